"""Robustness: what a user sees when the input is not what dgdcell expects.

Every case builds a small synthetic AnnData (or MuData), spoils it in one way (log-normalised
values, NaN, a missing obs column, a typo in a key, ...) and makes the call a user would make
(``DGD(...).fit``, ``transform``, ``DGD.load``). For each case the table records

* the outcome: the exception type and the exact message (``str(exc)``, what follows the
  type in a traceback), or ``accepted`` when the call succeeds;
* warnings issued (Python warnings and ``dgdcell`` log records at WARNING or above);
* whether the user's object was left exactly as it was (a deep copy taken before the call is
  compared after a failed call: X, layers, obs, var, obsm, varm, obsp, uns keys and values, names;
  for a MuData also its own obs/obsm/uns and every modality);
* the verdict: ``ok`` when the outcome is the expected one (an error of the expected type whose
  message matches the expected pattern naming the problem and fix, or acceptance), and, for an
  error, the object is unchanged; ``NO`` otherwise.

Usage (from the repository root)::

    python benchmarks/robustness.py [--out benchmarks/results]

Writes ``<out>/robustness.md``. Runs in well under a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import platform
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # use the checkout's dgdcell even if it is not installed

import torch  # noqa: E402

import dgdcell  # noqa: E402
from dgdcell import DGD  # noqa: E402

FIT = dict(max_epochs=2, verbose=False)
TRANSFORM = dict(max_epochs=2, verbose=False)


# --------------------------------------------------------------------------- data


def make_adata(n_cells: int = 120, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """NB counts of three groups (CSR float32), ``obs['group']``, ``obs['batch']`` (2 classes)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n_cells) % 3
    profile = rng.gamma(2.0, 1.0, size=(3, n_genes))
    mu = profile[groups] / profile[groups].sum(1, keepdims=True) * rng.lognormal(np.log(500), 0.3, (n_cells, 1))
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    counts[:, 0] += 1  # every cell has counts
    obs = pd.DataFrame(
        {
            "group": pd.Categorical([f"g{g}" for g in groups]),
            "batch": pd.Categorical([f"b{b}" for b in rng.integers(0, 2, n_cells)]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))


def make_mudata(seed: int = 0):
    """A MuData with modalities ``rna`` (40 genes) and ``adt`` (10 proteins), same 120 cells."""
    import mudata as md

    rna = make_adata(seed=seed)
    adt = make_adata(n_genes=10, seed=seed + 1)
    adt.var_names = [f"prot{j}" for j in range(adt.n_vars)]
    adt.obs = adt.obs[[]]
    m = md.MuData({"rna": rna, "adt": adt})
    m.obs["batch"] = rna.obs["batch"].to_numpy()
    return m


def _dense(a) -> np.ndarray:
    return a.toarray() if sp.issparse(a) else np.asarray(a)


def _with_X(X, adata: ad.AnnData | None = None) -> ad.AnnData:
    base = make_adata() if adata is None else adata
    return ad.AnnData(X, obs=base.obs.copy(), var=base.var.copy())


_FITTED: dict[str, DGD] = {}


def fitted_model() -> DGD:
    """A model fitted on :func:`make_adata` (cached)."""
    if "m" not in _FITTED:
        _FITTED["m"] = DGD(latent_dim=3, n_components=3, seed=0).fit(make_adata(), **FIT)
    return _FITTED["m"]


def saved_model(directory: Path) -> Path:
    """Save the fitted model to ``directory/model`` and return the path."""
    path = directory / "model"
    fitted_model().save(path, overwrite=True)
    return path


# --------------------------------------------------------------------------- comparing


def same(a: Any, b: Any) -> bool:
    """Deep equality for what an AnnData holds (arrays, sparse, frames, dicts, lists, scalars; NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if sp.issparse(a):
        return a.format == b.format and same(a.toarray(), b.toarray())
    if isinstance(a, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, (pd.DataFrame, pd.Series, pd.Index)):
        try:
            if isinstance(a, pd.DataFrame):
                pd.testing.assert_frame_equal(a, b)
            elif isinstance(a, pd.Series):
                pd.testing.assert_series_equal(a, b)
            else:
                pd.testing.assert_index_equal(a, b)
        except AssertionError:
            return False
        return True
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and np.isnan(a):
        return bool(np.isnan(b))
    return bool(a == b)


def _mapping(m) -> dict:
    return {k: m[k] for k in m.keys()}


def anndata_differences(before: ad.AnnData, after: ad.AnnData, prefix: str = "") -> list[str]:
    """Names of the parts of ``after`` that differ from ``before`` (empty: unchanged)."""
    out = []
    parts = {
        "X": lambda a: a.X,
        "layers": lambda a: _mapping(a.layers),
        "obs": lambda a: a.obs,
        "var": lambda a: a.var,
        "obsm": lambda a: _mapping(a.obsm),
        "varm": lambda a: _mapping(a.varm),
        "obsp": lambda a: _mapping(a.obsp),
        "uns": lambda a: dict(a.uns),
        "obs_names": lambda a: a.obs_names,
        "var_names": lambda a: a.var_names,
    }
    for name, get in parts.items():
        if not same(get(before), get(after)):
            out.append(prefix + name)
    return out


def differences(before, after) -> list[str]:
    """Like :func:`anndata_differences` for an AnnData or a MuData (its own parts and every modality)."""
    if type(before).__name__ == "MuData":
        out = []
        for name in ("obs", "var"):
            if not same(getattr(before, name), getattr(after, name)):
                out.append(name)
        for name in ("obsm", "uns"):
            if not same(_mapping(getattr(before, name)), _mapping(getattr(after, name))):
                out.append(name)
        if list(before.mod) != list(after.mod):
            out.append("mod keys")
        for m in before.mod:
            if m in after.mod:
                out += anndata_differences(before.mod[m], after.mod[m], prefix=f"mod[{m!r}].")
        return out
    if isinstance(before, ad.AnnData):
        return anndata_differences(before, after)
    return [] if same(before, after) else [type(before).__name__]


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One bad (or merely unusual) input.

    ``build`` returns ``(obj, call)``: the user's object and the call made on it.
    ``expect`` is ``None`` when the call should succeed, else ``(exception type, regex)``:
    the message must match the regex (it names the problem and the fix). ``note``: the change
    that would make the case ok, listed under the table while it is not.
    """

    group: str
    name: str
    build: Callable[[], tuple[Any, Callable[[Any], Any]]]
    expect: tuple[type, str] | None
    note: str = ""


def fit_with(**model_kw) -> Callable[..., Callable[[Any], Any]]:
    """A ``call`` that fits ``DGD(latent_dim=3, n_components=3, **model_kw)`` with ``fit_kw``."""

    def make(**fit_kw):
        kw = dict(latent_dim=3, n_components=3, seed=0)
        kw.update(model_kw)
        return lambda obj: DGD(**kw).fit(obj, **{**FIT, **fit_kw})

    return make


FIT_DEFAULT = fit_with()


def case(group, name, expect=None, note=""):
    """Decorator registering a builder as a :class:`Case`."""

    def register(build):
        CASES.append(Case(group, name, build, expect, note))
        return build

    return register


CASES: list[Case] = []


def _fit(adata, **fit_kw):
    return adata, FIT_DEFAULT(**fit_kw)


# ----- values
@case("values", "log-normalised X (normalize_total + log1p), raw counts in layers['counts']",
      (ValueError, r"non-integer.*log-transformed.*layer='counts' probably holds the raw counts"))
def _():
    a = make_adata()
    a.layers["counts"] = a.X.copy()
    X = a.X.multiply(1e4 / a.X.sum(1)).tocsr()
    a.X = X.log1p()
    return _fit(a)


@case("values", "normalised X (normalize_total, no log), no layers",
      (ValueError, r"non-integer.*raw counts.*adata.raw or a layer"))
def _():
    a = make_adata()
    a.X = a.X.multiply(1e4 / a.X.sum(1)).tocsr()
    return _fit(a)


@case("values", "scaled X (sc.pp.scale: centred, negative values)", (ValueError, r"negative.*raw counts"))
def _():
    a = make_adata()
    X = _dense(a.X)
    a.X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    return _fit(a)


@case("values", "negative counts (one entry -1)", (ValueError, r"negative"))
def _():
    a = make_adata()
    a.X.data[0] = -1
    return _fit(a)


@case("values", "NaN in X", (ValueError, r"NaN.*finite"))
def _():
    a = make_adata()
    a.X.data[3] = np.nan
    return _fit(a)


@case("values", "+inf in X", (ValueError, r"infinite"))
def _():
    a = make_adata()
    a.X.data[3] = np.inf
    return _fit(a)


@case("values", "string dtype matrix (numbers stored as text)", (TypeError, r"dtype.*numeric.*counts"))
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(int).astype(str).astype(object), a))


