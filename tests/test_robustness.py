"""Bad inputs get an error that names the problem and the fix, and the user's object is left
exactly as it was (deep comparison). Unusual but valid inputs are accepted. Model files that are
corrupted, foreign or unsafe are refused clearly.

(Basic value and key checks are in test_data.py; these add the fix in the message, a deep
unchanged-check, MuData, backed data, warm starts, failures inside fit and model files.)
"""

import copy
import json
import logging
import re

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import dgdcell
from dgdcell import DGD
from dgdcell.data import read_data
from dgdcell.data.checks import check_data_object

from .conftest import make_counts

FIT = dict(max_epochs=2, verbose=False)
MODEL = dict(latent_dim=3, n_components=3, seed=0)


# --------------------------------------------------------------------------- deep comparison
def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if sp.issparse(a):
        return a.format == b.format and _same(a.toarray(), b.toarray())
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, pd.DataFrame):
        return a.equals(b) and list(a.dtypes) == list(b.dtypes) and a.index.equals(b.index)
    if isinstance(a, pd.Index):
        return a.equals(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _parts(a: ad.AnnData) -> dict:
    return {
        "X": a.X, "layers": dict(a.layers), "obs": a.obs, "var": a.var, "obsm": dict(a.obsm), "varm": dict(a.varm),
        "obsp": dict(a.obsp), "uns": dict(a.uns), "obs_names": a.obs_names, "var_names": a.var_names,
    }


def changed_parts(before, after) -> list[str]:
    """The parts of an AnnData (or of a MuData and its modalities) that differ."""
    if isinstance(before, md.MuData):
        out = [p for p in ("obs", "var") if not _same(getattr(before, p), getattr(after, p))]
        out += [p for p in ("obsm", "uns") if not _same(dict(getattr(before, p)), dict(getattr(after, p)))]
        for m in before.mod:
            out += [f"{m}.{p}" for p in changed_parts(before.mod[m], after.mod[m])]
        return out
    pa, pb = _parts(before), _parts(after)
    return [p for p in pa if not _same(pa[p], pb[p])]


def snapshot(obj):
    return obj.copy() if isinstance(obj, md.MuData) else copy.deepcopy(obj)


def test_the_comparison_sees_every_part():
    a = make_counts(n_per_group=(5, 5), n_genes=6)
    a.layers["counts"] = a.X.copy()
    a.uns["nested"] = {"v": np.arange(3.0)}
    edits = {
        "X": lambda x: x.X.data.__setitem__(0, x.X.data[0] + 1),
        "layers": lambda x: x.layers["counts"].data.__setitem__(0, 99),
        "obs": lambda x: setattr(x, "obs", x.obs.assign(group=x.obs["group"].cat.rename_categories(["a", "b"]))),
        "var": lambda x: x.var.__setitem__("new", 1),
        "obsm": lambda x: x.obsm.__setitem__("X_new", np.zeros((10, 2))),
        "uns": lambda x: x.uns["nested"]["v"].__setitem__(0, 5.0),
        "obs_names": lambda x: setattr(x, "obs_names", [f"c{i}" for i in range(10)]),
    }
    for part, edit in edits.items():
        b = snapshot(a)
        edit(b)
        assert part in changed_parts(a, b)
    assert changed_parts(a, snapshot(a)) == []


# --------------------------------------------------------------------------- bad AnnData inputs
def _log_normalised(a):
    a.layers["counts"] = a.X.copy()
    a.X = a.X.multiply(1e4 / a.X.sum(1)).tocsr().log1p()


def _normalised_no_layers(a):
    a.X = a.X.multiply(1e4 / a.X.sum(1)).tocsr()


def _wrong_layer(a):
    a.layers["lognorm"] = a.X.log1p()
    a.layers["raw_counts"] = a.X.copy()


def _string_matrix(a):
    a.X = a.X.toarray().astype(int).astype(str).astype(object)


def _complex_matrix(a):
    a.X = a.X.toarray().astype(np.complex64)


def _no_X(a):
    a.layers["counts"] = a.X.copy()
    a.X = None


def _all_zero(a):
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)


