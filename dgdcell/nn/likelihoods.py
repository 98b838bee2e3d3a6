"""Count likelihoods in log space.

The negative binomial is parametrised by its mean ``mu`` and dispersion
(inverse over-dispersion) ``r``: ``Var = mu + mu^2 / r``. It equals
``scipy.stats.nbinom(n=r, p=r / (r + mu))``.

log NB(x | mu, r) = lgamma(x + r) - lgamma(r) - lgamma(x + 1)
                    + r log(r / (r + mu)) + x log(mu / (r + mu))

For ``x = 0`` the lgamma terms cancel and only ``r log(r / (r + mu))`` remains.
The sparse form therefore evaluates that cheap term densely (cells x
features) and the lgamma terms only at the non-zero counts, so the lgamma
work scales with the number of non-zeros. ``log(r / (r + mu))`` is computed as
``-softplus(log mu - log r)``, exact from mu << r to mu >> r.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def nb_log_prob_sparse(
    log_mu: torch.Tensor,
    log_r: torch.Tensor,
    flat_index: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    log_factorial: torch.Tensor | None = None,
    log_library: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell negative-binomial log-likelihood from sparse counts.

    Parameters
    ----------
    log_mu
        (n, G) log expected counts of n cells over G features; with
        ``log_library``, the decoder's (n, G) logits instead, and the log
        means are ``log_softmax(logits) + log_library`` (computed inside, in
        fewer passes over (n, G) than doing it outside).
    log_r
        (G,) log dispersions.
    flat_index
        (nnz,) long: ``row * G + col`` of every non-zero count.
    rows
        (nnz,) long: the row (0..n-1) of every non-zero count.
    values
        (nnz,) float: the non-zero counts (integers).
    log_factorial
        (n,) optional precomputed ``sum_j lgamma(x_ij + 1)`` per cell (a
        constant of the data); computed from ``values`` when None.
    log_library
        (n,) optional log library sizes (see ``log_mu``).

    Returns
    -------
    (n,) ``sum_j log NB(x_ij | mu_ij, r_j)`` in nats; zero counts are implied.
    The dense work is one softplus over (n, G) (and one sigmoid in the
    backward pass); the lgamma terms are evaluated in float64 at the non-zeros
    only (see :func:`_count_terms`), so the result stays accurate for counts
    up to 1e6 and dispersions 1e-3..1e4. Not twice differentiable.
    """
    if log_factorial is None:
        log_factorial = torch.zeros(log_mu.shape[0], dtype=log_mu.dtype, device=log_mu.device).index_add_(
            0, rows, torch.lgamma(values + 1.0)
        )
    return _NBSparse.apply(log_mu, log_library, log_r, flat_index, rows, values, log_factorial)


class _NBSparse(torch.autograd.Function):
    """:func:`nb_log_prob_sparse` with a hand-written backward.

    With ``a = log mu - log r`` and upstream gradient ``g`` (n,), the
    derivatives are ``d/d log mu_ij = g_i (x_ij - (x_ij + r_j) sigmoid(a_ij))``
    (``-r_j sigmoid(a_ij)`` densely plus ``x_ij sigmoid(-a_ij)`` at the
    non-zeros) and ``d/d log r_j = -sum_i d/d log mu_ij - r_j sum_i g_i
    softplus(a_ij) + r_j sum_{x_ij>0} g_i (digamma(x_ij + r_j) - digamma(r_j))``.
    With logits and library sizes as input (``log mu = log_softmax(logits) +
    log s``), the logits' gradient is the log-softmax backward of ``d/d log mu``
    and ``d/d log s_i = sum_j d/d log mu_ij``.
    Autograd would materialise about twice as many (n, G) intermediates (a
    zero-filled scatter target for the non-zeros among them); here the dense
    work is one softplus and one sigmoid plus a few in-place passes, and the
    lgamma / digamma differences come from :func:`_count_terms`, whose table
    positions are computed once for both passes.
    """

    @staticmethod
    def forward(ctx, x, log_library, log_r, flat_index, rows, values, log_factorial):
        g = x.shape[1]
        r = torch.exp(log_r)
        lsm = None
        if log_library is None:
            a = x - log_r
        else:
            lsm = torch.log_softmax(x, dim=1)
            a = torch.add(lsm, log_library.unsqueeze(1)).sub_(log_r)
        sp = F.softplus(a)
        dense = nb_zero_term(sp, r)
        cols = flat_index - rows * g
        a_nz = a.reshape(-1).index_select(0, flat_index)
        index = _count_index(values, cols) if _use_table(values) else None
        nz = nb_count_constant(values, r, cols, index=index).to(x.dtype).add_(nb_count_term(a_nz, values))
        ctx.index = index
        ctx.save_for_backward(a, sp, r, flat_index, cols, rows, values, a_nz, lsm)
        return dense.index_add_(0, rows, nz).sub_(log_factorial)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, sp, r, flat_index, cols, rows, values, a_nz, lsm = ctx.saved_tensors
        g_nz = grad.index_select(0, rows)
        d_mu = torch.sigmoid(a).mul_(-r).mul_(grad.unsqueeze(1))
        d_mu.view(-1).index_add_(0, flat_index, g_nz * values * torch.sigmoid(-a_nz))
        d_r = None
        if ctx.needs_input_grad[2]:
            dig = _count_terms(values, r.double(), cols, torch.reciprocal, torch.digamma, index=ctx.index)
            d_r = (r * (grad @ sp)).add_(d_mu.sum(0)).neg_()
            d_r.index_add_(0, cols, g_nz.mul_(dig.to(grad.dtype)).mul_(r.index_select(0, cols)))
        d_lib = d_mu.sum(1) if lsm is not None and ctx.needs_input_grad[1] else None
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = d_mu if lsm is None else torch._log_softmax_backward_data(d_mu, lsm, 1, lsm.dtype)
        log_factorial_grad = -grad if ctx.needs_input_grad[6] else None
        return d_x, d_lib, d_r, None, None, None, log_factorial_grad


