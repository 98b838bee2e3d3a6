"""Latent space: per-cell representations and Gaussian-mixture priors (no AnnData here)."""

from .gmm import COVARIANCE_TYPES, GaussianMixture, GaussianMixtureSupervised
from .priors import DirichletPrior, GaussianPrior, Softball
from .representation import NormalRepresentation, RepresentationLayer

__all__ = [
    "COVARIANCE_TYPES",
    "DirichletPrior",
    "GaussianMixture",
    "GaussianMixtureSupervised",
    "GaussianPrior",
    "NormalRepresentation",
    "RepresentationLayer",
    "Softball",
]
