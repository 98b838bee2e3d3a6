import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import dgdcell
from dgdcell import DGD

FAST = dict(max_epochs=40, verbose=False)


@pytest.fixture(scope="module")
def fitted():
    from .conftest import make_counts

    adata = make_counts()
    model = DGD(latent_dim=5, n_components=3, seed=0).fit(adata, **FAST)
    return adata, model


def test_fit_recovers_known_groups(fitted):
    adata, model = fitted
    assert adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"]) > 0.95
    assert adata.obsm["X_dgd"].shape == (adata.n_obs, 5)
    probs = adata.obsm["X_dgd_cluster_probs"]
    assert probs.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert isinstance(adata.obs["dgd_cluster"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(adata.obs["dgd_cluster"].cat.codes.to_numpy(), probs.argmax(1))
    np.testing.assert_array_equal(model.get_latent_representation(), adata.obsm["X_dgd"])


def test_writes_exactly_the_documented_keys(synthetic):
    before = (set(synthetic.obs.columns), set(synthetic.obsm), set(synthetic.uns), set(synthetic.layers),
              set(synthetic.var.columns), set(synthetic.obsp), synthetic.X.copy())
    DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=3, verbose=False)
    assert set(synthetic.obs.columns) - before[0] == {"dgd_cluster"}
    assert set(synthetic.obsm) - before[1] == {"X_dgd", "X_dgd_cluster_probs"}
    assert set(synthetic.uns) - before[2] == {"dgd"}
    assert set(synthetic.layers) == before[3] and set(synthetic.var.columns) == before[4]
    assert set(synthetic.obsp) == before[5]
    assert (synthetic.X != before[6]).nnz == 0
    rec = synthetic.uns["dgd"]
    assert rec["version"] == dgdcell.__version__
    assert len(rec["history"]["train_loss"]) == rec["fit"]["n_epochs"] == 3


def test_key_added_and_h5ad_round_trip(synthetic, tmp_path):
    DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=3, verbose=False, key_added="run1")
    assert {"X_run1", "X_run1_cluster_probs"} <= set(synthetic.obsm) and "run1_cluster" in synthetic.obs
    synthetic.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.obsm["X_run1"], synthetic.obsm["X_run1"])


def test_seed_gives_identical_results(synthetic):
    a, b = synthetic.copy(), synthetic.copy()
    DGD(latent_dim=4, n_components=3, seed=7).fit(a, max_epochs=5, verbose=False)
    DGD(latent_dim=4, n_components=3, seed=7).fit(b, max_epochs=5, verbose=False)
    np.testing.assert_array_equal(a.obsm["X_dgd"], b.obsm["X_dgd"])
    c = synthetic.copy()
    DGD(latent_dim=4, n_components=3, seed=8).fit(c, max_epochs=5, verbose=False)
    assert not np.array_equal(a.obsm["X_dgd"], c.obsm["X_dgd"])


def test_fit_does_not_touch_global_rng(synthetic):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=2, verbose=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_save_load_round_trip(fitted, tmp_path):
    adata, model = fitted
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dgdcell_version"] == dgdcell.__version__ and cfg["format_version"] == 1
    # plain tensors only: loadable with weights_only=True
    tensors = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    loaded = DGD.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    z = torch.as_tensor(adata.obsm["X_dgd"])
    np.testing.assert_array_equal(loaded.cluster_probabilities(z), model.cluster_probabilities(z))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder(z)["rna"], model.decoder(z)["rna"], rtol=0, atol=0)
    assert loaded.history == model.history
    assert loaded.features == model.features
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)


