"""The native CPU kernels of the NB likelihood agree with the PyTorch implementation,
refuse what they cannot take, and fall back cleanly when they cannot be built."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

import dgdcell.nn.likelihoods as lk
from dgdcell.nn import native

needs_kernels = pytest.mark.skipif(native.native_kernels() is None, reason=f"native kernels: {native.native_status()}")


def _problem(n=40, g=300, seed=0, big=True):
    """Logits, log library sizes, log dispersions and sparse counts drawn from that model."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, g, generator=gen) * 2
    log_lib = torch.rand(n, generator=gen) * 4 + 5
    log_r = torch.randn(g, generator=gen) * 1.5
    mu = torch.softmax(logits, 1) * log_lib.exp().unsqueeze(1)
    counts = torch.poisson(mu, generator=gen)
    if big:
        counts[0, :4] = torch.tensor([5000.0, 17.0, 16.0, 1.0])  # beyond the tables, at their edge
    counts[1] = 0  # a row without counts
    rows, cols = counts.nonzero(as_tuple=True)
    return logits, log_lib, log_r, rows * g + cols, rows, counts[rows, cols], counts


def _both(fn, logits, log_lib, log_r, flat, rows, values, weight):
    """Values and (logit, library, dispersion) gradients of ``fn`` (an NB autograd Function)."""
    x, ll, lr = (t.clone().requires_grad_() for t in (logits, log_lib, log_r))
    lf = torch.zeros(logits.shape[0]).index_add_(0, rows, torch.lgamma(values + 1))
    out = fn.apply(x, ll, lr, flat, rows, values, lf)
    grads = torch.autograd.grad((out * weight).sum(), (x, ll, lr))
    return (out.detach(), *grads)


def _close(ours, theirs, rtol=2e-5):
    for a, b in zip(ours, theirs):
        scale = b.abs().max().clamp_min(1.0)
        assert float((a - b).abs().max() / scale) < rtol


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_native_matches_pytorch_values_and_gradients(seed):
    logits, log_lib, log_r, flat, rows, values, _ = _problem(seed=seed)
    weight = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(seed)) + 0.5
    _close(_both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight),
           _both(lk._NBSparse, logits, log_lib, log_r, flat, rows, values, weight))


@needs_kernels
def test_native_log_likelihood_matches_scipy():
    logits, log_lib, log_r, flat, rows, values, counts = _problem(n=12, g=50)
    mu = (torch.softmax(logits.double(), 1) * log_lib.double().exp().unsqueeze(1)).numpy()
    r = log_r.double().exp().numpy()
    ref = st.nbinom.logpmf(counts.numpy(), r, r / (r + mu)).sum(1)
    lf = torch.zeros(12).index_add_(0, rows, torch.lgamma(values + 1))
    ours = lk._NBSparseNative.apply(logits, log_lib, log_r, flat, rows, values, lf).numpy()
    theirs = lk._NBSparse.apply(logits, log_lib, log_r, flat, rows, values, lf).numpy()
    # float32 inputs: both implementations are off float64 by a few 1e-5 relative here
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert np.abs(ours - ref).max() <= 2 * np.abs(theirs - ref).max() + 1e-3


@needs_kernels
def test_native_is_used_for_float32_logits_and_frozen_parameters():
    """Representation-only passes (dispersions and library sizes frozen) take the
    kernels and give PyTorch's logit gradient; float64 takes the PyTorch path."""
    logits, log_lib, log_r, flat, rows, values, _ = _problem()
    weight = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(5)) + 0.5
    grads = []
    for cls in (lk._NBSparseNative, lk._NBSparse):
        x = logits.clone().requires_grad_()
        lf = torch.zeros(logits.shape[0]).index_add_(0, rows, torch.lgamma(values + 1))
        out = cls.apply(x, log_lib, log_r, flat, rows, values, lf)
        grads.append((out.detach(), *torch.autograd.grad((out * weight).sum(), [x])))
    _close(*grads)
    x = logits.clone().requires_grad_()
    out = lk.nb_log_prob_sparse(x, log_r, flat, rows, values, log_library=log_lib)
    assert type(out.grad_fn).__name__ == "_NBSparseNativeBackward"
    torch.testing.assert_close(out.detach(), grads[1][0], rtol=2e-5, atol=1e-2)
    out64 = lk.nb_log_prob_sparse(logits.double().requires_grad_(), log_r.double(), flat, rows, values.double(), log_library=log_lib.double())
    assert type(out64.grad_fn).__name__ == "_NBSparseBackward"


