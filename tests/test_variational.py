"""Per-cell Normal posteriors, the ELBO, importance-sampled evidence and K chosen by evidence.

Generated data whose truth is known: a module built directly with a fixed
(linear) decoder and mixture, counts drawn from it, and the posteriors or
evidence compared with the truth (quadrature for log p(x), the generating
latent values for the intervals).
"""

from __future__ import annotations

import json
import math
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch
import torch.distributions as D

import dgdcell
import dgdcell._evidence
from dgdcell import DGD
from dgdcell.latent import NormalRepresentation, RepresentationLayer
from dgdcell.module import DGDModule, Minibatch, SparseCounts
from dgdcell.train import CellSet, DeviceCounts
from dgdcell.train.variational import (
    evidence_summary,
    fit_posteriors,
    importance_log_weights,
    laplace_log_std,
    with_posterior,
)

from .conftest import make_counts
from .reference import nb_log_prob


# --------------------------------------------------------------------------- generated truth
def _truth_module(dim: int, n_genes: int, k: int, seed: int) -> DGDModule:
    """A module with a linear decoder (no hidden layers: log fractions = log_softmax(W z + b)),
    dispersion 5 and a K-component isotropic mixture with well separated means."""
    gen = torch.Generator().manual_seed(seed)
    module = DGDModule(dim, {"rna": n_genes}, n_components=k, n_hidden=(), n_hidden_head=(),
                       covariance_type="isotropic", generator=gen)
    with torch.no_grad():
        lin = module.decoder.heads["rna"][-1]
        # orthogonal columns: the posterior's coordinates are nearly uncorrelated (a diagonal posterior fits)
        q, _ = torch.linalg.qr(torch.randn(n_genes, dim, generator=gen))
        lin.weight.copy_(q * (0.7 * math.sqrt(n_genes)))
        lin.bias.copy_(torch.randn(n_genes, generator=gen) * 0.5)
        module.decoder.likelihoods["rna"].log_r.fill_(math.log(5.0))
        module.gmm.mean.copy_(torch.randn(k, dim, generator=gen) * 2.0)
        module.gmm.neglogvar.fill_(-2 * math.log(0.6))
        module.gmm.weight.zero_()
    return module


