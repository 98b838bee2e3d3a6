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
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet", "checks": {}})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.native_kernels() is None
    assert native.native_status().startswith("off (no C compiler")
    logits, log_lib, log_r, flat, rows, values, _ = _problem(n=6, g=20, big=False)
    out = lk.nb_log_prob_sparse(logits.requires_grad_(), log_r, flat, rows, values, log_library=log_lib)
    assert type(out.grad_fn).__name__ == "_NBSparseBackward"


def test_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet", "checks": {}})
    monkeypatch.setenv("DGDCELL_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", (bad,))
    with caplog.at_level("WARNING", logger="dgdcell.nn.native"):
        assert native.native_kernels() is None
        assert native.checked_kernels("mixture") is None
    assert "RuntimeError" in native.native_status()
    assert "native kernels are off" in caplog.text
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
    monkeypatch.setattr(native, "_state", {"lib": None, "tried": False, "reason": "not loaded yet", "checks": {}})
    monkeypatch.setenv("DGDCELL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "FLAG_SETS", (["-O3", "-fno-math-errno", "-fopenmp-simd"],))
    assert native.native_kernels() is not None, native.native_status()
    assert native.native_status() == "on (compiled and checked)"  # the mixture kernels too
    logits, log_lib, log_r, flat, rows, values, _ = _problem(seed=3)
    weight = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    _close(_both(lk._NBSparseNative, logits, log_lib, log_r, flat, rows, values, weight),
           _both(lk._NBSparse, logits, log_lib, log_r, flat, rows, values, weight))


def _csr_minibatch(counts, batch):
    """The whole matrix ``counts`` (n, G) as CSR arrays and the row spans of
    cells ``batch`` in it: (start, length, int32 indices, float32 values, log factorials)."""
    rows, cols = counts.nonzero(as_tuple=True)
    length_all = torch.bincount(rows, minlength=counts.shape[0])
    start_all = length_all.cumsum(0) - length_all
    values = counts[rows, cols]
    log_fact = torch.zeros(counts.shape[0]).index_add_(0, rows, torch.lgamma(values + 1))
    return start_all[batch], length_all[batch], cols.to(torch.int32), values, log_fact[batch]


def _csr_both(logits, log_lib, log_r, start, length, indices, values, log_fact, weight):
    x, ll, lr = (t.clone().requires_grad_() for t in (logits, log_lib, log_r))
    out = lk.nb_log_prob_csr(x, lr, start, length, indices, values, log_fact, ll)
    return (out.detach(), *torch.autograd.grad((out * weight).sum(), (x, ll, lr)))


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_csr_rows_read_in_place_match_the_sliced_pytorch_path(seed, monkeypatch):
    """A minibatch of shuffled, repeated rows of a bigger CSR matrix, read in
    place by the kernels, gives the values and gradients of the PyTorch
    implementation on the same rows sliced out as COO triplets."""
    logits, log_lib, log_r, *_, counts = _problem(n=60, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.randperm(60, generator=gen)[:25], torch.tensor([0, 1, 0])])  # big counts, an empty row, repeats
    start, length, indices, values, log_fact = _csr_minibatch(counts, batch)
    weight = torch.rand(batch.shape[0], generator=gen) + 0.5
    x, ll = logits[batch], log_lib[batch]
    assert lk.csr_native_applies(x, ll, indices)
    native_calls = []
    monkeypatch.setattr(lk._NBCSRNative, "apply", lambda *a, _f=lk._NBCSRNative.apply: native_calls.append(1) or _f(*a))
    ours = _csr_both(x, ll, log_r, start, length, indices, values, log_fact, weight)
    assert native_calls
    sub = counts[batch]
    rows, cols = sub.nonzero(as_tuple=True)
    theirs = _both(lk._NBSparse, x, ll, log_r, rows * sub.shape[1] + cols, rows, sub[rows, cols], weight)
    _close(ours, theirs)


