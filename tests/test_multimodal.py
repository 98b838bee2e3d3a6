"""Several modalities (MuData, var-keyed AnnData), mosaic cells, Bernoulli features,
protein prediction, several covariates and counterfactual decoding."""

from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from dgdcell import DGD
from dgdcell.data import read_data
from dgdcell.nn import bernoulli_log_prob_sparse

from .conftest import make_counts

DATA = Path(__file__).parent / "data"
FAST = dict(max_epochs=30, verbose=False)


def make_cite(n_per_group=(70, 50, 40), n_proteins=8, seed=0, adt_seed=1):
    """MuData: RNA from :func:`make_counts` and a protein panel whose profile depends on the group."""
    rna = make_counts(n_per_group=n_per_group, seed=seed)
    rng = np.random.default_rng(adt_seed)
    groups = rna.obs["group"].cat.codes.to_numpy()
    profiles = rng.gamma(2.0, 1.0, size=(len(n_per_group), n_proteins))
    for g in range(len(n_per_group)):
        profiles[g, g * 2 : g * 2 + 2] *= 10.0
    frac = profiles[groups] / profiles[groups].sum(1, keepdims=True)
    mu = frac * rng.lognormal(np.log(2000), 0.3, size=(rna.n_obs, 1))
    counts = rng.negative_binomial(10.0, 10.0 / (10.0 + mu)).astype(np.float32)
    adt = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=rna.obs_names),
                     var=pd.DataFrame(index=[f"prot{j}" for j in range(n_proteins)]))
    mdata = md.MuData({"rna": rna, "adt": adt})
    mdata.obs["group"] = rna.obs["group"].to_numpy()
    mdata.obs["batch"] = rna.obs["batch"].to_numpy()
    return mdata


def as_var_keyed(mdata) -> ad.AnnData:
    """The same data as one AnnData whose ``var['modality']`` names each feature's modality."""
    mods = list(mdata.mod)
    X = sp.hstack([mdata.mod[m].X for m in mods]).tocsr()
    var = pd.DataFrame({"modality": pd.Categorical(np.concatenate([[m] * mdata.mod[m].n_vars for m in mods]),
                                                   categories=mods)},
                       index=np.concatenate([mdata.mod[m].var_names for m in mods]))
    return ad.AnnData(X, obs=mdata.obs[["group", "batch"]].copy(), var=var)


@pytest.fixture(scope="module")
def cite_fit():
    mdata = make_cite()
    model = DGD(latent_dim=5, n_components=3, seed=0).fit(mdata, **FAST)
    return mdata, model


def test_mudata_fit_writes_joint_outputs(cite_fit):
    mdata, model = cite_fit
    assert set(model.features) == {"rna", "adt"}
    assert mdata.obsm["X_dgd"].shape == (mdata.n_obs, 5)
    assert mdata.obsm["X_dgd_cluster_probs"].shape == (mdata.n_obs, 3)
    assert adjusted_rand_score(mdata.obs["group"], mdata.obs["dgd_cluster"]) > 0.95
    assert "dgd" in mdata.uns and mdata.uns["dgd"]["fit"]["modalities"] == ["rna", "adt"]
    for mod in mdata.mod.values():  # the modalities' own AnnData are untouched
        assert "X_dgd" not in mod.obsm


def test_var_keyed_anndata_equals_mudata(cite_fit):
    mdata, model = cite_fit
    adata = as_var_keyed(mdata)
    other = DGD(latent_dim=5, n_components=3, seed=0, modality_key="modality").fit(adata, **FAST)
    assert other.features == model.features
    np.testing.assert_array_equal(adata.obsm["X_dgd"], mdata.obsm["X_dgd"])


def test_each_modality_gets_its_head_library_and_likelihood(cite_fit):
    mdata, model = cite_fit
    data = read_data(mdata)
    np.testing.assert_allclose(data.library["adt"], np.asarray(mdata.mod["adt"].X.sum(1)).ravel())
    assert set(model.decoder.heads) == {"rna", "adt"}
    assert model.decoder.likelihoods["adt"].log_r.shape == (8,)
    expr = model.get_normalized_expression(modality="adt")
    assert list(expr.columns) == list(mdata.mod["adt"].var_names)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)


