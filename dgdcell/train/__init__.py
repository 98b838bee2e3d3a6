"""Fitting: the training loop, early stopping, history, new cells, and data-driven starts."""

from .batching import DeviceCounts
from .cells import CellSet
from .initialisation import graph_clusters, init_mixture, init_mixture_from_labels, kmeans, log_normalise, pca_scores
from .loop import TrainConfig, representation_epoch, train
from .candidates import Candidates, best_candidates, candidate_scores, candidate_starts, top_candidates
from .new_cells import NewCellConfig, fit_new_cells, frozen

__all__ = [
    "CellSet",
    "Candidates",
    "NewCellConfig",
    "best_candidates",
    "candidate_scores",
    "candidate_starts",
    "fit_new_cells",
    "frozen",
    "top_candidates",
    "DeviceCounts",
    "TrainConfig",
    "graph_clusters",
    "init_mixture",
    "init_mixture_from_labels",
    "kmeans",
    "log_normalise",
    "pca_scores",
    "representation_epoch",
    "train",
]