def _covariate_nan(a):
    a.obs["donor"] = pd.array(["d1", "d2"] * (a.n_obs // 2), dtype=object)
    a.obs.loc[a.obs_names[:3], "donor"] = np.nan


def _label_all_nan(a):
    a.obs["celltype"] = pd.Categorical([np.nan] * a.n_obs, categories=["t"])


BAD_FIT = {
    # name: (spoil the AnnData, model kwargs, fit kwargs, exception, pattern naming problem and fix)
    "log-normalised X, counts in a layer": (
        _log_normalised, {}, {}, ValueError, r"non-integer.*log-transformed.*layer='counts' probably holds the raw counts"),
    "normalised X, no layers": (
        _normalised_no_layers, {}, {}, ValueError, r"non-integer.*adata\.raw or a layer.*layer='counts'"),
    "layer= names the log-normalised layer": (
        _wrong_layer, {}, {"layer": "lognorm"}, ValueError,
        r"adata\.layers\['lognorm'\] contains non-integer.*layer='raw_counts' probably holds"),
    "layer name typo": (
        lambda a: a.layers.__setitem__("counts", a.X.copy()), {}, {"layer": "count"}, KeyError,
        r"layer 'count' not found.*\['counts'\]"),
    "string matrix": (_string_matrix, {}, {}, TypeError, r"dtype object; expected a numeric matrix of raw counts"),
    "complex matrix": (_complex_matrix, {}, {}, TypeError, r"complex dtype"),
    "X is None": (_no_X, {}, {}, ValueError, r"adata\.X is empty; pass layer="),
    "all cells empty": (_all_zero, {}, {}, ValueError, r"90 cells have no counts.*filter_cells"),
    "covariate key with wrong case": (
        lambda a: None, {"covariate_keys": ["Batch"]}, {}, KeyError, r"'Batch' is not a column.*'batch'"),
    "covariate column with NaN": (
        _covariate_nan, {"covariate_keys": ["donor"]}, {}, ValueError, r"'donor' has 3 missing values; fill them or drop"),
    "label column all NaN": (_label_all_nan, {"label_key": "celltype"}, {}, ValueError, r"no non-missing values"),
    "K not a multiple of the label classes": (
        lambda a: None, {"label_key": "group", "n_components": 4}, {}, ValueError, r"multiple of the 3 classes"),
    "zero features": (lambda a: None, {}, {"_subset": (slice(None), slice(0, 0))}, ValueError, r"no features"),
    "more components than cells": (
        lambda a: None, {"n_components": 6}, {"_subset": (slice(0, 5), slice(None))}, ValueError,
        r"n_components=6 exceeds the number of cells \(5\)"),
    "warm start of an unfitted model": (
        lambda a: None, {}, {"warm_start": True}, ValueError, r"warm_start=True continues a fitted model"),
    "checkpoint_every=0": (
        lambda a: None, {}, {"checkpoint_every": 0}, ValueError, r"checkpoint_every must be >= 1"),
}


@pytest.mark.parametrize("name", list(BAD_FIT))
def test_bad_input_names_problem_and_fix_and_leaves_adata_unchanged(name):
    spoil, model_kw, fit_kw, exc, pattern = BAD_FIT[name]
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    fit_kw = dict(fit_kw)
    if "_subset" in fit_kw:
        a = a[fit_kw.pop("_subset")].copy()
    spoil(a)
    before = snapshot(a)
    with pytest.raises(exc) as info:
        DGD(**{**MODEL, **model_kw}).fit(a, **FIT, **fit_kw)
    assert re.search(pattern, str(info.value), flags=re.S), str(info.value)
    assert changed_parts(before, a) == []


# --------------------------------------------------------------------------- valid but unusual inputs
@pytest.mark.parametrize(
    "convert",
    [
        lambda X: X.toarray().astype(np.float64),
        lambda X: X.toarray().astype(np.int32),
        lambda X: X.toarray().astype(np.uint16),
        lambda X: X.toarray().astype(np.float16),
        lambda X: sp.csc_matrix(X),
    ],
    ids=["float64", "int32", "uint16", "float16", "csc"],
)
def test_any_numeric_integer_matrix_reads_like_csr_float32(convert):
    a = make_counts(n_per_group=(20, 20), n_genes=20)
    b = ad.AnnData(convert(a.X), obs=a.obs, var=a.var)
    assert (read_data(b).counts["rna"] != read_data(a).counts["rna"]).nnz == 0


def test_boolean_matrix_is_fitted_as_zero_one_counts_with_a_warning(caplog):
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    b = ad.AnnData(a.X.toarray() > 3, obs=a.obs, var=a.var)
    with caplog.at_level(logging.WARNING, logger="dgdcell"):
        DGD(**MODEL).fit(b, **FIT)
    assert "adata.X is boolean (binarised data): it is modelled as counts of 0 and 1" in caplog.text
    np.testing.assert_array_equal(read_data(b).counts["rna"].toarray(), (a.X.toarray() > 3).astype(np.float32))
    assert np.isfinite(b.obsm["X_dgd"]).all()


@pytest.mark.parametrize("dense", [False, True])
def test_backed_anndata_is_read_and_the_file_is_left_alone(tmp_path, dense):
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    if dense:
        a.X = a.X.toarray()
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    streamed = read_data(backed).counts["rna"]  # on disk (BackedCounts), read per block
    np.testing.assert_array_equal(streamed.read(0, a.n_obs).toarray(), read_data(a).counts["rna"].toarray())
    DGD(**MODEL).fit(backed, **FIT)
    assert backed.obsm["X_dgd"].shape == (90, 3)
    assert changed_parts(a, ad.read_h5ad(path)) == []


@pytest.mark.filterwarnings("ignore:Setting element:anndata.ImplicitModificationWarning")
def test_fitting_a_view_leaves_the_parent_untouched():
    parent = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    before = snapshot(parent)
    view = parent[parent.obs["group"] != "g2"]
    DGD(latent_dim=3, n_components=2).fit(view, **FIT)
    assert view.obsm["X_dgd"].shape == (60, 3)
    assert changed_parts(before, parent) == []


def test_success_adds_only_the_documented_keys():
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30, n_batches=2)
    a.layers["counts"] = a.X.copy()
    a.uns["keep"] = {"x": np.arange(2)}
    before = snapshot(a)
    DGD(**MODEL, covariate_keys=["batch"]).fit(a, layer="counts", **FIT)
    assert {"X_dgd", "X_dgd_batch", "X_dgd_cluster_probs"} <= set(a.obsm)
    after = snapshot(a)
    for k in [k for k in after.obsm if k.startswith("X_dgd")]:
        del after.obsm[k]
    del after.obs["dgd_cluster"], after.uns["dgd"]
    assert changed_parts(before, after) == []


# --------------------------------------------------------------------------- failures inside fit
def test_a_failure_during_training_leaves_adata_unchanged(monkeypatch):
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    before = snapshot(a)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("dgdcell._fitting.train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        DGD(**MODEL).fit(a, **FIT)
    assert changed_parts(before, a) == []


def test_a_failed_refit_leaves_the_fitted_model_unchanged(monkeypatch):
    model = DGD(**MODEL).fit(make_counts(n_per_group=(30, 30, 30), n_genes=30), **FIT)
    weights = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    features, z = copy.deepcopy(model.features), model.representation.clone()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("dgdcell._fitting.train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(make_counts(n_per_group=(30, 30, 30), n_genes=20, seed=4), **FIT)
    assert model.features == features and torch.equal(model.representation, z)
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in weights.items())


def test_a_failure_while_writing_results_leaves_adata_unchanged(monkeypatch):
    a = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    before = snapshot(a)

    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(DGD, "_uns_record", boom)
    with pytest.raises(RuntimeError, match="boom"):
        DGD(**MODEL).fit(a, **FIT)
    assert changed_parts(before, a) == []


# --------------------------------------------------------------------------- not an AnnData
@pytest.mark.parametrize("obj", [np.ones((4, 3)), pd.DataFrame(np.ones((4, 3))), sp.csr_matrix(np.ones((4, 3)))],
                         ids=["ndarray", "DataFrame", "csr"])
def test_check_data_object_names_the_fix(obj):
    with pytest.raises(TypeError, match=r"expected an AnnData or MuData.*anndata\.AnnData\(X\)"):
        check_data_object(obj)
    check_data_object(ad.AnnData(np.ones((4, 3))))


def test_fit_on_a_bare_matrix_is_a_type_error():
    with pytest.raises(TypeError, match="AnnData"):
        DGD(**MODEL).fit(np.ones((20, 5)), **FIT)


# --------------------------------------------------------------------------- bad inputs to transform
@pytest.fixture(scope="module")
def trained():
    return DGD(**MODEL).fit(make_counts(n_per_group=(30, 30, 30), n_genes=30), **FIT)


def _rename_all(a):
    a.var_names = [f"ENSG{j:011d}" for j in range(a.n_vars)]


def _nan(a):
    a.X.data[0] = np.nan


def _duplicate_shared(a):
    a.var_names = ["gene0"] + list(a.var_names[1:-1]) + ["gene0"]


BAD_TRANSFORM = {
    "other kind of feature names": (_rename_all, {}, ValueError,
                                    r"none of the model's 30 rna features.*Are the names the same kind"),
    "NaN": (_nan, {}, ValueError, r"contains 1 NaN or infinite values.*set it to 0 first"),
    "missing layer": (lambda a: None, {"layer": "counts"}, KeyError, r"layer 'counts' not found"),
    "duplicated shared feature": (_duplicate_shared, {}, ValueError, r"more than once.*var_names_make_unique"),
}


@pytest.mark.parametrize("name", list(BAD_TRANSFORM))
def test_bad_transform_input_names_the_fix_and_leaves_adata_unchanged(trained, name):
    spoil, kw, exc, pattern = BAD_TRANSFORM[name]
    a = make_counts(n_per_group=(10, 10, 10), n_genes=30, seed=3)
    spoil(a)
    before = snapshot(a)
    with pytest.raises(exc) as info:
        trained.transform(a, max_epochs=2, verbose=False, **kw)
    assert re.search(pattern, str(info.value), flags=re.S), str(info.value)
    assert changed_parts(before, a) == []


# --------------------------------------------------------------------------- MuData
def make_mudata():
    rna = make_counts(n_per_group=(30, 30, 30), n_genes=30)
    adt = make_counts(n_per_group=(30, 30, 30), n_genes=8, seed=1)
    adt.var_names = [f"prot{j}" for j in range(adt.n_vars)]
    adt.obs = adt.obs[[]]
    return md.MuData({"rna": rna, "adt": adt})


def _mu_no_counts_anywhere(m):
    for mod in m.mod.values():
        X = mod.X.toarray()
        X[[1, 4]] = 0
        mod.X = sp.csr_matrix(X)


BAD_MUDATA = {
    "missing modality": (lambda m: None, {"modalities": ["rna", "atac"]}, KeyError,
                         r"no modality 'atac' \(modalities: \['rna', 'adt'\]\); fix modalities="),
    "non-integer modality": (lambda m: setattr(m.mod["adt"], "X", m.mod["adt"].X.log1p()), {}, ValueError,
                             r"mdata\.mod\['adt'\]\.X contains non-integer.*layer=\{'adt': 'counts'\}"),
    "non-integer modality, counts in its layer": (
        lambda m: (m.mod["adt"].layers.__setitem__("counts", m.mod["adt"].X.copy()),
                   setattr(m.mod["adt"], "X", m.mod["adt"].X.log1p())), {}, ValueError,
        r"Available layers of mdata\.mod\['adt'\]: \['counts'\]; layer=\{'adt': 'counts'\} probably holds"),
    "cells without counts in any modality": (_mu_no_counts_anywhere, {}, ValueError,
                                             r"2 cells have no counts in any of the modalities.*mdata\[keep\]"),
    "nothing selected": (lambda m: None, {"modalities": []}, ValueError, r"no modality selected"),
}


@pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")
@pytest.mark.parametrize("name", list(BAD_MUDATA))
def test_bad_mudata_names_problem_and_fix_and_is_left_unchanged(name):
    spoil, fit_kw, exc, pattern = BAD_MUDATA[name]
    m = make_mudata()
    spoil(m)
    before = snapshot(m)
    with pytest.raises(exc) as info:
        DGD(**MODEL).fit(m, **FIT, **fit_kw)
    assert re.search(pattern, str(info.value), flags=re.S), str(info.value)
    assert changed_parts(before, m) == []


# --------------------------------------------------------------------------- model files
def weights_of(path):
    """The weights file that ``path/config.json`` names (a checkpoint alternates between two names)."""
    return path / json.loads((path / "config.json").read_text()).get("weights_file", "weights.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    DGD(**MODEL).fit(make_counts(n_per_group=(30, 30, 30), n_genes=30), **FIT).save(path)
    return path


@pytest.fixture
def model_dir(saved, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    for f in saved.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "10 bytes", "half", "all but the last byte"])
def test_truncated_weights_are_refused(model_dir, keep):
    w = weights_of(model_dir)
    data = w.read_bytes()
    w.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=r"weights\.pt could not be read \(corrupted or truncated\?\)"):
        DGD.load(model_dir)


@pytest.mark.parametrize("text", ["", "{", '{"format_version": 1, "init_args": {', "not json at all"])
def test_garbage_config_is_refused(model_dir, text):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json is corrupted"):
        DGD.load(model_dir)


@pytest.mark.parametrize("fmt", [0, 2, "1", None])
def test_other_format_versions_are_refused(model_dir, fmt):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["format_version"] = fmt
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"has model format {fmt}; this dgdcell \(.*\) reads format 1"):
        DGD.load(model_dir)


