"""Sets of cells being fitted (training, validation or new cells) and their minibatches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..latent import RepresentationLayer
from ..module import Minibatch, SparseCounts
from .batching import DeviceCounts


@dataclass
class CellSet:
    """The cells of one set (train, validation or new): their representations,
    counts and codes; :meth:`minibatch` gives the objective's input for some of them.

    Attributes
    ----------
    rep
        (n, L) representations (a :class:`~dgdcell.latent.NormalRepresentation`:
        each cell's Normal posterior, its means and log stds).
    cov_reps
        covariate key -> (n, 2) representations.
    counts
        modality -> counts on the device.
    cov_codes
        covariate key -> (n,) long class codes (-1 unknown).
    labels
        (n,) long label codes (-1 unlabelled), or None.
    feature_index
        modality -> indices of the decoder features the counts' columns are (None: all).
    guide
        (n,) long mixture component of each cell during the guided phase of
        training (pseudo-labels from the initial clustering), or None.
    weight
        modality -> (n,) float weight of each cell's log-likelihood in the
        modality: 0 where the cell was not measured in it (mosaic data), else
        the modality's weight (1 unless the model says otherwise); a modality
        not listed has weight 1 everywhere.
    continuous
        (n, C) standardised continuous covariates, or None.
    """

    rep: RepresentationLayer
    cov_reps: dict[str, RepresentationLayer]
    counts: dict[str, DeviceCounts]
    cov_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    feature_index: dict[str, torch.Tensor | None] = field(default_factory=dict)
    guide: torch.Tensor | None = None
    weight: dict[str, torch.Tensor] = field(default_factory=dict)
    continuous: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.rep.n_sample

    @property
    def variational(self) -> bool:
        """True when each cell owns a Normal posterior (means and log stds)."""
        return bool(getattr(self.rep, "variational", False))

    def parameters(self) -> list[nn.Parameter]:
        own = [self.rep.z] + ([self.rep.log_std] if self.variational else [])
        return own + [r.z for r in self.cov_reps.values()]

    def minibatch(
        self, idx: torch.Tensor, z: torch.Tensor | None = None, cov: dict[str, torch.Tensor] | None = None
    ) -> Minibatch:
        """The objective's input for rows ``idx`` ((B,) long on the device): their
        representations (``z`` / ``cov`` instead, when given), counts (sliced as
        COO triplets), codes, labels and guides."""
        counts = {}
        for mod, c in self.counts.items():
            flat, rows, values = c.batch(idx)
            weight = self.weight.get(mod)
            counts[mod] = SparseCounts(
                flat, rows, values, c.log_library.index_select(0, idx), c.log_factorial.index_select(0, idx),
                feature_index=self.feature_index.get(mod), weight=None if weight is None else weight.index_select(0, idx),
            )
        return Minibatch(
            z=self.rep(idx) if z is None else z,
            cov={k: r(idx) for k, r in self.cov_reps.items()} if cov is None else cov,
            counts=counts,
            cov_codes={k: v.index_select(0, idx) for k, v in self.cov_codes.items()},
            labels=None if self.labels is None else self.labels.index_select(0, idx),
            guide=None if self.guide is None else self.guide.index_select(0, idx),
            continuous=None if self.continuous is None else self.continuous.index_select(0, idx),
            log_std=self.rep.log_std_rows(idx) if self.variational and z is None else None,
        )