def _draw_cells(module: DGDModule, n: int, seed: int, log_lib=(math.log(30), math.log(3000))):
    """Latent values from the module's mixture and NB counts (numpy) from its decoder at
    log-uniform library sizes; returns (z (n, L), CSR counts, library (n,))."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        g = module.gmm
        comp = torch.as_tensor(rng.choice(g.n_mix_comp, n, p=torch.softmax(g.weight, 0).numpy()))
        z = g.mean[comp] + g.stddev[comp] * torch.as_tensor(rng.normal(size=(n, g.dim)), dtype=torch.float32)
        frac = module.log_fractions(z, {})["rna"].exp().double().numpy()
        r = float(module.decoder.likelihoods["rna"].log_r.exp()[0])
    mu = frac * np.exp(rng.uniform(*log_lib, size=n))[:, None]
    x = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)
    return z, sp.csr_matrix(x), np.maximum(x.sum(1), 1.0)


def _cells(csr, library, z=None, log_std=None) -> CellSet:
    n, dim = csr.shape[0], (z.shape[1] if z is not None else 1)
    z = torch.zeros(n, dim) if z is None else z
    rep = RepresentationLayer(dim, n, z) if log_std is None else NormalRepresentation(dim, n, z, log_std)
    return CellSet(rep=rep, cov_reps={}, counts={"rna": DeviceCounts(csr, library, "cpu")})


# --------------------------------------------------------------------------- the objective
def test_elbo_terms_match_torch_distributions():
    module = DGDModule(3, {"rna": 12}, n_components=4, n_hidden=(8,), n_hidden_head=(8,),
                       generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    n, g = 5, 12
    x = torch.poisson(torch.rand(n, g, generator=gen) * 4, generator=gen)
    rows, cols = x.nonzero(as_tuple=True)
    lib = x.sum(1).clamp_min(1.0)
    counts = SparseCounts(rows * g + cols, rows, x[rows, cols], lib.log(), torch.lgamma(x + 1).sum(1))
    mean, log_std = torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen) * 0.3 - 1
    noise = torch.randn(4, n, 3, generator=gen)
    batch = Minibatch(z=mean, counts={"rna": counts}, log_std=log_std)
    with torch.no_grad():
        out = module.loss(batch, noise=noise)
        terms = module.sample_terms(batch, noise)
        q = D.Independent(D.Normal(mean, log_std.exp()), 1)
        zs = mean + log_std.exp() * noise  # (S, n, L)
        gm = module.gmm
        mix = D.MixtureSameFamily(D.Categorical(logits=gm.weight), D.Independent(D.Normal(gm.mean, gm.stddev), 1))
        log_r = module.decoder.likelihoods["rna"].log_r
        recon = torch.stack([-nb_log_prob(x, module.log_fractions(z, {})["rna"] + lib.log()[:, None], log_r).sum(1)
                             for z in zs])
    torch.testing.assert_close(terms.reconstruction["rna"], recon, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(terms.prior, -mix.log_prob(zs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.log_q, q.log_prob(zs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.entropy, q.entropy(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.distortion, recon.mean(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.rate, (-mix.log_prob(zs)).mean(0) - q.entropy(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(terms.log_weights, -recon - (-mix.log_prob(zs)) - q.log_prob(zs), rtol=1e-5, atol=1e-3)
    # a point batch (no log_std) is the MAP objective, unchanged
    point = module.loss(Minibatch(z=mean, counts={"rna": counts}))
    assert point.entropy is None and torch.equal(point.rate, point.prior)


def test_importance_sampled_evidence_matches_quadrature_and_bounds_the_elbo():
    module = _truth_module(1, 30, 2, seed=3)
    z_true, csr, library = _draw_cells(module, 12, seed=4, log_lib=(math.log(20), math.log(200)))
    # log p(x) by quadrature on a fine grid (the loss of every cell at every grid point)
    grid = torch.linspace(-12, 12, 4801).unsqueeze(1)
    cells = _cells(csr, library)
    with torch.no_grad():
        nll = torch.stack([module.loss(cells.minibatch(torch.full((grid.shape[0],), i), z=grid)).per_cell
                           for i in range(csr.shape[0])])  # (n, grid)
    log_px = torch.logsumexp(-nll, 1) + math.log(float(grid[1] - grid[0]))
    # the proposal: a Laplace approximation at each cell's mode
    mode = grid[nll.argmin(1)]
    cells = _cells(csr, library, mode)
    log_std = laplace_log_std(module, cells)
    q = with_posterior(cells, mode, log_std)
    est = evidence_summary(importance_log_weights(module, q, 4096, torch.Generator().manual_seed(0))[0])
    assert (est["log_evidence"] >= est["elbo"]).all()
    # a poorer proposal (off-centre, too wide) shows the rise with S: E[log mean_S exp w] grows with S
    # towards log p(x) (the mean over 20 repeats of every cell)
    poor = with_posterior(cells, mode + log_std.exp(), log_std + math.log(2.0))
    means = []
    for s in (1, 4, 16, 64, 256):
        w = importance_log_weights(module, poor, s * 20, torch.Generator().manual_seed(s))[0]
        runs = evidence_summary(w.view(20, s, -1))["log_evidence"]  # (20 repeats, n)
        means.append(float(runs.mean()))
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert float(log_px.mean()) - means[-1] < 0.25 * (float(log_px.mean()) - means[0]), (means, log_px.mean())
    err = (est["log_evidence"] - log_px).abs()
    assert (err <= 3 * est["log_evidence_se"] + 2e-3).all(), (err, est["log_evidence_se"])


def test_laplace_std_matches_the_curvature_of_a_gaussian_loss():
    """With a flat likelihood (no counts) the loss is the mixture alone: near a
    component's mean (one component dominates) the Laplace std is its sd."""
    module = _truth_module(2, 10, 1, seed=0)
    csr = sp.csr_matrix(np.zeros((3, 10), dtype=np.float32))
    cells = _cells(csr, np.ones(3), module.gmm.mean.detach().repeat(3, 1))
    got = laplace_log_std(module, cells).exp()
    torch.testing.assert_close(got, torch.full((3, 2), 0.6), rtol=1e-3, atol=1e-4)


