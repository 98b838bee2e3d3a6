"""Plots of a fit: training history, latent space with the mixture, components against labels, summary, evidence curve."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._base import _NA_COLOR, _categorical_colors, _closing_on_error, _color_values, _finish, _new_figure, _obsm

logger = logging.getLogger(__name__)


_LOSS_KEYS = ("epoch", "train_loss", "train_reconstruction", "val_loss", "val_reconstruction")


def _get_history(model_or_adata: Any, key: str) -> dict[str, np.ndarray]:
    """History dict of a DGD (``.history``), an AnnData (``.uns[key]['history']``) or a plain mapping."""
    if hasattr(model_or_adata, "uns") and hasattr(model_or_adata, "obs"):
        uns = model_or_adata.uns
        if key not in uns:
            raise KeyError(
                f"adata.uns[{key!r}] not found (uns keys: {list(uns.keys())}); fit a DGD on this AnnData "
                f"first or pass key= (the key_added of the fit)."
            )
        if not isinstance(uns[key], Mapping) or "history" not in uns[key]:
            raise KeyError(f"adata.uns[{key!r}] has no 'history' entry; was it written by dgdcell?")
        hist = uns[key]["history"]
        where = f"adata.uns[{key!r}]['history']"
    elif hasattr(model_or_adata, "history"):
        hist = model_or_adata.history
        where = "model.history"
        if not hist:
            raise ValueError("the model has no training history: fit it first (or load a fitted model).")
    elif isinstance(model_or_adata, Mapping):
        hist, where = model_or_adata, "history"
    else:
        raise TypeError(
            f"expected a fitted DGD, an AnnData or a history dict, got {type(model_or_adata).__name__}."
        )
    missing = [k for k in _LOSS_KEYS if k not in hist]
    if missing:
        raise KeyError(f"{where} lacks {missing} (has {list(hist.keys())}).")
    out = {k: np.asarray(hist[k], dtype=float).ravel() for k in _LOSS_KEYS}
    n = out["epoch"].size
    if n == 0:
        raise ValueError(f"{where} is empty: no epochs were recorded.")
    bad = [k for k in _LOSS_KEYS if out[k].size != n]
    if bad:
        raise ValueError(f"{where}: {bad} do not have one value per epoch ({n}).")
    return out


def _set_log(ax, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
    else:  # the total loss includes log densities and may be <= 0
        ax.set_yscale("symlog")


def _draw_history(ax, hist: dict[str, np.ndarray], which: str, log: bool, mark_best: bool = True) -> None:
    epoch = hist["epoch"]
    tr, va = hist[f"train_{which}"], hist[f"val_{which}"]
    marker = "o" if epoch.size <= 30 else None
    ax.plot(epoch, tr, label="train", color="C0", marker=marker, markersize=3)
    ax.plot(epoch, va, label="validation", color="C1", marker=marker, markersize=3)
    if mark_best and np.isfinite(hist["val_loss"]).any():
        best = int(np.nanargmin(np.where(np.isfinite(hist["val_loss"]), hist["val_loss"], np.nan)))
        ax.axvline(epoch[best], color="0.5", linestyle=":", linewidth=1, label=f"best validation (epoch {epoch[best]:g})")
    if log:
        _set_log(ax, np.concatenate([tr, va]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per cell")
    ax.set_title("total loss" if which == "loss" else "reconstruction (-log NB)")
    ax.legend(frameon=False, fontsize="small")


def _pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, (L, 2) loadings and explained-variance ratios of ``z`` by numpy SVD.

    Signs are fixed so the largest-magnitude loading of each axis is positive
    (deterministic). With L == 1 the second axis is zero.
    """
    center = z.mean(0)
    zc = z - center
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    n_ax = min(2, vt.shape[0])
    v = vt[:n_ax].T  # (L, n_ax)
    flip = np.sign(v[np.abs(v).argmax(0), np.arange(n_ax)])
    v = v * np.where(flip == 0, 1.0, flip)
    total = float((s**2).sum())
    ratio = (s[:n_ax] ** 2) / total if total > 0 else np.zeros(n_ax)
    if n_ax < 2:
        v = np.hstack([v, np.zeros((v.shape[0], 2 - n_ax))])
        ratio = np.concatenate([ratio, np.zeros(2 - n_ax)])
    return center, v, ratio


