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
