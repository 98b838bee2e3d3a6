"""Gaussian-mixture priors over representations (the classic multiDGD latent API).

Shapes: ``x`` is (n, dim); component quantities are (K, dim); per-sample
outputs are (n,); per-sample-per-component outputs are (n, K). All densities
are natural-log densities in the representation space.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import native
from .priors import DirichletPrior, GaussianPrior, Softball, parameter_log_prob

COVARIANCE_TYPES = ("fixed", "isotropic", "diagonal")


class _MixtureLogDensity(torch.autograd.Function):
    """``logsumexp_k(log_w_k + log N(x | m_k, diag(exp(-nlv_k))))`` per row, with
    a hand-written backward (about half the tensor operations of autograd's).

    Inputs: ``x`` (n, d), ``mean`` (K, d), ``neglogvar`` (K, 1) or (K, d),
    ``log_w`` (K,) or (n, K) (``-inf`` excludes a component for that row), and
    the constant ``-d/2 log(2 pi)``. With responsibilities ``r_ik`` and upstream
    gradient ``g_i``, ``w_ik = g_i r_ik`` and ``t_ikl = w_ik P_kl (x_il - m_kl)``:
    ``d/dx = -sum_k t``, ``d/dm = sum_i t``, ``d/dlog_w = w`` (summed over rows
    for (K,) weights), ``d/dnlv_kl = sum_i w_ik (1 - (x_il - m_kl)^2 P_kl) / 2``
    (summed over l for one variance per component). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, mean, neglogvar, log_w, pi_term):
        d = x.shape[-1]
        shared = neglogvar.shape[-1] == 1
        diff = x.unsqueeze(-2) - mean  # (n, K, d)
        wdiff = diff * torch.exp(neglogvar)  # precision-weighted
        maha = torch.linalg.vecdot(diff, wdiff)  # (n, K)
        half_logdet = 0.5 * neglogvar.sum(-1) * (d if shared else 1)  # (K,)
        lp = maha.mul(-0.5).add_(log_w + (half_logdet + pi_term))
        out = torch.logsumexp(lp, dim=-1)
        resp = lp.sub_(out.unsqueeze(-1)).exp_()
        ctx.shared, ctx.d, ctx.per_row = shared, d, log_w.dim() == 2
        ctx.save_for_backward(diff, wdiff, resp, maha if shared else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, wdiff, resp, maha = ctx.saved_tensors
        w = resp * grad.unsqueeze(-1)  # (n, K)
        t = wdiff * w.unsqueeze(-1)  # (n, K, d)
        need = ctx.needs_input_grad
        d_x = -t.sum(1) if need[0] else None
        d_mean = t.sum(0) if need[1] else None
        d_nlv = None
        if need[2]:
            nk = w.sum(0)
            if ctx.shared:
                d_nlv = (0.5 * ctx.d * nk - 0.5 * (w * maha).sum(0)).unsqueeze(-1)
            else:
                d_nlv = 0.5 * nk.unsqueeze(-1) - 0.5 * (t * diff).sum(0)
        d_w = (w if ctx.per_row else w.sum(0)) if need[3] else None
        return d_x, d_mean, d_nlv, d_w, None


def _native_lib(*tensors: torch.Tensor):
    """The native kernels when they take these tensors (float32 on the CPU) and pass their check, else None."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    return native.checked_kernels("mixture")


def _prior_constants(gmm: "GaussianMixture") -> tuple[float, ...]:
    """The parameter priors' constants in the order of :func:`dgdcell.nn.native.parameter_prior`."""
    ball, dirichlet, gauss = gmm.mean_prior, gmm.weight_prior, gmm.neglogvar_prior
    return (ball.radius, ball.sharpness, ball._log_norm, dirichlet.alpha, dirichlet._log_norm,
            gauss.mean, gauss.stddev, gauss._log_norm)


class _ParameterLogProbNative(torch.autograd.Function):
    """:func:`~dgdcell.latent.priors.parameter_log_prob` through the native
    kernels: value and gradients in one call forward, the backward scales them."""

    @staticmethod
    def forward(ctx, mean, weight, neglogvar, constants):
        lib = native.checked_kernels("mixture")
        nlv = None if neglogvar is None else neglogvar.contiguous()
        value, grads = native.parameter_prior(lib, mean.contiguous(), weight.contiguous(), nlv, constants,
                                              ctx.needs_input_grad[:3])
        ctx.grads = grads
        return torch.tensor(value, dtype=mean.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (*(None if g is None else g * grad for g in ctx.grads), None)


class _MixtureNative(torch.autograd.Function):
    """``sign * logsumexp_k(log_w_k + log N(x_i | k)) - prior_scale * log p(parameters) / n``
    per row (n,) in one native call forward and one backward
    (``dgdcell/latent/mixture_kernels.c``). ``mode`` says what ``log_w`` is:
    (K,) log weights, (n, K) log weights per row, or (K,) weight logits. With
    ``prior_scale`` not 0 (weight logits only) the mixture ``gmm``'s parameter
    priors are fused in: :meth:`GaussianMixture.forward` is ``sign = -1``."""

    @staticmethod
    def forward(ctx, x, mean, neglogvar, log_w, mode, pi_term, sign, prior_scale, gmm):
        lib = native.checked_kernels("mixture")
        x, mean, neglogvar, log_w = x.contiguous(), mean.contiguous(), neglogvar.contiguous(), log_w.contiguous()
        n = max(int(x.shape[0]), 1)
        add, prior_grads = 0.0, (None, None, None)
        if prior_scale != 0.0:
            nlv = neglogvar if gmm.covariance_type != "fixed" else None
            need = ctx.needs_input_grad
            value, prior_grads = native.parameter_prior(lib, mean, log_w, nlv, _prior_constants(gmm),
                                                        (need[1], need[3], need[2]))
            add = -prior_scale * value / n
        out, resp = native.mixture_forward(lib, x, mean, neglogvar, log_w, mode, pi_term, sign=sign, add=add)
        ctx.mode, ctx.sign, ctx.prior_coef, ctx.prior_grads = mode, sign, -prior_scale / n, prior_grads
        ctx.save_for_backward(x, mean, neglogvar, log_w, resp)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, mean, neglogvar, log_w, resp = ctx.saved_tensors
        grads = native.mixture_backward(
            native.checked_kernels("mixture"), x, mean, neglogvar, log_w, ctx.mode, resp, grad.contiguous(),
            ctx.sign, ctx.needs_input_grad[:4], ctx.prior_coef, ctx.prior_grads,
        )
        return (*grads, None, None, None, None, None)


def _check_native(lib) -> str | None:
    """Compare the native mixture kernels with the PyTorch implementation
    (values and gradients of every log-weight mode, diagonal and shared
    variances, the parameter priors and the fused forward); returns what
    disagrees, or None."""
    gen = torch.Generator().manual_seed(0)
    failures = []

    def compare(name, ours, theirs):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if (a is None) != (b is None):
                failures.append(f"{name} output {i} missing")
                continue
            if a is None:
                continue
            scale = b.abs().max().clamp_min(1.0)
            err = float((a - b).abs().max() / scale)
            if not err <= native.CHECK_TOLERANCE:
                failures.append(f"{name} output {i} differs by {err:.2e} relative")

    def run(fn, inputs, weight):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return (out.detach(), *torch.autograd.grad((out * weight).sum(), leaves))

    for cov in ("diagonal", "isotropic"):
        gmm = GaussianMixture(5, 3, covariance_type=cov)
        with torch.no_grad():
            gmm.mean.copy_(torch.randn(5, 3, generator=gen) * 2)
            gmm.neglogvar.copy_(torch.randn(gmm.neglogvar.shape, generator=gen))
            gmm.weight.copy_(torch.randn(5, generator=gen))
        x = torch.randn(9, 3, generator=gen) * 2
        g = torch.rand(9, generator=gen) + 0.5
        mask = torch.zeros(9, 5).masked_fill_(torch.rand(9, 5, generator=gen) < 0.4, float("-inf"))
        mask[:, 0] = 0.0
        row_w = torch.randn(9, 5, generator=gen) + mask
        params = (x, gmm.mean, gmm.neglogvar)
        pi = gmm._pi_term
        compare(f"{cov} shared log weights",
                run(lambda *t: _MixtureNative.apply(*t, native.SHARED_LOG_WEIGHTS, pi, 1.0, 0.0, None),
                    (*params, gmm.weight), g),
                run(lambda *t: _MixtureLogDensity.apply(*t, pi), (*params, gmm.weight), g))
        compare(f"{cov} log weights per row",
                run(lambda *t: _MixtureNative.apply(*t, native.ROW_LOG_WEIGHTS, pi, 1.0, 0.0, None), (*params, row_w), g),
                run(lambda *t: _MixtureLogDensity.apply(*t, pi), (*params, row_w), g))
        consts = _prior_constants(gmm)
        compare(f"{cov} parameter priors",
                run(lambda m, w, v: _ParameterLogProbNative.apply(m, w, v, consts), (gmm.mean, gmm.weight, gmm.neglogvar), 1.0),
                run(lambda m, w, v: parameter_log_prob(m, w, v, gmm.mean_prior, gmm.weight_prior, gmm.neglogvar_prior),
                    (gmm.mean, gmm.weight, gmm.neglogvar), 1.0))

        def reference(x, m, v, w):
            lp = _MixtureLogDensity.apply(x, m, v, torch.log_softmax(w, 0), pi)
            return -lp - 0.3 * parameter_log_prob(m, w, v, gmm.mean_prior, gmm.weight_prior, gmm.neglogvar_prior) / 9
        compare(f"{cov} fused", run(lambda *t: _MixtureNative.apply(*t, native.WEIGHT_LOGITS, pi, -1.0, 0.3, gmm),
                                    (*params, gmm.weight), g),
                run(reference, (*params, gmm.weight), g))
    return "; ".join(failures) or None


native.register_check("mixture", _check_native)


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
        self.mean = nn.Parameter(self.mean_prior.sample(self.n_mix_comp))
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
        weights (K,) or per row (n, K) (``-inf`` excludes a component); one
        fused operation with a hand-written backward."""
        if _native_lib(x, self.mean, self.neglogvar, log_w) is not None:
            mode = native.ROW_LOG_WEIGHTS if log_w.dim() == 2 else native.SHARED_LOG_WEIGHTS
            return _MixtureNative.apply(x, self.mean, self.neglogvar, log_w, mode, self._pi_term, 1.0, 0.0, None)
        return _MixtureLogDensity.apply(x, self.mean, self.neglogvar, log_w, self._pi_term)

    def component_log_prob_of(self, x: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
        """Log density of each row of ``x`` (n, dim) under its own component
        ``component`` (n,) long (weights not included): (n,); the entries of
        :meth:`component_log_prob` picked per row."""
        mask = torch.full((x.shape[0], self.n_mix_comp), float("-inf"), dtype=x.dtype, device=x.device)
        return self._log_density(x, mask.scatter_(1, component.view(-1, 1).to(x.device), 0.0))

    def prior_log_prob(self) -> torch.Tensor:
        """Log density of the parameters under their priors (scalar)."""
        nlv = self.neglogvar if self.covariance_type != "fixed" else None
        if _native_lib(self.mean, self.weight, self.neglogvar) is not None:
            return _ParameterLogProbNative.apply(self.mean, self.weight, nlv, _prior_constants(self))
        return parameter_log_prob(self.mean, self.weight, nlv, self.mean_prior, self.weight_prior, self.neglogvar_prior)

    def forward(self, x: torch.Tensor, prior_scale: float = 1.0) -> torch.Tensor:
        """Negative log density per sample incl. parameter priors: (n,).

        The parameter priors' negative log density times ``prior_scale`` is
        spread evenly over the n rows, so ``forward(x).sum()`` counts it
        ``prior_scale`` times. Training passes ``prior_scale = n_batch / n_total``
        so that the priors count once per pass over the data.
        """
        if _native_lib(x, self.mean, self.neglogvar, self.weight) is not None:
            return _MixtureNative.apply(x, self.mean, self.neglogvar, self.weight, native.WEIGHT_LOGITS, self._pi_term,
                                        -1.0, float(prior_scale), self)
        n = max(int(x.shape[0]), 1)
        return -self.log_prob(x) - prior_scale * self.prior_log_prob() / n

    # ----- parameters in natural units --------------------------------------------
    def mixture_probs(self) -> torch.Tensor:
        """Mixture weights, (K,), summing to 1."""
        return torch.softmax(self.weight, dim=0)

    def covariance(self) -> torch.Tensor:
        """Per-component diagonal variances, (K, dim)."""
        return torch.exp(-self.neglogvar).expand(self.n_mix_comp, self.dim)

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
        return self.mean[comp] + self.stddev()[comp] * noise

    @torch.no_grad()
    def component_sample(self, n_sample: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_sample`` draws from every component, (n_sample, K, dim); ``generator`` seeds them (CPU)."""
        noise = torch.randn(n_sample, self.n_mix_comp, self.dim, generator=generator).to(self.mean.device)
        return self.mean + self.stddev() * noise

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
    ):
        if int(Nclass) < 1 or int(Ncompperclass) < 1:
            raise ValueError(f"Nclass and Ncompperclass must be >= 1, got {Nclass}, {Ncompperclass}.")
        super().__init__(
            int(Nclass) * int(Ncompperclass), dim, covariance_type, mean_init, sd_init, weight_alpha=alpha
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
            return self.mean[comp] + self.stddev()[comp] * noise
        raise ValueError(f"sample_type must be 'random' or 'origin', got {sample_type!r}.")
