"""The model module: the objective's terms against reference formulas, and no process-wide side effects."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributions as D

from dgdcell import DGD
from dgdcell.module import DGDModule, Minibatch, SparseCounts

from .conftest import make_counts
from .reference import nb_log_prob


def _module(cov_classes=None, generator_seed=0):
    return DGDModule(3, {"rna": 12}, {"rna": "nb"}, cov_classes or {}, n_components=4, n_hidden=(8,),
                     n_hidden_head=(8,), generator=torch.Generator().manual_seed(generator_seed))


def _batch(module, n=6, g=12, seed=0, cov=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 4, generator=gen)
    x[0, 0] = 40.0  # a count beyond the lgamma table
    rows, cols = x.nonzero(as_tuple=True)
    lib = x.sum(1).clamp_min(1.0)
    counts = SparseCounts(rows * g + cols, rows, x[rows, cols], lib.log(), torch.lgamma(x + 1).sum(1))
    z = torch.randn(n, 3, generator=gen)
    covs = {"batch": torch.randn(n, 2, generator=gen)} if cov else {}
    codes = {"batch": torch.tensor([0, 1, -1, 0, 1, -1][:n])} if cov else {}
    return x, lib, Minibatch(z=z, cov=covs, counts={"rna": counts}, cov_codes=codes)


def test_loss_terms_match_reference_formulas():
    module = _module({"batch": 2})
    x, lib, batch = _batch(module, cov=True)
    with torch.no_grad():
        out = module.loss(batch, prior_scale=0.25)
        log_frac = module.log_fractions(batch.z, batch.cov)["rna"]
        want_recon = -nb_log_prob(x, log_frac + lib.log().unsqueeze(1), module.decoder.likelihoods["rna"].log_r).sum(1)
        g = module.gmm
        mix = D.MixtureSameFamily(D.Categorical(logits=g.weight), D.Independent(D.Normal(g.mean, g.stddev), 1))
        cg = module.cov_gmms["batch"]
        comp = D.Independent(D.Normal(cg.mean, cg.stddev), 1).log_prob(batch.cov["batch"].unsqueeze(1))  # (n, K)
        codes = batch.cov_codes["batch"]
        logw = torch.log_softmax(cg.weight, 0)
        own = comp.gather(1, codes.clamp_min(0).unsqueeze(1)).squeeze(1)  # one component per class
        cov_lp = torch.where(codes >= 0, own, torch.logsumexp(comp + logw, 1))
        want_prior = -mix.log_prob(batch.z) - cov_lp
    torch.testing.assert_close(out.reconstruction["rna"], want_recon, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.prior, want_prior, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.per_cell, want_recon + want_prior, rtol=1e-5, atol=1e-4)
    want_param = -0.25 * (g.prior_log_prob() + cg.prior_log_prob())
    torch.testing.assert_close(out.parameter_prior, want_param)
    torch.testing.assert_close(out.loss, out.per_cell.sum() + want_param)
    assert module.loss(batch).parameter_prior.item() == 0.0  # representation-only passes skip the priors


def test_guided_prior_is_the_guide_component_alone():
    module = _module()
    _, _, batch = _batch(module)
    batch.guide = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        guided = module.loss(batch, guided=True).prior
        comp = module.gmm.component_log_prob(batch.z)
    torch.testing.assert_close(guided, -comp[torch.arange(6), batch.guide])


def test_module_initial_values_come_from_the_generator_only():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = _module(generator_seed=5), _module(generator_seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was neither read into nor advanced
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = _module(generator_seed=6)
    assert not torch.equal(a.decoder.heads["rna"][1].weight, c.decoder.heads["rna"][1].weight)


def test_fit_and_transform_leave_process_state_alone():
    adata = make_counts(n_per_group=(40, 30, 30), n_genes=30, n_batches=2, batch_effect=0.3)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    threads = torch.get_num_threads()
    model = DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], seed=1).fit(adata, max_epochs=4,
                                                                                    verbose=False)
    model.transform(adata[:20].copy(), verbose=False, max_epochs=3)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == mkldnn
    assert torch.get_num_threads() == threads
    again = DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], seed=1).fit(adata.copy(), max_epochs=4,
                                                                                    verbose=False)
    np.testing.assert_array_equal(model.get_latent_representation(), again.get_latent_representation())


def test_mixture_covariance_and_stddev_are_properties():
    g = _module().gmm
    assert g.stddev.detach().shape == (4, 3) and g.covariance.detach().shape == (4, 3)
    torch.testing.assert_close(g.covariance, g.stddev.square())


def test_fit_prints_a_summary_unless_quiet(capsys):
    adata = make_counts(n_per_group=(30, 30), n_genes=20)
    DGD(latent_dim=2, n_components=2).fit(adata, max_epochs=3, guide_epochs=1)
    out = capsys.readouterr().out
    assert "fitted 60 cells in 3 epochs" in out and "cells per cluster" in out and "epoch cap (3)" in out
    DGD(latent_dim=2, n_components=2).fit(adata, max_epochs=3, verbose=False)
    assert capsys.readouterr().out == ""


def test_adam_falls_back_when_fused_is_refused(monkeypatch):
    # torch < 2.4 has no fused CPU Adam: the refusal must not leave "fused" in the groups of the fallback
    from dgdcell.train.loop import adam

    real = torch.optim.Adam

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            for group in params:
                if isinstance(group, dict):
                    group["fused"] = True  # what torch's constructor does before it refuses
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    w = torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [w], "lr": 0.1}]
    opt = adam(groups, 0.1, (0.5, 0.7))
    assert not opt.param_groups[0].get("fused") and "fused" not in groups[0]
    w.grad = torch.ones(3)
    opt.step()
    assert (w < 1).all()