def test_predict_modality_for_rna_only_query(cite_fit):
    mdata, model = cite_fit
    query = make_cite(n_per_group=(30, 30, 30), seed=5)  # same profiles (adt_seed), new cells
    rna = query.mod["rna"].copy()
    model.transform(rna, verbose=False)
    assert adjusted_rand_score(query.obs["group"], rna.obs["dgd_cluster"]) > 0.9
    pred = model.predict_modality(rna, "adt")
    assert pred.shape == (rna.n_obs, 8) and list(pred.index) == list(rna.obs_names)
    # geometric means of fractions: under one temperature each row sums to at most 1 (Jensen), under
    # the features' own temperatures near 1; the arithmetic means sum to exactly 1
    one = model.predict_modality(rna, "adt", temperature=2.0)
    assert (one.sum(1) <= 1 + 1e-5).all() and (one.sum(1) > 0.5).all()
    assert np.abs(pred.sum(1) - 1).max() < 0.1
    mean = model.predict_modality(rna, "adt", average="arithmetic")
    np.testing.assert_allclose(mean.sum(1), 1.0, rtol=1e-4)
    assert (pred.to_numpy() <= mean.to_numpy() * (1 + 1e-4)).mean() > 0.5
    counts = model.predict_modality(rna, "adt", library_size=2000.0)
    np.testing.assert_allclose(counts.to_numpy(), 2000.0 * pred.to_numpy(), rtol=1e-4)
    truth = query.mod["adt"].X.toarray()
    truth = truth / truth.sum(1, keepdims=True)
    rho = [spearmanr(pred.iloc[:, j], truth[:, j]).statistic for j in range(8)]
    assert np.mean(rho) > 0.5  # predicted from RNA alone
    # after fit too: the training cells' own decoded proteins (measured in the modality: decoded at their points)
    np.testing.assert_array_equal(model.predict_modality(mdata, "adt").to_numpy(),
                                  model.get_normalized_expression(mdata, modality="adt").to_numpy())
    with pytest.raises(ValueError, match="modality="):
        model.predict_modality(rna)


def _brute_force_nll(model, query):
    """(cells, training points) negative log-likelihood of the query's counts at every training
    representation, through the module's loss."""
    from dgdcell._evidence import _cells
    from dgdcell.data import read_new_data

    new = read_new_data(query, model.features, None, model.covariate_categories, 0.0)
    ref = model.representation
    n, r = new.data.n_obs, ref.shape[0]
    rows = np.repeat(np.arange(n), r)
    z = torch.zeros(n, model.latent_dim)
    cells = _cells(model, new.data, rows, z, {})
    cells.rep.z.data.copy_(ref.repeat(n, 1))
    with torch.no_grad():
        out = model.module.loss(cells.minibatch(torch.arange(n * r), z=cells.rep.z, cov={}))
    return out.reconstruction_total.view(n, r).double()


def _brute_force_empirical(model, rna, modality, temperature=1.0, nll=None, average="geometric"):
    """The empirical-prior estimate of ``predict_modality`` written out: every query cell's RNA
    negative log-likelihood at every training representation, softmax of it over ``-temperature``,
    then the weighted geometric (``exp`` of the weighted mean log) or arithmetic mean of the decoded
    fractions."""
    nll = _brute_force_nll(model, rna) if nll is None else nll
    with torch.no_grad():
        log_frac = model.module.log_fractions(model.representation, {}, [modality])[modality].double()
    vals = log_frac if average == "geometric" else torch.exp(log_frac)
    if np.ndim(temperature):  # one per feature: each column under its own weights
        out = np.stack([(torch.softmax(-nll / t, 1) @ vals[:, j]).numpy() for j, t in enumerate(temperature)], 1)
    else:
        out = (torch.softmax(-nll / temperature, 1) @ vals).numpy()
    return np.exp(out) if average == "geometric" else out