def test_posterior_std_falls_with_library_and_intervals_cover_the_truth():
    # latent dimension 1: a diagonal posterior is then the exact family (in 2-D the coordinates' posterior
    # correlation, which a diagonal Normal ignores, brings the coverage down to 0.80-0.85)
    module = _truth_module(1, 60, 3, seed=1)
    z_true, csr, library = _draw_cells(module, 400, seed=2, log_lib=(math.log(100), math.log(3000)))
    # start at the truth's neighbourhood (a point fit), then fit the posteriors to the ELBO
    cells = _cells(csr, library, z_true + 0.05 * torch.randn(z_true.shape, generator=torch.Generator().manual_seed(0)))
    q = with_posterior(cells, cells.rep.z, torch.full_like(z_true, math.log(0.1)))
    fit_posteriors(module, q, max_epochs=200, lr=0.02, betas=(0.5, 0.7), batch_size=512, n_samples=4, patience=200,
                   generator=torch.Generator().manual_seed(0), lr_decay=0.98)
    std = q.rep.std.detach()
    rho = st.spearmanr(library, std.mean(1).numpy())[0]
    assert rho < -0.5, rho
    half = st.norm.ppf(0.95) * std
    inside = ((z_true - q.rep.z.detach()).abs() <= half).all(1).float()
    per_dim = ((z_true - q.rep.z.detach()).abs() <= half).float().mean()
    assert 0.85 <= float(per_dim) <= 0.95, float(per_dim)
    assert float(inside.mean()) > 0.7


# --------------------------------------------------------------------------- the model
def _clustered(k: int, seed: int, per_group: int = 50) -> ad.AnnData:
    """K groups of unequal sizes (shares ~ Dirichlet(2), at least 20 cells), each over-expressing
    its own block of genes (``conftest.make_counts``); the truth is ``obs['group']``."""
    rng = np.random.default_rng(seed)
    sizes = tuple(int(v) for v in np.maximum(rng.dirichlet(np.full(k, 2.0)) * per_group * k, 20))
    return make_counts(n_per_group=sizes, n_genes=8 * k + 20, seed=seed)


def test_normal_fit_writes_means_stds_and_history(synthetic):
    model = DGD(latent_dim=3, n_components=3, posterior="normal").fit(synthetic, max_epochs=15, guide_epochs=5,
                                                                       verbose=False)
    std = synthetic.obsm["X_dgd_std"]
    assert std.shape == synthetic.obsm["X_dgd"].shape and (std > 0).all()
    np.testing.assert_allclose(synthetic.obsm["X_dgd_cluster_probs"].sum(1), 1.0, rtol=1e-5)
    for key in ("train_rate", "train_elbo", "val_rate", "val_elbo"):
        assert len(model.history[key]) == len(model.history["epoch"])
    np.testing.assert_allclose(model.history["val_elbo"], -(np.asarray(model.history["val_reconstruction"])
                                                            + np.asarray(model.history["val_rate"])))
    # a seed gives identical results
    again = synthetic.copy()
    DGD(latent_dim=3, n_components=3, posterior="normal").fit(again, max_epochs=15, guide_epochs=5, verbose=False)
    np.testing.assert_array_equal(again.obsm["X_dgd_std"], std)


def test_score_map_and_normal_is_above_elbo_and_reproducible(synthetic):
    for posterior in ("map", "normal"):
        a = synthetic.copy()
        model = DGD(latent_dim=3, n_components=3, posterior=posterior).fit(a, max_epochs=10, verbose=False)
        before = a.obsm["X_dgd"].copy()
        model.score(a, n_samples=20, seed=3)
        ev, elbo = a.obs["dgd_log_evidence"].to_numpy(), a.obs["dgd_elbo"].to_numpy()
        assert np.isfinite(ev).all() and (ev >= elbo - 1e-4).all() and (a.obs["dgd_log_evidence_se"] >= 0).all()
        assert a.uns["dgd"]["score"]["proposal"] == ("laplace" if posterior == "map" else "posterior")
        np.testing.assert_array_equal(a.obsm["X_dgd"], before)
        first = ev.copy()
        model.score(a, n_samples=20, seed=3)
        np.testing.assert_array_equal(a.obs["dgd_log_evidence"].to_numpy(), first)


