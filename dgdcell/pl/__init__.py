"""Plots of a fitted DGD and its outputs (matplotlib only).

Every function returns a :class:`matplotlib.figure.Figure` and takes, like
scanpy, ``save`` (a path: the figure is written there, the format chosen by the
suffix, e.g. ``.png`` or ``.pdf``; missing parent folders are created) and
``show`` (call :func:`matplotlib.pyplot.show`). A figure the function created
itself is closed in pyplot unless ``show=True``: it stays a complete Figure
(``fig.savefig`` works, a notebook displays the returned object once) but does
not pile up in pyplot's figure list or display twice. Functions that draw a
single panel take ``ax`` to draw into an existing Axes instead.

Nothing here modifies the AnnData or the model. Safe under the Agg backend.
"""

from ._de import de_heatmap, volcano
from ._fit import adjusted_rand_index, components_vs_labels, evidence_curve, history, latent, summary

__all__ = ["history", "latent", "components_vs_labels", "summary", "adjusted_rand_index", "volcano", "de_heatmap",
           "evidence_curve"]