def test_predict_modality_empirical_prior_is_the_posterior_mean_over_training_points(cite_fit, tmp_path):
    mdata, model = cite_fit
    query = make_cite(n_per_group=(10, 10, 10), seed=6)
    rna = query.mod["rna"].copy()
    before = rna.copy()
    got = model.predict_modality(rna, "adt", method="empirical")
    nll = _brute_force_nll(model, rna)
    # by default each protein under the temperature fit chose for it
    temperature = model.fit_settings["prediction_feature_temperature"]["adt"]
    assert len(temperature) == len(model.features["adt"]) and len(set(temperature)) > 1
    # the weighted geometric mean of the decoded fractions (not rescaled)
    assert model.fit_settings["prediction_average"] == "geometric"
    expected = _brute_force_empirical(model, rna, "adt", temperature, nll)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=2e-3, atol=1e-6)
    for t in (1.0, 4.0):  # any temperature asked for
        np.testing.assert_allclose(model.predict_modality(rna, "adt", temperature=t).to_numpy(),
                                   _brute_force_empirical(model, rna, "adt", t, nll), rtol=2e-3, atol=1e-6)
    # the arithmetic mean on request, rescaled to fractions where the features' temperatures differ
    arithmetic = _brute_force_empirical(model, rna, "adt", temperature, nll, average="arithmetic")
    arithmetic /= arithmetic.sum(1, keepdims=True)
    np.testing.assert_allclose(model.predict_modality(rna, "adt", average="arithmetic").to_numpy(), arithmetic,
                               rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(model.predict_modality(rna, "adt", temperature=2.0, average="arithmetic").to_numpy(),
                               _brute_force_empirical(model, rna, "adt", 2.0, nll, average="arithmetic"),
                               rtol=2e-3, atol=1e-6)
    # a model saved before dgdcell recorded the average took the arithmetic mean, and still does
    settings = model.fit_settings
    model.fit_settings = {k: v for k, v in settings.items() if k != "prediction_average"}
    try:
        np.testing.assert_allclose(model.predict_modality(rna, "adt").to_numpy(), arithmetic, rtol=2e-3, atol=1e-6)
    finally:
        model.fit_settings = settings
    with pytest.raises(ValueError, match="temperature must be"):
        model.predict_modality(rna, "adt", temperature=0)
    with pytest.raises(ValueError, match="average must be one of"):
        model.predict_modality(rna, "adt", average="median")
    # the default for cells passed in, and it needs no transform (only the counts); nothing is written
    np.testing.assert_array_equal(model.predict_modality(rna, "adt").to_numpy(), got.to_numpy())
    assert rna.obsm.keys() == before.obsm.keys() and rna.obs.equals(before.obs)
    # better than the point from RNA alone on these cells (the decoder's protein head was trained at joint points)
    model.transform(rna, verbose=False)
    point = model.predict_modality(rna, "adt", method="point")
    truth = query.mod["adt"].X.toarray()
    truth = truth / truth.sum(1, keepdims=True)

    def rho(pred):
        return np.mean([spearmanr(pred.iloc[:, j], truth[:, j]).statistic for j in range(truth.shape[1])])

    assert rho(got) >= rho(point) - 0.02
    # a seeded sample of the training points when there are more than n_candidates
    a = model.predict_modality(rna, "adt", n_candidates=50, seed=1)
    b = model.predict_modality(rna, "adt", n_candidates=50, seed=1)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert not np.allclose(a.to_numpy(), got.to_numpy())
    # the training cells' own points without adata; errors name the fix
    np.testing.assert_array_equal(model.predict_modality(modality="adt").to_numpy(),
                                  model.get_normalized_expression(modality="adt").to_numpy())
    with pytest.raises(ValueError, match="pass adata="):
        model.predict_modality(modality="adt", method="empirical")
    with pytest.raises(ValueError, match="method must be one of"):
        model.predict_modality(rna, "adt", method="knn")
    with pytest.raises(ValueError, match="n_candidates"):
        model.predict_modality(rna, "adt", n_candidates=0)
    # cells carrying only their representations (no counts of the model's features): decoded at the points
    bare = ad.AnnData(np.zeros((rna.n_obs, 1), dtype=np.float32), obs=pd.DataFrame(index=rna.obs_names))
    bare.obsm["X_dgd"] = rna.obsm["X_dgd"]
    np.testing.assert_array_equal(model.predict_modality(bare, "adt").to_numpy(), point.to_numpy())
    with pytest.raises(ValueError, match="method='point' decodes"):
        model.predict_modality(bare, "adt", method="empirical")
    # a MuData with the RNA modality counts (no protein modality)
    mu = md.MuData({"rna": rna.copy()})
    np.testing.assert_allclose(model.predict_modality(mu, "adt").to_numpy(), got.to_numpy(), rtol=1e-5)
    # counts read from disk (backed), block by block
    rna.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    np.testing.assert_allclose(model.predict_modality(backed, "adt").to_numpy(), got.to_numpy(), rtol=1e-5)


def test_fit_calibrates_the_temperature_by_leave_one_out(cite_fit, tmp_path):
    """fit's temperature per modality is the one whose leave-one-out predictions of the fitted cells
    (from their other modality, against the other training points) have the best mean Spearman
    correlation with the measured values; recomputed here by brute force."""
    from dgdcell._expression import PREDICTION_TEMPERATURES

    mdata, model = cite_fit
    chosen = model.fit_settings["prediction_temperature"]
    assert set(chosen) == {"rna", "adt"} and all(t in PREDICTION_TEMPERATURES for t in chosen.values())
    for target, source in (("adt", "rna"), ("rna", "adt")):
        nll = _brute_force_nll(model, mdata.mod[source].copy())
        nll.fill_diagonal_(torch.inf)  # each cell's own point left out
        x = mdata.mod[target].X.toarray().astype(np.float64)
        keep = (x > 0).any(0)
        truth = np.log1p(1e4 * x[:, keep] / x.sum(1, keepdims=True))

        rho = np.array([[spearmanr(pred[:, j], truth[:, j]).statistic for j in range(truth.shape[1])]
                        for pred in (_brute_force_empirical(model, None, target, t, nll)[:, keep]
                                     for t in PREDICTION_TEMPERATURES)])  # (temperatures, features)
        curve = np.nanmean(rho, 1)
        best = PREDICTION_TEMPERATURES[int(np.argmax(curve))]
        # the chosen one is the best, or within rounding of it (float32 scores in the package)
        assert curve[PREDICTION_TEMPERATURES.index(chosen[target])] >= curve.max() - 1e-3, (target, best, curve)
        # and each scored feature's own temperature is the best for that feature, within rounding
        own = np.asarray(model.fit_settings["prediction_feature_temperature"][target])
        assert own.shape == (len(model.features[target]),) and np.isin(own, PREDICTION_TEMPERATURES).all()
        for j, t in enumerate(own[keep]):
            if np.isfinite(rho[:, j]).all():
                assert rho[PREDICTION_TEMPERATURES.index(t), j] >= rho[:, j].max() - 1e-3, (target, j, t, rho[:, j])
    # saved and loaded with the model; a single-modality model has none
    model.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m").fit_settings
    assert loaded["prediction_temperature"] == chosen
    assert loaded["prediction_feature_temperature"] == model.fit_settings["prediction_feature_temperature"]
    assert loaded["prediction_average"] == "geometric"
    rna_only = DGD(latent_dim=3, n_components=3, seed=0).fit(mdata.mod["rna"].copy(), max_epochs=3, verbose=False)
    assert "prediction_temperature" not in rna_only.fit_settings
    assert "prediction_feature_temperature" not in rna_only.fit_settings


def test_predict_modality_empirical_with_a_covariate():
    mdata = make_cite(seed=2)
    mdata.obs["batch"] = np.where(np.arange(mdata.n_obs) % 2, "b1", "b0")
    model = DGD(latent_dim=4, n_components=3, covariate_keys=["batch"], seed=0).fit(mdata, **FAST)
    query = make_cite(n_per_group=(10, 10, 10), seed=7)
    rna = query.mod["rna"].copy()
    rna.obs["batch"] = np.where(np.arange(rna.n_obs) % 2, "b1", "b0")
    pred = model.predict_modality(rna, "adt")
    assert np.isfinite(pred.to_numpy()).all()
    np.testing.assert_allclose(model.predict_modality(rna, "adt", average="arithmetic").sum(1), 1.0, rtol=1e-4)
    first = model.covariate_categories["batch"][0]
    moved = model.predict_modality(rna, "adt", transform_batch=first)
    assert not np.allclose(moved.to_numpy(), pred.to_numpy())
    cont = make_cite(seed=3)
    cont.obs["pct"] = np.linspace(0.0, 1.0, cont.n_obs)
    fitted = DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["pct"], seed=0).fit(
        cont, max_epochs=3, verbose=False)
    q = cont.mod["rna"][:20].copy()
    q.obs["pct"] = 0.5
    fitted.transform(q, verbose=False, max_epochs=3)
    assert fitted.predict_modality(q, "adt").shape == (20, 8)  # the default falls back to the points
    with pytest.raises(ValueError, match="does not support models with continuous_covariate_keys"):
        fitted.predict_modality(q, "adt", method="empirical")