def _mixture_arrays(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, L) means, (K, L) variances and (K,) weights of ``model.gmm`` as numpy."""
    gmm = getattr(model, "gmm", None)
    if gmm is None:
        raise ValueError("the model has no mixture: fit it first (or load a fitted model).")
    mean = gmm.mean.detach().cpu().numpy().astype(float)
    var = gmm.stddev.detach().cpu().numpy().astype(float) ** 2
    weights = gmm.mixture_probs().detach().cpu().numpy().astype(float)
    return mean, var, weights


def _draw_components(ax, model, center, v, colors_by_label: dict[str, Any] | None, n_sigma: float = 2.0) -> None:
    from matplotlib.patches import Ellipse

    mean, var, _ = _mixture_arrays(model)
    if mean.shape[1] != center.shape[0]:
        raise ValueError(
            f"the model's mixture has dimension {mean.shape[1]} but the representation has {center.shape[0]}; "
            "is this the model that wrote it (check key=)?"
        )
    m2 = (mean - center) @ v  # (K, 2)
    for k in range(mean.shape[0]):
        cov2 = v.T @ np.diag(var[k]) @ v  # projected diagonal covariance, (2, 2)
        evals, evecs = np.linalg.eigh(cov2)
        evals = np.clip(evals, 0.0, None)
        angle = float(np.degrees(np.arctan2(evecs[1, 1], evecs[0, 1])))  # major axis (largest eigenvalue last)
        width, height = 2 * n_sigma * np.sqrt(evals[1]), 2 * n_sigma * np.sqrt(evals[0])
        col = (colors_by_label or {}).get(str(k), "black")
        ax.add_patch(
            Ellipse(m2[k], width, height, angle=angle, fill=False, edgecolor=col, linewidth=1.5, linestyle="--", zorder=3)
        )
        ax.scatter(m2[k, 0], m2[k, 1], marker="X", s=90, c=[col], edgecolors="black", linewidths=0.8, zorder=4)
        ax.annotate(
            str(k), m2[k], xytext=(5, 5), textcoords="offset points", fontsize="medium", fontweight="bold", zorder=5,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.7),
        )
    ax.autoscale_view()


def _draw_latent(
    ax, adata, basis: str, color: str | None, model, key: str, components: bool, size: float | None,
    palette, legend: bool = True, title: str | None = None,
) -> None:
    rep_key = f"X_{key}"
    if basis == "pca":
        z = _obsm(adata, rep_key, " Fit a DGD first, or pass key= (the key_added of the fit).")
        center, v, ratio = _pca_2d(z)
        xy = (z - center) @ v
        labels = (f"DGD PC1 ({100 * ratio[0]:.0f}%)", f"DGD PC2 ({100 * ratio[1]:.0f}%)")
    else:
        name = f"X_{basis}"
        hint = (
            f" Compute it first, e.g. sc.pp.neighbors(adata, use_rep={rep_key!r}); sc.tl.umap(adata)."
            if basis == "umap" else ""
        )
        xy = _obsm(adata, name, hint)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"adata.obsm[{name!r}] needs at least 2 columns, has shape {xy.shape}.")
        xy = xy[:, :2]
        labels = (f"{basis.upper()}1", f"{basis.upper()}2")
        center = v = None

    n = xy.shape[0]
    s = float(np.clip(120000 / max(n, 1), 0.5, 30.0)) if size is None else float(size)
    colors_by_label: dict[str, Any] | None = None
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=s, c="0.4", linewidths=0, rasterized=n > 5000)
    else:
        values = _color_values(adata, color)
        is_cat = isinstance(values, pd.Series) and (
            isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_bool_dtype(values.dtype)
            or not pd.api.types.is_numeric_dtype(values.dtype)
        )
        if is_cat:
            cat = values.astype("category")
            cats = list(cat.cat.categories)
            cols = _categorical_colors(adata, color, cats, palette)
            colors_by_label = {str(c): col for c, col in zip(cats, cols)}
            codes = cat.cat.codes.to_numpy()
            if (codes < 0).any():
                m = codes < 0
                ax.scatter(xy[m, 0], xy[m, 1], s=s, c=_NA_COLOR, linewidths=0, label="NA", rasterized=n > 5000)
            # draw in a random but fixed order so no category hides the others
            order = np.random.default_rng(0).permutation(n)
            order = order[codes[order] >= 0]
            import matplotlib.colors as mcolors

            rgba = np.array([mcolors.to_rgba(c) for c in cols]) if cols else np.zeros((0, 4))
            ax.scatter(xy[order, 0], xy[order, 1], s=s, c=rgba[codes[order]] if len(order) else None,
                       linewidths=0, rasterized=n > 5000)
            if legend and len(cats) <= 40:
                from matplotlib.lines import Line2D

                handles = [Line2D([], [], marker="o", linestyle="", color=col, label=str(c)) for c, col in zip(cats, cols)]
                ax.legend(handles=handles, title=color, frameon=False, fontsize="small",
                          loc="upper left", bbox_to_anchor=(1.0, 1.0), ncols=1 if len(cats) <= 20 else 2)
        else:
            vals = np.asarray(values, dtype=float)
            order = np.argsort(np.where(np.isnan(vals), -np.inf, vals), kind="stable")  # high values on top
            cmap = palette if isinstance(palette, str) else "viridis"
            sc = ax.scatter(xy[order, 0], xy[order, 1], s=s, c=vals[order], cmap=cmap,
                            linewidths=0, plotnonfinite=True, rasterized=n > 5000)
            ax.figure.colorbar(sc, ax=ax, label=color, shrink=0.8)

    if model is not None and components:
        if basis == "pca":
            # colour component markers like their cluster when colouring by the cluster column
            by_label = colors_by_label if color == f"{key}_cluster" else None
            _draw_components(ax, model, center, v, by_label)
        else:
            logger.warning("mixture components are drawn only with basis='pca' (they have no %s coordinates)", basis)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else (f"{key} latent ({basis})" + (f": {color}" if color else "")))


def adjusted_rand_index(a: Sequence, b: Sequence) -> float:
    """Adjusted Rand index of two labelings (numpy; equals sklearn's ``adjusted_rand_score``).

    Parameters
    ----------
    a, b
        Two labelings of the same cells, of equal length (any hashable
        values, e.g. ``adata.obs['cell_type']`` and ``adata.obs['dgd_cluster']``).

    Returns
    -------
    float
        1 for identical partitions (up to renaming), about 0 for independent ones.
    """
    a_codes = pd.factorize(np.asarray(a, dtype=object))[0]
    b_codes = pd.factorize(np.asarray(b, dtype=object))[0]
    if a_codes.size != b_codes.size:
        raise ValueError(f"labelings differ in length: {a_codes.size} vs {b_codes.size}.")
    n = a_codes.size
    if n == 0:
        return 1.0
    table = np.zeros((a_codes.max() + 1, b_codes.max() + 1), dtype=np.int64)
    np.add.at(table, (a_codes, b_codes), 1)
    return _ari_from_table(table)


def _ari_from_table(table: np.ndarray) -> float:
    def comb2(x):
        x = np.asarray(x, dtype=float)
        return (x * (x - 1) / 2).sum()

    n = table.sum()
    index = comb2(table)
    sa, sb = comb2(table.sum(1)), comb2(table.sum(0))
    total = n * (n - 1) / 2
    expected = sa * sb / total if total > 0 else 0.0
    max_index = (sa + sb) / 2
    if max_index == expected:  # both labelings trivial (one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (max_index - expected))


def _confusion(adata, label_key: str, cluster_key: str) -> tuple[pd.DataFrame, int]:
    missing = [k for k in (cluster_key, label_key) if k not in adata.obs.columns]
    if missing:
        raise KeyError(
            f"{missing} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
            + (" Fit a DGD first, or pass cluster_key=." if cluster_key in missing else "")
        )
    clusters = adata.obs[cluster_key].astype("category")
    labels = adata.obs[label_key].astype("category")
    keep = (clusters.cat.codes.to_numpy() >= 0) & (labels.cat.codes.to_numpy() >= 0)
    table = pd.crosstab(clusters[keep], labels[keep], dropna=False)
    table = table.reindex(index=clusters.cat.categories, columns=labels.cat.categories, fill_value=0)
    return table, int((~keep).sum())


def _draw_confusion(ax, table: pd.DataFrame, n_dropped: int, normalize: str | None, cluster_key: str,
                    label_key: str, annotate: bool, cmap: str) -> None:
    counts = table.to_numpy().astype(float)
    if normalize == "row":
        with np.errstate(invalid="ignore", divide="ignore"):
            values = counts / counts.sum(1, keepdims=True)
        values = np.nan_to_num(values)
        bar_label, fmt = f"fraction of {cluster_key} component", "{:.2f}"
    elif normalize in ("column", "col"):
        with np.errstate(invalid="ignore", divide="ignore"):
            values = counts / counts.sum(0, keepdims=True)
        values = np.nan_to_num(values)
        bar_label, fmt = f"fraction of {label_key} class", "{:.2f}"
    else:
        values, bar_label, fmt = counts, "cells", "{:.0f}"
    vmax = 1.0 if normalize else max(values.max(), 1.0)
    im = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label=bar_label, shrink=0.8)
    ax.set_xticks(np.arange(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(np.arange(table.shape[0]), [str(c) for c in table.index])
    ax.set_xlabel(label_key)
    ax.set_ylabel(cluster_key)
    if annotate and values.size <= 900:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if counts[i, j] == 0:
                    continue
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize="small",
                        color="white" if values[i, j] > 0.6 * vmax else "black")
    ari = _ari_from_table(table.to_numpy()) if counts.sum() else float("nan")
    title = f"{cluster_key} vs {label_key}: ARI = {ari:.3f}"
    if n_dropped:
        title += f"\n({n_dropped} cells with missing values left out)"
    ax.set_title(title)


def history(
    model_or_adata: Any,
    key: str = "dgd",
    log: bool = False,
    save: str | Path | None = None,
    show: bool = False,
):
    """Training history: total and reconstruction loss per epoch, train vs validation.

    Parameters
    ----------
    model_or_adata
        A fitted :class:`~dgdcell.DGD` (reads ``model.history``), an AnnData it
        was fitted on (reads ``adata.uns[key]['history']``), or such a history dict.
    key
        The ``key_added`` of the fit (AnnData input only).
    log
        Logarithmic y axes (symmetric-log when a curve has values <= 0, which
        the total loss can: it includes log densities of the representations).
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure
        Two Axes: total loss and reconstruction loss (negative log-likelihood
        of the counts), training and validation cells.

    Notes
    -----
    Reads ``model.history`` or ``adata.uns[key]['history']`` (keys ``epoch``,
    ``train_loss``, ``train_reconstruction``, ``val_loss``,
    ``val_reconstruction``); writes nothing into the AnnData. The dotted line
    marks the epoch with the lowest validation loss (early stopping keeps the
    state of that epoch). Losses are per cell, in nats.
    """
    hist = _get_history(model_or_adata, key)
    fig, axes = _new_figure(1, 2, figsize=(10, 3.8))
    with _closing_on_error(fig, True):
        _draw_history(axes[0, 0], hist, "loss", log)
        _draw_history(axes[0, 1], hist, "reconstruction", log)
    return _finish(fig, save, show, created=True)


def latent(
    adata,
    basis: str = "pca",
    color: str | None = None,
    model=None,
    key: str = "dgd",
    components: bool = True,
    size: float | None = None,
    palette=None,
    title: str | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool = False,
):
    """2-D view of the DGD representations ``adata.obsm[f'X_{key}']``.

    Parameters
    ----------
    adata
        AnnData with the outputs of a fit or transform.
    basis
        ``'pca'``: the first two principal axes of ``obsm[f'X_{key}']``
        (numpy SVD, computed here, nothing is stored). Any other name reads
        ``obsm[f'X_{basis}']`` (e.g. ``'umap'`` after
        ``sc.pp.neighbors(adata, use_rep='X_dgd'); sc.tl.umap(adata)``).
    color
        An ``adata.obs`` column (categorical: one colour per class, with a
        legend; numeric: a colour bar) or a feature in ``adata.var_names``.
        Default ``f'{key}_cluster'`` (``'dgd_cluster'``); ``''`` for no colour.
    model
        The fitted :class:`~dgdcell.DGD`. With ``basis='pca'`` and
        ``components=True`` its mixture means are projected into the same PCA
        and drawn as labelled ``X`` markers, each with a dashed ellipse: the
        2-sigma contour of the component's diagonal covariance projected into
        the plane (``V^T diag(var) V``).
    key
        The ``key_added`` of the fit.
    components
        Draw the mixture components (needs ``model``).
    size, palette, title
        Point size (default from the number of cells), colours (a list, a
        dict class -> colour, or a colormap name; default
        ``adata.uns[f'{color}_colors']`` when present, else tab10/tab20), title.
    ax
        Draw into this Axes (its figure is returned and not closed).
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure
        The figure of the drawn Axes.

    Notes
    -----
    Reads ``adata.obsm[f'X_{key}']`` (``basis='pca'``) or
    ``adata.obsm[f'X_{basis}']``, ``adata.obs[color]`` or a feature of
    ``adata.var_names``, and ``adata.uns[f'{color}_colors']`` when present;
    writes nothing.
    """
    if color is None:
        color = f"{key}_cluster"
    created = ax is None
    if created:
        fig, axes = _new_figure(1, 1, figsize=(6.2, 5))
        ax = axes[0, 0]
    with _closing_on_error(ax.figure, created):
        _draw_latent(ax, adata, basis, color or None, model, key, components, size, palette, title=title)
    return _finish(ax.figure, save, show, created)


def components_vs_labels(
    adata,
    label_key: str,
    cluster_key: str = "dgd_cluster",
    normalize: str | None = "row",
    annotate: bool = True,
    cmap: str = "Blues",
    ax=None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Heatmap of mixture components (rows) against known labels (columns).

    Parameters
    ----------
    adata
        AnnData with ``obs[cluster_key]`` and ``obs[label_key]``.
    label_key
        ``adata.obs`` column of reference labels (cell types, ...).
    cluster_key
        ``adata.obs`` column of the DGD clusters (``f'{key_added}_cluster'``).
    normalize
        ``'row'`` (default): each component's cells as fractions over the
        labels; ``'column'``: each label's cells as fractions over the
        components; ``None``: cell counts.
    annotate
        Write the value in every non-empty cell (up to 900 cells).
    cmap, ax, save, show
        Colormap; Axes to draw into; see the module docstring.

    Returns
    -------
    matplotlib.figure.Figure
        The heatmap's figure.

    Notes
    -----
    Reads ``adata.obs[cluster_key]`` and ``adata.obs[label_key]``; writes
    nothing. Cells missing either value are left out (their number is shown).
    The title gives the adjusted Rand index of the two labelings (numpy
    implementation, equal to sklearn's ``adjusted_rand_score``).
    """
    if normalize not in ("row", "column", "col", None, "none", False):
        raise ValueError(f"normalize must be 'row', 'column' or None, got {normalize!r}.")
    if normalize in ("none", False):
        normalize = None
    table, n_dropped = _confusion(adata, label_key, cluster_key)
    created = ax is None
    if created:
        fig, axes = _new_figure(
            1, 1, figsize=(max(4.5, 1.0 + 0.55 * table.shape[1]) + 1.2, max(3.5, 1.0 + 0.45 * table.shape[0]))
        )
        ax = axes[0, 0]
    with _closing_on_error(ax.figure, created):
        _draw_confusion(ax, table, n_dropped, normalize, cluster_key, label_key, annotate, cmap)
    return _finish(ax.figure, save, show, created)


def summary(
    adata,
    model=None,
    label_key: str | None = None,
    key: str = "dgd",
    color: str | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """One figure summarising a fit: loss curves, the PCA view of the latent
    space (with the mixture components when ``model`` is given) and, with
    ``label_key``, the components-vs-labels heatmap.

    Parameters
    ----------
    adata
        AnnData with the outputs of a fit or transform.
    model
        The fitted :class:`~dgdcell.DGD` (history and mixture components), or None.
    label_key
        ``adata.obs`` column of reference labels: adds the heatmap of
        :func:`components_vs_labels`.
    key
        The ``key_added`` of the fit.
    color
        Colour of the latent panel (see :func:`latent`); default
        ``f'{key}_cluster'``.
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure
        One row of panels: total and reconstruction loss (when a history is
        found), the latent PCA, and the heatmap (with ``label_key``).

    Notes
    -----
    The history is read from ``model`` when given, else from
    ``adata.uns[key]['history']``; without either it is left out. Also reads
    ``adata.obsm[f'X_{key}']``, ``adata.obs[f'{key}_cluster']`` and
    ``adata.obs[label_key]``; writes nothing. Used by ``dgdcell fit --plot``.
    """
    hist = None
    for source in (model, adata):
        if source is None:
            continue
        try:
            hist = _get_history(source, key)
            break
        except (KeyError, ValueError):
            continue
    panels = (2 if hist is not None else 0) + 1 + (1 if label_key else 0)
    fig, axes = _new_figure(1, panels, figsize=(5.2 * panels, 4.4))
    axes = list(axes[0])
    with _closing_on_error(fig, True):
        if hist is not None:
            _draw_history(axes.pop(0), hist, "loss", log=False)
            _draw_history(axes.pop(0), hist, "reconstruction", log=False)
        _draw_latent(axes.pop(0), adata, "pca", color or f"{key}_cluster", model, key, True, None, None)
        if label_key:
            table, n_dropped = _confusion(adata, label_key, f"{key}_cluster")
            _draw_confusion(axes.pop(0), table, n_dropped, "row", f"{key}_cluster", label_key, True, "Blues")
    return _finish(fig, save, show, created=True)


def evidence_curve(
    data: Any,
    key: str = "dgd",
    ax=None,
    save: str | Path | None = None,
    show: bool = False,
):
    """The evidence per cell against the number of components K, the chosen K marked.

    Parameters
    ----------
    data
        An AnnData fitted with ``n_components='auto'`` (or a list; reads
        ``adata.uns[key]['n_components']``), or the DataFrame returned by
        :meth:`dgdcell.DGD.select_n_components` / :func:`dgdcell.tl.evidence_curve`.
    key
        The ``key_added`` of the fit (AnnData input only).
    ax
        A matplotlib Axes to draw into (default: a new figure).
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure
        The ``log_evidence`` of every candidate K (nats per cell; see
        :meth:`dgdcell.DGD.select_n_components`), with +-1 standard error bars
        where the rule has them, and the chosen K marked.
    """
    if isinstance(data, pd.DataFrame):
        frame = data
    else:
        uns = getattr(data, "uns", {})
        if key not in uns or "n_components" not in uns[key]:
            raise ValueError(f"no evidence curve in uns[{key!r}]['n_components']: fit with n_components='auto' "
                             "(or a list of candidates) first, or pass the DataFrame of DGD.select_n_components.")
        from .._evidence import evidence_frame

        frame = evidence_frame(uns[key]["n_components"])
    created = ax is None
    if created:
        fig, axes = _new_figure(1, 1, figsize=(5, 3.5))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    with _closing_on_error(fig, created):
        k = frame["n_components"].to_numpy()
        ev = frame["log_evidence"].to_numpy()
        ax.errorbar(k, ev, yerr=frame["se"].to_numpy(), marker="o", ms=4, capsize=2, color="#1f77b4")
        chosen = frame["chosen"].to_numpy().astype(bool)
        if chosen.any():
            ax.axvline(k[chosen][0], color="#d62728", ls=":", lw=1)
            ax.plot(k[chosen], ev[chosen], "o", color="#d62728", ms=7, label=f"chosen K = {int(k[chosen][0])}")
            ax.legend(frameon=False)
        ax.set_xlabel("components K")
        ax.set_ylabel("log evidence per cell (nats)")
    return _finish(fig, save, show, created)
