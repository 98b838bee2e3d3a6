"""The model module: the decoder and the mixtures, and the objective of a minibatch.

:class:`DGDModule` is the one place where the DGD's objective is written. For a
minibatch of cells (a :class:`Minibatch`: their representations, covariate
representations and sparse counts) :meth:`DGDModule.loss` returns a
:class:`LossOutput` with every term per cell::

    loss = sum_cells [ -sum_m w_m log p(x_m | decoder(z, c))          (reconstruction, per modality)
                       -log p_GMM(z)  -sum_k log p_sGMM_k(c_k | class) ] (prior)
           - prior_scale * log p(mixture parameters)                    (parameter prior)

With a Normal posterior per cell (``Minibatch.log_std`` set: ``q_i = N(z_i,
diag(exp(log_std_i))^2)``) the per-cell terms are those of the negative ELBO,
estimated with S reparameterised samples ``z_is = z_i + exp(log_std_i) * eps_is``::

    distortion D_i = -1/S sum_s log p(x_i | z_is, c_i)                 (reconstruction)
    rate       R_i = 1/S sum_s [-log p_GMM(z_is)] - H(q_i)  -sum_k log p_sGMM_k(c_k | class)
    H(q_i)         = sum_d log_std_id + L/2 (1 + log 2 pi)              (entropy, exact)

so ``R_i`` is the Monte Carlo estimate of ``KL(q_i || p_GMM)`` (no closed form
for a mixture) plus the covariate prior of the (point) covariate
representations, and ``D_i + R_i`` is the negative ELBO of cell ``i``.
:meth:`DGDModule.sample_terms` gives the per-sample terms (for importance
sampling of ``log p(x)``); :meth:`DGDModule.loss` averages them.

Training passes ``prior_scale = n_batch / n_cells`` so that the parameter
priors count once per pass over the data; fitting representations (validation
cells, new cells) passes 0. Training, validation, :meth:`dgdcell.DGD.transform`
and the candidate scoring of new cells all go through this module.

Pure PyTorch, no AnnData: the same code runs on CPU, CUDA and MPS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .latent import GaussianMixture, GaussianMixtureSupervised
from .nn import Decoder

#: dimension of each covariate's representation
COVARIATE_DIM = 2


@dataclass
class SparseCounts:
    """The non-zero counts of a minibatch's B cells in one modality, as COO triplets.

    Attributes
    ----------
    flat_index
        (nnz,) long: ``row * G + col`` of every non-zero, addressing a (B, G)
        matrix over the decoded features (``G`` = the features in
        ``feature_index``, or all of the modality's).
    rows
        (nnz,) long: the row (0..B-1) of every non-zero.
    values
        (nnz,) float: the counts.
    log_library
        (B,) log library sizes.
    log_factorial
        (B,) ``sum_j lgamma(x_ij + 1)`` (a constant of the data).
    feature_index
        (G,) long: which of the decoder's features the columns are (None: all).
    weight
        (B,) weight of each cell's log-likelihood (0 where the cell was not
        measured in the modality), or None for weight 1.
    """

    flat_index: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor
    log_library: torch.Tensor
    log_factorial: torch.Tensor
    feature_index: torch.Tensor | None = None
    weight: torch.Tensor | None = None


@dataclass
class Minibatch:
    """What the objective needs of B cells.

    Attributes
    ----------
    z
        (B, L) representations.
    cov
        covariate key -> (B, 2) covariate representations.
    counts
        modality -> :class:`SparseCounts` (the modalities the cells are scored on).
    cov_codes
        covariate key -> (B,) long class codes (-1: unknown, the full covariate mixture).
    labels
        (B,) long label codes of a supervised mixture (-1: unlabelled), or None.
    guide
        (B,) long: with ``guided`` in :meth:`DGDModule.loss`, each cell's prior is
        this component's density alone (the guided start), or None.
    continuous
        (B, C) standardised values of the continuous covariates (None without any).
    log_std
        (B, L) log standard deviations of the cells' Normal posteriors (``z`` are
        then their means), or None for points (MAP).
    """

    z: torch.Tensor
    cov: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, SparseCounts] = field(default_factory=dict)
    cov_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    continuous: torch.Tensor | None = None
    log_std: torch.Tensor | None = None


@dataclass
class LossOutput:
    """The terms of the objective for a minibatch (nats; lower is better).

    Attributes
    ----------
    reconstruction
        modality -> (B,) negative log-likelihood of each cell's counts (times
        the cell's modality weight).
    prior
        (B,) ``-log p_GMM(z) - sum_k log p_sGMM_k(c_k | class)``. A density
        can exceed 1, so this can be negative: tight mixture components give
        the cells near their means a negative prior term, and the total loss
        can then be lower than the reconstruction term alone.
    parameter_prior
        Scalar: ``-prior_scale * log p(mixture parameters)``.
    entropy
        (B,) entropy of each cell's Normal posterior (None for points); the
        reconstruction and prior are then averages over posterior samples.
    """

    reconstruction: dict[str, torch.Tensor]
    prior: torch.Tensor
    parameter_prior: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def reconstruction_total(self) -> torch.Tensor:
        """(B,) reconstruction NLL summed over the modalities."""
        out = torch.zeros_like(self.prior)
        for value in self.reconstruction.values():
            out = out + value
        return out

    @property
    def distortion(self) -> torch.Tensor:
        """(B,) ``D``: the reconstruction NLL (expected under the posterior for a Normal one)."""
        return self.reconstruction_total

    @property
    def rate(self) -> torch.Tensor:
        """(B,) ``R``: prior minus posterior entropy (the prior term alone for points)."""
        return self.prior if self.entropy is None else self.prior - self.entropy

    @property
    def per_cell(self) -> torch.Tensor:
        """(B,) ``D + R`` of each cell (the parameter prior excluded): for a
        Normal posterior the negative ELBO, for points reconstruction + prior."""
        return self.reconstruction_total + self.rate

    @property
    def loss(self) -> torch.Tensor:
        """Scalar: the minibatch's objective (sum over cells plus the parameter prior)."""
        return self.per_cell.sum() + self.parameter_prior