def test_csr_rows_without_the_kernels_give_the_same_result(monkeypatch):
    """With the kernels off (or int64 indices) nb_log_prob_csr gathers the rows
    itself and goes through the PyTorch path: the same numbers."""
    logits, log_lib, log_r, *_, counts = _problem(n=30, seed=3)
    batch = torch.tensor([5, 2, 2, 29, 1, 0])
    start, length, indices, values, log_fact = _csr_minibatch(counts, batch)
    weight = torch.linspace(0.5, 1.5, batch.shape[0])
    args = (logits[batch], log_lib[batch], log_r, start, length)
    reference = _csr_both(*args, indices, values, log_fact, weight)
    assert not lk.csr_native_applies(logits, log_lib, indices.long())
    _close(_csr_both(*args, indices.long(), values, log_fact, weight), reference)
    monkeypatch.setattr(native, "NATIVE_ON_CPU", False)
    _close(_csr_both(*args, indices, values, log_fact, weight), reference)


@pytest.mark.parametrize("native_on", [True, False])
def test_csr_rows_out_of_range_are_refused(native_on, monkeypatch):
    monkeypatch.setattr(native, "NATIVE_ON_CPU", native_on)
    logits, log_lib, log_r, *_, counts = _problem(n=10, g=40, seed=4, big=False)
    start, length, indices, values, log_fact = _csr_minibatch(counts, torch.arange(10))
    bad_start = start.clone()
    bad_start[-1] = indices.shape[0] - length[-1] + 1  # runs past the end
    bad_cols = indices.clone()
    bad_cols[3] = 40  # a column outside [0, G)
    for s, ind in ((bad_start, indices), (start, bad_cols)):
        with pytest.raises(ValueError, match="outside"):
            lk.nb_log_prob_csr(logits, log_r, s, length, ind, values, log_fact, log_lib)


@needs_kernels
def test_training_reads_minibatch_counts_in_place(monkeypatch):
    """The training objective takes the in-place path on the CPU (the counts
    are never sliced) and gives the sliced path's loss and gradients."""
    import anndata as ad
    import scipy.sparse as sp

    import dgdcell
    from dgdcell.train import batching, objective

    *_, counts = _problem(n=80, g=120, seed=5, big=False)
    counts[1] = 3.0  # every cell has counts
    adata = ad.AnnData(sp.csr_matrix(counts.numpy()))
    results = {}
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(objective, "_reads_rows_in_place", lambda *a: False)
        else:
            monkeypatch.setattr(batching.DeviceCounts, "batch", lambda *a: pytest.fail("counts were sliced"))
        model = dgdcell.DGD(n_components=2, init="zero", seed=0)
        model.fit(adata, max_epochs=2, early_stopping=False, verbose=False, batch_size=32)
        results[in_place] = np.array(model.history["train_loss"] + model.history["val_loss"])
        monkeypatch.undo()
    np.testing.assert_allclose(results[True], results[False], rtol=1e-5)


@needs_kernels
def test_a_family_that_fails_its_check_is_off_alone(monkeypatch, caplog):
    """When one family's check fails, that family uses PyTorch and the other stays on."""
    from dgdcell.latent import GaussianMixture

    monkeypatch.setitem(native._state, "checks", {})
    monkeypatch.setitem(native._CHECKS, "mixture", lambda lib: "broken on purpose")
    with caplog.at_level("WARNING", logger="dgdcell.nn.native"):
        status = native.native_status()
    assert status.startswith("on for NB") and status.endswith("(mixture off: broken on purpose)"), status
    assert "native mixture kernels are off (broken on purpose)" in caplog.text
    assert native.native_kernels() is not None and native.checked_kernels("Adam") is not None
    gmm = GaussianMixture(3, 2)
    out = gmm(torch.randn(4, 2, requires_grad=True))
    assert type(out.grad_fn).__name__ != "_MixtureNativeBackward"
