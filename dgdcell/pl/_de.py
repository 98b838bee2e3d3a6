"""Plots of differential expression: volcano and heatmap of top features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._base import _closing_on_error, _finish, _new_figure


#: colours of up- and down-regulated features
_UP_COLOR, _DOWN_COLOR = "#d62728", "#1f77b4"


def _one_comparison(de: pd.DataFrame, comparison: str | None) -> tuple[pd.DataFrame, str | None]:
    """The rows of one comparison of a :func:`dgdcell.differential.differential_expression` result."""
    if not isinstance(de, pd.DataFrame):
        raise TypeError(f"de must be the DataFrame of differential_expression, got {type(de).__name__}.")
    if "comparison" not in de.columns:
        if comparison is not None:
            raise KeyError("comparison= given, but the frame has no 'comparison' column.")
        return de, None
    names = list(dict.fromkeys(de["comparison"].astype(str)))
    if comparison is None:
        if len(names) > 1:
            raise ValueError(f"the frame holds {len(names)} comparisons; pass comparison= one of {names[:20]}.")
        return de, names[0] if names else None
    if str(comparison) not in names:
        raise KeyError(f"comparison {comparison!r} is not in the frame (comparisons: {names[:20]}).")
    return de[de["comparison"].astype(str) == str(comparison)], str(comparison)


def _fdr_column(de: pd.DataFrame, fdr_column: str | None) -> str | None:
    if fdr_column is not None:
        if fdr_column not in de.columns:
            raise KeyError(f"fdr_column {fdr_column!r} is not a column of the frame (columns: {list(de.columns)}).")
        return fdr_column
    found = [c for c in de.columns if str(c).startswith("is_de_fdr_")]
    return found[0] if found else None


def volcano(
    de: pd.DataFrame,
    comparison: str | None = None,
    x: str = "lfc_mean",
    y: str = "bayes_factor",
    n_labels: int = 10,
    labels: Sequence[str] | None = None,
    fdr_column: str | None = None,
    size: float | None = None,
    title: str | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Volcano plot of a differential expression result: effect (x) against evidence (y).

    Parameters
    ----------
    de
        The DataFrame returned by :func:`dgdcell.differential.differential_expression`
        (features as index).
    comparison
        Which comparison to draw when the frame holds several (its
        ``comparison`` column, e.g. ``"g1 vs Rest"``).
    x
        Column on the x axis (default ``lfc_mean``, log2 fold change).
    y
        Column on the y axis: ``bayes_factor`` (default), ``proba_de`` or any
        numeric column.
    n_labels
        Label this many features: the first ones in the frame's order (its
        ranking: the features flagged DE first, each part by ``|lfc_shrunk|``).
    labels
        Label these features instead (names in the index).
    fdr_column
        Boolean column marking DE features (default: the frame's
        ``is_de_fdr_<fdr>`` column): they are coloured red (up) or blue (down),
        the others grey.
    size, title
        Point size (default from the number of features) and title.
    ax
        Draw into this Axes (its figure is returned and not closed).
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Reads only ``de``. Dashed vertical lines mark ``+-delta`` (the frame's
    ``delta`` column) when present.
    """
    frame, name = _one_comparison(de, comparison)
    for col in (x, y):
        if col not in frame.columns:
            raise KeyError(f"column {col!r} is not in the frame (columns: {list(frame.columns)}).")
    if int(n_labels) < 0:
        raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
    flag_col = _fdr_column(frame, fdr_column)
    xv = frame[x].to_numpy(dtype=float)
    yv = frame[y].to_numpy(dtype=float)
    flags = frame[flag_col].to_numpy(dtype=bool) if flag_col else np.zeros(len(frame), dtype=bool)
    created = ax is None
    if created:
        fig, axes = _new_figure(1, 1, figsize=(6.2, 5))
        ax = axes[0, 0]
    with _closing_on_error(ax.figure, created):
        n = len(frame)
        s = float(np.clip(3000 / max(n, 1), 3.0, 25.0)) if size is None else float(size)
        rest = ~flags
        ax.scatter(xv[rest], yv[rest], s=s, c="0.7", linewidths=0, label="not DE" if flag_col else None,
                   rasterized=n > 5000)
        up, down = flags & (xv > 0), flags & (xv <= 0)
        ax.scatter(xv[up], yv[up], s=s, c=_UP_COLOR, linewidths=0, label=f"DE up ({int(up.sum())})")
        ax.scatter(xv[down], yv[down], s=s, c=_DOWN_COLOR, linewidths=0, label=f"DE down ({int(down.sum())})")
        if "delta" in frame.columns and len(frame) and x.startswith("lfc"):
            d = float(frame["delta"].iloc[0])
            for v in (-d, d):
                ax.axvline(v, color="0.4", linestyle="--", linewidth=0.8)
        if labels is not None:
            missing = [f for f in labels if f not in frame.index]
            if missing:
                raise KeyError(f"labels: {missing[:10]} are not features of the frame.")
            chosen = list(dict.fromkeys(labels))
        else:
            chosen = list(dict.fromkeys(frame.index[: int(n_labels)]))
        position = {f: i for i, f in enumerate(frame.index)}
        _label_points(ax, [(str(f), xv[position[f]], yv[position[f]]) for f in chosen
                           if np.isfinite(xv[position[f]]) and np.isfinite(yv[position[f]])])
        ax.set_xlabel(x if x != "lfc_mean" else "log2 fold change (lfc_mean)")
        ax.set_ylabel({"bayes_factor": "Bayes factor (log odds of DE)", "proba_de": "P(|LFC| >= delta)"}.get(y, y))
        ax.set_title(title if title is not None else (name or "differential expression"))
        if flag_col:
            ax.legend(frameon=False, fontsize="small", title=flag_col, title_fontsize="small")
    return _finish(ax.figure, save, show, created)