@dataclass
class SampleTerms:
    """Per-sample terms of S posterior samples of B cells (see :meth:`DGDModule.sample_terms`).

    Attributes
    ----------
    reconstruction
        modality -> (S, B) ``-log p(x_m | z_s, c)``.
    prior
        (S, B) ``-log p_GMM(z_s) - sum_k log p_sGMM_k(c_k | class)``.
    log_q
        (S, B) ``log q(z_s)`` of each cell's Normal posterior.
    entropy
        (B,) exact entropy of each posterior.
    expanded
        The (S * B)-row minibatch of the samples (row ``s * B + b``), e.g. to
        score them under another mixture with :meth:`DGDModule.prior_nll`.
    """

    reconstruction: dict[str, torch.Tensor]
    prior: torch.Tensor
    log_q: torch.Tensor
    entropy: torch.Tensor
    expanded: Minibatch

    @property
    def reconstruction_total(self) -> torch.Tensor:
        """(S, B) reconstruction NLL summed over the modalities."""
        return sum(self.reconstruction.values(), torch.zeros_like(self.prior))

    @property
    def log_weights(self) -> torch.Tensor:
        """(S, B) importance log weights ``log p(x, z_s) - log q(z_s)``."""
        return -self.reconstruction_total - self.prior - self.log_q


def _repeat_counts(c: SparseCounts, n_repeats: int, n_cols: int) -> SparseCounts:
    """``c`` (B cells over ``n_cols`` decoded features) stacked ``n_repeats`` times:
    row ``s * B + b`` is cell ``b``."""
    b = c.log_library.shape[0]
    shift = torch.arange(n_repeats, device=c.rows.device).repeat_interleave(c.rows.shape[0])
    rep = lambda v: None if v is None else v.repeat(n_repeats)  # noqa: E731
    return SparseCounts(
        c.flat_index.repeat(n_repeats) + shift * (b * n_cols), c.rows.repeat(n_repeats) + shift * b,
        c.values.repeat(n_repeats), rep(c.log_library), rep(c.log_factorial), c.feature_index, rep(c.weight),
    )