@pytest.mark.parametrize("version", ["0.0.1", "99.0.0"], ids=["older", "newer"])
def test_other_library_versions_load_with_a_warning(model_dir, saved, version, caplog):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["dgdcell_version"] = version
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="dgdcell"):
        model = DGD.load(model_dir, device="cpu")
    assert f"model saved by dgdcell {version}, loading with {dgdcell.__version__}" in caplog.text
    np.testing.assert_array_equal(model.get_latent_representation(), DGD.load(saved).get_latent_representation())


class _Payload:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_in_weights_is_refused_and_never_run(model_dir, tmp_path):
    marker = tmp_path / "code_ran"
    tensors = torch.load(weights_of(model_dir), weights_only=True)
    tensors["payload"] = _Payload(marker)
    torch.save(tensors, weights_of(model_dir))
    with pytest.raises(ValueError, match=r"weights\.pt could not be read.*(Weights only load failed|Unsupported)"):
        DGD.load(model_dir)
    assert not marker.exists()


def _other_model_weights(path):
    other = path.parent / "other"
    DGD(latent_dim=4, n_components=3, seed=0).fit(make_counts(n_per_group=(30, 30, 30), n_genes=30), **FIT).save(other)
    weights_of(path).write_bytes(weights_of(other).read_bytes())