def _label_points(ax, items: list[tuple[str, float, float]]) -> None:
    """Label points without overlapping labels: each label tries offsets away from the nearer
    horizontal edge, then towards it (in points, greedily, in order), and points to it with a thin line
    when moved. Labels of points in the right half of the axes go to the left of the point."""
    if not items:
        return
    ax.autoscale_view()
    fig = ax.figure
    to_px = fig.dpi / 72.0
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    placed: list[tuple[float, float, float, float]] = []  # display-space boxes
    for text, x, y in items:
        px, py = ax.transData.transform((x, y))
        left = x > 0.5 * (x0 + x1)
        away = -1 if y > 0.5 * (y0 + y1) else 1  # move labels away from the nearer horizontal edge first
        steps = [0] + [away * k for k in range(1, 16)] + [-away * k for k in range(1, 8)]
        width, height = 5.2 * len(text) * to_px, 9.0 * to_px
        for step in steps:
            dx, dy = (-4.0 if left else 4.0), 2.0 + 10.0 * step
            bx0 = px + dx * to_px - (width if left else 0.0)
            by0 = py + dy * to_px
            box = (bx0, by0, bx0 + width, by0 + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize="x-small",
                    ha="right" if left else "left", va="bottom",
                    arrowprops=dict(arrowstyle="-", color="0.5", linewidth=0.5) if step else None)