@case("values", "complex dtype matrix", (TypeError, r"complex"))
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(np.complex64), a))


@case("values", "boolean matrix (binarised data; modelled as 0/1 counts, with a warning)")
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X) > 2, a))


@case("values", "dense float64 matrix of integer values")
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(np.float64), a))


@case("values", "dense int32 matrix")
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(np.int32), a))


@case("values", "dense uint16 matrix")
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(np.uint16), a))


@case("values", "float16 matrix of integer values")
def _():
    a = make_adata()
    return _fit(_with_X(_dense(a.X).astype(np.float16), a))


@case("values", "CSC sparse matrix")
def _():
    a = make_adata()
    return _fit(_with_X(sp.csc_matrix(a.X), a))


@case("values", "sparse matrix with explicit stored zeros")
def _():
    a = make_adata()
    X = a.X.tocoo()
    X = sp.coo_matrix((np.r_[X.data, 0.0], (np.r_[X.row, 0], np.r_[X.col, 1])), shape=X.shape).tocsr()
    a.X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)
    return _fit(a)


@case("values", "very large integer counts (1e7 per entry)")
def _():
    a = make_adata()
    a.X = a.X * 1e7
    return _fit(a)


# ----- shapes
@case("shape", "zero cells", (ValueError, r"no cells"))
def _():
    return _fit(make_adata()[:0].copy())


