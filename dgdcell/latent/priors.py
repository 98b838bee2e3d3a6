"""Priors on mixture parameters: a softball on means, a Gaussian on negative
log-variances and a Dirichlet on mixture weights.

Every prior is a small object with ``log_prob`` (summed over the last axis,
natural log) and ``sample``. They hold no learnable state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Softball:
    """Mollified uniform distribution on the ball of radius ``radius`` in R^dim.

    ``log p(z) = -log V_dim(radius) - softplus(sharpness * (|z| / radius - 1))``.
    Inside the ball the density is almost flat, outside it decays at a rate set
    by ``sharpness`` (larger is harder). The normaliser is that of the uniform
    ball, exact as ``sharpness -> inf``.

    Parameters
    ----------
    dim
        Dimension of the space.
    radius
        Ball radius (> 0). A radius of 0 puts every mean at the origin and is
        rejected.
    sharpness
        Hardness of the ball's edge (> 0).
    """

    def __init__(self, dim: int, radius: float, sharpness: float = 1.0):
        if dim < 1:
            raise ValueError(f"Softball dim must be >= 1, got {dim}.")
        if not radius > 0:
            raise ValueError(
                f"Softball radius must be > 0, got {radius}: a radius of 0 collapses every "
                "mixture mean onto the origin. Use e.g. mean_init=(5.0, 5.0)."
            )
        if not sharpness > 0:
            raise ValueError(f"Softball sharpness must be > 0, got {sharpness}.")
        self.dim = int(dim)
        self.radius = float(radius)
        self.sharpness = float(sharpness)
        # log volume of the dim-ball of this radius
        log_volume = (
            0.5 * self.dim * math.log(math.pi)
            + self.dim * math.log(self.radius)
            - math.lgamma(1.0 + 0.5 * self.dim)
        )
        self._log_norm = -log_volume

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of points ``z`` of shape (..., dim); returns shape (...)."""
        r = torch.linalg.vector_norm(z, dim=-1)
        return self._log_norm - F.softplus(self.sharpness * (r / self.radius - 1.0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points uniform in the ball, shape (n, dim); ``generator`` seeds them."""
        direction = torch.randn(n, self.dim, generator=generator)
        direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(1e-12)
        u = torch.rand(n, 1, generator=generator)
        return direction * self.radius * u.pow(1.0 / self.dim)


class GaussianPrior:
    """Independent normal prior N(mean, stddev^2) on each of ``dim`` coordinates.

    Parameters
    ----------
    dim
        Number of coordinates.
    mean, stddev
        Mean and standard deviation (> 0) of every coordinate.
    """

    def __init__(self, dim: int, mean: float, stddev: float):
        if not stddev > 0:
            raise ValueError(f"GaussianPrior stddev must be > 0, got {stddev}.")
        self.dim = int(dim)
        self.mean = float(mean)
        self.stddev = float(stddev)
        self._log_norm = -0.5 * math.log(2.0 * math.pi) - math.log(self.stddev)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of ``x`` of shape (..., dim), summed over the last axis."""
        zs = (x - self.mean) / self.stddev
        return (self._log_norm - 0.5 * zs.square()).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws, shape (n, dim); ``generator`` seeds them."""
        return self.mean + self.stddev * torch.randn(n, self.dim, generator=generator)


class DirichletPrior:
    """Symmetric Dirichlet(alpha) prior on mixture weights given as logits.

    ``log_prob(logits)`` evaluates the Dirichlet density at ``softmax(logits)``.
    With ``alpha = 1`` it is constant (a flat prior); ``alpha > 1`` favours
    balanced weights.

    Parameters
    ----------
    n_components
        Number of mixture weights K.
    alpha
        Concentration (> 0).
    """

    def __init__(self, n_components: int, alpha: float = 1.0):
        if not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}.")
        self.n_components = int(n_components)
        self.alpha = float(alpha)
        self._log_norm = math.lgamma(self.n_components * self.alpha) - self.n_components * math.lgamma(self.alpha)

    def log_prob(self, logits: torch.Tensor) -> torch.Tensor:
        """Log density at ``softmax(logits)``; ``logits`` shape (..., K) -> (...)."""
        return self._log_norm + (self.alpha - 1.0) * torch.log_softmax(logits, dim=-1).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` weight vectors, shape (n, K) (each row sums to 1); ``generator`` is accepted for API symmetry (unused)."""
        g = torch._standard_gamma(torch.full((n, self.n_components), self.alpha))
        return g / g.sum(-1, keepdim=True)
