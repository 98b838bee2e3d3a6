"""Input checks on count matrices and obs columns, with errors that name the fix."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)


def _values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densifying); backed
    (on-disk) sparse matrices are read into memory."""
    if hasattr(X, "to_memory"):  # anndata's backed sparse datasets
        X = X.to_memory()
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def check_data_object(data) -> None:
    """Raise TypeError unless ``data`` is an AnnData or a MuData.

    A bare matrix or DataFrame has no ``obs``/``var`` to read names, covariates
    or labels from, and nowhere to write the results.
    """
    if isinstance(data, AnnData) or (hasattr(data, "mod") and hasattr(data, "obsmap")):  # MuData
        return
    raise TypeError(
        f"expected an AnnData or MuData, got {type(data).__module__}.{type(data).__qualname__}. "
        "Wrap a cells x features count matrix first, e.g. adata = anndata.AnnData(X) "
        "(for a DataFrame: anndata.AnnData(df), which keeps its index and columns as names)."
    )


def check_counts(X, where: str, available_layers: list[str] | None = None) -> None:
    """Raise a clear error unless ``X`` holds non-negative integer counts.

    Parameters
    ----------
    X
        Dense array or scipy sparse matrix (cells x features).
    where
        Human description of the source, e.g. ``"adata.X"`` or ``"adata.layers['counts']"``.
    available_layers
        Layer names to suggest when the values look normalised.
    """
    check_count_dtype(X.shape, X.dtype, where)
    check_count_values(_values(X), where, available_layers)


def check_count_dtype(shape, dtype, where: str) -> None:
    """The shape and dtype part of :func:`check_counts` (no values read)."""
    if shape[0] == 0:
        raise ValueError(f"{where} has no cells (0 rows): nothing to fit.")
    if shape[1] == 0:
        raise ValueError(f"{where} has no features (0 columns); check the feature selection that produced it.")
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise TypeError(f"{where} has dtype {dtype}; expected a numeric matrix of raw counts.")
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} has complex dtype {dtype}; expected real raw counts.")
    if dtype == bool:
        logger.warning(
            "%s is boolean (binarised data): it is modelled as counts of 0 and 1. Pass the raw counts if you have them.",
            where,
        )


def check_count_values(v: np.ndarray, where: str, available_layers: list[str] | None = None) -> None:
    """The value part of :func:`check_counts` on stored values ``v`` (all of a
    matrix's, or one block's: a streamed matrix is checked block by block)."""
    if np.issubdtype(v.dtype, np.floating):
        if not np.isfinite(v).all():
            n_bad = int((~np.isfinite(v)).sum())
            raise ValueError(
                f"{where} contains {n_bad} NaN or infinite values; counts must be finite. Pass the raw counts "
                "(NaN often comes from normalising or joining tables); if a NaN stands for 0, set it to 0 first."
            )
    if v.size and v.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {v.min():g}); expected raw counts. "
            "Scaled or centred data (e.g. after sc.pp.scale) cannot be modelled: pass the raw counts."
        )
    if np.issubdtype(v.dtype, np.floating) and v.size and not np.all(np.mod(v, 1) == 0):
        hint = _raw_counts_hint(where, available_layers or [])
        raise ValueError(
            f"{where} contains non-integer values (e.g. {v[np.mod(v, 1) != 0][0]:g}); it looks normalised or "
            f"log-transformed, but the model needs raw integer counts.{hint}"
        )
    if v.size and float(v.max()) > MAX_COUNT:
        raise ValueError(
            f"{where} contains a value of {v.max():g}, above {MAX_COUNT:g}: no single feature of one cell is counted "
            "that often; the matrix is not raw counts (scaled, or corrupted). Pass the raw counts."
        )


#: the largest count accepted in one entry (far above any real count, well inside float32 and the float64 lgamma)
MAX_COUNT = 1e15


def cells_identical(csr: sp.csr_matrix) -> bool:
    """Whether every row of the canonical CSR matrix ``csr`` holds the same counts."""
    n = csr.shape[0]
    nnz = np.diff(csr.indptr)
    if n < 2 or (nnz != nnz[0]).any():
        return False
    k = int(nnz[0])
    idx, val = csr.indices.reshape(n, k), csr.data.reshape(n, k)
    return bool((idx == idx[0]).all() and (val == val[0]).all())


def _raw_counts_hint(where: str, layers: list[str]) -> str:
    """Where the raw counts might be, for a non-integer error on ``where``
    (``"adata.X"``, ``"mdata.mod['adt'].X"``, ...)."""
    modality = re.match(r"mdata\.mod\[('[^']*')\]", where)
    obj = "adata" if modality is None else modality.group(0)

    def layer_arg(name: str) -> str:
        return f"layer={name!r}" if modality is None else f"layer={{{modality.group(1)}: {name!r}}}"

    current = re.search(r"\.layers\[('[^']*')\]", where)
    others = [name for name in layers if current is None or repr(name) != current.group(1)]
    likely = [name for name in others if "count" in name.lower() or "raw" in name.lower()]
    if likely:
        return f" Available layers of {obj}: {layers}; {layer_arg(likely[0])} probably holds the raw counts."
    if others:
        return f" Available layers of {obj}: {layers}; pass {layer_arg('<name>')} naming the one with the raw counts."
    return f" If the raw counts are in {obj}.raw or a layer, put them in a layer and pass it (e.g. {layer_arg('counts')})."


def check_cell_totals(totals: np.ndarray, where: str) -> None:
    """Raise if any cell has zero total counts.

    ``where`` names the source (e.g. ``"adata.X"``, ``"mdata.mod['rna']"`` or
    ``"any of the modalities [...]"``); the suggested fix fits the source.
    """
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        anndata_fix = "sc.pp.filter_cells(adata, min_counts=1)"
        mudata_fix = "mdata = mdata[keep].copy() with keep the cells that have counts"
        if where.startswith("mdata"):
            fix = f"Remove them first, e.g. {mudata_fix}."
        elif "modalities" in where:
            fix = f"Remove them first, e.g. {anndata_fix} for an AnnData or {mudata_fix} for a MuData."
        else:
            fix = f"Remove them first, e.g. {anndata_fix}."
        raise ValueError(
            f"{empty.size} cells have no counts in {where} (e.g. row {empty[0]}); their library size is 0. {fix}"
        )


def check_obs_column(obs: pd.DataFrame, key: str, role: str) -> None:
    """Raise KeyError when ``obs`` lacks ``key``."""
    if key not in obs.columns:
        raise KeyError(
            f"{role} key {key!r} is not a column of adata.obs (columns: {list(obs.columns)[:20]}). "
            "Fix the name or add the column."
        )
