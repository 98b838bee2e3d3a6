"""Per-cell Normal posteriors: their Laplace start, their fit, and importance-sampled evidence.

Torch only (no AnnData). The objective and the per-sample terms come from
:class:`~dgdcell.module.DGDModule` (``loss`` and ``sample_terms``); this file
only drives them:

- :func:`laplace_log_std`: a diagonal Laplace approximation around each cell's
  point, ``std_id = H_idd^(-1/2)`` with ``H_idd`` the curvature of the cell's
  loss (reconstruction + prior) along coordinate ``d``, from central
  differences of its autograd gradient;
- :func:`importance_log_weights`: ``log p(x, z_s) - log q(z_s)`` at S draws from
  each cell's Normal (the proposal), under the module's mixture or others;
- :func:`evidence_summary`: the importance-sampled ``log p(x)`` (a
  log-mean-exp, IWAE-style), the ELBO, and their standard errors;
- :func:`fit_posteriors`: Adam on the means and log stds of cells against a
  frozen module (new cells under ``posterior='normal'``);
- :func:`fit_mixture`: a fresh K-component mixture fitted by k-means + EM (best of several starts).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .._checks import check_int
from ..latent import GaussianMixture, NormalRepresentation
from ..module import DGDModule
from .cells import CellSet
from .initialisation import init_mixture
from .loop import (
    REPRESENTATION_BATCH_ELEMENTS,
    adam,
    noise_generator,
    representation_epoch,
    representation_groups,
)
from .new_cells import frozen

#: half-width of the central differences of :func:`laplace_log_std`
LAPLACE_STEP = 1e-2
#: k-means starts of :func:`fit_mixture` (the mixture with the highest log density of the points is kept)
MIXTURE_RESTARTS = 5


def _n_values(cells: CellSet) -> int:
    return max(sum(c.n_features for c in cells.counts.values()), 1)


def _chunks(n: int, size: int, device) -> list[torch.Tensor]:
    return list(torch.arange(n, device=device).split(max(int(size), 1)))


def with_posterior(cells: CellSet, mean: torch.Tensor, log_std: torch.Tensor) -> CellSet:
    """``cells`` with Normal posteriors of the given means and log stds (n, L) (on their device)."""
    rep = NormalRepresentation(mean.shape[1], mean.shape[0], mean.detach().cpu(), log_std.detach().cpu())
    return replace(cells, rep=rep.to(cells.rep.z.device))


@torch.no_grad()
def laplace_log_std(module: DGDModule, cells: CellSet, step: float = LAPLACE_STEP,
                    max_elements: int = REPRESENTATION_BATCH_ELEMENTS) -> torch.Tensor:
    """(n, L) log stds of a diagonal Laplace approximation around each cell's point (``cells.rep.z``).

    The curvature ``H_id = d^2 loss_i / dz_id^2`` of cell ``i``'s loss
    (reconstruction + prior, covariate representations held at their points)
    is the central difference ``(g_id(z_i + h e_d) - g_id(z_i - h e_d)) / 2h``
    of its autograd gradient (exact for a quadratic loss, whatever ``h``),
    with all ``2 L`` shifted points of a chunk of cells in one pass. It is
    floored at ``1 / max_k var_k`` of the mixture (a cell is never given a
    wider proposal than the widest component) and ``std = H^(-1/2)``.
    """
    z_all = cells.rep.z.detach()
    n, dim = z_all.shape
    floor = float(module.gmm.neglogvar.detach().min().exp())  # 1 / the widest component's variance
    out = torch.empty_like(z_all)
    eye = torch.eye(dim, device=z_all.device, dtype=z_all.dtype) * float(step)
    shifts = torch.cat([eye, -eye])  # (2L, L): +h e_d then -h e_d
    size = max(1, int(max_elements) // (2 * dim * _n_values(cells)))
    with frozen(module), torch.enable_grad():
        for idx in _chunks(n, size, z_all.device):
            z = z_all[idx]
            b = z.shape[0]
            batch = cells.minibatch(idx, z=z, cov={k: r.z.detach()[idx] for k, r in cells.cov_reps.items()})
            points = (shifts.unsqueeze(1) + z.unsqueeze(0)).reshape(2 * dim * b, dim).requires_grad_(True)
            loss = module.loss(module.expand(batch, points)).per_cell.sum()
            (grad,) = torch.autograd.grad(loss, points)
            grad = grad.view(2, dim, b, dim)
            diag = torch.diagonal(grad[0] - grad[1], dim1=0, dim2=2) / (2 * float(step))  # (B, L)
            out[idx] = -0.5 * diag.clamp_min(floor).log()
    return out


@torch.no_grad()
def importance_log_weights(
    module: DGDModule,
    cells: CellSet,
    n_samples: int,
    generator: torch.Generator | None = None,
    gmms: list[GaussianMixture] | None = None,
    max_elements: int = REPRESENTATION_BATCH_ELEMENTS,
) -> torch.Tensor:
    """(P, S, n) importance log weights ``log p(x_i, z_is) - log q_i(z_is)`` of
    ``n_samples`` draws from each cell's Normal posterior (``cells`` must be
    variational), under each prior of ``gmms`` (default: the module's mixture
    alone, P = 1). The same draws serve every prior (common random numbers),
    so differences between priors are sharp. ``generator`` (CPU) seeds them."""
    if not cells.variational:
        raise ValueError("importance_log_weights needs Normal posteriors (see with_posterior).")
    gmms = [module.gmm] if gmms is None else list(gmms)
    device = cells.rep.z.device
    gen = noise_generator(generator, device)
    n, dim = cells.rep.z.shape
    s_total = int(n_samples)
    s_chunk = max(1, min(s_total, int(max_elements) // _n_values(cells)))
    size = max(1, int(max_elements) // (s_chunk * _n_values(cells)))
    out = torch.empty(len(gmms), s_total, n, device=device)
    with frozen(module):
        for idx in _chunks(n, size, device):
            batch = cells.minibatch(idx)
            for s0 in range(0, s_total, s_chunk):
                s1 = min(s_total, s0 + s_chunk)
                noise = torch.randn((s1 - s0, idx.shape[0], dim), generator=gen, device=device)
                terms = module.sample_terms(batch, noise)
                base = -terms.reconstruction_total - terms.log_q
                for p, g in enumerate(gmms):
                    prior = terms.prior if g is module.gmm else module.prior_nll(terms.expanded, gmm=g).view_as(base)
                    out[p, s0:s1, idx] = base - prior
    return out


def evidence_summary(log_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-cell estimates from (..., S, n) importance log weights.

    ``log_evidence``: ``log (1/S sum_s exp w_s)`` (the importance-sampled
    ``log p(x)``; a lower bound in expectation that rises to ``log p(x)`` as
    S grows, and is >= ``elbo`` for every draw by Jensen's inequality);
    ``log_evidence_se``: its delta-method standard error
    ``sd(exp w) / (sqrt(S) mean(exp w))``; ``elbo``: ``mean_s w_s``;
    ``elbo_se``: ``sd(w) / sqrt(S)``."""
    s = log_w.shape[-2]
    top = log_w.max(dim=-2, keepdim=True).values
    ratio = (log_w - top).exp()
    mean_ratio = ratio.mean(-2)
    log_evidence = top.squeeze(-2) + mean_ratio.log()
    corr = 1 if s > 1 else 0
    se = ratio.std(-2, correction=corr) / (math.sqrt(s) * mean_ratio)
    return {
        "log_evidence": log_evidence,
        "log_evidence_se": se,
        "elbo": log_w.mean(-2),
        "elbo_se": log_w.std(-2, correction=corr) / math.sqrt(s),
    }


