"""Input checks on count matrices and obs columns, with errors that name the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def _values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densifying)."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


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
    if X.shape[0] == 0:
        raise ValueError(f"{where} has no cells (0 rows): nothing to fit.")
    if X.shape[1] == 0:
        raise ValueError(f"{where} has no features (0 columns).")
    dtype = X.dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise TypeError(f"{where} has dtype {dtype}; expected a numeric matrix of raw counts.")
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} has complex dtype {dtype}; expected real raw counts.")
    v = _values(X)
    if np.issubdtype(v.dtype, np.floating):
        if not np.isfinite(v).all():
            n_bad = int((~np.isfinite(v)).sum())
            raise ValueError(f"{where} contains {n_bad} NaN or infinite values; counts must be finite.")
    if v.size and v.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {v.min():g}); expected raw counts. "
            "Scaled or centred data (e.g. after sc.pp.scale) cannot be modelled: pass the raw counts."
        )
    if np.issubdtype(v.dtype, np.floating) and v.size and not np.all(np.mod(v, 1) == 0):
        hint = ""
        if available_layers:
            hint = f" Available layers: {available_layers}; pass e.g. layer='counts' if one holds the raw counts."
        else:
            hint = " If the raw counts are in adata.raw or a layer, pass them (e.g. layer='counts')."
        raise ValueError(
            f"{where} contains non-integer values (e.g. {v[np.mod(v, 1) != 0][0]:g}); it looks normalised or "
            f"log-transformed, but the model needs raw integer counts.{hint}"
        )


def check_cell_totals(totals: np.ndarray, where: str) -> None:
    """Raise if any cell has zero total counts."""
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} cells have no counts in {where} (e.g. row {empty[0]}); their library size is 0. "
            "Remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )


def check_obs_column(obs: pd.DataFrame, key: str, role: str) -> None:
    """Raise KeyError when ``obs`` lacks ``key``."""
    if key not in obs.columns:
        raise KeyError(
            f"{role} key {key!r} is not a column of adata.obs (columns: {list(obs.columns)[:20]}). "
            "Fix the name or add the column."
        )
