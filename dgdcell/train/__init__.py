"""Fitting: the training loop, early stopping, history, and data-driven starts."""

from .batching import DeviceCounts
from .initialisation import init_mixture, kmeans, log_normalise, pca_scores
from .new_cells import (
    Candidates,
    NewCellConfig,
    best_candidates,
    candidate_scores,
    candidate_starts,
    fit_new_cells,
    frozen,
    top_candidates,
)
from .loop import TrainConfig, representation_epoch, train
from .objective import CellSet, batch_loss

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
    "batch_loss",
    "init_mixture",
    "kmeans",
    "log_normalise",
    "pca_scores",
    "representation_epoch",
    "train",
]