def test_transform_mudata_with_both_modalities(cite_fit):
    mdata, model = cite_fit
    new = mdata[:60].copy()
    for key in list(new.obsm):
        del new.obsm[key]
    model.transform(new, verbose=False)
    assert new.obsm["X_dgd"].shape == (60, 5)
    assert adjusted_rand_score(new.obs["group"], new.obs["dgd_cluster"]) > 0.9
    assert set(new.uns["dgd"]["transform"]["features"]) == {"rna", "adt"}


def test_mosaic_cells_contribute_only_their_modalities():
    mdata = make_cite()
    adt = mdata.mod["adt"].X.tolil()
    missing = np.arange(0, mdata.n_obs, 4)
    adt[missing] = 0  # a quarter of the cells have no protein measurement
    mdata.mod["adt"].X = adt.tocsr()
    data = read_data(mdata)
    assert data.mosaic and not data.observed["adt"][missing].any() and data.observed["rna"].all()
    assert (data.library["adt"][missing] == 1.0).all()  # placeholder, never used
    model = DGD(latent_dim=5, n_components=3, seed=0).fit(mdata, **FAST)
    assert adjusted_rand_score(mdata.obs["group"], mdata.obs["dgd_cluster"]) > 0.9
    # the loss of an unobserved modality is zero: the training objective equals RNA-only for those cells
    from dgdcell.train import CellSet, DeviceCounts

    rows = missing[:10]
    z = torch.as_tensor(mdata.obsm["X_dgd"][rows])
    cells = {}
    for mods in (["rna", "adt"], ["rna"]):
        cells[len(mods)] = CellSet(
            rep=None, cov_reps={},
            counts={m: DeviceCounts(data.counts[m][rows], data.library[m][rows], torch.device("cpu")) for m in mods},
            weight={m: torch.as_tensor(data.observed[m][rows], dtype=torch.float32) for m in mods},
        )
    idx = torch.arange(len(rows))
    with torch.no_grad():
        both, rna_only = (sum(model.module.reconstruction_nll(z, cells[k].minibatch(idx, z=z, cov={}).counts).values())
                          for k in (2, 1))
    torch.testing.assert_close(both, rna_only)