def test_settings_are_validated_with_the_fix_named(synthetic):
    with pytest.raises(ValueError, match="posterior must be one of"):
        DGD(posterior="laplace")
    with pytest.raises(ValueError, match="posterior_samples"):
        DGD(posterior="normal", posterior_samples=0)
    with pytest.raises(ValueError, match="n_components"):
        DGD(n_components="many")
    with pytest.raises(ValueError, match="at least two"):
        DGD(n_components=[3])
    with pytest.raises(ValueError, match="train_size < 1"):
        DGD(n_components="auto").fit(synthetic.copy(), train_size=1.0, verbose=False)
    model = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=3, verbose=False)
    with pytest.raises(ValueError, match="n_samples"):
        model.score(synthetic, n_samples=1)
    other = synthetic.copy()
    del other.obsm["X_dgd"]
    before = other.obs.copy()
    with pytest.raises(ValueError, match="transform"):
        model.score(other)
    pd.testing.assert_frame_equal(other.obs, before)


def test_save_load_round_trip_and_old_models_load_as_map(synthetic, tmp_path):
    model = DGD(latent_dim=3, n_components=3, posterior="normal").fit(synthetic, max_epochs=5, verbose=False)
    model.save(tmp_path / "m")
    back = DGD.load(tmp_path / "m", device="cpu")
    assert back.variational and torch.equal(back.representation_std, model.representation_std)
    # a model saved before the setting existed (no posterior keys) loads as MAP
    plain = DGD(latent_dim=3, n_components=3).fit(synthetic.copy(), max_epochs=3, verbose=False)
    plain.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("posterior", "posterior_samples"):
        cfg["init_args"].pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    old = DGD.load(tmp_path / "old", device="cpu")
    assert not old.variational and old.representation_std is None


def test_transform_normal_with_covariates_and_two_modalities():
    rna = make_counts(n_per_group=(50, 40, 30), n_batches=2, batch_effect=0.3, seed=2)
    adt = make_counts(n_per_group=(50, 40, 30), n_genes=12, n_batches=2, seed=3)
    var = pd.concat([rna.var.assign(modality="rna"), adt.var.set_axis([f"adt{j}" for j in range(12)])
                     .assign(modality="adt")])
    both = ad.AnnData(sp.hstack([rna.X, adt.X]).tocsr(), obs=rna.obs.copy(), var=var)
    model = DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], modality_key="modality",
                posterior="normal", posterior_samples=2).fit(both, max_epochs=8, verbose=False)
    new = both[:40].copy()
    model.transform(new, max_epochs=10, verbose=False)
    assert new.obsm["X_dgd_std"].shape == (40, 3) and (new.obsm["X_dgd_std"] > 0).all()
    assert "posterior_history" in new.uns["dgd"]["transform"]
    model.score(new, n_samples=8)
    assert np.isfinite(new.obs["dgd_log_evidence"]).all()
    assert (new.obs["dgd_log_evidence"] >= new.obs["dgd_elbo"] - 1e-4).all()


@pytest.mark.usefixtures("no_figure_leak")
def test_n_components_auto_writes_the_curve_and_the_chosen_k(tmp_path):
    a = _clustered(3, seed=0)
    model = DGD(latent_dim=4, n_components=[2, 3, 4, 5]).fit(a, verbose=False)  # the default epoch cap
    rec = a.uns["dgd"]["n_components"]
    assert model.gmm.n_mix_comp == rec["chosen"] == model.fit_settings["n_components"] == 3
    assert list(rec["candidates"]) == [2, 3, 4, 5] and len(rec["log_evidence"]) == 4
    assert a.obs["dgd_cluster"].cat.categories.size == rec["chosen"]
    model.save(tmp_path / "auto")
    back = DGD.load(tmp_path / "auto", device="cpu")
    assert back.gmm.n_mix_comp == rec["chosen"] and back.init_args["n_components"] == [2, 3, 4, 5]
    fig = dgdcell.pl.evidence_curve(a)
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "components K"
    curve = dgdcell._evidence.evidence_frame(rec)
    assert curve.chosen.sum() == 1 and int(curve.loc[curve.chosen, "n_components"].iloc[0]) == rec["chosen"]
    with pytest.raises(ValueError, match="n_components='auto'"):
        dgdcell.pl.evidence_curve(_clustered(3, seed=1))