@case("shape", "zero features", (ValueError, r"no features"))
def _():
    return _fit(make_adata()[:, :0].copy())


@case("shape", "one cell with n_components=1",
      note="dgdcell/train/initialisation.py takes z.var(0) (unbiased: NaN for one cell) for the variance floor and "
           "the start variances; use z.var(0, correction=0), or reject fewer than 2 cells in DGD.fit.")
def _():
    return make_adata()[:1].copy(), fit_with(n_components=1)()


@case("shape", "one feature")
def _():
    a = make_adata()[:, :1].copy()
    return _fit(a)


@case("shape", "cells with no counts", (ValueError, r"no counts.*filter_cells"))
def _():
    a = make_adata()
    X = _dense(a.X)
    X[[5, 17]] = 0
    a.X = sp.csr_matrix(X)
    return _fit(a)


@case("shape", "all cells without counts (all-zero matrix)", (ValueError, r"no counts"))
def _():
    a = make_adata()
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    return _fit(a)


@case("shape", "features with no counts (kept)")
def _():
    a = make_adata()
    X = _dense(a.X)
    X[:, [3, 7]] = 0
    a.X = sp.csr_matrix(X)
    return _fit(a)


@case("shape", "adata.X is None, counts only in a layer, no layer=", (ValueError, r"X is empty.*layer="))
def _():
    a = make_adata()
    b = ad.AnnData(obs=a.obs, var=a.var, layers={"counts": a.X})
    return _fit(b)


@case("shape", "a layer with a different shape than X (refused by anndata itself on assignment)",
      (ValueError, r"incorrect shape"))
def _():
    a = make_adata()

    def call(obj):
        obj.layers["counts"] = obj.X[:, :10]
        return FIT_DEFAULT(layer="counts")(obj)

    return a, call


def _backed(dense: bool):
    a = make_adata()
    if dense:
        a.X = a.X.toarray()
    path = Path(tempfile.mkdtemp(prefix="dgd_robust_")) / "data.h5ad"
    a.write_h5ad(path)
    return ad.read_h5ad(path, backed="r"), FIT_DEFAULT()


@case("shape", "backed AnnData (read_h5ad(backed='r')), sparse X")
def _():
    return _backed(dense=False)


@case("shape", "backed AnnData (read_h5ad(backed='r')), dense X")
def _():
    return _backed(dense=True)


@case("shape", "AnnData view (adata[mask]): the view becomes a copy holding the results, the parent is untouched")
def _():
    def call(parent):
        view = parent[parent.obs["batch"] == "b0"]
        FIT_DEFAULT()(view)
        assert "X_dgd" in view.obsm and not view.is_view

    return make_adata(), call


# ----- keys and columns
@case("keys", "layer missing", (KeyError, r"layer 'counts' not found.*available"))
def _():
    return _fit(make_adata(), layer="counts")


@case("keys", "layer name with a typo (layer='count', layers has 'counts')", (KeyError, r"'count'.*counts"))
def _():
    a = make_adata()
    a.layers["counts"] = a.X.copy()
    return _fit(a, layer="count")


@case("keys", "wrong layer: layer= names a log-normalised layer", (ValueError, r"layers\['lognorm'\].*non-integer"))
def _():
    a = make_adata()
    a.layers["lognorm"] = a.X.log1p()
    return _fit(a, layer="lognorm")


@case("keys", "covariate column missing", (KeyError, r"covariate key 'donor'.*not a column"))
def _():
    return make_adata(), fit_with(covariate_keys=["donor"])()


@case("keys", "covariate key with wrong case ('Batch')", (KeyError, r"'Batch'.*batch"))
def _():
    return make_adata(), fit_with(covariate_keys=["Batch"])()