def test_cells_without_counts_in_any_modality_are_an_error():
    mdata = make_cite()
    for m in mdata.mod:
        X = mdata.mod[m].X.tolil()
        X[3] = 0
        mdata.mod[m].X = X.tocsr()
    before = set(mdata.obsm)
    with pytest.raises(ValueError, match="no counts in any of the modalities"):
        DGD(n_components=3).fit(mdata, **FAST)
    assert set(mdata.obsm) == before


def test_bernoulli_log_prob_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    log_mu = torch.randn(6, 40, generator=gen) * 3 - 2  # mu from ~1e-5 to ~100
    x = (torch.rand(6, 40, generator=gen) < 0.3).float() * torch.randint(1, 4, (6, 40), generator=gen)
    flat = x.reshape(-1).nonzero().squeeze(1)
    rows = flat // 40
    ours = bernoulli_log_prob_sparse(log_mu.double(), flat, rows)
    mu = torch.exp(log_mu.double())
    logits = torch.log(-torch.expm1(-mu)) + mu  # log p - log(1 - p) for p = 1 - exp(-mu), exact in float64
    ref = torch.distributions.Bernoulli(logits=logits).log_prob((x > 0).double()).sum(1)
    torch.testing.assert_close(ours, ref)
    tiny = bernoulli_log_prob_sparse(torch.full((1, 2), -30.0), torch.tensor([0]), torch.tensor([0]))
    assert torch.isfinite(tiny).all()