def test_tl_evidence_curve_returns_the_curve():
    a = _clustered(3, seed=2)
    curve = dgdcell.tl.evidence_curve(a, n_components=[2, 4], latent_dim=3, max_epochs=5, guide_epochs=2,
                                      verbose=False)
    assert list(curve.n_components) == [2, 4] and curve.chosen.sum() == 1
    assert a.uns["dgd"]["params"]["n_components"] is not None and "X_dgd" in a.obsm


def test_one_se_rule_picks_the_smallest_k_near_the_best():
    from dgdcell._evidence import one_se_choice

    rng = np.random.default_rng(0)
    base = rng.normal(-100, 5, 200)
    table = np.stack([base - 3, base - 1, base, base + 0.01, base + rng.normal(0.02, 0.5, 200)])
    k, means, se = one_se_choice(table, [2, 3, 4, 5, 6])
    assert k == 4 and means.shape == (5,) and se[int(np.argmax(means))] == 0


@pytest.mark.skipif(not os.environ.get("DGDCELL_SLOW"), reason="about 60 s: run with DGDCELL_SLOW=1")
@pytest.mark.xfail(reason="measured 4 of 5 exact with two torch threads and model seed 0 (2-4 of 5 over five runs: two "
                          "thread counts, model seeds 0-2); the BIC under-splits K = 9-12; see docs/posteriors.md",
                   strict=False)
def test_n_components_auto_recovers_the_true_k():
    hits = []
    for seed, k in enumerate((3, 5, 7, 9, 12)):
        model = DGD(latent_dim=4, n_components=list(range(2, 16)))
        curve = model.select_n_components(_clustered(k, seed), verbose=False)  # the default epoch cap
        hits.append(int(curve.loc[curve.chosen, "n_components"].iloc[0]) == k)
    assert sum(hits) >= 4, hits


def test_bic_curve_peaks_at_the_true_number_of_clusters():
    from dgdcell._evidence import bic_curve

    rng = np.random.default_rng(0)
    # four elongated, correlated clusters: a full covariance follows them, a diagonal one would need more
    rot = np.array([[1.0, 0.9], [0.9, 1.0]])
    z = np.concatenate([c + rng.normal(size=(n, 2)) @ rot * 0.3 for c, n in
                        zip(([0, 0], [4, 0], [0, 4], [4, 4]), (200, 120, 60, 30))])
    ks = [1, 2, 3, 4, 5, 6, 8]
    curve = bic_curve(z, ks, seed=0)
    assert ks[int(np.nanargmax(curve))] == 4 and np.isfinite(curve).all()
    assert np.array_equal(curve, bic_curve(z, ks, seed=0))  # seeded
    assert np.isnan(bic_curve(z[:5], [2, 8], seed=0)[1])  # more components than points: not fitted


def test_fit_mixture_keeps_the_best_of_its_kmeans_starts():
    from dgdcell.latent import GaussianMixture
    from dgdcell.train.variational import fit_mixture

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [6.0, 6.0]])
    sizes = [400, 20, 20, 200, 15]
    z = torch.as_tensor(np.concatenate([c + 0.4 * rng.normal(size=(s, 2)) for c, s in zip(centres, sizes)]),
                        dtype=torch.float32)
    template = GaussianMixture(5, 2, "diagonal")
    gen = torch.Generator().manual_seed(3)
    singles = [float(fit_mixture(template, z, 5, generator=gen, n_init=1).log_prob(z).mean()) for _ in range(5)]
    best = fit_mixture(template, z, 5, generator=torch.Generator().manual_seed(3), n_init=5)
    assert float(best.log_prob(z).mean()) == pytest.approx(max(singles))
    assert max(singles) > min(singles) + 0.05  # the starts differ: the choice matters
    with pytest.raises(ValueError, match="n_init"):
        fit_mixture(template, z, 5, n_init=0)