def test_load_rejects_bad_files(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    w = tmp_path / "m" / "weights.pt"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        DGD.load(tmp_path / "m")
    model.save(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format"):
        DGD.load(tmp_path / "m2")
    with pytest.raises(FileNotFoundError):
        DGD.load(tmp_path / "nothing")


def test_covariates_get_their_own_representation(synthetic_batches):
    adata = synthetic_batches
    model = DGD(latent_dim=4, n_components=3, covariate_keys=["batch"]).fit(adata, **FAST)
    c = adata.obsm["X_dgd_batch"]
    assert c.shape == (adata.n_obs, 2)
    assert adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"]) > 0.9
    # the covariate representations separate the batches
    cg = model.cov_gmms["batch"]
    pred = cg.clustering(torch.as_tensor(c)).numpy()
    codes = adata.obs["batch"].cat.codes.to_numpy()
    assert (pred == codes).mean() > 0.95
    assert model.decoder.n_input == 4 + 2


def test_label_key_semi_supervised(synthetic):
    synthetic.obs["label"] = synthetic.obs["group"].astype(object)
    synthetic.obs.loc[synthetic.obs_names[::2], "label"] = np.nan
    model = DGD(latent_dim=4, label_key="label").fit(synthetic, **FAST)
    assert model.gmm.n_mix_comp == 3
    assert model.label_categories == ["g0", "g1", "g2"]
    # component k belongs to class k: clusters equal the groups
    truth = synthetic.obs["group"].cat.codes.to_numpy()
    assert (synthetic.obs["dgd_cluster"].cat.codes.to_numpy() == truth).mean() > 0.95
    with pytest.raises(ValueError, match="multiple"):
        DGD(n_components=4, label_key="label").fit(synthetic, max_epochs=1, verbose=False)


@pytest.mark.parametrize("cov", ["fixed", "isotropic"])
def test_other_covariance_types_fit(synthetic, cov):
    DGD(latent_dim=3, n_components=3, covariance_type=cov).fit(synthetic, max_epochs=20, verbose=False)
    assert adjusted_rand_score(synthetic.obs["group"], synthetic.obs["dgd_cluster"]) > 0.9


def test_zero_init_and_no_validation(synthetic):
    m = DGD(latent_dim=3, n_components=3, init="zero").fit(synthetic, max_epochs=3, train_size=1.0, verbose=False)
    assert m.history["n_val"] == [0]
    assert np.isfinite(synthetic.obsm["X_dgd"]).all()


def test_early_stopping_stops_on_plateau(synthetic):
    m = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=500, patience=3, min_delta=0.05, verbose=False)
    assert len(m.history["epoch"]) < 500


def test_tl_function(synthetic):
    out = dgdcell.tl.dgd(synthetic, n_components=3, latent_dim=3, max_epochs=3, copy=True, verbose=False)
    assert "X_dgd" in out.obsm and "X_dgd" not in synthetic.obsm
    model = dgdcell.tl.dgd(synthetic, n_components=3, latent_dim=3, max_epochs=3, verbose=False, return_model=True,
                           covariance_type="isotropic")
    assert isinstance(model, DGD) and model.init_args["covariance_type"] == "isotropic"
    assert "dgd_cluster" in synthetic.obs


def test_embedded_cellbench():
    a = dgdcell.datasets.cellbench()
    assert a.shape == (1021, 3000)
    assert a.obs["cell_type"].nunique() == 5 and a.obs["batch"].nunique() == 5
    assert np.all(np.mod(a.X.data, 1) == 0)


def test_unfitted_model_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        DGD().get_latent_representation()


@pytest.mark.parametrize("setting", ["pooled", "learned"])
def test_component_variance_pooled_is_shared_and_kept_learned_moves(synthetic, setting, monkeypatch):
    import dgdcell._fitting as fitting

    started = {}
    original = fitting.init_mixture_from_labels

    def spy(gmm, z, labels):
        original(gmm, z, labels)
        w = torch.bincount(labels, minlength=gmm.n_mix_comp).float()
        started["pooled"] = -torch.log((w[:, None] * torch.exp(-gmm.neglogvar)).sum(0) / w.sum())
        started["own"] = gmm.neglogvar.detach().clone()

    monkeypatch.setattr(fitting, "init_mixture_from_labels", spy)
    m = DGD(latent_dim=3, n_components=3, component_variance=setting).fit(synthetic, max_epochs=25, verbose=False)
    nlv = m.gmm.neglogvar.detach()
    if setting == "pooled":  # the start clusters' pooled variance, in every component, unchanged by the fit
        torch.testing.assert_close(nlv, started["pooled"].expand_as(nlv))
    else:
        assert not torch.equal(nlv, started["own"])
    assert m.init_args["component_variance"] == setting


def test_component_variance_is_validated():
    with pytest.raises(ValueError, match="component_variance"):
        DGD(component_variance="free")


@pytest.mark.parametrize("key, now, before", [("component_variance", "pooled", "learned"),
                                              ("start_correction", "harmony", "centre")])
def test_models_saved_before_an_option_load_with_its_old_behaviour(fitted, tmp_path, key, now, before):
    _, model = fitted
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg["init_args"].pop(key) == now
    path.write_text(json.dumps(cfg))
    assert DGD.load(tmp_path / "m", device="cpu").init_args[key] == before


def test_balanced_start_clusters_across_covariate_classes(synthetic_batches, monkeypatch):
    import dgdcell._fitting as fitting

    seen = {}
    original = fitting.graph_clusters

    def spy(z, k, **kw):
        seen["groups"] = kw.get("groups")
        return original(z, k, **kw)

    monkeypatch.setattr(fitting, "graph_clusters", spy)
    DGD(latent_dim=3, n_components=3, covariate_keys=["batch"]).fit(synthetic_batches, max_epochs=2, verbose=False)
    assert seen["groups"] is None  # the default start graph ignores the classes
    DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], init_clustering="balanced").fit(
        synthetic_batches, max_epochs=2, verbose=False)
    codes = synthetic_batches.obs["batch"].cat.codes.to_numpy()
    assert adjusted_rand_score(seen["groups"], codes) == 1.0
    with pytest.raises(ValueError, match="init_clustering"):
        DGD(init_clustering="bbknn")


def test_start_correction_harmonises_the_start_of_covariate_fits_only(synthetic_batches, monkeypatch):
    import dgdcell._fitting as fitting

    calls = []
    original = fitting.harmonise

    def spy(z, groups, **kw):
        calls.append(np.asarray(groups))
        return original(z, groups, **kw)

    monkeypatch.setattr(fitting, "harmonise", spy)
    DGD(latent_dim=3, n_components=3, covariate_keys=["batch"]).fit(synthetic_batches, max_epochs=2, verbose=False)
    codes = synthetic_batches.obs["batch"].cat.codes.to_numpy()
    assert len(calls) == 1 and adjusted_rand_score(calls[0], codes) == 1.0
    DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], start_correction="centre").fit(
        synthetic_batches, max_epochs=2, verbose=False)
    DGD(latent_dim=3, n_components=3).fit(synthetic_batches, max_epochs=2, verbose=False)
    assert len(calls) == 1  # neither 'centre' nor a fit without covariates harmonises
    with pytest.raises(ValueError, match="start_correction"):
        DGD(start_correction="combat")
