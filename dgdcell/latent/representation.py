"""Learnable per-sample representations (no encoder)."""

from __future__ import annotations

import torch
from torch import nn


class RepresentationLayer(nn.Module):
    """One learnable vector per sample: ``z`` of shape (n_sample, n_rep).

    Parameters
    ----------
    n_rep
        Dimension of each representation.
    n_sample
        Number of samples (cells).
    value_init
        ``'zero'`` (all zeros), a float (draws from N(0, value_init^2)), or a
        tensor of shape (n_sample, n_rep) copied as the start.
    generator
        Optional ``torch.Generator`` (CPU) for a float ``value_init``.
    """

    def __init__(self, n_rep: int, n_sample: int, value_init="zero", generator: torch.Generator | None = None):
        super().__init__()
        self.n_rep = int(n_rep)
        self.n_sample = int(n_sample)
        if isinstance(value_init, str):
            if value_init != "zero":
                raise ValueError(f"value_init must be 'zero', a float or a tensor, got {value_init!r}.")
            init = torch.zeros(self.n_sample, self.n_rep)
        elif isinstance(value_init, torch.Tensor):
            if tuple(value_init.shape) != (self.n_sample, self.n_rep):
                raise ValueError(
                    f"value_init tensor has shape {tuple(value_init.shape)}, expected ({self.n_sample}, {self.n_rep})."
                )
            init = value_init.detach().clone().float()
        else:
            init = torch.randn(self.n_sample, self.n_rep, generator=generator) * float(value_init)
        self.z = nn.Parameter(init)

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The representations of samples ``idx`` (all when None): shape (len(idx), n_rep)."""
        return self.z if idx is None else self.z[idx]

    def __len__(self) -> int:
        return self.n_sample


class NormalRepresentation(RepresentationLayer):
    """A directly parameterised diagonal Normal per sample: ``q_i = N(z_i, diag(exp(log_std_i))^2)``.

    No encoder: each sample owns its mean ``z`` (n_sample, n_rep) and its
    log standard deviation ``log_std`` (n_sample, n_rep), both learnable. A
    minibatch reads (and, with a sparse read, steps) only its own rows.
    :meth:`forward` returns the means, so code that uses a point per sample
    works unchanged.

    Parameters
    ----------
    n_rep, n_sample, value_init, generator
        As for :class:`RepresentationLayer` (the means).
    log_std_init
        A float (every log std) or a tensor of shape (n_sample, n_rep).
    """

    #: the sample owns a distribution, not a point
    variational = True

    def __init__(self, n_rep: int, n_sample: int, value_init="zero", log_std_init=-2.0,
                 generator: torch.Generator | None = None):
        super().__init__(n_rep, n_sample, value_init, generator)
        if isinstance(log_std_init, torch.Tensor):
            if tuple(log_std_init.shape) != (self.n_sample, self.n_rep):
                raise ValueError(f"log_std_init tensor has shape {tuple(log_std_init.shape)}, expected "
                                 f"({self.n_sample}, {self.n_rep}).")
            init = log_std_init.detach().clone().float()
        else:
            init = torch.full((self.n_sample, self.n_rep), float(log_std_init))
        self.log_std = nn.Parameter(init)

    def log_std_rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Log standard deviations of samples ``idx`` (all when None): (len(idx), n_rep)."""
        return self.log_std if idx is None else self.log_std[idx]

    @property
    def std(self) -> torch.Tensor:
        """(n_sample, n_rep) standard deviations."""
        return self.log_std.exp()