def nb_zero_term(softplus_a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``sum_j r_j log(r_j / (r_j + mu_j))`` over the last axis, given
    ``softplus(a)`` with ``a = log mu - log r`` (..., G) and dispersions ``r``
    (G,): the log-likelihood's term that every feature has, zero counts
    included (a mat-vec)."""
    return -(softplus_a @ r)


def nb_count_term(a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x log(mu / (r + mu))`` at non-zero counts ``values`` with
    ``a = log mu - log r`` (same shape, or broadcastable)."""
    return -values * F.softplus(-a)


def nb_count_constant(
    values: torch.Tensor, r: torch.Tensor, cols: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``lgamma(x + r_c) - lgamma(r_c)`` at non-zero counts ``values`` (nnz,)
    of features ``cols`` (nnz,) long, dispersions ``r`` (G,): (nnz,) float64.
    With ``- lgamma(x + 1)`` summed per cell (the data's log-factorial
    constant), the part of the log-likelihood that does not depend on ``mu``.
    ``index`` as in :func:`_count_terms`."""
    return _count_terms(values, r.double(), cols, torch.log, torch.lgamma, index=index)


#: on the CPU, counts up to this value take their lgamma / digamma differences
#: from a per-feature table (90-97% of the non-zeros of typical data)
TABLE_COUNTS = 16


def _use_table(values: torch.Tensor) -> bool:
    """Whether :func:`_count_terms` reads a table for these non-zeros: on
    the CPU (where lgamma / digamma are the costly part)."""
    return values.device.type == "cpu"


def _count_index(values: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the non-zeros read the (G, TABLE_COUNTS + 1) table of
    :func:`_count_terms`: their flat positions in it ((nnz,) long; counts
    above ``TABLE_COUNTS`` read its last column) and the positions of those
    larger counts ((n_big,) long)."""
    k = TABLE_COUNTS
    position = cols * (k + 1) + values.clamp(max=k).long()
    big = (values > k).nonzero().squeeze(1)
    return position, big


def _count_terms(
    values: torch.Tensor,
    r: torch.Tensor,
    cols: torch.Tensor,
    step,
    special,
    table: bool | None = None,
    index: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """``special(x + r_c) - special(r_c)`` at the non-zeros, (nnz,) float64,
    for ``special`` = lgamma (``step`` = log) or digamma (``step`` = reciprocal).

    For an integer count x both are sums over ``k < x`` of ``step(r + k)``
    (``lgamma(z + 1) = lgamma(z) + log z``, ``digamma(z + 1) = digamma(z) + 1 / z``).
    With ``table`` (default: on the CPU, where ``special`` is the costly part) a
    (G, TABLE_COUNTS + 1) table of those sums serves every count up to
    ``TABLE_COUNTS`` (a stored zero gives 0); only larger counts evaluate
    ``special`` (``special(x + r) - special(K + r)`` on top of the table's last
    column). Elsewhere (GPU) all non-zeros evaluate ``special`` directly, which
    needs no data-dependent shapes.

    ``values`` (nnz,) integer counts (as floats), ``r`` (G,) float64
    dispersions, ``cols`` (nnz,) long features; ``index`` optionally the
    table positions from :func:`_count_index` (computed here when None; a
    given ``index`` selects the table).
    """
    if table is None:
        table = index is not None or _use_table(values)
    if not table:
        x = values.double()
        return special(x + r.index_select(0, cols)).sub_(special(r).index_select(0, cols))
    k = TABLE_COUNTS
    position, big = _count_index(values, cols) if index is None else index
    steps = step(r.unsqueeze(1) + torch.arange(k, dtype=r.dtype, device=r.device))
    sums = F.pad(steps.cumsum_(1), (1, 0))  # (G, K + 1); column x holds the sum for count x (0 for 0)
    out = sums.view(-1).index_select(0, position)
    if big.numel():
        rb = r.index_select(0, cols.index_select(0, big))
        out.index_add_(0, big, special(values.index_select(0, big).double() + rb).sub_(special(rb + k)))
    return out


class NegativeBinomial(nn.Module):
    """Negative-binomial likelihood with one learned dispersion per feature.

    Parameters
    ----------
    n_features
        Number of features G.
    dispersion_init
        Initial dispersion r for every feature (the mean-variance trade-off;
        r -> inf is Poisson).
    """

    name = "nb"
    binary = False

    def __init__(self, n_features: int, dispersion_init: float = 2.0):
        super().__init__()
        self.log_r = nn.Parameter(torch.full((int(n_features),), math.log(dispersion_init)))

    @property
    def dispersion(self) -> torch.Tensor:
        """Dispersion r per feature, (G,)."""
        return torch.exp(self.log_r)

    def log_prob_sparse(
        self,
        log_mu: torch.Tensor,
        flat_index: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        log_factorial: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-cell log-likelihood (n,) for log means (n, G') of the features in
        ``feature_index`` (all G when None; ``flat_index`` addresses that subset);
        with ``log_library`` (n,), ``log_mu`` holds logits instead (see
        :func:`nb_log_prob_sparse`)."""
        log_r = self.log_r if feature_index is None else self.log_r[feature_index]
        return nb_log_prob_sparse(log_mu, log_r, flat_index, rows, values, log_factorial, log_library)


def bernoulli_log_prob_sparse(
    log_mu: torch.Tensor, flat_index: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Per-cell log-likelihood (n,) of binarised counts under ``P(x > 0) = 1 - exp(-mu)``.

    ``log P = sum_j -mu_ij + sum_{x_ij>0} [log(1 - exp(-mu_ij)) + mu_ij]``: the
    dense part is a plain sum, the rest runs over the non-zeros (given as in
    :func:`nb_log_prob_sparse`; their values are ignored: any count > 0 is 1).
    ``log(1 - exp(-mu))`` is evaluated as ``log(-expm1(-mu))``, and as
    ``log mu - mu / 2`` for ``mu < 1e-4`` where ``expm1`` underflows.
    """
    dense = -torch.exp(log_mu).sum(-1)
    return dense.index_add(0, rows, bernoulli_on_term(log_mu.reshape(-1).index_select(0, flat_index)))


def bernoulli_on_term(log_mu: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-mu)) + mu`` element-wise for log means ``log_mu`` (any shape):
    what a feature that is on adds to :func:`bernoulli_log_prob_sparse` beyond
    the dense ``-mu``."""
    mu = torch.exp(log_mu)
    log_p1 = torch.where(mu < 1e-4, log_mu - 0.5 * mu, torch.log(-torch.expm1(-mu.clamp_min(1e-4))))
    return log_p1 + mu


class Bernoulli(nn.Module):
    """Bernoulli likelihood for binarised features (e.g. ATAC peaks): a feature is
    "on" with probability ``1 - exp(-mu)``, ``mu = library * p`` as for counts
    (the probability that a Poisson count with that mean is non-zero). The
    library size is the number of features on. No parameters.

    Parameters
    ----------
    n_features
        Number of features G (kept for the common interface).
    dispersion_init
        Ignored (common interface).
    """

    name = "bernoulli"
    binary = True

    def __init__(self, n_features: int, dispersion_init: float = 2.0):
        super().__init__()
        self.n_features = int(n_features)

    def log_prob_sparse(
        self,
        log_mu: torch.Tensor,
        flat_index: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        log_factorial: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-cell log-likelihood (n,); arguments as :meth:`NegativeBinomial.log_prob_sparse`
        (``values``, ``log_factorial`` and ``feature_index`` are not needed)."""
        if log_library is not None:  # log_mu holds logits
            log_mu = torch.log_softmax(log_mu, dim=-1) + log_library.unsqueeze(-1)
        return bernoulli_log_prob_sparse(log_mu, flat_index, rows)


#: likelihood name -> module class; each has ``log_prob_sparse`` and ``binary``
#: (True: counts are binarised before fitting)
LIKELIHOODS = {"nb": NegativeBinomial, "bernoulli": Bernoulli}
