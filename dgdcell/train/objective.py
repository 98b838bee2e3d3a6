"""The training objective for a minibatch of cells.

Loss per cell (nats): ``-log NB(counts | decoder(z, c))  - log p_GMM(z)  - sum_k log p_sGMM_k(c_k | class)``
plus the mixtures' parameter priors scaled by ``prior_scale`` (see
:meth:`dgdcell.latent.GaussianMixture.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..latent import GaussianMixture, GaussianMixtureSupervised, RepresentationLayer
from ..nn import Decoder, NegativeBinomial
from ..nn.likelihoods import csr_native_applies
from .batching import DeviceCounts


@dataclass
class CellSet:
    """Everything the objective needs for one set of cells (train, validation or new).

    Attributes
    ----------
    rep
        (n, L) representations.
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
    """

    rep: RepresentationLayer
    cov_reps: dict[str, RepresentationLayer]
    counts: dict[str, DeviceCounts]
    cov_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    feature_index: dict[str, torch.Tensor | None] = field(default_factory=dict)
    guide: torch.Tensor | None = None
    weight: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.rep.n_sample

    def parameters(self) -> list[nn.Parameter]:
        return [self.rep.z] + [r.z for r in self.cov_reps.values()]


def decoder_input(cells: CellSet, idx: torch.Tensor | None, cov_keys: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``[z, c_1, ...]`` for rows ``idx``: (B, L + 2 * n_cov), and the covariate parts."""
    z = cells.rep(idx)
    cs = [cells.cov_reps[k](idx) for k in cov_keys]
    return (torch.cat([z] + cs, dim=-1) if cs else z), cs


def reconstruction_nll(
    decoder: Decoder, x_in: torch.Tensor, cells: CellSet, idx: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of the counts of rows ``idx`` summed over the
    modalities each cell was measured in: (B,)."""
    logits = decoder.logits(x_in, cells.feature_index or None, list(cells.counts))
    nll = torch.zeros(idx.shape[0], device=x_in.device)
    for mod, counts in cells.counts.items():
        lik = decoder.likelihoods[mod]
        log_factorial = counts.log_factorial.index_select(0, idx)
        log_library = counts.log_library.index_select(0, idx)
        # the likelihood applies the softmax and the library size itself (fused with it for the NB)
        if _reads_rows_in_place(lik, logits[mod], log_library, counts):
            start, length = counts.row_spans(idx)
            ll = lik.log_prob_csr(logits[mod], start, length, counts.indices, counts.values, log_factorial,
                                  cells.feature_index.get(mod), log_library=log_library)
        else:
            flat, rows, vals = counts.batch(idx)
            ll = lik.log_prob_sparse(logits[mod], flat, rows, vals, log_factorial, cells.feature_index.get(mod),
                                     log_library=log_library)
        if mod in cells.weight:
            ll = ll * cells.weight[mod].index_select(0, idx)
        nll = nll - ll
    return nll


def _reads_rows_in_place(lik, logits: torch.Tensor, log_library: torch.Tensor, counts) -> bool:
    """Whether the likelihood reads a minibatch's counts in place from the CSR
    arrays (the NB with the native CPU kernels) instead of slicing them."""
    return (isinstance(lik, NegativeBinomial) and counts.in_place_rows
            and csr_native_applies(logits, log_library, counts.indices))


def prior_nll(
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    z: torch.Tensor,
    cs: list[torch.Tensor],
    cells: CellSet,
    idx: torch.Tensor,
    prior_scale: float,
    guided: bool = False,
) -> torch.Tensor:
    """Negative log prior density of rows ``idx`` under the mixtures: (B,).

    With ``guided`` (and ``cells.guide`` set) each cell's density is that of its
    guide component alone, which pulls the cells of one initial cluster
    towards one component."""
    if guided and cells.guide is not None:
        n = max(int(z.shape[0]), 1)
        nll = -gmm.component_log_prob_of(z, cells.guide.index_select(0, idx)) - prior_scale * gmm.prior_log_prob() / n
    elif isinstance(gmm, GaussianMixtureSupervised):
        labels = None if cells.labels is None else cells.labels.index_select(0, idx)
        nll = gmm(z, labels, prior_scale=prior_scale)
    else:
        nll = gmm(z, prior_scale=prior_scale)
    for (key, cg), c in zip(cov_gmms.items(), cs):
        nll = nll + cg(c, cells.cov_codes[key].index_select(0, idx), prior_scale=prior_scale)
    return nll


def batch_loss(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    idx: torch.Tensor,
    prior_scale: float,
    guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell reconstruction NLL and prior NLL of rows ``idx``: two (B,) tensors."""
    cov_keys = list(cov_gmms)
    x_in, cs = decoder_input(cells, idx, cov_keys)
    recon = reconstruction_nll(decoder, x_in, cells, idx)
    prior = prior_nll(gmm, cov_gmms, x_in[:, : cells.rep.n_rep], cs, cells, idx, prior_scale, guided)
    return recon, prior
