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

from . import native


def nb_log_prob(x: torch.Tensor, log_mu: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Element-wise negative-binomial log pmf (dense reference form).

    Parameters
    ----------
    x
        Counts (non-negative integers stored as floats), any shape.
    log_mu
        Log mean, broadcastable to ``x``.
    log_r
        Log dispersion, broadcastable to ``x``.

    Returns
    -------
    Tensor of ``x``'s broadcast shape with ``log P(x)`` in nats.
    """
    r = torch.exp(log_r)
    x64 = x.double()
    r64 = r.double()
    lgam = (torch.lgamma(x64 + r64) - torch.lgamma(r64) - torch.lgamma(x64 + 1.0)).to(log_mu.dtype)
    return lgam - r * F.softplus(log_mu - log_r) - x * F.softplus(log_r - log_mu)


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
    if _native_applies(log_mu, log_library, log_r, flat_index, rows, values, log_factorial):
        return _NBSparseNative.apply(log_mu, log_library, log_r, flat_index, rows, values, log_factorial)
    return _NBSparse.apply(log_mu, log_library, log_r, flat_index, rows, values, log_factorial)


def nb_log_prob_csr(
    log_mu: torch.Tensor,
    log_r: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    log_factorial: torch.Tensor,
    log_library: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`nb_log_prob_sparse` with the counts given as rows of a CSR matrix.

    Row ``i`` of ``log_mu`` (n, G) is scored against the non-zeros at
    positions ``start[i] .. start[i] + length[i] - 1`` ((n,) long each) of
    the matrix's column ``indices`` (nnz_all,) int and ``values``
    (nnz_all,) float, which may hold any number of other rows: a minibatch
    of cells is read in place, without slicing its non-zeros out first.
    ``log_factorial`` (n,) is required (a constant of the data);
    ``log_library`` as in :func:`nb_log_prob_sparse`.

    With the native CPU kernels (:mod:`dgdcell.nn.native`; float32 logits
    with library sizes, int32 indices) the kernels read the rows in place;
    otherwise the non-zeros are gathered into COO triplets and passed to
    :func:`nb_log_prob_sparse`. Both give the same values and gradients to
    float32 rounding. Raises ValueError when a span or a column is out of range.
    """
    if _csr_native_applies(log_mu, log_library, log_r, start, length, indices, values, log_factorial):
        return _NBCSRNative.apply(log_mu, log_library, log_r, start, length, indices, values, log_factorial)
    n, g = log_mu.shape
    total = int(length.sum())
    rows = torch.repeat_interleave(torch.arange(n, device=length.device), length, output_size=total)
    pos = row_positions(start, length, total)
    if total and (int(pos.min()) < 0 or int(pos.max()) >= indices.shape[0]):
        raise ValueError("nb_log_prob_csr: a row's span of non-zeros lies outside the CSR arrays.")
    cols = indices.index_select(0, pos).long()
    if total and (int(cols.min()) < 0 or int(cols.max()) >= g):
        raise ValueError(f"nb_log_prob_csr: a column index lies outside [0, {g}).")
    return nb_log_prob_sparse(log_mu, log_r, rows * g + cols, rows, values.index_select(0, pos), log_factorial,
                              log_library)


def row_positions(start: torch.Tensor, length: torch.Tensor, total: int) -> torch.Tensor:
    """Positions in a CSR matrix's arrays of the non-zeros of B rows with first
    positions ``start`` and counts ``length`` ((B,) long), row after row:
    (total,) long, ``total = length.sum()``."""
    shift = start - (torch.cumsum(length, 0) - length)
    return torch.repeat_interleave(shift, length, output_size=total).add_(torch.arange(total, device=start.device))


def csr_native_applies(log_mu: torch.Tensor, log_library: torch.Tensor | None, indices: torch.Tensor) -> bool:
    """Whether :func:`nb_log_prob_csr` reads the rows in place with the native
    kernels for logits ``log_mu``, ``log_library`` and CSR ``indices`` of
    these types and devices (float32 on the CPU, int32 indices)."""
    if log_library is None or log_mu.device.type != "cpu" or log_mu.dim() != 2:
        return False
    if log_mu.dtype != torch.float32 or log_library.dtype != torch.float32 or indices.dtype != torch.int32:
        return False
    return native.native_kernels() is not None


def _csr_native_applies(log_mu, log_library, log_r, start, length, indices, values, log_factorial) -> bool:
    if not csr_native_applies(log_mu, log_library, indices):
        return False
    return (log_r.dtype == values.dtype == log_factorial.dtype == torch.float32
            and start.dtype == length.dtype == torch.long and values.device.type == "cpu"
            and indices.device.type == "cpu")


class _NBCSRNative(torch.autograd.Function):
    """:func:`nb_log_prob_csr` through the native kernels (see
    :class:`_NBSparseNative`; the counts are read in place)."""

    @staticmethod
    def forward(ctx, x, log_library, log_r, start, length, indices, values, log_factorial):
        lib = native.native_kernels()
        x, log_library, log_r = x.contiguous(), log_library.contiguous(), log_r.contiguous()
        start, length, indices, values = start.contiguous(), length.contiguous(), indices.contiguous(), values.contiguous()
        done = native.nb_forward_csr(lib, x, log_library, log_r, start, length, indices, values,
                                     log_factorial.contiguous())
        if done is None:
            raise ValueError(
                f"nb_log_prob_csr: a row's span of non-zeros lies outside the CSR arrays, or a column outside [0, {x.shape[1]})."
            )
        out, lse = done
        ctx.save_for_backward(x, log_library, lse, log_r, start, length, indices, values)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, log_library, lse, log_r, start, length, indices, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_x, d_lib, d_r = native.nb_backward_csr(
            native.native_kernels(), x, log_library, lse, log_r, start, length, indices, values, grad.contiguous(),
            need[0], need[1], need[2], check_columns=False,  # the forward pass checked them
        )
        return d_x, d_lib, d_r, None, None, None, None, (-grad if need[7] else None)


def _native_applies(logits, log_library, log_r, flat_index, rows, values, log_factorial) -> bool:
    """Whether :class:`_NBSparseNative` takes these arguments: logits with
    library sizes, all float32 on the CPU, and the native kernels loaded."""
    if log_library is None or logits.device.type != "cpu" or logits.dim() != 2:
        return False
    floats = (logits, log_library, log_r, values, log_factorial)
    if any(t.dtype != torch.float32 for t in floats) or flat_index.dtype != torch.long or rows.dtype != torch.long:
        return False
    return native.native_kernels() is not None


class _NBSparseNative(torch.autograd.Function):
    """:class:`_NBSparse` with logits and library sizes, through the native
    CPU kernels of :mod:`dgdcell.nn.native` (the same values and gradients
    to float32 rounding). Saves only the logits and their (n,) row
    log-sum-exps; the backward recomputes what it needs row by row. Non-zeros
    that are not grouped by row (never the case for minibatches) take
    :class:`_NBSparse`'s path."""

    @staticmethod
    def forward(ctx, x, log_library, log_r, flat_index, rows, values, log_factorial):
        lib = native.native_kernels()
        x, log_library, log_r = x.contiguous(), log_library.contiguous(), log_r.contiguous()
        flat_index, rows, values = flat_index.contiguous(), rows.contiguous(), values.contiguous()
        done = None if lib is None else native.nb_forward(
            lib, x, log_library, log_r, rows, flat_index, values, log_factorial.contiguous()
        )
        ctx.fallback = done is None
        if ctx.fallback:
            return _NBSparse.forward(ctx, x, log_library, log_r, flat_index, rows, values, log_factorial)
        out, lse = done
        ctx.save_for_backward(x, log_library, lse, log_r, flat_index, rows, values)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.fallback:
            return _NBSparse.backward(ctx, grad)
        x, log_library, lse, log_r, flat_index, rows, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_x, d_lib, d_r = native.nb_backward(
            native.native_kernels(), x, log_library, lse, log_r, rows, flat_index, values, grad.contiguous(),
            need[0], need[1], need[2],
        )
        return d_x, d_lib, d_r, None, None, None, (-grad if need[6] else None)


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
        # r log(r / (r + mu)) for every entry, summed per cell with a mat-vec
        dense = -(sp @ r)
        cols = flat_index - rows * g
        a_nz = a.reshape(-1).index_select(0, flat_index)
        index = _count_index(values, cols) if _use_table(values) else None
        lgam = _count_terms(values, r.double(), cols, torch.log, torch.lgamma, index=index)
        nz = lgam.to(x.dtype).sub_(values * F.softplus(-a_nz))
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


def nb_log_prob_sparse_mu_terms(
    log_mu: torch.Tensor,
    log_r: torch.Tensor,
    flat_index: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """The terms of :func:`nb_log_prob_sparse` that depend on ``mu``: (n,) nats.

    ``sum_j r_j log(r_j / (r_j + mu_ij)) + sum_{x_ij>0} x_ij log(mu_ij / (r_j + mu_ij))``;
    adding the per-cell constant ``sum_{x_ij>0} lgamma(x_ij + r_j) - lgamma(r_j) - lgamma(x_ij + 1)``
    gives :func:`nb_log_prob_sparse`. For fitting representations against fixed
    dispersions, where that constant never changes (no lgamma per step).
    Arguments as in :func:`nb_log_prob_sparse`.
    """
    g = log_mu.shape[1]
    dense = -(F.softplus(log_mu - log_r) @ torch.exp(log_r))
    lm = log_mu.reshape(-1).index_select(0, flat_index)
    lr = log_r.index_select(0, flat_index.remainder(g))
    return dense.index_add(0, rows, -values * F.softplus(lr - lm))


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

    def log_prob_csr(
        self,
        log_mu: torch.Tensor,
        start: torch.Tensor,
        length: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        log_factorial: torch.Tensor,
        feature_index: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`log_prob_sparse` with the counts as rows of a CSR matrix
        (see :func:`nb_log_prob_csr`)."""
        log_r = self.log_r if feature_index is None else self.log_r[feature_index]
        return nb_log_prob_csr(log_mu, log_r, start, length, indices, values, log_factorial, log_library)


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