@case("keys", "covariate with one class", (ValueError, r"single class.*Drop it"))
def _():
    a = make_adata()
    a.obs["one"] = "x"
    return a, fit_with(covariate_keys=["one"])()


@case("keys", "covariate column with NaN", (ValueError, r"missing values.*fill"))
def _():
    a = make_adata()
    a.obs["donor"] = pd.array(["d1", "d2"] * 60, dtype=object)
    a.obs.loc[a.obs_names[:4], "donor"] = np.nan
    return a, fit_with(covariate_keys=["donor"])()


@case("keys", "covariate given as a string, not a list")
def _():
    return make_adata(), fit_with(covariate_keys="batch")()


@case("keys", "numeric (integer) covariate column")
def _():
    a = make_adata()
    a.obs["plate"] = np.arange(a.n_obs) % 2
    return a, fit_with(covariate_keys=["plate"])()


@case("keys", "label column missing", (KeyError, r"label key 'celltype'.*not a column"))
def _():
    return make_adata(), fit_with(label_key="celltype")()


@case("keys", "label column all NaN", (ValueError, r"no non-missing"))
def _():
    a = make_adata()
    a.obs["celltype"] = pd.Categorical([np.nan] * a.n_obs, categories=["t1"])
    return a, fit_with(label_key="celltype")()


@case("keys", "label column with some NaN (semi-supervised)")
def _():
    a = make_adata()
    a.obs["celltype"] = a.obs["group"].astype(object)
    a.obs.loc[a.obs_names[:30], "celltype"] = np.nan
    return a, fit_with(label_key="celltype")()


@case("keys", "n_components not a multiple of the label classes", (ValueError, r"multiple of the 3 classes"))
def _():
    return make_adata(), fit_with(label_key="group", n_components=4)()


@case("keys", "duplicated obs names")
def _():
    a = make_adata()
    a.obs_names = ["c"] * (a.n_obs // 2) + [f"x{i}" for i in range(a.n_obs - a.n_obs // 2)]
    return _fit(a)


@case("keys", "duplicated var names")
def _():
    a = make_adata()
    a.var_names = ["g"] * 2 + list(a.var_names[2:])
    return _fit(a)


# ----- parameters
@case("parameters", "n_components=0", (ValueError, r"n_components must be >= 1"))
def _():
    return make_adata(), fit_with(n_components=0)()


@case("parameters", "n_components larger than the number of cells", (ValueError, r"exceeds the number of cells"))
def _():
    return make_adata()[:5].copy(), fit_with(n_components=10)()


@case("parameters", "latent_dim=0", (ValueError, r"latent_dim must be >= 1"))
def _():
    return make_adata(), fit_with(latent_dim=0)()


@case("parameters", "covariance_type typo ('diag')", (ValueError, r"covariance_type must be one of"))
def _():
    return make_adata(), fit_with(covariance_type="diag")()


@case("parameters", "max_epochs=0", (ValueError, r"max_epochs"),
      note="DGD.fit checks batch_size and train_size but not max_epochs: 0 or -5 silently skip training; "
           "raise ValueError('max_epochs must be >= 1').")
def _():
    return _fit(make_adata(), max_epochs=0)


@case("parameters", "batch_size=0", (ValueError, r"batch_size must be >= 1"))
def _():
    return _fit(make_adata(), batch_size=0)


@case("parameters", "train_size=0", (ValueError, r"train_size must be in"))
def _():
    return _fit(make_adata(), train_size=0.0)


NOT_ANNDATA = "call dgdcell.data.checks.check_data_object(data) first in read_data and read_new_data."


@case("parameters", "a numpy array instead of an AnnData", (TypeError, r"AnnData"), note=NOT_ANNDATA)
def _():
    return _dense(make_adata().X), FIT_DEFAULT()


@case("parameters", "a pandas DataFrame instead of an AnnData", (TypeError, r"AnnData"), note=NOT_ANNDATA)
def _():
    a = make_adata()
    return pd.DataFrame(_dense(a.X), index=a.obs_names, columns=a.var_names), FIT_DEFAULT()


# ----- transform
def _transform(adata, **kw):
    model = fitted_model()
    return adata, lambda obj: model.transform(obj, **{**TRANSFORM, **kw})


@case("transform", "new data sharing too few features (30% of the model's)",
      (ValueError, r"only 12 of the model's 40 rna features"))
def _():
    return _transform(make_adata(seed=1)[:, :12].copy())


@case("transform", "new data with other feature names (Ensembl IDs vs symbols)", (ValueError, r"only 0 of the model's"))
def _():
    a = make_adata(seed=1)
    a.var_names = [f"ENSG{j:011d}" for j in range(a.n_vars)]
    return _transform(a)


@case("transform", "new data log-normalised", (ValueError, r"non-integer"))
def _():
    a = make_adata(seed=1)
    a.X = a.X.log1p()
    return _transform(a)


@case("transform", "new data with NaN", (ValueError, r"NaN"))
def _():
    a = make_adata(seed=1)
    a.X.data[0] = np.nan
    return _transform(a)


@case("transform", "new data with a cell without counts in the shared features", (ValueError, r"no counts.*shared"))
def _():
    a = make_adata(seed=1)
    X = _dense(a.X)
    X[0] = 0
    a.X = sp.csr_matrix(X)
    return _transform(a)


@case("transform", "new data with zero cells", (ValueError, r"no cells"))
def _():
    return _transform(make_adata(seed=1)[:0].copy())


@case("transform", "layer missing in new data", (KeyError, r"layer 'counts' not found"))
def _():
    return _transform(make_adata(seed=1), layer="counts")


@case("transform", "shared feature duplicated in new data", (ValueError, r"more than once.*var_names_make_unique"))
def _():
    a = make_adata(seed=1)
    a.var_names = ["gene0"] + list(a.var_names[1:-1]) + ["gene0"]
    return _transform(a)


@case("transform", "unfitted model", (RuntimeError, r"not fitted yet"))
def _():
    return make_adata(seed=1), lambda obj: DGD().transform(obj, **TRANSFORM)


# ----- model files
def _load_case(spoil: Callable[[Path], None]):
    def build():
        tmp = Path(tempfile.mkdtemp(prefix="dgd_robust_"))
        path = saved_model(tmp)
        spoil(path)
        return None, lambda _obj: DGD.load(path, device="cpu")

    return build


def weights_of(path: Path) -> Path:
    """The weights file that ``path/config.json`` names (a checkpoint alternates between two names)."""
    return path / json.loads((path / "config.json").read_text()).get("weights_file", "weights.pt")


def _truncate(path: Path):
    w = weights_of(path)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _garbage_config(path: Path):
    (path / "config.json").write_text('{"format_version": 1, "init_args": {')


def _config_edit(**changes):
    def spoil(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))

    return spoil


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def _pickle_object(path: Path):
    tensors = torch.load(weights_of(path), weights_only=True)
    tensors["payload"] = _Evil()
    torch.save(tensors, weights_of(path))


