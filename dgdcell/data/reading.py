"""Read an AnnData or MuData into what training needs: sparse counts, library sizes, codes.

Nothing here knows about torch. Counts stay scipy CSR (float32); a dense input
is converted to CSR once.

Modalities come from a MuData's ``.mod`` (any names, any number), from an
AnnData's ``.var[modality_key]`` column, or a plain AnnData is one modality
(``'rna'``). A cell that lacks a modality (absent from that ``.mod``, or with no
counts in it) is flagged unobserved there and contributes only the
modalities it has (mosaic data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .backed import BackedCounts, is_backed_matrix
from .sparse import row_blocks, to_csr  # noqa: F401 (re-exported: where callers found them)
from .checks import cells_identical, check_cell_totals, check_counts, check_data_object, check_obs_column

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
        modality -> CSR (n_obs, G_m) float32 raw counts, or a
        :class:`~dgdcell.data.backed.BackedCounts` when they are read from
        disk block by block (a backed AnnData's ``.X``).
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
    observed
        modality -> (n_obs,) bool: whether the cell was measured in the
        modality. Missing modalities are all observed. An unobserved cell has
        an empty row and library size 1 (a placeholder, never used).
    continuous
        continuous covariate key -> (n_obs,) float64 values (e.g. percent
        mitochondrial counts), in the order of the keys given.
    """

    counts: dict[str, sp.csr_matrix]
    library: dict[str, np.ndarray]
    feature_names: dict[str, list[str]]
    covariates: dict[str, Categories] = field(default_factory=dict)
    labels: Categories | None = None
    obs_names: list[str] = field(default_factory=list)
    observed: dict[str, np.ndarray] = field(default_factory=dict)
    continuous: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def backed(self) -> bool:
        """True when some modality's counts are read from disk (:class:`~dgdcell.data.backed.BackedCounts`)."""
        return any(not sp.issparse(c) for c in self.counts.values())

    def observed_mask(self, modality: str) -> np.ndarray:
        """(n_obs,) bool: cells measured in ``modality``."""
        mask = self.observed.get(modality)
        return np.ones(self.n_obs, dtype=bool) if mask is None else mask

    def block(self, start: int, stop: int) -> "CountData":
        """The cells ``start:stop`` with their counts in memory (CSR; read from
        disk for :class:`~dgdcell.data.backed.BackedCounts`)."""
        def rows(v):
            return None if v is None else v[start:stop]

        return CountData(
            counts={m: c.read(start, stop) if isinstance(c, BackedCounts) else c[start:stop]
                    for m, c in self.counts.items()},
            library={m: v[start:stop] for m, v in self.library.items()},
            feature_names=self.feature_names,
            covariates={k: Categories(c.codes[start:stop], c.categories) for k, c in self.covariates.items()},
            labels=None if self.labels is None else Categories(self.labels.codes[start:stop], self.labels.categories),
            obs_names=self.obs_names[start:stop],
            observed={m: v[start:stop] for m, v in self.observed.items()},
            continuous={k: v[start:stop] for k, v in self.continuous.items()},
        )

    def take(self, rows: np.ndarray) -> "CountData":
        """The cells ``rows`` (sorted indices) with their counts in memory (CSR;
        read from disk for :class:`~dgdcell.data.backed.BackedCounts`)."""
        rows = np.asarray(rows, dtype=np.int64)
        return CountData(
            counts={m: c.take(rows) if isinstance(c, BackedCounts) else c[rows] for m, c in self.counts.items()},
            library={m: v[rows] for m, v in self.library.items()},
            feature_names=self.feature_names,
            covariates={k: Categories(c.codes[rows], c.categories) for k, c in self.covariates.items()},
            labels=None if self.labels is None else Categories(self.labels.codes[rows], self.labels.categories),
            obs_names=[self.obs_names[i] for i in rows],
            observed={m: v[rows] for m, v in self.observed.items()},
            continuous={k: v[rows] for k, v in self.continuous.items()},
        )

    @property
    def mosaic(self) -> bool:
        """True when some cell lacks some modality."""
        return any(not m.all() for m in self.observed.values())

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    @property
    def modalities(self) -> list[str]:
        return list(self.counts)


