"""Nothing lost, nothing silently wrong: checkpoints, interrupts, settings and covariates."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import dgdcell.train.loop as loop
from dgdcell import DGD

from .conftest import make_counts
from .test_data import assert_unchanged, snapshot

MODEL = dict(latent_dim=3, n_components=3, seed=0)
FIT = dict(max_epochs=3, verbose=False)


@pytest.fixture(scope="module")
def fitted():
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30, n_batches=2, batch_effect=0.3)
    return a, DGD(**MODEL, covariate_keys=["batch"]).fit(a, **FIT)


# ------------------------------------------------------------------ data loss
def test_checkpoint_dir_never_overwrites_a_folder_with_other_files(tmp_path):
    a = make_counts(n_per_group=(30, 30), n_genes=20)
    other = tmp_path / "saved"
    DGD(**MODEL).fit(a.copy(), **FIT).save(other)
    files = {p.name: p.read_bytes() for p in other.iterdir()}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for folder in (other, tmp_path / "mine"):
        with pytest.raises(FileExistsError, match="checkpoint_dir .* is not empty"):
            DGD(**MODEL).fit(a.copy(), checkpoint_dir=folder, **FIT)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == files
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # continuing the fit saved there is what a non-empty checkpoint folder is for
    DGD.load(other).fit(a.copy(), warm_start=True, checkpoint_dir=other, **FIT)
    with pytest.raises(ValueError, match="is a file"):
        DGD(**MODEL).fit(a.copy(), checkpoint_dir=tmp_path / "mine" / "notes.txt", **FIT)


def test_interrupt_during_the_start_of_a_refit_leaves_the_model_as_it_was(fitted, monkeypatch):
    import dgdcell._fitting as fitting

    a, model = fitted
    z, module, names = model.representation.clone(), model.module, list(model.obs_names)
    other = make_counts(n_per_group=(25, 25, 25), n_genes=30, n_batches=2, seed=5)
    other.obs_names = [f"new{i}" for i in range(other.n_obs)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "graph_clusters", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.fit(other, **FIT)
    assert model.module is module and torch.equal(model.representation, z) and model.obs_names == names
    model.transform(a[:10].copy(), verbose=False, max_epochs=2)  # still the good model


def test_interrupt_in_the_guided_phase_propagates_and_writes_nothing(monkeypatch):
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    before = snapshot(a)
    real, calls = loop.representation_epoch, {"n": 0}

    def interrupt_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "representation_epoch", interrupt_on_second)
    model = DGD(**MODEL)
    with pytest.raises(KeyboardInterrupt):  # no best state exists yet: nothing to keep
        model.fit(a, max_epochs=20, guide_epochs=5, verbose=False)
    assert not model.is_fitted
    assert_unchanged(a, before)


# ------------------------------------------------------------------ silently wrong
def test_numeric_covariate_with_many_values_names_continuous_covariate_keys():
    a = make_counts(n_per_group=(60, 60), n_genes=20)
    a.obs["pct_mito"] = np.random.default_rng(0).uniform(0, 10, a.n_obs)
    a.obs["plate"] = np.arange(a.n_obs) % 120
    for key in ("pct_mito", "plate"):
        with pytest.raises(ValueError, match=rf"continuous_covariate_keys=\['{key}'\]"):
            DGD(**MODEL, covariate_keys=[key]).fit(a, **FIT)
    a.obs["lane"] = np.arange(a.n_obs) % 4  # a few integer classes are fine
    DGD(**MODEL, covariate_keys=["lane"]).fit(a, **FIT)


def test_integer_classes_match_float_classes_in_the_query(caplog):
    a = make_counts(n_per_group=(40, 40), n_genes=20, n_batches=2, batch_effect=0.3)
    a.obs["lane"] = (a.obs["batch"] == "b1").astype(int)
    model = DGD(**MODEL, covariate_keys=["lane"]).fit(a, **FIT)
    q = a[:30].copy()
    q.obs["lane"] = q.obs["lane"].astype(float)
    model.transform(q, verbose=False, max_epochs=2)
    assert q.uns["dgd"]["transform"]["unseen_classes"] == {}
    q2 = a[:30].copy()
    q2.obs["lane"] = q2.obs["lane"] + 5
    with caplog.at_level(logging.WARNING, logger="dgdcell"):
        model.transform(q2, verbose=False, max_epochs=2)
    assert "unseen in training" in caplog.text and "30 of 30 cells" in caplog.text


def test_identical_cells_are_an_error():
    a = make_counts(n_per_group=(20, 20), n_genes=15)
    a.X = type(a.X)(np.tile(a.X[0].toarray(), (a.n_obs, 1)))
    with pytest.raises(ValueError, match="identical counts"):
        DGD(**MODEL).fit(a, **FIT)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr_decoder": -1e-3}, "lr_decoder must be"), ({"lr_representation": 1e6}, "lr_representation must be"),
    ({"lr_mixture": float("nan")}, "lr_mixture must be"), ({"train_size": 1e-9}, "too few"),
    ({"train_size": "0.5"}, "train_size must be a number"), ({"betas": (0.5, 1.5)}, "betas must be"),
    ({"batch_size": 2.5}, "batch_size must be"), ({"patience": 0}, "patience must be"),
])
def test_fit_settings_are_checked(kwargs, match):
    a = make_counts(n_per_group=(20, 20), n_genes=15)
    before = snapshot(a)
    with pytest.raises(ValueError, match=match):
        DGD(**MODEL).fit(a, **{**FIT, **kwargs})
    assert_unchanged(a, before)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_components": 2.5}, "n_components must be"), ({"n_hidden": (0,)}, r"n_hidden\[0\] must be"),
    ({"n_hidden_head": (-3, 4)}, r"n_hidden_head\[0\] must be"), ({"seed": -1}, "seed must be"),
    ({"seed": 2**64}, "seed must be"), ({"dispersion_init": 0}, "dispersion_init must be"),
    ({"mean_init": (0.0, 5.0)}, r"mean_init\[0\] must be"), ({"device": "meta"}, "device must be"),
    ({"device": "tpu"}, "device must be"), ({"covariate_keys": ["cluster_probs"]}, "would overwrite"),
    ({"covariate_keys": ["batch", "batch"]}, "twice"), ({"latent_dim": float("inf")}, "latent_dim must be"),
])
def test_model_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DGD(**{**MODEL, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, fitted):
    with pytest.raises(ValueError, match="no CUDA device"):
        DGD(device="cuda")
    fitted[1].save(tmp_path / "m")
    with pytest.raises(ValueError, match="device must be"):
        DGD.load(tmp_path / "m", device="tpu")


def test_modality_weights_for_a_missing_modality_is_an_error():
    a = make_counts(n_per_group=(20, 20), n_genes=15)
    with pytest.raises(ValueError, match="modality_weights names modalities"):
        DGD(**MODEL, modality_weights={"adt": 0.5}).fit(a, **FIT)


def test_non_finite_decoding_inputs_are_errors(fitted):
    a, model = fitted
    with pytest.raises(ValueError, match="library_size must be"):
        model.get_normalized_expression(library_size=float("inf"))
    b = a.copy()
    b.obsm["X_dgd"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"obsm\['X_dgd'\] has 1 non-finite"):
        model.get_normalized_expression(b)
    c = a.copy()
    c.obsm["X_dgd_batch"] = c.obsm["X_dgd_batch"][:, :1]
    with pytest.raises(ValueError, match=r"obsm\['X_dgd_batch'\] has shape"):
        model.get_normalized_expression(c)


def test_a_view_gets_its_results_with_a_warning():
    parent = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    view = parent[parent.obs["group"] != "g2"]
    with pytest.warns(UserWarning, match="view of an AnnData"):
        DGD(**MODEL).fit(view, **FIT)
    assert view.obsm["X_dgd"].shape == (60, 3) and "X_dgd" not in parent.obsm


# ------------------------------------------------------------------ crashes and messages
@pytest.mark.parametrize("field, value", [("history", None), ("features", {"rna": "abc"}), ("obs_names", 3),
                                          ("covariate_categories", []), ("init_args", None)])
def test_tampered_config_is_one_value_error_naming_the_field(tmp_path, fitted, field, value):
    fitted[1].save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        DGD.load(tmp_path / "m")


def test_infinite_latent_dim_in_config_is_a_value_error(tmp_path, fitted):
    fitted[1].save(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text().replace('"latent_dim": 3', '"latent_dim": Infinity')
    (tmp_path / "m" / "config.json").write_text(text)
    with pytest.raises(ValueError, match="latent_dim"):
        DGD.load(tmp_path / "m")


def test_float64_weights_load(tmp_path, fitted):
    fitted[1].save(tmp_path / "m")
    w = tmp_path / "m" / "weights.pt"
    tensors = {k: (v.double() if v.is_floating_point() else v) for k, v in torch.load(w, weights_only=True).items()}
    torch.save(tensors, w)
    loaded = DGD.load(tmp_path / "m")
    assert loaded.representation.dtype == torch.float32
    loaded.get_normalized_expression()


def test_huge_counts_and_dict_layers_are_clear_errors():
    a = make_counts(n_per_group=(20, 20), n_genes=15)
    b = a.copy()
    b.X = b.X.astype(np.float64)
    b.X.data[0] = 1e300
    with pytest.raises(ValueError, match="not raw counts"):
        DGD(**MODEL).fit(b, **FIT)
    with pytest.raises(ValueError, match="layer must be None"):
        DGD(**MODEL).fit(a, layer={"rna": "counts"}, **FIT)


def test_saving_into_an_unwritable_folder_names_the_path(tmp_path, fitted, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError, match=str(tmp_path / "m")):
        fitted[1].save(tmp_path / "m")
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_mudata_layer_errors_name_the_modality():
    import mudata as md

    a = make_counts(n_per_group=(20, 20), n_genes=15)
    b = make_counts(n_per_group=(20, 20), n_genes=6, seed=3)
    b.obs_names = a.obs_names
    a.layers["counts"] = a.X.copy()
    m = md.MuData({"rna": a, "adt": b})
    with pytest.raises(KeyError, match=r"mdata.mod\['adt'\]"):
        DGD(**MODEL).fit(m, layer="counts", **FIT)


@pytest.mark.parametrize("kwargs, match", [({"key_added": ""}, "key_added must be"),
                                           ({"modalities": "rna"}, "modalities must be a list")])
def test_more_fit_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DGD(**MODEL).fit(make_counts(n_per_group=(20, 20), n_genes=15), **{**FIT, **kwargs})
