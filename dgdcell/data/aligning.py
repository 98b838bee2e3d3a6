"""Read new cells against a trained model: features aligned by name, classes by the model's.

Knows nothing of torch. The counts keep only the features the model was trained
on that the new data carry (in training order); extra features are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .backed import BackedCounts, is_backed_matrix
from .checks import check_counts, check_data_object
from .reading import DEFAULT_MODALITY, Categories, CountData, encode_categories, get_matrix, in_obs_order, to_csr

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
    if n_shared == 0:
        raise ValueError(
            f"none of the model's {n_train} {modality} features are in the new data's {len(new_index)} features. "
            f"Are the names the same kind (training: {list(train_index[:3])}, new: {list(new_index[:3])})?"
        )
    if n_shared < min_overlap * n_train:
        raise ValueError(
            f"only {n_shared} of the model's {n_train} {modality} features ({n_shared / max(n_train, 1):.2%}) are "
            f"in the new data's {len(new_index)} features; at least {min_overlap:.0%} "
            f"({int(np.ceil(min_overlap * n_train))}) are needed (lower min_overlap= to accept fewer). Are the names "
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


def _new_modalities(data, features: dict[str, list[str]], layer, modality_key, modality):
    """modality -> (AnnData-like with the modality's columns, layer, where-prefix, present (n,) bool)."""
    from .reading import _layer_for, is_mudata

    n = data.n_obs
    if is_mudata(data):
        mods = [m for m in features if m in data.mod]
        if not mods:
            raise KeyError(
                f"the MuData's modalities {list(data.mod)} include none of the model's {sorted(features)}; "
                "rename the modalities to match."
            )
        out = {}
        for m in mods:
            rows = np.asarray(data.obsmap[m]).astype(np.int64).ravel()
            out[m] = (data.mod[m], _layer_for(layer, m), f"mdata.mod[{m!r}]", rows)
        return out
    if modality_key is not None and modality_key in data.var.columns:
        if getattr(data, "isbacked", False):
            raise ValueError(
                f"modality_key={modality_key!r} splits the features of one matrix, which is not supported for counts "
                "read from disk (a backed AnnData); load it into memory (adata = adata.to_memory()), or pass "
                "the cells of one modality as their own file."
            )
        labels = data.var[modality_key].astype(str).to_numpy()
        mods = [m for m in features if (labels == m).any()]
        if not mods:
            raise KeyError(
                f"adata.var[{modality_key!r}] names none of the model's modalities {sorted(features)} "
                f"(values: {sorted(set(labels))[:10]})."
            )
        return {m: (data[:, labels == m], layer, "adata", np.arange(1, n + 1)) for m in mods}
    if modality is None:
        if len(features) == 1:
            modality = next(iter(features))
        else:  # the modality whose features the data share most
            names = pd.Index([str(v) for v in data.var_names])
            share = {m: float(pd.Index(f).isin(names).mean()) for m, f in features.items()}
            modality = max(share, key=share.get)
            logger.info("reading the AnnData as modality %r (shares %.0f%% of its features)", modality,
                        100 * share[modality])
    elif modality not in features:
        raise KeyError(f"modality {modality!r} is not in the model (modalities: {sorted(features)}).")
    return {modality: (data, layer, "adata", np.arange(1, n + 1))}


def read_new_data(
    data,
    features: dict[str, list[str]],
    layer: str | dict[str, str] | None = None,
    covariate_categories: dict[str, list[str]] | None = None,
    min_overlap: float = 0.5,
    modality_key: str | None = None,
    modality: str | None = None,
    continuous_keys: list[str] | None = None,
) -> NewCellData:
    """Check and read new cells (AnnData or MuData) against a model's features and classes.

    ``features`` maps each of the model's modalities to its training feature
    names. The new data may carry any subset of them: a MuData's modalities
    are matched by name, an AnnData's by ``.var[modality_key]`` or, for a
    plain AnnData, ``modality`` (default: the model's modality sharing most
    of its feature names). Within a modality, features are aligned by name
    (:func:`align_features`) and the counts are checked (raw non-negative
    integers) on the shared features only. Modalities of the model missing
    from the data are absent from the result (unobserved for every cell); a
    cell with no counts in a modality is unobserved there, and a cell with
    no counts in any is an error. Covariate columns are read as codes in the
    model's classes: unseen classes, missing values and missing columns give
    -1. The continuous covariates ``continuous_keys`` must be columns of the
    new data (:func:`~dgdcell.data.reading.read_continuous`). Never modifies ``data``.
    """
    from .reading import is_mudata, obs_column, read_continuous

    check_data_object(data)
    counts, library, names, observed, alignments = {}, {}, {}, {}, {}
    for m, (ad, lay, prefix, rows) in _new_modalities(data, features, layer, modality_key, modality).items():
        X, where = get_matrix(ad, lay)
        where = where.replace("adata", prefix, 1)
        align = align_features(ad.var_names, features[m], min_overlap, m)
        shared = f"{where} (its {align.n_shared} features shared with the model)"
        if is_backed_matrix(X):  # on disk: checked and summed in one streaming pass, read per block later
            csr = in_obs_order(BackedCounts(X, shared, columns=align.columns).scan(list(ad.layers.keys())), rows)
            lib = csr.library.copy()
        else:
            sub = X[:, align.columns]
            check_counts(sub, shared, available_layers=list(ad.layers.keys()))
            csr = in_obs_order(to_csr(sub), rows)
            lib = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
        present = rows > 0
        observed[m] = present & (lib > 0)
        counts[m], library[m], alignments[m] = csr, lib, align
        names[m] = [features[m][j] for j in align.feature_index]
        if align.n_missing or align.n_extra:
            logger.info(
                "%s: %d of %d model features present (%d missing, left out of the likelihood); %d extra features "
                "ignored", m, align.n_shared, align.n_train, align.n_missing, align.n_extra,
            )
    _check_shared_totals(sum(library.values()), data.obs_names, alignments)
    for m in counts:
        library[m] = np.where(observed[m], library[m], 1.0)
    obs = data.obs
    if is_mudata(data):  # covariate columns from mdata.obs or a modality's obs
        frames = {k: obs_column(data, k) for k in covariate_categories or {}}
        obs = pd.DataFrame({k: f[k] for k, f in frames.items() if k in f.columns}, index=data.obs.index)
    covariates, unseen, missing = read_covariates(obs, covariate_categories or {})
    return NewCellData(
        data=CountData(
            counts=counts,
            library=library,
            feature_names=names,
            covariates=covariates,
            labels=None,
            obs_names=[str(v) for v in data.obs_names],
            observed=observed if any(not o.all() for o in observed.values()) else {},
            continuous=read_continuous(data, continuous_keys or []),
        ),
        alignments=alignments,
        unseen_classes=unseen,
        missing_covariates=missing,
    )


def read_new_anndata(
    adata,
    features: dict[str, list[str]],
    layer: str | None = None,
    covariate_categories: dict[str, list[str]] | None = None,
    min_overlap: float = 0.5,
    modality: str = DEFAULT_MODALITY,
) -> NewCellData:
    """Read one AnnData as modality ``modality`` of the model; see :func:`read_new_data`."""
    return read_new_data(adata, features, layer, covariate_categories, min_overlap, modality=modality)


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
            n_unseen = int(((cat.codes < 0) & col.notna().to_numpy()).sum())
            logger.warning("covariate %r: %d of %d cells have classes unseen in training (%s): they are treated as "
                           "unknown (the full covariate mixture); the model's classes are %s", key, n_unseen,
                           len(col), new[:10], list(cats)[:10])
        covariates[key] = cat
    return covariates, unseen, missing


def _check_shared_totals(library: np.ndarray, obs_names, alignments: dict[str, FeatureAlignment]) -> None:
    """Raise when a cell has no counts in the features shared with the model (summed over modalities)."""
    empty = np.flatnonzero(library <= 0)
    if empty.size:
        shared = " + ".join(f"{a.n_shared} {m}" for m, a in alignments.items())
        raise ValueError(
            f"{empty.size} cells have no counts in the {shared} features shared with the "
            f"model (e.g. {str(obs_names[empty[0]])!r}); their library size is 0 and they cannot be embedded. "
            "Remove them first (keep cells with counts in the model's features)."
        )