def get_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]`` with a clear KeyError when missing."""
    if layer is not None and not isinstance(layer, str):
        raise ValueError(f"layer must be None (adata.X) or the name of a layer of adata.layers, got {layer!r} "
                         "(a dict modality -> layer is for a MuData).")
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
    as_str = _class_names(col)
    if categories is None and role == "covariate":
        _check_looks_categorical(col, key, int(as_str[~missing].nunique()), len(col))
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


#: a numeric covariate column with more distinct values than this is taken for a measurement, not classes
MAX_NUMERIC_CLASSES = 100


def _class_names(col: pd.Series) -> pd.Series:
    """The class name of every value of ``col`` (pandas string dtype). Numeric values that are
    integers are named without a decimal part whatever their dtype, so that a column read as
    int in one file and as float in another (``1`` and ``1.0``) names the same classes."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        values = pd.to_numeric(col, errors="coerce")
        finite = values.dropna()
        if len(finite) and np.isfinite(finite).all() and (finite == np.round(finite)).all():
            return values.astype("Int64").astype("string")
    return col.astype("string")


def _check_looks_categorical(col: pd.Series, key: str, n_classes: int, n_cells: int) -> None:
    """Raise when a numeric column passed as a categorical covariate looks like a measurement
    (non-integer values, or more than :data:`MAX_NUMERIC_CLASSES` distinct values): one class per
    value would give hundreds of classes of a few cells each."""
    if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col.dtype):
        return
    if pd.api.types.is_bool_dtype(col.dtype):
        return
    values = pd.to_numeric(col, errors="coerce").dropna()
    fractional = bool(len(values)) and not (values == np.round(values)).all()
    if fractional or n_classes > MAX_NUMERIC_CLASSES:
        why = "non-integer values" if fractional else f"{n_classes} distinct values"
        raise ValueError(
            f"covariate {key!r} is numeric with {why} ({n_cells} cells): as a categorical covariate every value "
            f"would be its own class. Pass it in continuous_covariate_keys=[{key!r}] to model it as a "
            f"measurement, or make it categorical first (e.g. adata.obs[{key!r}] = "
            f"adata.obs[{key!r}].astype(str), or pd.cut for bins)."
        )


def is_mudata(data) -> bool:
    """True for a MuData (anything with ``.mod`` and ``.obsmap``)."""
    return hasattr(data, "mod") and hasattr(data, "obsmap")


def _layer_for(layer: str | dict | None, modality: str) -> str | None:
    return layer.get(modality) if isinstance(layer, dict) else layer


def _read_modality(adata, layer: str | None, where_prefix: str) -> sp.csr_matrix:
    """Checked CSR counts of one AnnData (``.X`` or ``layer``); errors name ``where_prefix``
    (e.g. ``mdata.mod['adt']``) instead of ``adata``."""
    try:
        X, where = get_matrix(adata, layer)
    except KeyError as err:
        raise KeyError(str(err.args[0]).replace("adata", where_prefix, 1)) from None
    except ValueError as err:
        raise ValueError(str(err).replace("adata", where_prefix, 1)) from None
    where = where.replace("adata", where_prefix, 1)
    if is_backed_matrix(X):  # on disk: checked and summed in one streaming pass, read per block later
        return BackedCounts(X, where).scan(available_layers=list(adata.layers.keys()))
    check_counts(X, where, available_layers=list(adata.layers.keys()))
    return to_csr(X)


