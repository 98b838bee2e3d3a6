"""Gaussian-mixture priors over representations (the classic multiDGD latent API).

Shapes: ``x`` is (n, dim); component quantities are (K, dim); per-sample
outputs are (n,); per-sample-per-component outputs are (n, K). All densities
are natural-log densities in the representation space.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .priors import DirichletPrior, GaussianPrior, Softball

COVARIANCE_TYPES = ("fixed", "isotropic", "diagonal")


class GaussianMixture(nn.Module):
    """Gaussian mixture with priors on its parameters.

    Parameters
    ----------
    n_mix_comp
        Number of components K.
    dim
        Dimension of the space.
    covariance_type
        ``'fixed'`` (one isotropic variance per component, not learned),
        ``'isotropic'`` (one learned variance per component) or ``'diagonal'``
        (one learned variance per component and dimension).
    mean_init
        ``(radius, sharpness)`` of the softball prior on the means; the initial
        means are drawn from it. Radius must be > 0.
    sd_init
        ``(sd, prior_sd)``: the initial component standard deviation (also the
        mode of the prior, which is Gaussian on ``-log(var)`` with mean
        ``-2 log(sd)``) and the standard deviation of that prior.
    weight_alpha
        Concentration of the symmetric Dirichlet prior on the weights.
    generator
        Optional ``torch.Generator`` (CPU) for the initial means (default:
        PyTorch's global generator, as for ``torch.nn`` layers).

    Attributes
    ----------
    mean : Parameter (K, dim)
    neglogvar : Parameter (K, 1) or (K, dim): negative log variances
    weight : Parameter (K,): mixture logits (weights are ``softmax(weight)``)
    """

    def __init__(
        self,
        n_mix_comp: int,
        dim: int,
        covariance_type: str = "diagonal",
        mean_init: tuple[float, float] = (5.0, 5.0),
        sd_init: tuple[float, float] = (0.5, 1.0),
        weight_alpha: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
        if int(n_mix_comp) < 1:
            raise ValueError(f"n_mix_comp must be >= 1, got {n_mix_comp}.")
        if not sd_init[0] > 0:
            raise ValueError(f"sd_init[0] (initial component sd) must be > 0, got {sd_init[0]}.")
        self.n_mix_comp = int(n_mix_comp)
        self.dim = int(dim)
        self.covariance_type = covariance_type
        self.mean_init = (float(mean_init[0]), float(mean_init[1]))
        self.sd_init = (float(sd_init[0]), float(sd_init[1]))
        self.weight_alpha = float(weight_alpha)

        self.mean_prior = Softball(self.dim, self.mean_init[0], self.mean_init[1])
        self.mean = nn.Parameter(self.mean_prior.sample(self.n_mix_comp, generator=generator))
        self.weight_prior = DirichletPrior(self.n_mix_comp, self.weight_alpha)
        self.weight = nn.Parameter(torch.zeros(self.n_mix_comp))
        nlv_dim = self.dim if covariance_type == "diagonal" else 1
        nlv0 = -2.0 * math.log(self.sd_init[0])
        self.neglogvar_prior = GaussianPrior(nlv_dim, nlv0, self.sd_init[1])
        self.neglogvar = nn.Parameter(
            torch.full((self.n_mix_comp, nlv_dim), nlv0), requires_grad=covariance_type != "fixed"
        )
        self._pi_term = -0.5 * self.dim * math.log(2.0 * math.pi)

    # ----- densities -------------------------------------------------------------
    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of ``x`` (n, dim) under each component: (n, K) (weights not included)."""
        precision = torch.exp(self.neglogvar)  # (K, 1|dim)
        diff2 = (x.unsqueeze(-2) - self.mean).square()  # (n, K, dim)
        maha = (diff2 * precision).sum(-1)
        half_logdet = 0.5 * self.neglogvar.sum(-1) * (self.dim if self.neglogvar.shape[-1] == 1 else 1)
        return self._pi_term + half_logdet - 0.5 * maha

    def log_mixture_probs(self) -> torch.Tensor:
        """Log mixture weights, (K,)."""
        return torch.log_softmax(self.weight, dim=0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture log density of each row of ``x``: (n,). Parameter priors excluded."""
        return self._log_density(x, self.log_mixture_probs())

    def _log_density(self, x: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        """``logsumexp_k(log_w_k + component_log_prob(x)_k)``: (n,), for log
        weights (K,) or per row (n, K) (``-inf`` excludes a component)."""
        return torch.logsumexp(self.component_log_prob(x) + log_w, dim=-1)

    def component_log_prob_of(self, x: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
        """Log density of each row of ``x`` (n, dim) under its own component
        ``component`` (n,) long (weights not included): (n,); the entries of
        :meth:`component_log_prob` picked per row."""
        component = component.to(x.device).long()
        diff2 = (x - self.mean.index_select(0, component)).square()
        nlv = self.neglogvar.index_select(0, component)  # (n, 1|dim)
        half_logdet = 0.5 * nlv.sum(-1) * (self.dim if nlv.shape[-1] == 1 else 1)
        return self._pi_term + half_logdet - 0.5 * (diff2 * torch.exp(nlv)).sum(-1)

    def prior_log_prob(self) -> torch.Tensor:
        """Log density of the parameters under their priors (scalar): softball on
        the means, Dirichlet on the weights, Gaussian on the negative log
        variances (left out for ``'fixed'``, where they are not learned)."""
        lp = self.mean_prior.log_prob(self.mean).sum() + self.weight_prior.log_prob(self.weight)
        if self.covariance_type != "fixed":
            lp = lp + self.neglogvar_prior.log_prob(self.neglogvar).sum()
        return lp

    def forward(self, x: torch.Tensor, prior_scale: float = 1.0) -> torch.Tensor:
        """Negative log density per sample incl. parameter priors: (n,).

        The parameter priors' negative log density times ``prior_scale`` is
        spread evenly over the n rows, so ``forward(x).sum()`` counts it
        ``prior_scale`` times. Training passes ``prior_scale = n_batch / n_total``
        so that the priors count once per pass over the data.
        """
        n = max(int(x.shape[0]), 1)
        return -self.log_prob(x) - prior_scale * self.prior_log_prob() / n

    # ----- parameters in natural units --------------------------------------------
    def mixture_probs(self) -> torch.Tensor:
        """Mixture weights, (K,), summing to 1."""
        return torch.softmax(self.weight, dim=0)

    @property
    def covariance(self) -> torch.Tensor:
        """Per-component diagonal variances, (K, dim)."""
        return torch.exp(-self.neglogvar).expand(self.n_mix_comp, self.dim)

    @property
    def stddev(self) -> torch.Tensor:
        """Per-component standard deviations, (K, dim)."""
        return torch.exp(-0.5 * self.neglogvar).expand(self.n_mix_comp, self.dim)

    # ----- sampling ----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n_sample: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_sample`` draws from the mixture, (n_sample, dim); ``generator`` seeds them (CPU)."""
        comp = torch.multinomial(self.mixture_probs().cpu(), n_sample, replacement=True, generator=generator)
        comp = comp.to(self.mean.device)
        noise = torch.randn(n_sample, self.dim, generator=generator).to(self.mean.device)
        return self.mean[comp] + self.stddev[comp] * noise

    @torch.no_grad()
    def component_sample(self, n_sample: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_sample`` draws from every component, (n_sample, K, dim); ``generator`` seeds them (CPU)."""
        noise = torch.randn(n_sample, self.n_mix_comp, self.dim, generator=generator).to(self.mean.device)
        return self.mean + self.stddev * noise

    @torch.no_grad()
    def sample_new_points(
        self, resample_type: str = "mean", n_new_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Candidate starting points for new representations.

        ``resample_type='mean'``: the K component means, (K, dim).
        ``resample_type='sample'``: ``n_new_samples`` draws from each component,
        (K * n_new_samples, dim), grouped by component, seeded by ``generator``.
        """
        if resample_type == "mean":
            return self.mean.detach().clone()
        if resample_type == "sample":
            s = self.component_sample(n_new_samples, generator=generator)  # (n, K, dim)
            return s.transpose(0, 1).reshape(self.n_mix_comp * n_new_samples, self.dim)
        raise ValueError(f"resample_type must be 'mean' or 'sample', got {resample_type!r}.")

    # ----- clustering --------------------------------------------------------------
    @torch.no_grad()
    def sample_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities (responsibilities) of each row of ``x`` (n, dim): (n, K)."""
        return torch.softmax(self.component_log_prob(x) + self.log_mixture_probs(), dim=-1)

    @torch.no_grad()
    def clustering(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of each row of ``x`` (n, dim): (n,) long."""
        return torch.argmax(self.component_log_prob(x) + self.log_mixture_probs(), dim=-1)


class GaussianMixtureSupervised(GaussianMixture):
    """Gaussian mixture whose components belong to classes (``Ncompperclass`` each).

    Component ``k`` belongs to class ``k // Ncompperclass``. For a sample with
    known class ``c`` the density is ``sum_{k in c} w_k N(x | k) / sum_{k in c} w_k``
    (a log-sum-exp over the class's components with weights renormalised
    within the class); a sample with label ``-1`` (unknown) uses the full
    mixture (semi-supervised).

    Labels are long tensors of shape (n,) with values in ``[-1, Nclass)``.

    Parameters
    ----------
    Nclass
        Number of classes.
    Ncompperclass
        Components per class; K = ``Nclass * Ncompperclass``.
    dim
        Dimension of the space.
    covariance_type, mean_init, sd_init
        As in :class:`GaussianMixture`.
    alpha
        Concentration of the symmetric Dirichlet prior on the weights (the
        ``weight_alpha`` of :class:`GaussianMixture`).
    generator
        As in :class:`GaussianMixture`.
    """

    def __init__(
        self,
        Nclass: int,
        Ncompperclass: int = 1,
        dim: int = 2,
        covariance_type: str = "isotropic",
        mean_init: tuple[float, float] = (5.0, 5.0),
        sd_init: tuple[float, float] = (0.5, 1.0),
        alpha: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        if int(Nclass) < 1 or int(Ncompperclass) < 1:
            raise ValueError(f"Nclass and Ncompperclass must be >= 1, got {Nclass}, {Ncompperclass}.")
        super().__init__(
            int(Nclass) * int(Ncompperclass), dim, covariance_type, mean_init, sd_init, weight_alpha=alpha,
            generator=generator,
        )
        self.Nclass = int(Nclass)
        self.Ncompperclass = int(Ncompperclass)
        self.register_buffer(
            "component_class", torch.arange(self.n_mix_comp) // self.Ncompperclass, persistent=False
        )

    def _class_mask(self, label: torch.Tensor) -> torch.Tensor:
        """(n, K) bool: components allowed for each sample (all for label -1)."""
        label = label.to(self.component_class.device).long()
        if ((label < -1) | (label >= self.Nclass)).any():
            raise ValueError(f"labels must lie in [-1, {self.Nclass}), got values outside.")
        return (self.component_class.unsqueeze(0) == label.unsqueeze(-1)) | (label < 0).unsqueeze(-1)

    def _log_label_weights(self, label: torch.Tensor) -> torch.Tensor:
        """(n, K) log weights renormalised within each sample's class (-inf outside it)."""
        logits = self.weight.expand(label.shape[0], -1)
        return torch.log_softmax(logits.masked_fill(~self._class_mask(label), float("-inf")), dim=-1)

    def label_mixture_probs(self, label: torch.Tensor) -> torch.Tensor:
        """Weights renormalised within each sample's class: (n, K); full weights for label -1."""
        return torch.exp(self._log_label_weights(label))

    def _log_joint(self, x: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """(n, K) log w_k|class + log N(x | k); -inf outside the class."""
        lp = self.component_log_prob(x)
        if label is None:
            return lp + self.log_mixture_probs()
        return lp + self._log_label_weights(label)

    def log_prob(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Log density of each row of ``x`` (n, dim) given its ``label`` (n,) (full mixture for label -1 or None): (n,)."""
        return self._log_density(x, self.log_mixture_probs() if label is None else self._log_label_weights(label))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, prior_scale: float = 1.0) -> torch.Tensor:
        """Negative log density of each row of ``x`` given its ``label``, incl. parameter priors: (n,).

        ``label`` (n,) long, -1 or None for unknown; ``prior_scale`` as in
        :meth:`GaussianMixture.forward`.
        """
        n = max(int(x.shape[0]), 1)
        return -self.log_prob(x, label) - prior_scale * self.prior_log_prob() / n

    @torch.no_grad()
    def sample_probs(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Responsibilities of the rows of ``x`` (n, dim): (n, K), restricted to the class's components when ``label`` is given."""
        return torch.softmax(self._log_joint(x, label), dim=-1)

    @torch.no_grad()
    def clustering(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Most probable component of each row of ``x`` (within its class when ``label`` is given): (n,)."""
        return torch.argmax(self._log_joint(x, label), dim=-1)

    @torch.no_grad()
    def supervised_sampling(
        self, label: torch.Tensor, sample_type: str = "random", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One point per label: (n, dim).

        A component is drawn from the label's class by its weights;
        ``sample_type='random'`` returns a draw from that component,
        ``sample_type='origin'`` its mean. ``generator`` seeds the draws (CPU).
        """
        probs = self.label_mixture_probs(label)
        comp = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(self.mean.device)
        if sample_type == "origin":
            return self.mean[comp].detach().clone()
        if sample_type == "random":
            noise = torch.randn(label.shape[0], self.dim, generator=generator).to(self.mean.device)
            return self.mean[comp] + self.stddev[comp] * noise
        raise ValueError(f"sample_type must be 'random' or 'origin', got {sample_type!r}.")
