"""The statistics of :func:`dgdcell.differential.differential_expression`: the two
sides' decoded fractions (:class:`_Sides`), the pseudocount, the LFC summaries,
the probabilities of a change, credible intervals and the order of the rows.
Pure NumPy on arrays; nothing here decodes or reads AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: a feature whose mean raw count in a group is below this counts as not expressed there
#: (scVI's ``threshold_counts``), for the pseudocount estimate
THRESHOLD_COUNTS = 0.01
#: default pseudocount: this many counts at the median library size of the compared cells (both sides pooled)
PSEUDOCOUNT_COUNTS = 0.1
#: ``pseudocount="quantile"`` (and the default without counts): this quantile, over the features, of their mean
#: decoded fraction (both sides pooled)
PSEUDOCOUNT_MEAN_QUANTILE = 0.3
#: ``pseudocount="scvi"``: quantile of the not-expressed features' largest decoded fraction (scVI's estimate)
SCVI_PSEUDOCOUNT_QUANTILE = 0.9
#: without counts: the share of least-expressed features (by mean decoded fraction) treated as not expressed
LOW_EXPRESSION_SHARE = 0.1
#: float32 elements of LFC samples held at a time (n_samples x feature chunk)
_CHUNK_ELEMENTS = 1 << 22
_EPS_BF = 1e-8


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


def _zero_reference(raw1, raw2) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean raw counts of the two sides (NaN where a feature is not in the counts) and the library sizes of
    their cells (pooled; the modality's features in the counts), or None without counts."""
    if raw1 is None or raw2 is None:
        return None
    if np.isnan(raw1["mean"]).all() and np.isnan(raw2["mean"]).all():
        return None
    return raw1["mean"], raw2["mean"], np.concatenate([raw1["library"], raw2["library"]])


def _pseudocount(pseudocount, sides: _Sides, reference, n_features: int) -> float:
    """The ``eps`` of the LFC: given, the default estimate, or scVI's (see :func:`differential_expression`)."""
    if pseudocount is not None and not isinstance(pseudocount, str):
        return float(pseudocount)
    library = reference[2][reference[2] > 0] if reference is not None else np.zeros(0)
    if pseudocount is None and library.size:
        # a tenth of a count at the compared cells' depth: fold changes of levels below what a cell's
        # counts resolve are shrunk towards 0, whatever the sequencing depth
        return max(1e-10, PSEUDOCOUNT_COUNTS / float(np.median(library)))
    if pseudocount in (None, "quantile"):
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
    shrunk = np.empty(n_feat)  # mean LFC with eps: the effect size the rows are ranked by
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
            shrunk[cols] = l1.mean(axis=0) - l2.mean(axis=0)
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
            shrunk[cols] = change.mean(axis=0)
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
            "delta": np.full(n_feat, delta), **lfc, "lfc_shrunk": shrunk}


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


def _sort(frame: pd.DataFrame, mode: str, is_de: np.ndarray | None = None) -> pd.DataFrame:
    """Change mode: the features flagged DE (``is_de``, the FDR flag) first, each part by the size of the
    shrunken fold change ``|lfc_shrunk|``; vanilla mode: by ``bayes_factor``, then ``|lfc_mean|``."""
    if mode == "change":
        order = np.lexsort((-np.abs(frame["lfc_shrunk"].to_numpy()), ~np.asarray(is_de, dtype=bool)))
    else:
        order = np.lexsort((-np.abs(frame["lfc_mean"].to_numpy()), -frame["bayes_factor"].to_numpy()))
    return frame.iloc[order]