def in_obs_order(csr: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """A modality's (n_mod, G) CSR counts as (n_obs, G) rows in the MuData's cell order.

    ``rows`` (n_obs,) is the MuData's ``obsmap`` of the modality: the 1-based row
    of each cell in the modality, 0 where the cell is absent (an empty row).
    Returns ``csr`` itself when the orders already agree.
    """
    present = rows > 0
    if present.all() and np.array_equal(rows, np.arange(1, rows.size + 1)):
        return csr
    if not sp.issparse(csr):
        raise ValueError("a modality read from disk (backed) must hold every cell of the MuData in the MuData's "
                         "order; load it into memory first (mdata.mod[...].to_memory()) or align the files.")
    return to_csr(sp.diags(present.astype(np.float32)) @ csr[np.where(present, rows - 1, 0)])


def _modality_counts(
    data, layer, modality_key: str | None, modalities: list[str] | None
) -> tuple[dict[str, sp.csr_matrix], dict[str, list[str]], dict[str, np.ndarray]]:
    """Counts, feature names and presence masks per modality, rows in ``data.obs_names`` order."""
    n = data.n_obs
    counts, names, present = {}, {}, {}
    if is_mudata(data):
        wanted = list(data.mod) if modalities is None else [str(m) for m in modalities]
        for m in wanted:
            if m not in data.mod:
                raise KeyError(f"the MuData has no modality {m!r} (modalities: {list(data.mod)}); fix modalities=.")
        if not wanted:
            raise ValueError("no modality selected: the MuData has none, or modalities=[] was passed.")
        for m in wanted:
            csr = _read_modality(data.mod[m], _layer_for(layer, m), f"mdata.mod[{m!r}]")
            rows = np.asarray(data.obsmap[m]).astype(np.int64).ravel()
            present[m] = rows > 0
            counts[m], names[m] = in_obs_order(csr, rows), [str(v) for v in data.mod[m].var_names]
        return counts, names, present
    if modality_key is not None:
        if modality_key not in data.var.columns:
            raise KeyError(
                f"modality_key {modality_key!r} is not a column of adata.var (columns: {list(data.var.columns)[:20]}); "
                "fix the name, or pass modality_key=None for a single modality."
            )
        col = data.var[modality_key]
        if col.isna().any():
            raise ValueError(f"adata.var[{modality_key!r}] has missing values; every feature needs a modality.")
        labels = col.astype(str).to_numpy()
        order = [str(c) for c in col.cat.categories] if isinstance(col.dtype, pd.CategoricalDtype) else list(dict.fromkeys(labels))
        order = [m for m in order if (labels == m).any()]
        wanted = order if modalities is None else [str(m) for m in modalities]
        for m in wanted:
            if m not in order:
                raise KeyError(f"no feature has adata.var[{modality_key!r}] == {m!r} (modalities: {order}).")
        csr = _read_modality(data, _layer_for(layer, "adata"), "adata")
        if not sp.issparse(csr):
            raise ValueError(
                f"modality_key={modality_key!r} splits the features of one matrix, which is not supported for counts "
                "read from disk (a backed AnnData); load it into memory (adata = adata.to_memory()) or write one "
                "file per modality (a MuData)."
            )
        for m in wanted:
            cols = np.flatnonzero(labels == m)
            counts[m] = to_csr(csr[:, cols])
            names[m] = [str(v) for v in data.var_names[cols]]
            present[m] = np.ones(n, dtype=bool)
        return counts, names, present
    m = DEFAULT_MODALITY if not modalities else str(modalities[0])
    if modalities is not None and len(modalities) != 1:
        raise ValueError(
            f"an AnnData without modality_key is one modality, but modalities={list(modalities)} was passed; "
            "pass a MuData or set modality_key= to the .var column naming each feature's modality."
        )
    counts[m] = _read_modality(data, layer, "adata")
    names[m] = [str(v) for v in data.var_names]
    present[m] = np.ones(n, dtype=bool)
    return counts, names, present


def _totals_source(data, layer, modalities: list[str]) -> str:
    """Where the counts of a cell total come from, for error messages."""
    if len(modalities) > 1:
        return f"any of the modalities {modalities}"
    if is_mudata(data):
        return f"mdata.mod[{modalities[0]!r}]"
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def obs_column(data, key: str) -> pd.DataFrame:
    """A one-column frame ``obs[key]`` of an AnnData or MuData. For a MuData a
    key missing from ``mdata.obs`` is looked up as ``'<modality>:<key>'`` (the
    form in which MuData mirrors its modalities' obs columns)."""
    obs = data.obs
    if key in obs.columns or not is_mudata(data):
        return obs
    prefixed = [c for c in obs.columns if str(c).endswith(f":{key}")]
    if prefixed:
        return pd.DataFrame({key: obs[prefixed[0]]}, index=obs.index)
    for m, ad in data.mod.items():
        if key in ad.obs.columns and ad.n_obs == data.n_obs and ad.obs_names.equals(data.obs_names):
            return pd.DataFrame({key: ad.obs[key]}, index=obs.index)
    return obs


def read_data(
    data,
    layer: str | dict[str, str] | None = None,
    covariate_keys: list[str] | None = None,
    label_key: str | None = None,
    modality_key: str | None = None,
    modalities: list[str] | None = None,
    continuous_keys: list[str] | None = None,
) -> CountData:
    """Check and read an AnnData or a MuData into :class:`CountData`.

    The ``.X`` of a backed AnnData (``anndata.read_h5ad(path, backed="r")``)
    is not loaded: it becomes a :class:`~dgdcell.data.backed.BackedCounts`,
    checked and summed in one streaming pass and read block by block later.

    ``continuous_keys`` name numeric obs columns read as continuous covariates
    (:func:`read_continuous`).

    Parameters
    ----------
    data
        MuData (one modality per ``.mod``), AnnData whose ``.var[modality_key]``
        names each feature's modality, or a plain AnnData (one modality,
        ``'rna'``, or ``modalities[0]``).
    layer
        Layer holding the raw counts (None: ``.X``); for a MuData also a dict
        modality -> layer.
    covariate_keys, label_key
        obs columns (for a MuData, ``mdata.obs`` or a modality's column).
        Covariates need no missing values and at least 2 classes; missing
        labels mark unlabelled cells.
    modality_key
        For an AnnData with several modalities: the ``.var`` column.
    modalities
        Which modalities to read (default: all, in their order).

    A cell absent from a modality, or with no counts in it, is unobserved
    there (``CountData.observed``); with several modalities that is allowed
    (mosaic data) as long as every cell has counts somewhere. Never modifies
    ``data``.
    """
    check_data_object(data)
    counts, names, present = _modality_counts(data, layer, modality_key, modalities)
    library = {m: c.library.copy() if isinstance(c, BackedCounts) else np.asarray(c.sum(axis=1), dtype=np.float64).ravel()
               for m, c in counts.items()}
    total = sum(library.values())
    check_cell_totals(total, _totals_source(data, layer, list(counts)))
    if all(c.rows_identical() if isinstance(c, BackedCounts) else cells_identical(c) for c in counts.values()):
        raise ValueError(f"all {data.n_obs} cells have identical counts in every feature: there is nothing to learn "
                         "about them. Check that the right matrix (or layer) is passed.")
    observed = {}
    for m in counts:
        observed[m] = present[m] & (library[m] > 0)
        library[m] = np.where(observed[m], library[m], 1.0)
    covariates = {}
    for key in covariate_keys or []:
        cat = encode_categories(obs_column(data, key), key, "covariate", allow_missing=False)
        if cat.n_classes < 2:
            raise ValueError(
                f"covariate {key!r} has a single class ({cat.categories}); it carries no information. "
                "Drop it from covariate_keys."
            )
        covariates[key] = cat
    labels = (
        encode_categories(obs_column(data, label_key), label_key, "label", allow_missing=True) if label_key else None
    )
    return CountData(
        counts=counts,
        library=library,
        feature_names=names,
        covariates=covariates,
        labels=labels,
        obs_names=[str(v) for v in data.obs_names],
        observed=observed if len(counts) > 1 else {},
        continuous=read_continuous(data, continuous_keys or [], require_spread=True),
    )


def read_continuous(data, keys: list[str], require_spread: bool = False) -> dict[str, np.ndarray]:
    """key -> (n_obs,) float64 values of the numeric obs columns ``keys`` (an AnnData's or a MuData's).

    Each must exist, be numeric (not boolean or categorical) and finite; with
    ``require_spread`` (training) it must also vary between cells."""
    out = {}
    for key in keys:
        frame = obs_column(data, key)
        check_obs_column(frame, key, "continuous covariate")
        col = frame[key]
        if (isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(col.dtype)
                or not pd.api.types.is_numeric_dtype(col.dtype)):
            raise ValueError(f"continuous covariate {key!r} has dtype {col.dtype}; it must be numeric (a measurement "
                             f"such as a percentage). Pass a class column in covariate_keys instead.")
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"continuous covariate {key!r} has {int(bad.sum())} missing or infinite values; fill "
                             "them (e.g. with the column's median) or drop those cells.")
        if require_spread and values.size > 1 and not values.std() > 0:
            raise ValueError(f"continuous covariate {key!r} has the same value in every cell; it carries no "
                             "information. Drop it from continuous_covariate_keys.")
        out[key] = values
    return out


def read_anndata(
    adata,
    layer: str | None = None,
    covariate_keys: list[str] | None = None,
    label_key: str | None = None,
    modality: str = DEFAULT_MODALITY,
) -> CountData:
    """Check and read one AnnData (a single modality named ``modality``); see :func:`read_data`."""
    return read_data(adata, layer, covariate_keys, label_key, modalities=[modality])


def binarise(data: CountData, modalities: list[str]) -> None:
    """Counts of ``modalities`` set to 1 where > 0 (a new matrix; its index
    arrays are shared, and the input's, which may be the caller's AnnData's,
    are never written), library sizes recounted as the number of features on
    (unobserved cells keep 1)."""
    for m in modalities:
        old = data.counts[m]
        if not sp.issparse(old):  # read from disk: values become 1 as each block is read
            data.counts[m] = old.binarised()
            data.library[m] = np.where(data.observed_mask(m), data.counts[m].library, 1.0)
            continue
        csr = sp.csr_matrix((np.ones_like(old.data), old.indices, old.indptr), shape=old.shape, copy=False)
        data.counts[m] = csr
        library = np.diff(csr.indptr).astype(np.float64)
        data.library[m] = np.where(data.observed_mask(m), library, 1.0)
