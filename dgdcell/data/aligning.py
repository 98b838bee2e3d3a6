"""Read new cells against a trained model: features aligned by name, classes by the model's.

Knows nothing of torch. The counts keep only the features the model was trained
on that the new data carry (in training order); extra features are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .checks import check_counts
from .reading import DEFAULT_MODALITY, Categories, CountData, encode_categories, get_matrix, to_csr

logger = logging.getLogger(__name__)


@dataclass
class FeatureAlignment:
    """How the columns of new data map onto a model's training features (one modality).

    Attributes
    ----------
    columns
        (G_shared,) int64 positions of the shared features among the new data's
        columns, in training order.
    feature_index
        (G_shared,) int64 indices of those features among the training features
        (strictly increasing).
    n_train
        Number of training features G.
    n_new
        Number of features (columns) of the new data.
    """

    columns: np.ndarray
    feature_index: np.ndarray
    n_train: int
    n_new: int

    @property
    def n_shared(self) -> int:
        return int(self.feature_index.size)

    @property
    def n_missing(self) -> int:
        """Training features absent from the new data (left out of the likelihood)."""
        return self.n_train - self.n_shared

    @property
    def n_extra(self) -> int:
        """Columns of the new data that are not training features (ignored)."""
        return self.n_new - self.n_shared

    @property
    def complete(self) -> bool:
        """True when every training feature is present."""
        return self.n_shared == self.n_train


def align_features(
    new_names, train_names, min_overlap: float = 0.5, modality: str = DEFAULT_MODALITY
) -> FeatureAlignment:
    """Match the new data's feature names to the training features.

    Parameters
    ----------
    new_names
        The new data's feature names (e.g. ``adata.var_names``), length G_new.
    train_names
        The model's training features of ``modality``, length G.
    min_overlap
        Smallest accepted share of training features present in the new data.

    Raises ValueError when fewer than ``min_overlap * G`` training features are
    present (the message names the counts and example names of both sides), or
    when a shared name occurs more than once in the new data. A name repeated
    among the training features is matched at its first occurrence only.
    """
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}.")
    new_index = pd.Index([str(v) for v in new_names])
    train_index = pd.Index([str(v) for v in train_names])
    present = train_index.isin(new_index) & ~train_index.duplicated()
    shared = train_index[present]
    if not new_index.is_unique:
        dup = new_index[new_index.duplicated() & new_index.isin(shared)]
        if len(dup):
            raise ValueError(
                f"{len(dup.unique())} {modality} features shared with the model occur more than once in the "
                f"new data (e.g. {dup[0]!r}); make the names unique first (e.g. adata.var_names_make_unique())."
            )
    n_train, n_shared = len(train_index), int(present.sum())
    if n_shared < min_overlap * n_train or n_shared == 0:
        raise ValueError(
            f"only {n_shared} of the model's {n_train} {modality} features ({n_shared / max(n_train, 1):.1%}) are "
            f"in the new data's {len(new_index)} features; at least {min_overlap:.0%} are needed. Are the names "
            f"the same kind (training: {list(train_index[:3])}, new: {list(new_index[:3])})?"
        )
    first = pd.Series(np.arange(len(new_index)), index=new_index)
    first = first[~new_index.duplicated()]  # repeated names are extras here, never shared
    return FeatureAlignment(
        columns=first.loc[shared].to_numpy().astype(np.int64),
        feature_index=np.flatnonzero(present).astype(np.int64),
        n_train=n_train,
        n_new=len(new_index),
    )


@dataclass
class NewCellData:
    """New cells read against a trained model.

    Attributes
    ----------
    data
        :class:`CountData` holding only the shared features, in training order
        (``feature_names`` are those), with library sizes summed over them and
        covariate codes in the model's classes (-1: unseen class or missing value
        or missing column).
    alignments
        modality -> :class:`FeatureAlignment`.
    unseen_classes
        covariate key -> sorted class names absent from the model (those cells get -1).
    missing_covariates
        covariate keys that are not columns of ``obs`` (all cells get -1).
    """

    data: CountData
    alignments: dict[str, FeatureAlignment]
    unseen_classes: dict[str, list[str]] = field(default_factory=dict)
    missing_covariates: list[str] = field(default_factory=list)


def read_new_anndata(
    adata,
    features: dict[str, list[str]],
    layer: str | None = None,
    covariate_categories: dict[str, list[str]] | None = None,
    min_overlap: float = 0.5,
    modality: str = DEFAULT_MODALITY,
) -> NewCellData:
    """Check and read one AnnData (a single modality) against a model's features and classes.

    ``features`` maps each of the model's modalities to its training feature
    names; a plain AnnData carries one (``modality``). Counts come from
    ``adata.X`` or ``adata.layers[layer]`` and are checked (raw non-negative
    integers) on the shared features only; a cell without counts in the shared
    features is an error. Covariate columns are read as codes in the model's
    classes: unseen classes, missing values and missing columns give -1.
    Never modifies ``adata``.
    """
    if set(features) != {modality}:
        raise ValueError(
            f"the model has modalities {sorted(features)}; an AnnData carries one ({modality!r}). "
            "Pass the modality the model was trained on."
        )
    X, where = get_matrix(adata, layer)
    align = align_features(adata.var_names, features[modality], min_overlap, modality)
    sub = X[:, align.columns]
    sub_where = f"{where} (its {align.n_shared} features shared with the model)"
    check_counts(sub, sub_where, available_layers=list(adata.layers.keys()))
    counts = to_csr(sub)
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    _check_shared_totals(library, adata.obs_names, align, modality)
    if align.n_missing or align.n_extra:
        logger.info(
            "%s: %d of %d model features present (%d missing, left out of the likelihood); %d extra features ignored",
            modality, align.n_shared, align.n_train, align.n_missing, align.n_extra,
        )
    covariates, unseen, missing = read_covariates(adata.obs, covariate_categories or {})
    return NewCellData(
        data=CountData(
            counts={modality: counts},
            library={modality: library},
            feature_names={modality: [features[modality][j] for j in align.feature_index]},
            covariates=covariates,
            labels=None,
            obs_names=[str(v) for v in adata.obs_names],
        ),
        alignments={modality: align},
        unseen_classes=unseen,
        missing_covariates=missing,
    )


def read_covariates(
    obs: pd.DataFrame, categories: dict[str, list[str]]
) -> tuple[dict[str, Categories], dict[str, list[str]], list[str]]:
    """Codes of the model's covariates in ``obs``, in the model's classes.

    Returns ``(covariates, unseen_classes, missing_columns)``: key -> Categories
    (codes -1 for unseen classes, missing values and absent columns), key ->
    sorted names of unseen classes, and the keys absent from ``obs``.
    """
    covariates, unseen, missing = {}, {}, []
    for key, cats in categories.items():
        if key not in obs.columns:
            missing.append(key)
            covariates[key] = Categories(codes=np.full(len(obs), -1, dtype=np.int64), categories=list(cats))
            logger.warning("covariate %r is not a column of adata.obs: its class is treated as unknown", key)
            continue
        cat = encode_categories(obs, key, "covariate", allow_missing=True, categories=cats)
        col = obs[key]
        new = sorted(set(col[(cat.codes < 0) & col.notna().to_numpy()].astype(str)))
        if new:
            unseen[key] = new
            logger.info("covariate %r: classes %s unseen in training are treated as unknown", key, new[:10])
        covariates[key] = cat
    return covariates, unseen, missing


def _check_shared_totals(library: np.ndarray, obs_names, align: FeatureAlignment, modality: str) -> None:
    """Raise when a cell has no counts in the features shared with the model."""
    empty = np.flatnonzero(library <= 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} cells have no counts in the {align.n_shared} {modality} features shared with the "
            f"model (e.g. {str(obs_names[empty[0]])!r}); their library size is 0 and they cannot be embedded. "
            "Remove them first (keep cells with counts in the model's features)."
        )