def _config_json(value):
    return lambda path: (path / "config.json").write_text(json.dumps(value))


def _config_without(key):
    def spoil(path):
        cfg = json.loads((path / "config.json").read_text())
        del cfg[key]
        (path / "config.json").write_text(json.dumps(cfg))

    return spoil


def _weights_without(key):
    def spoil(path):
        tensors = torch.load(weights_of(path), weights_only=True)
        del tensors[key]
        torch.save(tensors, weights_of(path))

    return spoil


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda p: (p / "config.json").write_bytes(b"\x80\xff"), id="binary config"),
        pytest.param(_config_json([]), id="config a JSON list"),
        pytest.param(_config_without("init_args"), id="config without init_args"),
        pytest.param(_other_model_weights, id="weights of another model"),
        pytest.param(_weights_without("representation"), id="weights without representation"),
    ],
)
def test_inconsistent_model_files_give_a_value_error(model_dir, spoil):
    spoil(model_dir)
    with pytest.raises(ValueError, match=r"config\.json|weights\.pt"):
        DGD.load(model_dir)


def test_max_epochs_below_one_is_a_value_error():
    a = make_counts(n_per_group=(20, 20), n_genes=20)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        DGD(**MODEL).fit(a, max_epochs=0, verbose=False)
    assert "X_dgd" not in a.obsm


def test_a_single_cell_fits_without_nan():
    a = make_counts(n_per_group=(20, 20), n_genes=20)[:1].copy()
    DGD(latent_dim=3, n_components=1, seed=0).fit(a, max_epochs=3, verbose=False)
    assert np.isfinite(a.obsm["X_dgd"]).all()


def test_a_model_from_a_newer_version_names_the_unknown_settings(tmp_path):
    model = DGD(**MODEL).fit(make_counts(n_per_group=(20, 20), n_genes=20), **FIT)
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["init_args"]["future_option"] = 1
    config["dgdcell_version"] = "9.0.0"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"future_option.*9\.0\.0.*Upgrade dgdcell"):
        DGD.load(tmp_path / "m")
