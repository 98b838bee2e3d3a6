"""dgdcell: cell representations from a deep generative decoder with a Gaussian-mixture prior."""

from . import data, datasets, latent, nn, pl, tl, train
from ._version import __version__
from .model import DGD

__all__ = ["DGD", "__version__", "data", "datasets", "latent", "nn", "pl", "tl", "train"]
