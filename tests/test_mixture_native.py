"""The native mixture-prior kernels (dgdcell/latent/mixture_kernels.c) agree with
the PyTorch implementation and with torch.distributions, for every covariance
type and log-weight mode, on one thread and on several."""

from __future__ import annotations

import pytest
import torch
import torch.distributions as D

from dgdcell.latent import GaussianMixture, GaussianMixtureSupervised
from dgdcell.latent import gmm as gmm_module
from dgdcell.nn import native

needs_kernels = pytest.mark.skipif(native.checked_kernels("mixture") is None,
                                   reason=f"native kernels: {native.native_status()}")


def _mixture(cls=GaussianMixture, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    gmm = cls(**kw)
    with torch.no_grad():
        gmm.mean.copy_(torch.randn(gmm.mean.shape, generator=gen) * 2)
        gmm.neglogvar.copy_(torch.randn(gmm.neglogvar.shape, generator=gen) * 0.5)
        gmm.weight.copy_(torch.randn(gmm.weight.shape, generator=gen))
    return gmm


def _value_and_grads(fn, gmm, x, weight):
    """``fn(x)`` and the gradients of ``(fn(x) * weight).sum()`` for x and the
    mixture's learnable parameters."""
    x = x.clone().requires_grad_()
    out = fn(x)
    params = [x] + [p for p in (gmm.mean, gmm.neglogvar, gmm.weight) if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    return (out.detach(), *(torch.zeros(()) if g is None else g for g in grads))


def _compare(fn, gmm, x, weight, monkeypatch, rtol=1e-5):
    """Native against PyTorch (the kernels switched off), values and gradients;
    returns the native value."""
    ours = _value_and_grads(fn, gmm, x, weight)
    with monkeypatch.context() as m:
        m.setattr(native, "NATIVE_ON_CPU", False)
        theirs = _value_and_grads(fn, gmm, x, weight)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        scale = b.abs().max().clamp_min(1.0)
        assert float((a - b).abs().max() / scale) < rtol
    return ours[0]


@needs_kernels
@pytest.mark.parametrize("cov", ["diagonal", "isotropic", "fixed"])
def test_mixture_negative_log_density_with_parameter_priors(cov, monkeypatch):
    gmm = _mixture(n_mix_comp=6, dim=5, covariance_type=cov, weight_alpha=2.0)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1)) * 3
    weight = torch.linspace(0.5, 2.0, 40)
    out = gmm(x.requires_grad_(), prior_scale=0.2)
    assert type(out.grad_fn).__name__ == "_MixtureNativeBackward"  # the kernels are in use
    _compare(lambda z: gmm(z, prior_scale=0.2), gmm, x.detach(), weight, monkeypatch)
    _compare(lambda z: gmm(z, prior_scale=0.0), gmm, x.detach(), weight, monkeypatch)
    _compare(lambda z: gmm.log_prob(z), gmm, x.detach(), weight, monkeypatch)
    _compare(lambda z: gmm.prior_log_prob() * z.sum(), gmm, x.detach()[:1], torch.ones(1), monkeypatch)


@needs_kernels
def test_mixture_log_density_matches_torch_distributions():
    gmm = _mixture(n_mix_comp=4, dim=3, covariance_type="diagonal")
    x = torch.randn(25, 3, generator=torch.Generator().manual_seed(2)) * 2
    ref = D.MixtureSameFamily(
        D.Categorical(logits=gmm.weight.detach().double()),
        D.Independent(D.Normal(gmm.mean.detach().double(), gmm.stddev().detach().double()), 1),
    ).log_prob(x.double())
    torch.testing.assert_close(gmm.log_prob(x).detach().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-gmm(x, prior_scale=0.0).detach().double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_log_weights_per_row_labels_and_guides(monkeypatch):
    """Supervised mixtures (log weights per row, -inf outside a cell's class) and
    the guided phase (one component per cell) take the kernels' per-row mode."""
    sup = _mixture(GaussianMixtureSupervised, Nclass=3, Ncompperclass=2, dim=4, covariance_type="isotropic")
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(3)) * 2
    labels = torch.tensor([-1, 0, 1, 2, 2] * 6)
    weight = torch.rand(30, generator=torch.Generator().manual_seed(4)) + 0.5
    _compare(lambda z: sup(z, labels, prior_scale=0.5), sup, x, weight, monkeypatch)
    guide = torch.arange(30) % 6
    _compare(lambda z: sup.component_log_prob_of(z, guide), sup, x, weight, monkeypatch)
    expected = sup.component_log_prob(x).gather(1, guide.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(sup.component_log_prob_of(x, guide).detach(), expected.detach(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_many_rows_run_in_parallel_and_agree_across_thread_counts(monkeypatch):
    """Above the kernels' work threshold rows run on all threads: the same
    values as one thread (sums over rows in float64, added in thread order)
    and as PyTorch."""
    gmm = _mixture(n_mix_comp=10, dim=20)
    x = torch.randn(3000, 20, generator=torch.Generator().manual_seed(5)) * 3  # 3000 * 10 * 20 > 2^18
    weight = torch.rand(3000, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(threads, 2)):
        torch.set_num_threads(n)
        try:
            results.append(_compare(lambda z: gmm(z, prior_scale=0.01), gmm, x, weight, monkeypatch, rtol=2e-5))
            results.append(_value_and_grads(lambda z: gmm(z, prior_scale=0.01), gmm, x, weight))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(results[1], results[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_float64_and_extreme_inputs():
    """float64 stays on PyTorch; far-away points (every component's density
    underflows) keep finite values and gradients."""
    gmm = _mixture(n_mix_comp=3, dim=2)
    x64 = torch.randn(5, 2, dtype=torch.float64)
    assert gmm_module._native_lib(x64, gmm.mean) is None
    far = torch.full((3, 2), 1e4, requires_grad=True)
    out = gmm(far, prior_scale=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(far.grad).all()
    assert torch.isfinite(gmm.mean.grad).all() and torch.isfinite(gmm.weight.grad).all()