class DGDModule(nn.Module):
    """Decoder, mixture prior and covariate mixtures of a DGD, and its objective.

    Parameters
    ----------
    latent_dim
        Dimension L of the cell representations.
    n_features
        modality -> number of features.
    likelihoods
        modality -> likelihood name (``'nb'`` or ``'bernoulli'``; NB when missing).
    covariate_classes
        covariate key -> number of classes (each gets a 2-D representation
        with a supervised mixture, one isotropic component per class).
    n_continuous
        Number of continuous covariates: their (standardised) values enter the
        decoder directly, after ``z`` and the covariate representations.
    n_components
        Components K of the mixture prior on ``z``.
    n_label_classes
        With label supervision: the number of label classes (K must be a
        multiple); the mixture is then a :class:`GaussianMixtureSupervised`.
    n_hidden, n_hidden_head, dispersion_init
        Decoder settings (see :class:`dgdcell.nn.Decoder`).
    covariance_type, mean_init, sd_init, weight_alpha
        Mixture settings (see :class:`dgdcell.latent.GaussianMixture`).
    generator
        ``torch.Generator`` (CPU) for every initial value; the global
        generator is neither read nor advanced when one is given.
    """

    def __init__(
        self,
        latent_dim: int,
        n_features: Mapping[str, int],
        likelihoods: Mapping[str, str] | None = None,
        covariate_classes: Mapping[str, int] | None = None,
        n_continuous: int = 0,
        n_components: int = 10,
        n_label_classes: int | None = None,
        n_hidden: Sequence[int] = (100, 100),
        n_hidden_head: Sequence[int] = (100, 100),
        dispersion_init: float = 2.0,
        covariance_type: str = "diagonal",
        mean_init: tuple[float, float] = (5.0, 5.0),
        sd_init: tuple[float, float] = (0.5, 1.0),
        weight_alpha: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.n_continuous = int(n_continuous)
        covariate_classes = dict(covariate_classes or {})
        # layers are built inside a forked global RNG (their constructors draw from it) and then
        # re-initialised from ``generator``: the caller's global random state is left as it was
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            self.decoder = Decoder(
                self.latent_dim + COVARIATE_DIM * len(covariate_classes) + self.n_continuous, dict(n_features),
                n_hidden, n_hidden_head,
                likelihood=dict(likelihoods or {}), dispersion_init=dispersion_init,
            )
        kw = dict(covariance_type=covariance_type, mean_init=tuple(mean_init), sd_init=tuple(sd_init))
        k = int(n_components)
        if n_label_classes is None:
            self.gmm = GaussianMixture(k, self.latent_dim, weight_alpha=weight_alpha, generator=generator, **kw)
        else:
            self.gmm = GaussianMixtureSupervised(int(n_label_classes), k // int(n_label_classes), self.latent_dim,
                                                 alpha=weight_alpha, generator=generator, **kw)
        self.cov_gmms = nn.ModuleDict({key: covariate_mixture(n) for key, n in covariate_classes.items()})
        if generator is not None:
            self.decoder.reset_parameters(generator)

    @property
    def covariate_keys(self) -> list[str]:
        """The covariates, in the order their representations enter the decoder."""
        return list(self.cov_gmms)

    def mixtures(self) -> list[GaussianMixture]:
        """The mixture prior on ``z`` and the covariate mixtures."""
        return [self.gmm, *self.cov_gmms.values()]

    # ------------------------------------------------------------------ generative side
    def decoder_input(
        self, z: torch.Tensor, cov: Mapping[str, torch.Tensor], continuous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[z, c_1, ..., continuous]`` (B, L + 2 * n_covariates + n_continuous), covariates in
        :attr:`covariate_keys` order; continuous values at 0 (their training mean) when None."""
        parts = [z] + [cov[k] for k in self.covariate_keys]
        if self.n_continuous:
            parts.append(z.new_zeros(z.shape[0], self.n_continuous) if continuous is None else continuous)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else z

    def log_fractions(
        self,
        z: torch.Tensor,
        cov: Mapping[str, torch.Tensor],
        modalities: Sequence[str] | None = None,
        feature_index: Mapping[str, torch.Tensor | None] | None = None,
        continuous: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """modality -> (B, G_m) log fractions (each row's exp sums to 1 over
        the modality's, or the selected, features)."""
        return self.decoder(self.decoder_input(z, cov, continuous), feature_index, modalities)

    # ------------------------------------------------------------------ objective
    def reconstruction_nll(self, x_in: torch.Tensor, counts: Mapping[str, SparseCounts]) -> dict[str, torch.Tensor]:
        """modality -> (B,) negative log-likelihood of the counts given decoder input ``x_in``."""
        findex = {m: c.feature_index for m, c in counts.items()}
        logits = self.decoder.logits(x_in, findex, list(counts))
        out = {}
        for mod, c in counts.items():
            # the likelihood applies the softmax and the library size itself (fused with it for the NB)
            ll = self.decoder.likelihoods[mod].log_prob_sparse(
                logits[mod], c.flat_index, c.rows, c.values, c.log_factorial, c.feature_index,
                log_library=c.log_library,
            )
            out[mod] = -(ll if c.weight is None else ll * c.weight)
        return out

    def prior_nll(self, batch: Minibatch, guided: bool = False, gmm: GaussianMixture | None = None) -> torch.Tensor:
        """(B,) ``-log p_GMM(z) - sum_k log p_sGMM_k(c_k | class)``.

        With ``guided`` (and ``batch.guide`` set) the density of ``z`` is that of
        the cell's guide component alone, which pulls the cells of one initial
        cluster towards one component. ``gmm``: another mixture over ``z`` in
        place of the module's (e.g. one with another number of components)."""
        z = batch.z
        gmm = self.gmm if gmm is None else gmm
        if guided and batch.guide is not None:
            nll = -gmm.component_log_prob_of(z, batch.guide)
        elif isinstance(gmm, GaussianMixtureSupervised):
            nll = -gmm.log_prob(z, batch.labels)
        else:
            nll = -gmm.log_prob(z)
        for key, g in self.cov_gmms.items():
            nll = nll - g.log_prob(batch.cov[key], batch.cov_codes.get(key))
        return nll

    def parameter_prior_nll(self) -> torch.Tensor:
        """Scalar ``-log p(parameters)`` of every mixture (softball, Dirichlet, Gaussian priors)."""
        return -sum(g.prior_log_prob() for g in self.mixtures())

    def expand(self, batch: Minibatch, z: torch.Tensor) -> Minibatch:
        """The minibatch of ``S * B`` points ``z`` ((S * B, L), row ``s * B + b``
        a point of cell ``b``) with every other field of ``batch`` repeated."""
        n_rep = z.shape[0] // batch.z.shape[0]
        if n_rep == 1:
            return Minibatch(z, batch.cov, batch.counts, batch.cov_codes, batch.labels, batch.guide, batch.continuous)
        rep = lambda v: None if v is None else v.repeat(n_rep, *([1] * (v.dim() - 1)))  # noqa: E731
        counts = {}
        for mod, c in batch.counts.items():
            n_cols = c.feature_index.numel() if c.feature_index is not None else self.decoder.heads[mod][-1].out_features
            counts[mod] = _repeat_counts(c, n_rep, n_cols)
        return Minibatch(
            z, {k: rep(v) for k, v in batch.cov.items()}, counts, {k: rep(v) for k, v in batch.cov_codes.items()},
            rep(batch.labels), rep(batch.guide), rep(batch.continuous),
        )

    def sample_terms(self, batch: Minibatch, noise: torch.Tensor, guided: bool = False,
                     gmm: GaussianMixture | None = None) -> SampleTerms:
        """The terms at S reparameterised samples ``z_s = z + exp(log_std) * noise[s]``.

        ``noise``: (S, B, L) standard-normal draws; ``batch.log_std`` must be set.
        Differentiable in ``batch.z`` and ``batch.log_std``. ``gmm``: see :meth:`prior_nll`."""
        if batch.log_std is None:
            raise ValueError("sample_terms needs a Normal posterior: set Minibatch.log_std.")
        n_samples, b, dim = noise.shape
        std = batch.log_std.exp()
        z = (batch.z.unsqueeze(0) + std.unsqueeze(0) * noise).reshape(n_samples * b, dim)
        big = self.expand(batch, z)
        recon = self.reconstruction_nll(self.decoder_input(big.z, big.cov, big.continuous), big.counts)
        recon = {m: v.view(n_samples, b) for m, v in recon.items()}
        prior = self.prior_nll(big, guided, gmm).view(n_samples, b)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        log_q = -(0.5 * noise.square() + batch.log_std.unsqueeze(0) + half_log_2pi).sum(-1)
        entropy = batch.log_std.sum(-1) + dim * (0.5 + half_log_2pi)
        return SampleTerms(recon, prior, log_q, entropy, big)

    def loss(self, batch: Minibatch, prior_scale: float = 0.0, guided: bool = False, n_samples: int = 1,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> LossOutput:
        """The objective's terms for ``batch`` (see the module docstring).

        ``prior_scale``: weight of the mixtures' parameter priors (training:
        ``n_batch / n_cells``; 0 when only representations are fitted, which
        then skips computing them). ``guided``: see :meth:`prior_nll`.
        With a Normal posterior (``batch.log_std`` set): the negative ELBO from
        ``n_samples`` reparameterised samples per cell, drawn from
        ``generator`` (on the cells' device), or from the given ``noise`` (S, B, L)."""
        entropy = None
        if batch.log_std is not None:
            if noise is None:
                noise = torch.randn((int(n_samples), *batch.z.shape), generator=generator, device=batch.z.device,
                                    dtype=batch.z.dtype)
            terms = self.sample_terms(batch, noise, guided)
            recon = {m: v.mean(0) for m, v in terms.reconstruction.items()}
            prior, entropy = terms.prior.mean(0), terms.entropy
        else:
            recon = self.reconstruction_nll(self.decoder_input(batch.z, batch.cov, batch.continuous), batch.counts)
            prior = self.prior_nll(batch, guided)
        if prior_scale:
            param = self.parameter_prior_nll() * float(prior_scale)
        else:
            param = torch.zeros((), dtype=prior.dtype, device=prior.device)
        return LossOutput(recon, prior, param, entropy)


def covariate_mixture(n_classes: int) -> GaussianMixtureSupervised:
    """Supervised 2-D mixture for one covariate: one isotropic component per
    class (sd 0.2), means spread evenly on the unit circle."""
    g = GaussianMixtureSupervised(n_classes, 1, COVARIATE_DIM, "isotropic", mean_init=(2.0, 5.0), sd_init=(0.2, 1.0),
                                  generator=torch.Generator().manual_seed(0))
    angle = torch.arange(n_classes) * (2 * math.pi / n_classes)
    with torch.no_grad():
        g.mean.copy_(torch.stack([angle.cos(), angle.sin()], -1))
    return g
