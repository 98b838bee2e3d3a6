"""What every plot of :mod:`dgdcell.pl` shares: figures, saving and closing, colours, obsm lookups."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: colour of missing values
_NA_COLOR = "#d3d3d3"


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None):
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    return fig, axes


@contextmanager
def _closing_on_error(fig, created: bool):
    """Close a figure we created when drawing into it fails (no half-drawn figure left in pyplot)."""
    try:
        yield
    except BaseException:
        if created:
            _pyplot().close(fig)
        raise


def _finish(fig, save: str | Path | None, show: bool, created: bool):
    """Write ``fig`` to ``save``, show it, and release it from pyplot when we created it."""
    if save is not None:
        path = Path(save)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=150)
        logger.info("saved figure to %s", path)
    plt = _pyplot()
    if show:
        plt.show()
    elif created:
        plt.close(fig)
    return fig


def _obsm(adata, name: str, hint: str = "") -> np.ndarray:
    if name not in adata.obsm:
        raise KeyError(f"adata.obsm[{name!r}] not found (obsm keys: {list(adata.obsm.keys())}).{hint}")
    return np.asarray(adata.obsm[name], dtype=float)


def _categorical_colors(adata, key: str | None, cats: Sequence, palette=None) -> list:
    """Colours for ``cats``: ``palette`` (a list or a matplotlib colormap name),
    else ``adata.uns[f'{key}_colors']`` (scanpy's convention) when it fits, else tab10/tab20/turbo."""
    import matplotlib as mpl

    n = len(cats)
    if palette is not None:
        if isinstance(palette, str):
            cmap = mpl.colormaps[palette]
            return [cmap(i % cmap.N) if hasattr(cmap, "colors") else cmap(i / max(n - 1, 1)) for i in range(n)]
        if isinstance(palette, Mapping):
            return [palette.get(c, _NA_COLOR) for c in cats]
        palette = list(palette)
        return [palette[i % len(palette)] for i in range(n)]
    if key is not None and f"{key}_colors" in adata.uns:
        uns_colors = list(adata.uns[f"{key}_colors"])
        if len(uns_colors) >= n:
            return uns_colors[:n]
    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    cmap = mpl.colormaps["turbo"]
    return [cmap(i / (n - 1)) for i in range(n)]


def _color_values(adata, color: str) -> pd.Series | np.ndarray:
    if color in adata.obs.columns:
        return adata.obs[color]
    if color in adata.var_names:
        return np.asarray(adata.obs_vector(color), dtype=float)
    raise KeyError(
        f"color {color!r} is neither a column of adata.obs (columns: {list(adata.obs.columns)[:20]}) "
        "nor a feature in adata.var_names."
    )