@needs_kernels
def test_native_refuses_unordered_nonzeros_and_the_result_stays_right():
    logits, log_lib, log_r, flat, rows, values, _ = _problem()
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    lf = torch.zeros(logits.shape[0]).index_add_(0, rows, torch.lgamma(values + 1))
    assert native.nb_forward(native.native_kernels(), logits, log_lib, log_r, rows[perm], flat[perm], values[perm], lf) is None
    weight = torch.ones(logits.shape[0])
    _close(_both(lk._NBSparseNative, logits, log_lib, log_r, flat[perm], rows[perm], values[perm], weight),
           _both(lk._NBSparse, logits, log_lib, log_r, flat, rows, values, weight))


@needs_kernels
def test_native_is_deterministic_and_agrees_across_thread_counts():
    logits, log_lib, log_r, flat, rows, values, _ = _problem(n=64, g=500)
    weight = torch.ones(64)
    first = _both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight)
    again = _both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight)
    finally:
        torch.set_num_threads(threads)
    _close(single, first, rtol=1e-6)


@needs_kernels
def test_native_stays_finite_at_extremes():
    """Huge library sizes, tiny and huge dispersions, very negative logits."""
    logits, log_lib, log_r, flat, rows, values, _ = _problem(n=8, g=40)
    logits[2] = -60.0
    logits[2, 0] = 30.0
    log_lib[3] = 25.0
    log_r[:5] = -20.0
    log_r[5:10] = 12.0
    weight = torch.ones(8)
    ours = _both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight)
    assert all(torch.isfinite(t).all() for t in ours)
    _close(ours, _both(lk._NBSparse, logits, log_lib, log_r, flat, rows, values, weight), rtol=1e-4)


def test_no_compiler_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet"})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.native_kernels() is None
    assert native.native_status().startswith("off (no C compiler")
    logits, log_lib, log_r, flat, rows, values, _ = _problem(n=6, g=20, big=False)
    out = lk.nb_log_prob_sparse(logits.requires_grad_(), log_r, flat, rows, values, log_library=log_lib)
    assert type(out.grad_fn).__name__ == "_NBSparseBackward"


def test_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet"})
    monkeypatch.setenv("DGDCELL_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with caplog.at_level("WARNING", logger="dgdcell.nn.native"):
        assert native.native_kernels() is None
    assert "RuntimeError" in native.native_status()
    assert "native NB kernels are off" in caplog.text
    assert not list(tmp_path.glob("nb_kernels-*"))  # nothing half-built is left for later runs


def test_switch_off(monkeypatch):
    monkeypatch.setattr(native, "NATIVE_ON_CPU", False)
    assert native.native_kernels() is None
    assert native.native_status() == "off (switched off)"


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_kernels_build_and_pass_their_check_where_a_compiler_exists():
    """CI machines have gcc: the kernels must be in use there, not silently skipped."""
    assert native.native_kernels() is not None, native.native_status()
    assert native.native_status() == "on (compiled and checked)"


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_a_build_without_openmp_threads_is_right_too(monkeypatch, tmp_path):
    """Compilers without OpenMP (Apple's clang) get a one-thread build: the same results."""
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet"})
    monkeypatch.setenv("DGDCELL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "FLAG_SETS", (["-O3", "-fno-math-errno", "-fopenmp-simd"],))
    assert native.native_kernels() is not None, native.native_status()
    logits, log_lib, log_r, flat, rows, values, _ = _problem(seed=3)
    weight = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    _close(_both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight),
           _both(lk._NBSparse, logits, log_lib, log_r, flat, rows, values, weight))
