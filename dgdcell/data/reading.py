"""Read an AnnData into what training needs: sparse counts, library sizes, codes.

Nothing here knows about torch. Counts stay scipy CSR (float32); a dense input
is converted to CSR once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .checks import check_cell_totals, check_counts, check_obs_column

DEFAULT_MODALITY = "rna"


@dataclass
class Categories:
    """Integer codes of an obs column: ``codes`` (n_obs,) int64 with -1 for missing,
    and ``categories`` (the class names, in code order)."""

    codes: np.ndarray
    categories: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.categories)


@dataclass
class CountData:
    """Counts of one data set ready for training.

    Attributes
    ----------
    counts
        modality -> CSR (n_obs, G_m) float32 raw counts.
    library
        modality -> (n_obs,) float64 library sizes (sum of counts in the modality).
    feature_names
        modality -> list of G_m feature names.
    covariates
        covariate key -> Categories.
    labels
        Categories of the label column, or None.
    obs_names
        list of n_obs cell names.
    """

    counts: dict[str, sp.csr_matrix]
    library: dict[str, np.ndarray]
    feature_names: dict[str, list[str]]
    covariates: dict[str, Categories] = field(default_factory=dict)
    labels: Categories | None = None
    obs_names: list[str] = field(default_factory=list)

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    @property
    def modalities(self) -> list[str]:
        return list(self.counts)


def get_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]`` with a clear KeyError when missing."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= naming the layer with the raw counts.")
        return adata.X, "adata.X"
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}). "
            "Use layer=None for adata.X."
        )
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def to_csr(X) -> sp.csr_matrix:
    """Any dense/sparse numeric matrix as canonical CSR float32 (explicit zeros dropped)."""
    if hasattr(X, "to_memory"):  # backed sparse datasets
        X = X.to_memory()
    if sp.issparse(X):
        out = sp.csr_matrix(X, dtype=np.float32, copy=True)
    else:
        out = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    return out


def encode_categories(
    obs: pd.DataFrame, key: str, role: str, allow_missing: bool, categories: list[str] | None = None
) -> Categories:
    """Codes of ``obs[key]``; missing values become -1 (error unless ``allow_missing``).

    With ``categories`` given (a trained model's classes) values outside them get -1.
    """
    check_obs_column(obs, key, role)
    col = obs[key]
    missing = col.isna().to_numpy()
    if missing.any() and not allow_missing:
        raise ValueError(
            f"{role} column {key!r} has {int(missing.sum())} missing values; fill them or drop those cells."
        )
    as_str = col.astype("string")
    if categories is None:
        if isinstance(col.dtype, pd.CategoricalDtype):
            present = set(as_str[~missing])
            cats = [str(c) for c in col.cat.categories if str(c) in present]
        else:
            cats = sorted(set(as_str[~missing]))
    else:
        cats = [str(c) for c in categories]
    codes = pd.Categorical(as_str, categories=cats).codes.astype(np.int64)
    return Categories(codes=codes, categories=cats)


def read_anndata(
    adata,
    layer: str | None = None,
    covariate_keys: list[str] | None = None,
    label_key: str | None = None,
    modality: str = DEFAULT_MODALITY,
) -> CountData:
    """Check and read one AnnData (a single modality) into :class:`CountData`.

    Reads ``adata.X`` or ``adata.layers[layer]`` and the obs columns named by
    ``covariate_keys`` (no missing values, at least 2 classes) and ``label_key``
    (missing values allowed: those cells are unlabelled). Never modifies ``adata``.
    """
    X, where = get_matrix(adata, layer)
    check_counts(X, where, available_layers=list(adata.layers.keys()))
    counts = to_csr(X)
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    check_cell_totals(library, where)

    covariates = {}
    for key in covariate_keys or []:
        cat = encode_categories(adata.obs, key, "covariate", allow_missing=False)
        if cat.n_classes < 2:
            raise ValueError(
                f"covariate {key!r} has a single class ({cat.categories}); it carries no information. "
                "Drop it from covariate_keys."
            )
        covariates[key] = cat
    labels = encode_categories(adata.obs, label_key, "label", allow_missing=True) if label_key else None
    return CountData(
        counts={modality: counts},
        library={modality: library},
        feature_names={modality: [str(v) for v in adata.var_names]},
        covariates=covariates,
        labels=labels,
        obs_names=[str(v) for v in adata.obs_names],
    )