def _delete_weights(path: Path):
    weights_of(path).unlink()


LOAD_NOTE = (
    "DGD.load: catch UnicodeDecodeError with JSONDecodeError; require a dict with the keys save writes; wrap "
    "DGD(**init_args), _build, load_state_dict and the tensor look-ups in try/except (KeyError, TypeError, "
    "RuntimeError) -> ValueError naming both files."
)


def _config_text(text: str | bytes):
    def spoil(path: Path):
        if isinstance(text, bytes):
            (path / "config.json").write_bytes(text)
        else:
            (path / "config.json").write_text(text)

    return spoil


def _config_drop(key: str):
    def spoil(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        del cfg[key]
        (path / "config.json").write_text(json.dumps(cfg))

    return spoil


def _newer_init_arg(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["dgdcell_version"] = "9.0.0"
    cfg["init_args"]["new_option"] = 1
    (path / "config.json").write_text(json.dumps(cfg))


def _other_models_weights(path: Path):
    other = DGD(latent_dim=4, n_components=3, seed=0).fit(make_adata(), **FIT)
    other.save(path.parent / "other", overwrite=True)
    weights_of(path).write_bytes(weights_of(path.parent / "other").read_bytes())


def _drop_tensor(path: Path):
    tensors = torch.load(weights_of(path), weights_only=True)
    del tensors["representation"]
    torch.save(tensors, weights_of(path))


CASES += [
    Case("model files", "weights.pt truncated to half", _load_case(_truncate), (ValueError, r"corrupted or truncated")),
    Case("model files", "config.json not valid JSON", _load_case(_garbage_config), (ValueError, r"config.json is corrupted")),
    Case("model files", "format_version 99", _load_case(_config_edit(format_version=99)), (ValueError, r"format 99")),
    Case("model files", "saved by another dgdcell version (loads, with a warning)",
         _load_case(_config_edit(dgdcell_version="0.0.1")), None),
    Case("model files", "weights.pt holding a pickled arbitrary object", _load_case(_pickle_object),
         (ValueError, r"could not be read")),
    Case("model files", "weights.pt missing", _load_case(_delete_weights), (FileNotFoundError, r"not a saved DGD")),
    Case("model files", "weights.pt empty (0 bytes)", _load_case(lambda p: weights_of(p).write_bytes(b"")),
         (ValueError, r"corrupted or truncated")),
    Case("model files", "config.json holding binary garbage", _load_case(_config_text(b"\x80\x81\xff garbage")),
         (ValueError, r"config.json"), LOAD_NOTE),
    Case("model files", "config.json valid JSON but not an object ([])", _load_case(_config_text("[]")),
         (ValueError, r"config.json"), LOAD_NOTE),
    Case("model files", "config.json without 'init_args'", _load_case(_config_drop("init_args")),
         (ValueError, r"init_args"), LOAD_NOTE),
    Case("model files", "config.json from a newer dgdcell with an unknown setting", _load_case(_newer_init_arg),
         (ValueError, r"new_option.*9\.0\.0"),
         "DGD.load: compare init_args with the parameters of DGD.__init__ before calling it; for unknown ones "
         "raise ValueError naming them and the saved dgdcell version ('upgrade dgdcell to load it') instead of "
         "calling the files inconsistent."),
    Case("model files", "weights.pt of another model (latent_dim 4 vs 3)", _load_case(_other_models_weights),
         (ValueError, r"consistent saved DGD.*config.json and the weights"), LOAD_NOTE),
    Case("model files", "weights.pt without the representations", _load_case(_drop_tensor),
         (ValueError, r"representation"), LOAD_NOTE),
]


# ----- resuming (warm_start)
@case("warm start", "warm_start=True on an unfitted model", (ValueError, r"warm_start=True continues a fitted model"))
def _():
    return _fit(make_adata(), warm_start=True)


@case("warm start", "warm_start=True on other cells than the model's", (ValueError, r"not in the model.*transform"))
def _():
    model = fitted_model()
    a = make_adata(seed=3)
    a.obs_names = [f"other{i}" for i in range(a.n_obs)]
    return a, lambda obj: model.fit(obj, warm_start=True, **FIT)


@case("warm start", "warm_start=True on the model's cells in another order")
def _():
    a = make_adata()
    a = a[np.random.default_rng(0).permutation(a.n_obs)].copy()
    model = DGD.load(saved_model(Path(tempfile.mkdtemp(prefix="dgd_robust_"))), device="cpu")
    return a, lambda obj: model.fit(obj, warm_start=True, **FIT)


@case("warm start", "warm_start=True on data with fewer features", (ValueError, r"warm_start needs the features"))
def _():
    model = DGD.load(saved_model(Path(tempfile.mkdtemp(prefix="dgd_robust_"))), device="cpu")
    return make_adata()[:, :30].copy(), lambda obj: model.fit(obj, warm_start=True, **FIT)


@case("warm start", "checkpoint_every=0", (ValueError, r"checkpoint_every must be >= 1"))
def _():
    return _fit(make_adata(), checkpoint_dir=tempfile.mkdtemp(prefix="dgd_robust_"), checkpoint_every=0)


# ----- MuData (fit reads every modality of mdata.mod, or those named by modalities=)
def _mudata_available() -> bool:
    import inspect

    return "modalities" in inspect.signature(DGD.fit).parameters


def _mfit(mdata, **fit_kw):
    return mdata, FIT_DEFAULT(**fit_kw)


@case("MuData", "MuData with rna and adt (both used)")
def _():
    return _mfit(make_mudata())


@case("MuData", "modalities= names a modality the MuData lacks", (KeyError, r"no modality 'atac'"))
def _():
    return _mfit(make_mudata(), modalities=["rna", "atac"])


@case("MuData", "a modality with non-integer values (CLR-normalised adt)", (ValueError, r"mod\['adt'\].*non-integer.*layer=\{'adt': 'counts'\}"))
def _():
    m = make_mudata()
    m.mod["adt"].X = m.mod["adt"].X.log1p()
    return _mfit(m)


# ----- settings and covariates (the reliability review)
@case("settings", "numeric covariate with 120 distinct values (a percentage)", (ValueError, r"continuous_covariate_keys"))
def _():
    a = make_adata()
    a.obs["pct"] = np.random.default_rng(0).uniform(0, 10, a.n_obs)
    return a, fit_with(covariate_keys=["pct"])()


@case("settings", "all cells identical", (ValueError, r"identical counts"))
def _():
    a = make_adata()
    a.X = sp.csr_matrix(np.tile(_dense(a.X)[:1], (a.n_obs, 1)))
    return _fit(a)


@case("settings", "lr_decoder=-1e-3", (ValueError, r"lr_decoder must be a number in \(0, 1.0\]"))
def _():
    return _fit(make_adata(), lr_decoder=-1e-3)


@case("settings", "lr_representation=1e6", (ValueError, r"lr_representation must be"))
def _():
    return _fit(make_adata(), lr_representation=1e6)


@case("settings", "train_size=1e-9 (one training cell for 3 components)", (ValueError, r"too few for 3 components"))
def _():
    return _fit(make_adata(), train_size=1e-9)


@case("settings", "train_size='0.5' (a string)", (ValueError, r"train_size must be a number"))
def _():
    return _fit(make_adata(), train_size="0.5")


@case("settings", "n_components=2.5", (ValueError, r"n_components must be >= 1 \(an integer\)"))
def _():
    return make_adata(), fit_with(n_components=2.5)()


@case("settings", "n_hidden=(0,)", (ValueError, r"n_hidden\[0\] must be >= 1"))
def _():
    return make_adata(), fit_with(n_hidden=(0,))()


@case("settings", "seed=-1", (ValueError, r"seed must be in \[0, "))
def _():
    return make_adata(), fit_with(seed=-1)()


@case("settings", "dispersion_init=0", (ValueError, r"dispersion_init must be a finite number"))
def _():
    return make_adata(), fit_with(dispersion_init=0)()


@case("settings", "device='meta'", (ValueError, r"device must be 'auto', 'cpu'"))
def _():
    return make_adata(), fit_with(device="meta")()


@case("settings", "modality_weights naming a modality the data lack", (ValueError, r"modality_weights names modalities"))
def _():
    return make_adata(), fit_with(modality_weights={"adt": 0.5})()


@case("settings", "a covariate named cluster_probs", (ValueError, r"would overwrite the output"))
def _():
    a = make_adata()
    a.obs["cluster_probs"] = a.obs["batch"]
    return a, fit_with(covariate_keys=["cluster_probs"])()


@case("settings", "layer={'rna': 'counts'} on an AnnData", (ValueError, r"layer must be None"))
def _():
    a = make_adata()
    a.layers["counts"] = a.X.copy()
    return _fit(a, layer={"rna": "counts"})


@case("settings", "a count of 1e300 (float64)", (ValueError, r"not raw counts"))
def _():
    a = make_adata()
    a.X = a.X.astype(np.float64)
    a.X.data[0] = 1e300
    return _fit(a)


@case("settings", "checkpoint_dir holding another saved model", (FileExistsError, r"checkpoint_dir .* is not empty"))
def _():
    folder = Path(tempfile.mkdtemp()) / "saved"
    fitted_model().save(folder)
    return make_adata(), FIT_DEFAULT(checkpoint_dir=folder)


@case("MuData", "cells with no counts in any modality", (ValueError, r"2 cells have no counts in any of the modalities.*mdata\[keep\]"))
def _():
    m = make_mudata()
    for mod in m.mod.values():
        X = _dense(mod.X)
        X[[2, 9]] = 0
        mod.X = sp.csr_matrix(X)
    return _mfit(m)


@case("MuData", "a cell with no counts in one modality only (mosaic: fitted on its other modality)")
def _():
    m = make_mudata()
    X = _dense(m.mod["adt"].X)
    X[4] = 0
    m.mod["adt"].X = sp.csr_matrix(X)
    return _mfit(m)


@case("MuData", "modalities=[] (nothing selected)", (ValueError, r"no modality selected"))
def _():
    return _mfit(make_mudata(), modalities=[])


@case("MuData", "covariate column missing from mdata.obs", (KeyError, r"'donor'"))
def _():
    return make_mudata(), fit_with(covariate_keys=["donor"])()


@case("MuData", "transform: a MuData with none of the model's modalities", (KeyError, r"include none of the model's"))
def _():
    import mudata as md

    m = make_mudata()
    m = md.MuData({"atac": m.mod["rna"], "hto": m.mod["adt"]})
    model = fitted_mudata_model()
    return m, lambda obj: model.transform(obj, **TRANSFORM)


def fitted_mudata_model() -> DGD:
    """A model fitted on :func:`make_mudata` (cached)."""
    if "mu" not in _FITTED:
        _FITTED["mu"] = DGD(latent_dim=3, n_components=3, seed=0).fit(make_mudata(), **FIT)
    return _FITTED["mu"]


# --------------------------------------------------------------------------- running


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _comparable(obj):
    """A copy of ``obj`` to compare, taken now (a backed AnnData is read into memory)."""
    if getattr(obj, "isbacked", False):
        return obj.to_memory()
    if type(obj).__name__ == "MuData":  # deepcopy trips over its file manager
        return obj.copy()
    return copy.deepcopy(obj)


def without_outputs(obj, key: str = "dgd"):
    """A copy of ``obj`` without the keys fit/transform write (``obsm['X_<key>*']``,
    ``obs['<key>_cluster']``, ``uns['<key>']``), also inside every MuData modality."""
    obj = _comparable(obj)
    targets = [obj] + (list(obj.mod.values()) if type(obj).__name__ == "MuData" else [])
    for a in targets:
        for name in [k for k in a.obsm.keys() if k == f"X_{key}" or k.startswith(f"X_{key}_")]:
            del a.obsm[name]
        if f"{key}_cluster" in a.obs.columns:
            del a.obs[f"{key}_cluster"]
        a.uns.pop(key, None)
    return obj


def run_case(c: Case) -> dict:
    """Run one case; returns its table row as a dict."""
    obj, call = c.build()
    before = None if obj is None else _comparable(obj)
    handler = _Records()
    lib_logger = logging.getLogger("dgdcell")
    lib_logger.addHandler(handler)
    old_level = lib_logger.level
    lib_logger.setLevel(logging.WARNING)
    error = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(obj)
    except Exception as exc:  # noqa: BLE001 - recording what the user sees is the point
        error = exc
    finally:
        lib_logger.removeHandler(handler)
        lib_logger.setLevel(old_level)
    warned = handler.messages + [
        f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, DeprecationWarning)
    ]
    if obj is None:
        unchanged, changed = "n/a", []
    elif error is None:  # success: only the documented outputs may have been added
        changed = differences(before, without_outputs(obj))
        unchanged = "outputs added, rest unchanged" if not changed else "NO: " + ", ".join(changed)
    else:
        changed = differences(before, _comparable(obj))
        unchanged = "yes" if not changed else "NO: " + ", ".join(changed)
    if c.expect is None:
        ok = error is None
    else:
        etype, pattern = c.expect
        ok = isinstance(error, etype) and re.search(pattern, str(error), flags=re.S) is not None
    ok = ok and not changed
    return {
        "group": c.group,
        "input": c.name,
        "outcome": "accepted" if error is None else type(error).__name__,
        "message": "" if error is None else str(error),
        "warnings": warned,
        "unchanged": unchanged,
        "expected": "succeeds" if c.expect is None else f"{c.expect[0].__name__} /{c.expect[1]}/",
        "verdict": "ok" if ok else "NO",
        "note": c.note,
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: list[dict], path: Path) -> None:
    """The results table and a summary."""
    n_ok = sum(r["verdict"] == "ok" for r in rows)
    lines = [
        "# Robustness: bad inputs and what the user sees",
        "",
        f"- machine: {platform.processor() or platform.machine()}; Python {platform.python_version()}; "
        f"torch {torch.__version__}; anndata {_version('anndata')}; mudata {_version('mudata')}; "
        f"dgdcell {dgdcell.__version__}; {_dt.date.today().isoformat()}",
        "- command: `python benchmarks/robustness.py` (synthetic 120 cells x 40 genes; fits use `max_epochs=2`)",
        "- *message*: `str(exc)`, what follows the exception type in a traceback. *unchanged*: after a failed",
        "  call, the object equals a deep copy taken before it (X, layers, obs, var, obsm, varm, obsp, uns,",
        "  names; for a MuData also its own obs/obsm/uns and every modality).",
        "- *verdict* ok: the expected outcome (an error of the expected type whose message names the problem",
        "  and the fix, matched by the *expected* pattern, with the object unchanged; or success).",
        "",
        f"**{n_ok} of {len(rows)} cases ok.**",
        "",
        "| # | group | input | outcome | message | warnings | unchanged | expected | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        warned = "; ".join(r["warnings"][:3]) + (f" (+{len(r['warnings']) - 3})" if len(r["warnings"]) > 3 else "")
        lines.append(
            f"| {i} | {r['group']} | {_cell(r['input'])} | {r['outcome']} | {_cell(r['message'])} | "
            f"{_cell(warned)} | {r['unchanged']} | `{_cell(r['expected'])}` | {r['verdict']} |"
        )
    failing = [(i, r) for i, r in enumerate(rows, 1) if r["verdict"] != "ok"]
    if failing:
        lines += ["", "## Cases not ok, and the change each needs", ""]
        lines += [f"- #{i} {r['input']} ({r['outcome']}): {r['note'] or 'no note'}" for i, r in failing]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    cases = [c for c in CASES if c.group != "MuData" or _mudata_available()]
    rows = []
    for c in cases:
        row = run_case(c)
        rows.append(row)
        print(f"[{row['verdict']:>2}] {c.group}: {c.name} -> {row['outcome']}: {row['message'][:150]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "robustness.md")
    print(f"{sum(r['verdict'] == 'ok' for r in rows)} of {len(rows)} ok; wrote {out / 'robustness.md'}")
    return rows


if __name__ == "__main__":
    main()