def fit_posteriors(
    module: DGDModule,
    cells: CellSet,
    max_epochs: int,
    lr: float,
    betas: tuple[float, float],
    batch_size: int,
    n_samples: int = 1,
    patience: int = 5,
    generator: torch.Generator | None = None,
    lr_decay: float = 0.97,
) -> dict[str, list]:
    """Fit ``cells``' Normal posteriors (means, log stds and covariate points)
    to the negative ELBO against the frozen module: one Adam step per epoch,
    the ``t``-th of size ``lr * lr_decay ** t`` (Adam's steps do not shrink as
    the gradient does, and a constant step larger than a well-measured cell's
    posterior std would leave its mean jittering by more than that std),
    stopping after ``patience`` epochs without improvement. The last state is
    kept (in ``cells``): the steps decay, so it is the settled one, while the
    "best" of a Monte Carlo ELBO estimate would be picked by its noise. Returns the history (``epoch``, ``loss``,
    ``reconstruction``, ``rate`` per cell)."""
    opt = adam(representation_groups(cells, lr), lr, betas)
    base_lr = [group["lr"] for group in opt.param_groups]
    gen = noise_generator(generator, cells.rep.z.device)
    history: dict[str, list] = {"epoch": [], "loss": [], "reconstruction": [], "rate": []}
    best, stale = math.inf, 0
    for epoch in range(int(max_epochs)):
        stats: dict = {}
        loss, recon = representation_epoch(module, cells, opt, batch_size, None, step=False, n_samples=n_samples,
                                           noise_generator=gen, stats=stats)
        for key, value in zip(("epoch", "loss", "reconstruction", "rate"), (epoch + 1, loss, recon, stats["rate"])):
            history[key].append(value)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the new cells' ELBO became non-finite at epoch {epoch + 1}; try a lower lr.")
        if loss < best - 1e-4 * abs(best if math.isfinite(best) else loss):
            best, stale = loss, 0
        else:
            stale += 1
            if stale >= int(patience):
                break
        for group, lr0 in zip(opt.param_groups, base_lr):
            group["lr"] = lr0 * float(lr_decay) ** epoch
        opt.step()
    return history


@torch.no_grad()
def fit_mixture(template: GaussianMixture, z: torch.Tensor, k: int, generator: torch.Generator | None = None,
                n_init: int | None = None) -> GaussianMixture:
    """A copy of ``template`` (its covariance type and parameter priors) with
    ``k`` components fitted to points ``z`` (n, L) by k-means + EM, from
    ``n_init`` (default :data:`MIXTURE_RESTARTS`) k-means starts drawn from
    ``generator``: the fit with the highest mean log density of ``z``. One
    start can leave a local optimum (a small cluster merged, a large one
    split) that a comparison of K then mistakes for the effect of K."""
    n_init = MIXTURE_RESTARTS if n_init is None else check_int("n_init", n_init, 1)
    best, best_ll = None, -math.inf
    for _ in range(n_init):
        g = GaussianMixture(int(k), template.dim, template.covariance_type, mean_init=template.mean_init,
                            sd_init=template.sd_init, weight_alpha=template.weight_alpha,
                            generator=torch.Generator().manual_seed(0)).to(z.device)
        if template.covariance_type == "fixed":
            g.neglogvar.copy_(template.neglogvar[:1].expand_as(g.neglogvar))
        init_mixture(g, z, generator=generator)
        ll = float(g.log_prob(z).mean())
        if best is None or ll > best_ll:
            best, best_ll = g, ll
    return best
