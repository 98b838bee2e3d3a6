"""Differential expression from the decoder.

Two kinds of comparison, both computed from decoded (normalized) expression, the
fractions ``p_ij`` the decoder gives each cell over a modality's features:

* **group mode** (``groupby`` / ``group1`` / ``group2``, or ``idx1`` / ``idx2``):
  two groups of cells, each decoded at its own representation, as scVI's
  ``differential_expression(mode="change")``;
* **counterfactual mode** (``covariate`` with ``group1`` / ``group2`` two classes
  of that covariate): the *same* cells decoded twice, once as if measured in
  class ``group1`` and once in class ``group2`` (``transform_batch``): the paired
  effect of the covariate on these cells, which a model without covariate
  representations cannot give.

The method follows scVI's "change" mode (Boyeau et al. 2019): pair
normalized-expression samples of the two sides, take the log fold change
``LFC = log2(p1 + eps) - log2(p2 + eps)`` per feature, and summarise its
distribution: ``proba_de = P(|LFC| >= delta)`` (the larger of the up and down
tails, ``test_mode="three"``), the Bayes factor ``log(proba_de / (1 - proba_de))``,
the LFC mean, median, sd, min, max and optional credible intervals, and scVI's
posterior expected false discovery rate procedure flagging the features
(``is_de_fdr_<fdr_target>``). Rows are sorted by ``proba_de`` and, among equal
values (often several features at 1), by ``|lfc_mean|``.

**What the samples are (the documented approximation).** A DGD fitted by MAP
has one point per cell and no posterior over it, so there is no per-cell
uncertainty to sample. The LFC distribution is then over *cells*: in group mode
over all pairs (a cell of group 1, a cell of group 2) of the decoded cells,
counted exactly rather than sampled (``proba_de``, ``lfc_mean``, ``lfc_std``,
``lfc_min``, ``lfc_max``; the median and credible intervals from ``n_samples``
random pairs); in counterfactual mode over the cells themselves, each decoded
under both classes (paired). ``proba_de`` is therefore the share of cell pairs
(of cells) whose decoded fold change exceeds ``delta``: a statement about how
consistently the groups differ across their cells, not a posterior
probability that accounts for the measurement noise of each cell. Decoded
expression is denoised, so features the decoder separates cleanly get
``proba_de`` at or near 1 even when they are lowly expressed; the pseudocount
(see ``pseudocount``) shrinks the fold changes of such features. With few
cells, an under-fitted decoder or very similar groups the evidence can be
over-stated, and the ``is_de_fdr_*`` flag is then optimistic. A model with a
per-cell posterior plugs its samples in through ``sampler`` (see
:func:`differential_expression`): each sampled cell then contributes a fresh
posterior draw and the same statistics become scVI's Monte Carlo estimates.

This module only uses the model's public interface
(``get_normalized_expression``, ``features``, ``covariate_categories``,
``obs_names``, ``is_fitted``), and never modifies the AnnData.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

__all__ = ["differential_expression", "fdr_de_prediction", "DE_MODES"]

#: the two test modes (scVI's names)
DE_MODES = ("change", "vanilla")
#: a feature whose mean raw count in a group is below this counts as not expressed there
#: (scVI's ``threshold_counts``), for the pseudocount estimate
THRESHOLD_COUNTS = 0.01
#: default pseudocount: this quantile, over the features, of their mean decoded fraction (both sides pooled)
PSEUDOCOUNT_MEAN_QUANTILE = 0.3
#: ``pseudocount="scvi"``: quantile of the not-expressed features' largest decoded fraction (scVI's estimate)
SCVI_PSEUDOCOUNT_QUANTILE = 0.9
#: without counts: the share of least-expressed features (by mean decoded fraction) treated as not expressed
LOW_EXPRESSION_SHARE = 0.1
#: float32 elements of LFC samples held at a time (n_samples x feature chunk)
_CHUNK_ELEMENTS = 1 << 22
#: warn when ``adata=None`` forces the decoding of all training cells at once beyond this many bytes
_FULL_DECODE_WARN_BYTES = 2 << 30
_EPS_BF = 1e-8


# --------------------------------------------------------------------------- the public function
def differential_expression(
    model,
    adata=None,
    groupby: str | Sequence | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: Sequence | np.ndarray | None = None,
    idx2: Sequence | np.ndarray | None = None,
    covariate: str | None = None,
    restrict_to: str | Sequence[str] | None = None,
    mode: str = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    batch_size: int = 1024,
    seed: int = 0,
    pseudocount: float | str | None = None,
    transform_batch: str | Mapping[str, str] | None = None,
    modality: str = "rna",
    key: str = "dgd",
    layer: str | None = None,
    all_stats: bool = True,
    test_mode: str = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    sampler: Callable | None = None,
) -> pd.DataFrame:
    """Differential expression between groups of cells, or between covariate classes for the same cells.

    **Group mode** (``covariate=None``): ``groupby`` names the groups (an
    ``adata.obs`` column, or an array of one label per cell); ``group1`` is a
    group, a list of groups (each compared in turn) or None (every group, each
    against ``group2``); ``group2`` is a group or None ("rest": every other
    labelled cell). Instead of ``groupby``, ``idx1`` / ``idx2`` give the two
    sets of cells directly (boolean masks, integer positions or obs names;
    ``idx2`` None: the rest). Each cell is decoded at its own representation
    with its own covariate classes, or every cell in the class(es)
    ``transform_batch`` (batch-corrected comparison).

    **Counterfactual mode** (``covariate`` given): ``group1`` and ``group2`` are
    two classes of that covariate of the model (``model.covariate_categories``),
    e.g. ``covariate="batch", group1="stim", group2="ctrl"``. Every selected
    cell is decoded twice, with ``transform_batch={covariate: group1}`` and
    ``{covariate: group2}`` (other covariates as observed, or as fixed by
    ``transform_batch``), and the LFC is taken cell by cell (paired). Which
    cells: all of them, or with ``groupby`` each of its groups in turn (one
    comparison per cell population), or only the groups named in
    ``restrict_to``. The raw count statistics (``raw_mean1`` ...) are those of
    the selected cells observed in each class (``adata.obs[covariate]``).

    Sampling: at most ``n_samples`` cells of each side are decoded (a uniform
    random subsample of larger groups, without replacement), in batches of
    ``batch_size``. In group mode the statistics are taken over all pairs of
    decoded cells (exactly; the median and credible intervals over
    ``n_samples`` random pairs); in counterfactual mode over the decoded cells
    (paired). With ``sampler`` (a model with a per-cell posterior),
    ``n_samples`` cells are drawn with replacement per side, each draw gets its
    own posterior sample, and draw ``k`` of one side is paired with draw ``k``
    of the other (scVI's scheme). See the module documentation for what the
    distribution means for a MAP model. Memory: about ``2 x n_samples x
    n_features`` float32 values per comparison.

    Parameters
    ----------
    model
        A fitted :class:`~dgdcell.DGD` (or any object with the same
        ``get_normalized_expression``, ``features``, ``covariate_categories``,
        ``obs_names`` and ``is_fitted``).
    adata
        AnnData / MuData carrying the representations ``obsm[f"X_{key}"]`` and
        ``obsm[f"X_{key}_{covariate}"]`` written by ``fit`` or ``transform``
        (only the sampled cells are decoded, in batches), and the counts for
        the raw statistics. None: the model's training cells, in
        ``model.obs_names`` order; their obs are not stored in the model, so
        ``groupby`` must then be an array (one label per training cell), there
        are no raw statistics, and every training cell is decoded at once
        (memory ``n_cells x n_features x 4`` bytes per decoding): pass the
        AnnData the model was fitted on for large data.
    groupby
        ``adata.obs`` column or array-like of one label per cell (missing
        labels belong to no group and are not in "rest").
    group1
        Group mode: a group of ``groupby``, a list of groups, or None (all
        groups, one comparison each). Counterfactual mode: a class of
        ``covariate``.
    group2
        Group mode: a group of ``groupby``, or None (the rest). Counterfactual
        mode: the other class of ``covariate`` (required).
    idx1
        Group mode without ``groupby``: the cells of the first group (boolean
        mask, integer positions or obs names).
    idx2
        Like ``idx1`` for the second group; None: all other cells.
    covariate
        A covariate of the model: switches to counterfactual mode.
    restrict_to
        Counterfactual mode with ``groupby``: the group(s) whose cells are
        compared (default: every group, one comparison each).
    mode
        ``"change"`` (scVI's change mode, LFC-based, default) or ``"vanilla"``
        (``proba_m1 = P(p1 > p2)``, Bayes factor of that event; the LFC
        summaries are reported too).
    delta
        LFC threshold (log2 units, > 0): a feature is DE where ``|LFC| >= delta``.
    fdr_target
        Posterior expected false discovery rate (in (0, 1)) for the
        ``is_de_fdr_<fdr_target>`` column (change mode).
    n_samples
        Cells decoded per side at most, and LFC samples per comparison (>= 2).
    batch_size
        Cells decoded at a time.
    seed
        Seed of the sampling (each comparison draws from its own stream, so a
        comparison's result does not depend on the others computed with it).
    pseudocount
        ``eps`` added to the fractions before the log (>= 0), one value per
        comparison. None (default): the 0.3 quantile, over the features, of
        their mean decoded fraction (the two sides pooled): fold changes of
        features expressed below that level are shrunk towards 0, those of
        features above it hardly change. ``"scvi"``: scvi-tools' estimate: the
        0.9 quantile of the largest decoded fraction of the features not
        expressed in a group (mean raw count below 0.01; without counts the
        10% least expressed by mean decoded fraction), the larger over the two
        sides, divided by the number of features, at least 1e-10 (a much
        smaller value, which lets lowly expressed features with large decoded
        fold changes rank high). A number: that value. As in scVI,
        ``proba_de`` uses ``eps`` and the LFC summaries use ``1e-3 * eps``. The
        value used is in the ``pseudocounts`` column.
    transform_batch
        Group mode: decode every cell as if measured in this covariate class
        (a class name, or ``{covariate: class}``); None: each cell's own
        classes. Counterfactual mode: fixes *other* covariates only.
    modality
        The modality whose features are compared (``model.features``).
    key
        The ``key_added`` of the fit: representations are read from
        ``obsm[f"X_{key}"]`` and ``obsm[f"X_{key}_{covariate}"]``.
    layer
        Where the raw counts are for the raw statistics: ``adata.X`` (None) or
        ``adata.layers[layer]`` (for a MuData, in ``mdata.mod[modality]``).
    all_stats
        Add the raw count statistics of each group: ``raw_mean1/2``,
        ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2`` (counts per 10k).
    test_mode
        ``"three"`` (scVI's default: ``proba_de`` is the larger of
        ``P(LFC >= delta)`` and ``P(LFC < -delta)``) or ``"two"`` (their sum).
    cred_interval_lvls
        Levels in (0, 1) of highest-density credible intervals of the LFC, as
        columns ``lfc_confidence_interval_<lvl>_min`` / ``_max`` (scVI's names).
    sampler
        Optional per-cell posterior sampler, for models with a posterior over
        each cell: ``sampler(cells, transform_batches) -> list of arrays``,
        where ``cells`` is an AnnData / MuData view of distinct cells (at most
        ``batch_size``) and ``transform_batches`` a list of ``transform_batch``
        values (None or dicts); it returns, for each entry, an
        ``(cells.n_obs, n_features)`` array of normalized expression (fractions
        of ``modality``) computed from one fresh posterior draw per cell,
        shared across the entries (so that counterfactual pairs are paired). It
        is called once per batch and per repeat of a cell. None: the MAP
        decoder (``model.get_normalized_expression``). Requires ``adata``.

    Returns
    -------
    DataFrame, one row per feature and comparison (features repeat when
    several comparisons are made), sorted within each comparison by
    ``proba_de`` (vanilla: ``bayes_factor``) and then ``|lfc_mean|``,
    descending. Columns (scVI's where they exist): ``proba_de``,
    ``proba_not_de``, ``bayes_factor`` (change mode; vanilla: ``proba_m1``,
    ``proba_m2``, ``bayes_factor``), ``scale1`` / ``scale2`` (mean decoded
    fractions of the sampled cells), ``pseudocounts``, ``delta``,
    ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max`` (and
    credible intervals), with ``all_stats`` and counts the raw statistics
    above, ``is_de_fdr_<fdr_target>`` (change mode), ``comparison``,
    ``group1``, ``group2``, ``n_cells1``, ``n_cells2`` (cells in each group;
    counterfactual: the population's cells, on both sides, and the columns
    ``covariate`` and ``population``). ``DataFrame.attrs["dgdcell_de"]`` records the settings
    (``groupby`` when it is a column name, used by
    :func:`dgdcell.pl.de_heatmap`).

    Raises
    ------
    ValueError, KeyError
        For an unfitted model and for every invalid argument (unknown group,
        modality, covariate or class, empty group, ``delta <= 0``, ...); the
        message names the argument and the fix.
    """
    _check_model(model)
    features = _check_modality(model, modality)
    _check_options(mode, delta, fdr_target, n_samples, batch_size, pseudocount, test_mode, cred_interval_lvls)
    if sampler is not None and not callable(sampler):
        raise TypeError(f"sampler must be a callable (or None), got {type(sampler).__name__}.")
    n_samples, batch_size = int(n_samples), int(batch_size)
    cred = [float(c) for c in (cred_interval_lvls or [])]

    source = _Source(model, adata, modality, key, batch_size, sampler, layer)
    labels = None if groupby is None else _group_labels(groupby, source)

    if covariate is None:
        if restrict_to is not None:
            raise ValueError("restrict_to is for the counterfactual mode (covariate=...); in group mode "
                             "choose the groups with group1 / group2.")
        fixed = _check_transform_batch(model, transform_batch)
        comparisons = _group_comparisons(labels, groupby, group1, group2, idx1, idx2, source)
    else:
        if idx1 is not None or idx2 is not None:
            raise ValueError("idx1 / idx2 select groups in group mode; in counterfactual mode (covariate=...) "
                             "select the cells with groupby= and restrict_to=, or pass adata[mask].")
        fixed = _check_transform_batch(model, transform_batch)
        comparisons = _counterfactual_comparisons(model, labels, groupby, covariate, group1, group2,
                                                  restrict_to, fixed, source)

    results = []
    for comp in comparisons:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(comp["comparison"].encode())])
        if comp["kind"] == "group":
            res = _run_group(source, comp, fixed, n_samples, rng)
        else:
            res = _run_counterfactual(source, comp, fixed, n_samples, rng)
        sides, raw, reference = res
        eps = _pseudocount(pseudocount, sides, reference, len(features))
        stats = _lfc_statistics(sides, eps, float(delta), mode, test_mode, cred)
        frame = pd.DataFrame(stats, index=pd.Index(features, name=None))
        if raw is not None and all_stats:
            for name, values in raw.items():
                frame[name] = values
        frame = _sort(frame, mode)
        if mode == "change":
            frame[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(frame["proba_de"], fdr=fdr_target)
        frame["comparison"] = comp["comparison"]
        frame["group1"] = comp["name1"]
        frame["group2"] = comp["name2"]
        frame["n_cells1"] = comp["n1"]
        frame["n_cells2"] = comp["n2"]
        if comp["kind"] == "counterfactual":
            frame["covariate"] = covariate
            frame["population"] = comp["population"]
        results.append(frame)
    out = pd.concat(results, axis=0) if len(results) > 1 else results[0]
    out.attrs["dgdcell_de"] = {
        "mode": "group" if covariate is None else "counterfactual",
        "test": mode,
        "groupby": groupby if isinstance(groupby, str) else None,
        "covariate": covariate,
        "key": key,
        "modality": modality,
        "delta": float(delta),
        "fdr_target": float(fdr_target),
        "n_samples": n_samples,
        "seed": int(seed),
        "transform_batch": None if not fixed else dict(fixed),
        "posterior": "sampler" if sampler is not None else "map (distribution over cells)",
    }
    return out


def fdr_de_prediction(posterior_probas: pd.Series | np.ndarray, fdr: float = 0.05) -> pd.Series:
    """Flag features as DE at a posterior expected false discovery rate (scVI's procedure).

    Features are sorted by ``posterior_probas`` (descending); the largest set
    of top features whose mean ``1 - proba`` is at most ``fdr`` is flagged.

    Parameters
    ----------
    posterior_probas
        One probability of being DE per feature (a Series keeps its index).
    fdr
        Target posterior expected false discovery rate, in (0, 1).

    Returns
    -------
    Boolean Series in the input's order.
    """
    p = posterior_probas if isinstance(posterior_probas, pd.Series) else pd.Series(np.asarray(posterior_probas))
    if p.ndim != 1:
        raise ValueError("posterior_probas must be 1-dimensional.")
    values = p.to_numpy(dtype=float)
    order = np.argsort(-values, kind="stable")
    cumulative = np.cumsum(1.0 - values[order]) / (1.0 + np.arange(values.size))
    n_de = int((cumulative <= fdr).sum())
    flags = np.zeros(values.size, dtype=bool)
    flags[order[:n_de]] = True
    return pd.Series(flags, index=p.index)


# --------------------------------------------------------------------------- validation
def _check_model(model) -> None:
    for attr in ("get_normalized_expression", "features", "covariate_categories", "obs_names", "is_fitted"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a fitted dgdcell.DGD (it has no {attr!r}), got {type(model).__name__}.")
    if not model.is_fitted:
        raise ValueError("the model is not fitted: call model.fit(adata) or DGD.load(dir) first.")


def _check_modality(model, modality: str) -> list[str]:
    if modality not in model.features:
        raise KeyError(f"modality {modality!r} is not in the model; pass modality= one of {sorted(model.features)}.")
    return [str(f) for f in model.features[modality]]


def _check_options(mode, delta, fdr_target, n_samples, batch_size, pseudocount, test_mode, cred) -> None:
    if mode not in DE_MODES:
        raise ValueError(f"mode must be one of {DE_MODES}, got {mode!r}.")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}.")
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.number)) or not math.isfinite(float(delta)) \
            or float(delta) <= 0:
        raise ValueError(f"delta must be a finite number > 0 (an LFC threshold in log2 units, e.g. 0.25), got {delta!r}.")
    if isinstance(fdr_target, bool) or not isinstance(fdr_target, (int, float, np.number)) \
            or not 0 < float(fdr_target) < 1:
        raise ValueError(f"fdr_target must be a number in (0, 1), e.g. 0.05, got {fdr_target!r}.")
    for name, value, low in (("n_samples", n_samples, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if isinstance(pseudocount, str):
        if pseudocount != "scvi":
            raise ValueError(f"pseudocount must be None (estimated), 'scvi' or a number >= 0, got {pseudocount!r}.")
    elif pseudocount is not None:
        if isinstance(pseudocount, bool) or not isinstance(pseudocount, (int, float, np.number)) \
                or not math.isfinite(float(pseudocount)) or float(pseudocount) < 0:
            raise ValueError(f"pseudocount must be None (estimated) or a finite number >= 0, got {pseudocount!r}.")
    for lvl in cred or []:
        if not isinstance(lvl, (int, float, np.number)) or not 0 < float(lvl) < 1:
            raise ValueError(f"cred_interval_lvls must hold levels in (0, 1), e.g. [0.9], got {lvl!r}.")


def _check_transform_batch(model, transform_batch) -> dict[str, str]:
    """``transform_batch`` as a checked dict covariate -> class ({} for None)."""
    from ._expression import resolve_transform_batch

    return resolve_transform_batch(model.covariate_categories, transform_batch)


def _group_labels(groupby, source: "_Source") -> pd.Categorical:
    """One label per cell (categorical, missing labels as NaN) from a column name or an array."""
    if isinstance(groupby, str):
        if source.adata is None:
            raise ValueError(f"groupby={groupby!r} names an obs column, but adata=None (the training cells, whose obs "
                             "the model does not keep): pass adata=, or groupby= an array of one label per training "
                             f"cell ({source.n} cells, in model.obs_names order).")
        obs = _obs_frame(source.adata, groupby)
        if obs is None:
            raise KeyError(f"groupby {groupby!r} is not a column of adata.obs (columns: {list(source.adata.obs.columns)[:30]}).")
        values = obs[groupby]
    else:
        values = groupby.to_numpy() if isinstance(groupby, pd.Series) else groupby
        values = np.asarray(values, dtype=object) if not isinstance(values, pd.Categorical) else values
        if np.ndim(values) != 1 or len(values) != source.n:
            raise ValueError(f"groupby as an array must hold one label per cell ({source.n} cells), "
                             f"got shape {np.shape(values)}.")
    cat = pd.Categorical(values)
    if cat.categories.size and not all(isinstance(c, str) for c in cat.categories):
        cat = pd.Categorical(
            [None if pd.isna(v) else str(v) for v in np.asarray(cat, dtype=object)],
            categories=list(dict.fromkeys(str(c) for c in cat.categories)),
        )
    return cat


def _obs_frame(adata, column: str) -> pd.DataFrame | None:
    """``adata.obs`` holding ``column``; for a MuData also a modality's column ('mod:column' or a modality's obs)."""
    obs = adata.obs
    if column in obs.columns:
        return obs
    if hasattr(adata, "mod"):
        prefixed = [c for c in obs.columns if str(c).endswith(f":{column}")]
        if prefixed:
            return pd.DataFrame({column: obs[prefixed[0]]}, index=obs.index)
        for mod in adata.mod.values():
            if column in mod.obs.columns and mod.n_obs == adata.n_obs and mod.obs_names.equals(adata.obs_names):
                return pd.DataFrame({column: mod.obs[column]}, index=obs.index)
    return None


def _as_rows(idx, source: "_Source", name: str) -> np.ndarray:
    """Sorted unique integer rows from a boolean mask, integer positions or obs names."""
    arr = np.asarray(idx.to_numpy() if isinstance(idx, (pd.Series, pd.Index)) else idx)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (a mask, positions or obs names), got shape {arr.shape}.")
    if arr.dtype == bool:
        if arr.size != source.n:
            raise ValueError(f"{name} as a boolean mask must have one value per cell ({source.n}), got {arr.size}.")
        rows = np.flatnonzero(arr)
    elif arr.size and np.issubdtype(arr.dtype, np.integer):
        if arr.min() < -source.n or arr.max() >= source.n:
            raise ValueError(f"{name} holds positions outside 0..{source.n - 1}.")
        rows = np.unique(np.where(arr < 0, arr + source.n, arr))
    elif arr.size == 0:
        rows = np.zeros(0, dtype=np.int64)
    else:
        names = pd.Index(source.obs_names)
        pos = names.get_indexer(pd.Index(arr.astype(str)))
        if (pos < 0).any():
            raise KeyError(f"{name}: {int((pos < 0).sum())} names are not cells of the data "
                           f"(first: {arr[np.flatnonzero(pos < 0)[0]]!r}); pass a mask, positions or obs names.")
        rows = np.unique(pos)
    if rows.size == 0:
        raise ValueError(f"{name} selects no cells: pass a non-empty selection.")
    return rows.astype(np.int64)


def _group_comparisons(labels, groupby, group1, group2, idx1, idx2, source) -> list[dict]:
    if labels is None:
        if idx1 is None:
            if group1 is not None or group2 is not None:
                raise ValueError("group1 / group2 need groupby= (the obs column or labels holding the groups).")
            raise ValueError("pass groupby= (with group1 / group2) or idx1= (and optionally idx2=) to say which "
                             "cells to compare, or covariate= for the counterfactual comparison.")
        rows1 = _as_rows(idx1, source, "idx1")
        if idx2 is None:
            rows2 = np.setdiff1d(np.arange(source.n), rows1)
            if rows2.size == 0:
                raise ValueError("idx1 selects every cell, so 'the rest' (idx2=None) is empty: pass idx2=.")
            name2 = "rest"
        else:
            rows2 = _as_rows(idx2, source, "idx2")
            name2 = "idx2"
        return [dict(kind="group", comparison=f"idx1 vs {name2}", name1="idx1", name2=name2,
                     rows1=rows1, rows2=rows2, n1=int(rows1.size), n2=int(rows2.size))]
    if idx1 is not None or idx2 is not None:
        raise ValueError("pass either groupby= (with group1 / group2) or idx1= / idx2=, not both.")
    what = f"groupby {groupby!r}" if isinstance(groupby, str) else "groupby"
    codes = np.asarray(labels.codes)
    present = [c for i, c in enumerate(labels.categories) if (codes == i).any()]
    if len(present) < 2 and group2 is None:
        raise ValueError(f"{what} has a single group ({present}): there is nothing to compare it with.")

    def rows_of(g, arg):
        if str(g) not in list(labels.categories):
            raise KeyError(f"{arg} {g!r} is not a group of {what} (groups: {present[:30]}).")
        rows = np.flatnonzero(codes == list(labels.categories).index(str(g)))
        if rows.size == 0:
            raise ValueError(f"{arg} {g!r} has no cells (an empty category of {what}); choose a group with cells.")
        return rows

    if group1 is None:
        groups1 = [g for g in present if g != (None if group2 is None else str(group2))]
    elif isinstance(group1, str) or not isinstance(group1, Sequence):
        groups1 = [str(group1)]
    else:
        groups1 = [str(g) for g in group1]
        if not groups1:
            raise ValueError("group1 is an empty list: pass a group, a list of groups or None (all groups).")
    if group2 is not None and not isinstance(group2, str):
        group2 = str(group2)
    rows2_fixed = None if group2 is None else rows_of(group2, "group2")
    out = []
    for g in groups1:
        rows1 = rows_of(g, "group1")
        if group2 is None:
            rows2 = np.flatnonzero((codes >= 0) & (codes != list(labels.categories).index(g)))
            if rows2.size == 0:
                raise ValueError(f"group1 {g!r} holds every labelled cell, so the rest is empty: pass group2=.")
            name2 = "Rest"
        else:
            if g == group2:
                raise ValueError(f"group1 and group2 are the same group {g!r}: choose two different groups.")
            rows2, name2 = rows2_fixed, group2
        out.append(dict(kind="group", comparison=f"{g} vs {name2}", name1=g, name2=name2,
                        rows1=rows1, rows2=rows2, n1=int(rows1.size), n2=int(rows2.size)))
    return out


def _counterfactual_comparisons(model, labels, groupby, covariate, group1, group2, restrict_to, fixed,
                                source) -> list[dict]:
    cats = {str(k): [str(c) for c in v] for k, v in model.covariate_categories.items()}
    if str(covariate) not in cats:
        raise KeyError(f"covariate {covariate!r} is not a covariate of the model (covariates: "
                       f"{list(cats) or 'none: fit with covariate_keys=[...]'}).")
    covariate = str(covariate)
    if covariate in fixed:
        raise ValueError(f"transform_batch fixes covariate {covariate!r}, the one being compared; "
                         "transform_batch may only fix the other covariates in counterfactual mode.")
    classes = cats[covariate]
    for arg, g in (("group1", group1), ("group2", group2)):
        if g is None:
            raise ValueError(f"counterfactual mode needs {arg}= a class of covariate {covariate!r} (classes: {classes}).")
        if not isinstance(g, str):
            raise ValueError(f"{arg} must be one class name of covariate {covariate!r} in counterfactual mode, got {g!r}.")
        if g not in classes:
            raise KeyError(f"{arg} {g!r} is not a class of covariate {covariate!r} (classes: {classes}).")
    if group1 == group2:
        raise ValueError(f"group1 and group2 are the same class {group1!r}: choose two different classes.")

    observed = source.observed_classes(covariate)  # (n,) str or None per cell, or None when unknown
    populations: list[tuple[str, np.ndarray]]
    if labels is None:
        if restrict_to is not None:
            raise ValueError("restrict_to needs groupby= (the obs column or labels holding the populations).")
        populations = [("all", np.arange(source.n))]
    else:
        codes = np.asarray(labels.codes)
        what = f"groupby {groupby!r}" if isinstance(groupby, str) else "groupby"
        present = [c for i, c in enumerate(labels.categories) if (codes == i).any()]
        if restrict_to is None:
            wanted = present
        elif isinstance(restrict_to, str) or not isinstance(restrict_to, Sequence):
            wanted = [str(restrict_to)]
        else:
            wanted = [str(g) for g in restrict_to]
            if not wanted:
                raise ValueError("restrict_to is an empty list: pass a group, a list of groups or None (every group).")
        populations = []
        for g in wanted:
            if g not in list(labels.categories):
                raise KeyError(f"restrict_to {g!r} is not a group of {what} (groups: {present[:30]}).")
            rows = np.flatnonzero(codes == list(labels.categories).index(g))
            if rows.size == 0:
                raise ValueError(f"restrict_to {g!r} has no cells (an empty category of {what}).")
            populations.append((g, rows))
    out = []
    for pop, rows in populations:
        label = f"{group1} vs {group2}" + ("" if pop == "all" else f" ({pop})")
        if observed is not None:
            obs_rows1 = rows[observed[rows] == group1]
            obs_rows2 = rows[observed[rows] == group2]
        else:
            obs_rows1 = obs_rows2 = None
        out.append(dict(kind="counterfactual", comparison=label, name1=group1, name2=group2, population=pop,
                        rows=rows, covariate=covariate, obs_rows1=obs_rows1, obs_rows2=obs_rows2,
                        n1=int(rows.size), n2=int(rows.size)))
    return out


# --------------------------------------------------------------------------- decoding
class _Source:
    """The cells being compared: decodes rows of ``adata`` (or of the training cells) and reads their counts."""

    def __init__(self, model, adata, modality, key, batch_size, sampler, layer):
        self.model, self.adata, self.modality, self.key = model, adata, modality, key
        self.batch_size, self.sampler = batch_size, sampler
        self.features = [str(f) for f in model.features[modality]]
        self._full: dict[str, np.ndarray] = {}
        if adata is None:
            if sampler is not None:
                raise ValueError("sampler= needs adata= (it draws from the cells' representations stored in "
                                 "adata.obsm); pass the AnnData the model was fitted on.")
            if layer is not None:
                raise ValueError("layer= needs adata= (the training cells' counts are not kept in the model).")
            self.n = len(model.obs_names)
            self.obs_names = [str(v) for v in model.obs_names]
        else:
            if not (hasattr(adata, "obsm") and hasattr(adata, "obs") and hasattr(adata, "n_obs")):
                raise TypeError(f"adata must be an AnnData or MuData (or None), got {type(adata).__name__}.")
            rep = f"X_{key}"
            if rep not in adata.obsm:
                raise KeyError(f"adata.obsm has no {rep!r}: run model.fit(adata) or model.transform(adata) first, "
                               f"or pass key= the key_added used (obsm keys: {list(adata.obsm.keys())}).")
            self.n = int(adata.n_obs)
            self.obs_names = [str(v) for v in adata.obs_names]
        if self.n == 0:
            raise ValueError("adata has no cells.")
        self.counts = self._counts(layer) if adata is not None else None

    # ---- decoding
    def decode(self, rows: np.ndarray, settings: list) -> list[np.ndarray]:
        """(len(rows), n_features) float32 fractions per setting, for distinct ``rows``."""
        if self.sampler is not None:
            return self._decode_sampler(rows, settings)
        if self.adata is None:
            out = []
            for tb in settings:
                tag = repr(sorted(tb.items())) if tb else "None"
                if tag not in self._full:
                    nbytes = self.n * len(self.features) * 4
                    if nbytes > _FULL_DECODE_WARN_BYTES:
                        logger.warning("adata=None: decoding all %d training cells at once (%.1f GB); pass adata= "
                                       "to decode only the sampled cells.", self.n, nbytes / 2**30)
                    self._full[tag] = self.model.get_normalized_expression(
                        None, modality=self.modality, key=self.key, transform_batch=tb or None,
                        batch_size=self.batch_size).to_numpy(dtype=np.float32)
                out.append(self._full[tag][rows])
            return out
        out = [np.empty((rows.size, len(self.features)), dtype=np.float32) for _ in settings]
        for start in range(0, rows.size, self.batch_size):
            stop = min(start + self.batch_size, rows.size)
            cells = self.adata[rows[start:stop]]
            for s, tb in enumerate(settings):
                frame = self.model.get_normalized_expression(
                    cells, modality=self.modality, key=self.key, transform_batch=tb or None,
                    batch_size=self.batch_size)
                out[s][start:stop] = frame.to_numpy(dtype=np.float32)
        return out

    def _decode_sampler(self, rows: np.ndarray, settings: list) -> list[np.ndarray]:
        """One fresh posterior draw per entry of ``rows`` (which may repeat a cell)."""
        out = [np.empty((rows.size, len(self.features)), dtype=np.float32) for _ in settings]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        first = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
        occurrence = np.empty(rows.size, dtype=np.int64)
        occurrence[order] = np.arange(rows.size) - np.repeat(first, np.diff(np.r_[first, rows.size]))
        for r in range(int(occurrence.max()) + 1 if rows.size else 0):
            positions = np.flatnonzero(occurrence == r)
            positions = positions[np.argsort(rows[positions], kind="stable")]
            for start in range(0, positions.size, self.batch_size):
                pos = positions[start:start + self.batch_size]
                cells = self.adata[rows[pos]]
                draws = self.sampler(cells, [tb or None for tb in settings])
                if not isinstance(draws, (list, tuple)) or len(draws) != len(settings):
                    raise ValueError(f"sampler must return a list of {len(settings)} arrays (one per transform_batch), "
                                     f"got {type(draws).__name__}.")
                for s, d in enumerate(draws):
                    d = np.asarray(d.to_numpy() if isinstance(d, pd.DataFrame) else d, dtype=np.float32)
                    if d.shape != (pos.size, len(self.features)):
                        raise ValueError(f"sampler returned an array of shape {d.shape}, expected "
                                         f"({pos.size}, {len(self.features)}) (cells x features of {self.modality!r}).")
                    out[s][pos] = d
        return out

    # ---- counts and obs
    def _counts(self, layer):
        """(matrix, column of each model feature in it or -1) or None when no counts cover the features."""
        adata = self.adata
        holder = adata
        if hasattr(adata, "mod"):
            if self.modality not in adata.mod:
                return None
            holder = adata.mod[self.modality]
        if layer is not None:
            if layer not in holder.layers:
                raise KeyError(f"layer {layer!r} not found (layers: {list(holder.layers.keys())}); pass layer= the "
                               "layer holding the raw counts, or None for .X.")
            X = holder.layers[layer]
        else:
            X = holder.X
        if X is None:
            return None
        cols = pd.Index([str(v) for v in holder.var_names]).get_indexer(pd.Index(self.features))
        if (cols < 0).all():
            return None
        if holder is not adata:  # a MuData modality: map the MuData's cells to the modality's rows
            rows = pd.Index([str(v) for v in holder.obs_names]).get_indexer(pd.Index(self.obs_names))
        else:
            rows = None
        return X, cols, rows

    def observed_classes(self, covariate: str) -> np.ndarray | None:
        if self.adata is None:
            return None
        obs = _obs_frame(self.adata, covariate)
        if obs is None:
            return None
        return np.asarray([None if pd.isna(v) else str(v) for v in obs[covariate].to_numpy()], dtype=object)

    def raw_statistics(self, rows: np.ndarray | None) -> dict[str, np.ndarray] | None:
        """Per feature: mean count, share of non-zero cells, mean counts per 10k (over the modality's features
        present in the counts; NaN for features missing there) over ``rows``."""
        if self.counts is None or rows is None:
            return None
        X, cols, map_rows = self.counts
        if map_rows is not None:
            rows = map_rows[rows]
            rows = np.sort(rows[rows >= 0])
        n_feat = len(self.features)
        if rows.size == 0:
            nan = np.full(n_feat, np.nan)
            return {"mean": nan, "nonzero": nan, "normalized": nan}
        present = cols >= 0
        total = np.zeros(present.sum())
        nonzero = np.zeros(present.sum())
        normalized = np.zeros(present.sum())
        chunk = 8192
        for start in range(0, rows.size, chunk):
            sub = X[rows[start:start + chunk]]
            sub = sub.tocsr()[:, cols[present]] if sp.issparse(sub) else np.asarray(sub)[:, cols[present]]
            if sp.issparse(sub):
                sub = sub.tocsr().astype(np.float64)
                library = np.asarray(sub.sum(axis=1)).ravel()
                scale = np.where(library > 0, 1e4 / np.maximum(library, 1e-12), 0.0)
                total += np.asarray(sub.sum(axis=0)).ravel()
                nonzero += np.asarray((sub != 0).sum(axis=0), dtype=np.float64).ravel()
                normalized += np.asarray(sub.multiply(scale[:, None]).sum(axis=0)).ravel()
            else:
                sub = np.asarray(sub, dtype=np.float64)
                library = sub.sum(axis=1)
                scale = np.where(library > 0, 1e4 / np.maximum(library, 1e-12), 0.0)
                total += sub.sum(axis=0)
                nonzero += (sub != 0).sum(axis=0)
                normalized += (sub * scale[:, None]).sum(axis=0)
        out = {}
        for name, acc in (("mean", total), ("nonzero", nonzero), ("normalized", normalized)):
            full = np.full(n_feat, np.nan)
            full[present] = acc / rows.size
            out[name] = full
        return out


def _subsample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if rows.size <= n:
        return rows
    return np.sort(rng.choice(rows, size=n, replace=False))


def _run_group(source: _Source, comp: dict, fixed: dict, n_samples: int, rng):
    setting = [dict(fixed)]
    sides = []
    for rows in (comp["rows1"], comp["rows2"]):
        if source.sampler is None:
            decoded = _subsample(rows, n_samples, rng)
            (values,) = source.decode(decoded, setting)
            sides.append(values)
        else:
            draws = rng.choice(rows, size=n_samples, replace=True)
            (values,) = source.decode(draws, setting)
            sides.append(values)
    if source.sampler is None:
        i1 = rng.integers(sides[0].shape[0], size=n_samples)
        i2 = rng.integers(sides[1].shape[0], size=n_samples)
    else:
        i1 = i2 = np.arange(n_samples)
    raw1 = source.raw_statistics(comp["rows1"])
    raw2 = source.raw_statistics(comp["rows2"])
    exact = source.sampler is None  # MAP: the tail probabilities over *all* pairs of decoded cells, exactly
    return _Sides(sides[0], i1, sides[1], i2, all_pairs=exact), _raw_columns(raw1, raw2), _zero_reference(raw1, raw2)


def _run_counterfactual(source: _Source, comp: dict, fixed: dict, n_samples: int, rng):
    settings = [{**fixed, comp["covariate"]: comp["name1"]}, {**fixed, comp["covariate"]: comp["name2"]}]
    rows = comp["rows"]
    if source.sampler is None:
        rows = _subsample(rows, n_samples, rng)
    else:
        rows = rng.choice(rows, size=n_samples, replace=True)
    a1, a2 = source.decode(rows, settings)
    index = np.arange(rows.size)
    if comp["obs_rows1"] is not None:
        raw1 = source.raw_statistics(comp["obs_rows1"])
        raw2 = source.raw_statistics(comp["obs_rows2"])
        return _Sides(a1, index, a2, index), _raw_columns(raw1, raw2), _zero_reference(raw1, raw2)
    # classes not observed (no obs column): the population's counts serve both sides, for the pseudocount only
    both = source.raw_statistics(comp["rows"])
    return _Sides(a1, index, a2, index), None, _zero_reference(both, both)


class _Sides:
    """Decoded fractions of the two sides and the pair index: sample k pairs a1[i1[k]] with a2[i2[k]].

    ``all_pairs``: the two sides are independent sets of cells; the probabilities and the LFC mean, sd,
    min and max are then computed over all ``len(a1) x len(a2)`` pairs exactly, the median and the
    credible intervals from the sampled pairs."""

    def __init__(self, a1, i1, a2, i2, all_pairs: bool = False):
        self.a1, self.i1, self.a2, self.i2 = a1, np.asarray(i1), a2, np.asarray(i2)
        self.all_pairs = all_pairs


def _raw_columns(raw1, raw2) -> dict[str, np.ndarray] | None:
    if raw1 is None or raw2 is None:
        return None
    return {
        "raw_mean1": raw1["mean"], "raw_mean2": raw2["mean"],
        "non_zeros_proportion1": raw1["nonzero"], "non_zeros_proportion2": raw2["nonzero"],
        "raw_normalized_mean1": raw1["normalized"], "raw_normalized_mean2": raw2["normalized"],
    }


def _zero_reference(raw1, raw2) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean raw counts of the two sides (NaN where a feature is not in the counts), or None without counts."""
    if raw1 is None or raw2 is None:
        return None
    if np.isnan(raw1["mean"]).all() and np.isnan(raw2["mean"]).all():
        return None
    return raw1["mean"], raw2["mean"]


# --------------------------------------------------------------------------- statistics
def _pseudocount(pseudocount, sides: _Sides, reference, n_features: int) -> float:
    """The ``eps`` of the LFC: given, the default estimate, or scVI's (see :func:`differential_expression`)."""
    if pseudocount is not None and not isinstance(pseudocount, str):
        return float(pseudocount)
    if pseudocount is None:
        scale = 0.5 * (sides.a1.mean(axis=0, dtype=np.float64) + sides.a2.mean(axis=0, dtype=np.float64))
        return max(1e-10, float(np.quantile(scale, PSEUDOCOUNT_MEAN_QUANTILE)))
    # "scvi": the not-expressed features' largest decoded fraction, as scvi-tools estimates it
    max1 = sides.a1.max(axis=0)
    max2 = sides.a2.max(axis=0)
    if reference is not None:
        zero1 = np.nan_to_num(reference[0], nan=np.inf) < THRESHOLD_COUNTS
        zero2 = np.nan_to_num(reference[1], nan=np.inf) < THRESHOLD_COUNTS
    else:  # no counts: the least expressed features (by mean decoded fraction) stand for the not-expressed ones
        k = max(1, int(round(LOW_EXPRESSION_SHARE * n_features)))
        zero1 = np.zeros(n_features, dtype=bool)
        zero2 = np.zeros(n_features, dtype=bool)
        zero1[np.argsort(sides.a1.mean(axis=0), kind="stable")[:k]] = True
        zero2[np.argsort(sides.a2.mean(axis=0), kind="stable")[:k]] = True
    eps1 = float(np.quantile(max1[zero1], SCVI_PSEUDOCOUNT_QUANTILE)) if zero1.any() else 1e-10
    eps2 = float(np.quantile(max2[zero2], SCVI_PSEUDOCOUNT_QUANTILE)) if zero2.any() else 1e-10
    return max(1e-10, max(eps1, eps2) / n_features)


def _lfc_statistics(sides: _Sides, eps: float, delta: float, mode: str, test_mode: str,
                    cred: list[float]) -> dict[str, np.ndarray]:
    n_feat = sides.a1.shape[1]
    m = max(sides.i1.size, sides.a1.shape[0] + sides.a2.shape[0] if sides.all_pairs else 0)
    chunk = max(1, _CHUNK_ELEMENTS // max(m, 1))
    names = ["lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"]
    for lvl in cred:
        tag = str(lvl)[:5]
        names += [f"lfc_confidence_interval_{tag}_min", f"lfc_confidence_interval_{tag}_max"]
    lfc = {n: np.empty(n_feat) for n in names}
    p_plus, p_minus, p_greater = np.empty(n_feat), np.empty(n_feat), np.empty(n_feat)
    eps_lfc = 1e-3 * eps
    for start in range(0, n_feat, chunk):
        cols = slice(start, min(start + chunk, n_feat))
        a1 = sides.a1[:, cols].astype(np.float64)
        a2 = sides.a2[:, cols].astype(np.float64)
        x, y = a1[sides.i1], a2[sides.i2]
        change = np.log2(x + eps_lfc) - np.log2(y + eps_lfc)
        lfc["lfc_median"][cols] = np.median(change, axis=0)
        if cred:
            ordered = np.sort(change, axis=0)
            for lvl in cred:
                low, high = _hpd(ordered, lvl)
                tag = str(lvl)[:5]
                lfc[f"lfc_confidence_interval_{tag}_min"][cols] = low
                lfc[f"lfc_confidence_interval_{tag}_max"][cols] = high
        if sides.all_pairs:
            l1, l2 = np.log2(a1 + eps), np.log2(a2 + eps)
            p_plus[cols], p_minus[cols], p_greater[cols] = _all_pair_tails(l1, l2, delta)
            l1, l2 = np.log2(a1 + eps_lfc), np.log2(a2 + eps_lfc)
            lfc["lfc_mean"][cols] = l1.mean(axis=0) - l2.mean(axis=0)
            lfc["lfc_std"][cols] = np.sqrt(l1.var(axis=0) + l2.var(axis=0))
            lfc["lfc_min"][cols] = l1.min(axis=0) - l2.max(axis=0)
            lfc["lfc_max"][cols] = l1.max(axis=0) - l2.min(axis=0)
        else:
            lfc["lfc_mean"][cols] = change.mean(axis=0)
            lfc["lfc_std"][cols] = change.std(axis=0)
            lfc["lfc_min"][cols] = change.min(axis=0)
            lfc["lfc_max"][cols] = change.max(axis=0)
            change = np.log2(x + eps) - np.log2(y + eps)
            p_plus[cols] = (change >= delta).mean(axis=0)
            p_minus[cols] = (change < -delta).mean(axis=0)
            p_greater[cols] = (x > y).mean(axis=0)
    scale1 = sides.a1.mean(axis=0, dtype=np.float64)
    scale2 = sides.a2.mean(axis=0, dtype=np.float64)
    if mode == "change":
        proba = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
        proba = np.clip(proba, 0.0, 1.0)
        head = {
            "proba_de": proba,
            "proba_not_de": 1.0 - proba,
            "bayes_factor": np.log(proba + _EPS_BF) - np.log(1.0 - proba + _EPS_BF),
        }
    else:
        head = {
            "proba_m1": p_greater,
            "proba_m2": 1.0 - p_greater,
            "bayes_factor": np.log(p_greater + _EPS_BF) - np.log(1.0 - p_greater + _EPS_BF),
        }
    return {**head, "scale1": scale1, "scale2": scale2, "pseudocounts": np.full(n_feat, eps),
            "delta": np.full(n_feat, delta), **lfc}


def _all_pair_tails(l1: np.ndarray, l2: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column, over all pairs (i, j): P(l1_i - l2_j >= delta), P(l1_i - l2_j < -delta), P(l1_i > l2_j).

    One sorted search for all columns: each column of ``l2`` is sorted and shifted by a column offset
    larger than the values' range, so that the columns occupy disjoint, increasing stretches.
    """
    n1, n2 = l1.shape[0], l2.shape[0]
    k = l1.shape[1]
    low = min(l1.min(), l2.min()) - abs(delta) - 1.0
    high = max(l1.max(), l2.max()) + abs(delta) + 1.0
    offset = (high - low) * np.arange(k)[None, :] - low  # column c lives in [c * span, (c + 1) * span)
    flat = (np.sort(l2, axis=0) + offset).T.ravel()  # column-major: columns one after the other
    base = (n2 * np.arange(k))[None, :]

    def count_le(t, side):
        return np.searchsorted(flat, (t + offset).ravel(), side=side).reshape(n1, k) - base

    plus = count_le(l1 - delta, "right").sum(axis=0) / (n1 * n2)       # l2_j <= l1_i - delta
    minus = (n2 - count_le(l1 + delta, "right")).sum(axis=0) / (n1 * n2)  # l2_j > l1_i + delta
    greater = count_le(l1, "left").sum(axis=0) / (n1 * n2)              # l2_j < l1_i
    return plus, minus, greater


def _hpd(ordered: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval per column of sorted samples (shortest window holding ``level`` of them)."""
    n = ordered.shape[0]
    width = int(np.floor(level * n))
    if width >= n:
        return ordered[0], ordered[-1]
    spans = ordered[width:] - ordered[: n - width]
    best = spans.argmin(axis=0)
    columns = np.arange(ordered.shape[1])
    return ordered[best, columns], ordered[best + width, columns]


def _sort(frame: pd.DataFrame, mode: str) -> pd.DataFrame:
    primary = frame["proba_de" if mode == "change" else "bayes_factor"].to_numpy()
    order = np.lexsort((-np.abs(frame["lfc_mean"].to_numpy()), -primary))
    return frame.iloc[order]