def test_multiome_rna_atac_end_to_end(tmp_path):
    """The tiny 10x multiome slice (RNA + ATAC): ATAC as binarised peaks."""
    mdata = md.read_h5mu(DATA / "multiome_pbmc_tiny_muon_test.h5mu")
    model = DGD(latent_dim=8, n_components=4, likelihood={"atac": "bernoulli"}, seed=0)
    model.fit(mdata, max_epochs=5, verbose=False)
    assert mdata.obsm["X_dgd"].shape == (mdata.n_obs, 8)
    assert np.isfinite(model.history["train_loss"]).all()
    assert type(model.decoder.likelihoods["atac"]).__name__ == "Bernoulli"
    model.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m")
    query = mdata.mod["rna"][:40].copy()
    loaded.transform(query, verbose=False, max_epochs=10)
    peaks = loaded.predict_modality(query, "atac")
    assert peaks.shape == (40, mdata.mod["atac"].n_vars)
    torch.testing.assert_close(loaded.decoder.heads["atac"][1].weight, model.decoder.heads["atac"][1].weight,
                               rtol=0, atol=0)


def test_several_covariates_and_counterfactual_decoding():
    """Two covariates, each with its own supervised mixture; decoding every cell in
    one batch moves its batch-affected genes to that batch's levels."""
    adata = make_counts(n_per_group=(70, 60, 50), n_batches=2, batch_effect=0.8, seed=3)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d0", "d1", "d2"], size=adata.n_obs))
    model = DGD(latent_dim=5, n_components=3, covariate_keys=["batch", "donor"], seed=0)
    model.fit(adata, max_epochs=60, verbose=False)
    assert set(model.cov_gmms) == {"batch", "donor"}
    assert model.cov_gmms["donor"].Nclass == 3
    assert adata.obsm["X_dgd_batch"].shape == adata.obsm["X_dgd_donor"].shape == (adata.n_obs, 2)
    assert adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"]) > 0.9

    X = adata.X.toarray()
    frac = X / X.sum(1, keepdims=True)
    b = adata.obs["batch"].to_numpy()
    g = adata.obs["group"].to_numpy()
    as_b1 = model.get_normalized_expression(transform_batch={"batch": "b1"}).to_numpy()
    as_b0 = model.get_normalized_expression(transform_batch="b0").to_numpy()
    # per group, the observed batch effect (log ratio b1/b0 of mean fractions) against the decoded one
    for grp in np.unique(g):
        obs_ratio = np.log(frac[(g == grp) & (b == "b1")].mean(0) / frac[(g == grp) & (b == "b0")].mean(0))
        cells = g == grp
        dec_ratio = np.log(as_b1[cells].mean(0) / as_b0[cells].mean(0))
        assert np.corrcoef(obs_ratio, dec_ratio)[0, 1] > 0.9
    with pytest.raises(KeyError, match="not a class"):
        model.get_normalized_expression(transform_batch={"batch": "b9"})


def test_multimodal_input_errors():
    mdata = make_cite()
    with pytest.raises(KeyError, match="no modality 'atac'"):
        DGD(n_components=3).fit(mdata, modalities=["rna", "atac"], **FAST)
    with pytest.raises(ValueError, match="lack"):
        DGD(n_components=3, likelihood={"atac": "bernoulli"}).fit(mdata, **FAST)
    with pytest.raises(ValueError, match="unknown likelihood"):
        DGD(likelihood={"adt": "gaussian"})
    with pytest.raises(KeyError, match="modality_key"):
        DGD(n_components=3, modality_key="kind").fit(as_var_keyed(mdata), **FAST)
    assert "X_dgd" not in mdata.obsm