def de_heatmap(
    model,
    adata=None,
    de: pd.DataFrame | None = None,
    groupby: str | Sequence | None = None,
    n_top: int = 5,
    direction: str = "up",
    modality: str | None = None,
    key: str | None = None,
    transform_batch: str | Mapping[str, str] | None = None,
    cells_per_group: int | None = None,
    max_cells_per_group: int = 500,
    cmap: str = "RdBu_r",
    seed: int = 0,
    batch_size: int = 1024,
    title: str | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Heatmap of the top features of each group in decoded expression, z-scored per feature.

    Rows are the groups of ``groupby`` (their mean decoded expression) or,
    with ``cells_per_group``, that many cells of each group; columns are the
    ``n_top`` features of each group's comparison in ``de`` (in its order),
    grouped and labelled by the group they mark. Values are
    ``log1p(1e4 * decoded fraction)`` (decoded log-normalised expression),
    z-scored per feature over the rows.

    Parameters
    ----------
    model
        The fitted :class:`~dgdcell.DGD`.
    adata
        AnnData / MuData with the representations (``obsm[f"X_{key}"]``, ...)
        and ``obs[groupby]``; None: the training cells (``groupby`` must then
        be an array, one label per training cell).
    de
        A group-mode result of :func:`dgdcell.differential.differential_expression`
        (one comparison per group, e.g. one-vs-rest). None: computed here, every
        group of ``groupby`` against the rest.
    groupby
        ``adata.obs`` column (or array of labels) defining the rows; default
        the ``groupby`` recorded in ``de.attrs["dgdcell_de"]``.
    n_top
        Features per group.
    direction
        ``"up"`` (features higher in the group: markers), ``"down"`` or ``"both"``.
    modality, key
        Default: those recorded in ``de.attrs``, else ``"rna"`` and ``"dgd"``.
    transform_batch
        Decode the cells in this covariate class (see ``get_normalized_expression``).
    cells_per_group
        None: one row per group (mean over up to ``max_cells_per_group`` random
        cells). A number: that many random cells per group, one row each.
    max_cells_per_group
        Cells decoded per group at most for the group means.
    cmap
        Colormap (diverging, centred at 0).
    seed
        Seed of the cell subsampling (and of ``de`` when computed here).
    batch_size
        Cells decoded at a time.
    title
        Figure title.
    ax
        Draw into this Axes (its figure is returned and not closed).
    save, show
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Reads the representations and ``obs[groupby]`` (through the model's
    ``get_normalized_expression``); writes nothing.
    """
    from ..differential import differential_expression

    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}.")
    if int(n_top) < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}.")
    if cells_per_group is not None and int(cells_per_group) < 1:
        raise ValueError(f"cells_per_group must be None or >= 1, got {cells_per_group}.")
    if int(max_cells_per_group) < 1:
        raise ValueError(f"max_cells_per_group must be >= 1, got {max_cells_per_group}.")
    settings = dict(de.attrs.get("dgdcell_de", {})) if isinstance(de, pd.DataFrame) else {}
    if de is not None and settings.get("mode") == "counterfactual":
        raise ValueError("de is a counterfactual comparison (the same cells under two covariate classes); "
                         "de_heatmap shows groups of cells: pass a group-mode result or groupby=.")
    modality = modality or settings.get("modality") or "rna"
    key = key or settings.get("key") or "dgd"
    if groupby is None:
        groupby = settings.get("groupby")
        if groupby is None:
            raise ValueError("pass groupby= (the obs column or labels of the groups shown as rows)"
                             + ("; de does not record one." if de is not None else "."))
    if de is None:
        de = differential_expression(model, adata, groupby=groupby, modality=modality, key=key,
                                     transform_batch=transform_batch, seed=seed, batch_size=batch_size)
    if not isinstance(de, pd.DataFrame) or "group1" not in de.columns:
        raise ValueError("de must be a group-mode result of differential_expression (with a 'group1' column).")

    # labels of the cells
    if isinstance(groupby, str):
        if adata is None:
            raise ValueError(f"groupby={groupby!r} names an obs column, but adata=None: pass adata=.")
        if groupby not in adata.obs.columns:
            raise KeyError(f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)[:30]}).")
        values = adata.obs[groupby].to_numpy()
        n_cells = adata.n_obs
    else:
        values = np.asarray(groupby.to_numpy() if isinstance(groupby, pd.Series) else groupby, dtype=object)
        n_cells = adata.n_obs if adata is not None else len(model.obs_names)
        if values.ndim != 1 or values.size != n_cells:
            raise ValueError(f"groupby as an array must hold one label per cell ({n_cells}), got shape {values.shape}.")
    labels = np.asarray([None if pd.isna(v) else str(v) for v in values], dtype=object)

    groups = [str(g) for g in dict.fromkeys(de["group1"].astype(str))]
    unknown = [g for g in groups if not (labels == g).any()]
    if unknown:
        what = f"groupby {groupby!r}" if isinstance(groupby, str) else "groupby"
        raise KeyError(f"groups {unknown[:10]} of de are not labels of {what}; pass the groupby the result was "
                       "computed with.")
    blocks: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for g in groups:
        part = de[de["group1"].astype(str) == g]
        if direction == "up":
            part = part[part["lfc_mean"] > 0]
        elif direction == "down":
            part = part[part["lfc_mean"] < 0]
        chosen = [f for f in part.index if f not in seen][: int(n_top)]
        seen.update(chosen)
        blocks.append((g, chosen))
    features = [f for _, fs in blocks for f in fs]
    if not features:
        raise ValueError(f"no features to show: no group has {direction!r}-regulated features in de.")
    all_features = list(model.features[modality]) if modality in model.features else None
    if all_features is None:
        raise KeyError(f"modality {modality!r} is not in the model (modalities: {sorted(model.features)}).")
    position = pd.Index([str(f) for f in all_features]).get_indexer(pd.Index([str(f) for f in features]))
    if (position < 0).any():
        raise KeyError(f"features {[features[i] for i in np.flatnonzero(position < 0)][:10]} of de are not "
                       f"features of modality {modality!r} of the model.")

    rng = np.random.default_rng(seed)
    per_group = int(cells_per_group) if cells_per_group is not None else int(max_cells_per_group)
    picks = []
    for g in groups:
        rows = np.flatnonzero(labels == g)
        if rows.size > per_group:
            rows = np.sort(rng.choice(rows, per_group, replace=False))
        picks.append(rows)
    order = np.concatenate(picks)
    decoded = _decode_columns(model, adata, order, position, modality, key, transform_batch, batch_size)
    values = np.log1p(1e4 * decoded)
    if cells_per_group is None:
        bounds = np.cumsum([0] + [p.size for p in picks])
        values = np.vstack([values[bounds[i]:bounds[i + 1]].mean(axis=0) for i in range(len(groups))])
        row_labels = groups
    else:
        row_labels = None
    sd = values.std(axis=0)
    z = np.where(sd > 0, (values - values.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)

    created = ax is None
    if created:
        width = float(np.clip(0.28 * len(features) + 2.5, 5.0, 24.0))
        height = float(np.clip(0.35 * (len(groups) if cells_per_group is None else 12) + 2.2, 3.0, 14.0))
        fig, axes = _new_figure(1, 1, figsize=(width, height))
        ax = axes[0, 0]
    with _closing_on_error(ax.figure, created):
        lim = float(np.nanmax(np.abs(z))) if z.size else 1.0
        im = ax.imshow(z, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.figure.colorbar(im, ax=ax, label="z-score of log1p(1e4 x decoded fraction)", shrink=0.8)
        ax.set_xticks(np.arange(len(features)), [str(f) for f in features], rotation=90, fontsize="x-small")
        if row_labels is not None:
            ax.set_yticks(np.arange(len(row_labels)), row_labels)
        else:
            bounds = np.cumsum([0] + [p.size for p in picks])
            centres = 0.5 * (bounds[:-1] + bounds[1:]) - 0.5
            ax.set_yticks(centres, groups)
            for b in bounds[1:-1]:
                ax.axhline(b - 0.5, color="black", linewidth=0.8)
        start = 0
        for g, fs in blocks:
            if fs:
                ax.text(start + (len(fs) - 1) / 2, -0.7, g, ha="center", va="bottom", fontsize="small",
                        clip_on=False)
                if start:
                    ax.axvline(start - 0.5, color="black", linewidth=0.8)
            start += len(fs)
        ax.set_ylabel(groupby if isinstance(groupby, str) else "group")
        ax.set_title(title if title is not None else f"top {int(n_top)} {direction} features per group", pad=18)
    return _finish(ax.figure, save, show, created)


def _decode_columns(model, adata, rows: np.ndarray, columns: np.ndarray, modality: str, key: str,
                    transform_batch, batch_size: int) -> np.ndarray:
    """Decoded fractions of ``rows`` (cells) at ``columns`` (feature positions), in batches."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if adata is None:
        full = model.get_normalized_expression(None, modality=modality, key=key, transform_batch=transform_batch,
                                               batch_size=int(batch_size))
        return full.to_numpy(dtype=np.float64)[rows][:, columns]
    out = np.empty((rows.size, columns.size))
    for start in range(0, rows.size, int(batch_size)):
        sub = rows[start:start + int(batch_size)]
        frame = model.get_normalized_expression(adata[sub], modality=modality, key=key,
                                                transform_batch=transform_batch, batch_size=int(batch_size))
        out[start:start + sub.size] = frame.to_numpy(dtype=np.float64)[:, columns]
    return out