def test_checkpoints_and_warm_start(tmp_path):
    adata = make_counts()
    ckpt = tmp_path / "ckpt"
    model = DGD(latent_dim=4, n_components=3, seed=0)
    model.fit(adata, max_epochs=6, early_stopping=False, guide_epochs=2, checkpoint_dir=ckpt, checkpoint_every=2,
              verbose=False)
    assert (ckpt / "config.json").is_file() and not list(ckpt.glob(".*tmp"))
    resumed = DGD.load(ckpt)
    assert resumed.history["epoch"] == list(range(1, 7))
    resumed.fit(adata, max_epochs=4, early_stopping=False, warm_start=True, verbose=False)
    assert resumed.history["epoch"] == list(range(1, 11))
    assert resumed.fit_settings["n_epochs"] == 10 and resumed.fit_settings["warm_start"]
    assert resumed.history["train_loss"][-1] <= model.history["train_loss"][-1] * 1.01
    assert adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"]) > 0.9
    shuffled = adata[::-1].copy()  # same cells in another order: matched by name
    DGD.load(ckpt).fit(shuffled, max_epochs=1, warm_start=True, verbose=False)
    with pytest.raises(ValueError, match="not in the model"):
        other = ad.AnnData(adata.X[:10], obs=pd.DataFrame(index=[f"new{i}" for i in range(10)]), var=adata.var.copy())
        DGD.load(ckpt).fit(other, warm_start=True)
    with pytest.raises(ValueError, match="fitted model"):
        DGD().fit(adata, warm_start=True)


def test_cli_fits_and_transforms_mudata(tmp_path):
    import contextlib
    import io

    from dgdcell import cli

    src = tmp_path / "in.h5mu"
    make_cite().write_h5mu(src)
    small = ["--latent-dim", "3", "--n-components", "3", "--max-epochs", "3", "--device", "cpu", "-q"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main([str(a) for a in ["fit", src, "-o", tmp_path / "out.h5mu", "--model-dir", tmp_path / "m",
                                        "--likelihood", "adt=nb", *small]])
        assert rc == 0
        out = md.read_h5mu(tmp_path / "out.h5mu")
        assert out.obsm["X_dgd"].shape == (out.n_obs, 3) and "dgd_cluster" in out.obs
        rc = cli.main([str(a) for a in ["transform", tmp_path / "m", src, "-o", tmp_path / "new.h5mu",
                                        "--max-epochs", "3", "--device", "cpu", "-q"]])
        assert rc == 0
        assert cli.main([str(a) for a in ["fit", src, "-o", tmp_path / "x.h5mu", "--model-dir", tmp_path / "m2",
                                          "--likelihood", "adt", *small]]) != 0


def test_canonical_float32_counts_are_shared_and_never_written():
    """Canonical float32 CSR counts are read without a copy (memory at scale), so nothing may
    write into them: a fit that binarises a modality leaves the user's matrices as they were."""
    from dgdcell.data import read_data

    mdata = make_cite(n_per_group=(30, 20, 20))
    for m in mdata.mod:
        mdata.mod[m].X = sp.csr_matrix(mdata.mod[m].X, dtype=np.float32)
        mdata.mod[m].X.sort_indices()
    before = {m: mdata.mod[m].X.copy() for m in mdata.mod}
    data = read_data(mdata)
    assert all(np.shares_memory(data.counts[m].data, mdata.mod[m].X.data) for m in mdata.mod)
    DGD(latent_dim=4, n_components=3, likelihood={"adt": "bernoulli"}, seed=0).fit(mdata, max_epochs=2, verbose=False)
    for m in mdata.mod:
        assert (mdata.mod[m].X != before[m]).nnz == 0
        np.testing.assert_array_equal(mdata.mod[m].X.data, before[m].data)
    assert before["adt"].data.max() > 1  # the binarised modality really had counts above 1
    # a non-canonical matrix (a stored zero) is copied and cleaned instead
    X = sp.csr_matrix(before["rna"], copy=True)
    X.data[0] = 0.0
    assert not np.shares_memory(read_data(ad.AnnData(X)).counts["rna"].data, X.data)
