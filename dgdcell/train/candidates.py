"""Candidate points for new cells and the likelihood of every (cell, candidate) pair.

Torch only; no AnnData. **Candidate starts** for :func:`~dgdcell.train.new_cells.fit_new_cells`: ``n_samples`` draws from every mixture component
(``init='sample'``) or every component's mean (``init='mean'``), combined
(Cartesian product) with every component mean of each covariate mixture.
Each cell is scored against every admissible candidate by the full
objective (NB negative log-likelihood + mixture prior + covariate prior
given the cell's class) in a vectorised, chunked pass. A cell with a known
covariate class only considers candidates at its own class's component(s);
an unknown class (-1) considers them all.
The same pass serves :func:`candidate_posterior_mean` (``predict_modality``'s empirical prior).

Scoring cost. For cell ``i`` with log library ``t_i`` and candidate ``c`` with
log fractions ``log p_c`` (decoded once per candidate), the NB log-likelihood is

    sum_j -r_j softplus(t_i + log p_cj - log r_j)                 (dense term D_c(t_i))
  + sum_{j: x_ij > 0} [lgamma(x_ij + r_j) - lgamma(r_j) - lgamma(x_ij + 1)]   (no c: once per cell)
  - sum_{j: x_ij > 0} x_ij softplus(log r_j - t_i - log p_cj)      (non-zeros only)

The dense term depends on the cell only through ``t_i``, so it is evaluated on a
grid of ``n_grid`` log-library values per candidate (with its exact derivative)
and interpolated per cell by cubic Hermite interpolation (error ~1e-4 nats for
typical data; with ``n_grid=None``, or at most ``2 * n_grid`` cells, it is
computed exactly per cell). Work therefore
scales with ``nnz x candidates + n_grid x candidates x features`` instead of
``cells x candidates x features``; no intermediate exceeds about
``max_elements`` floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..latent import GaussianMixture, GaussianMixtureSupervised
from ..module import DGDModule
from ..nn.likelihoods import NegativeBinomial, bernoulli_on_term, nb_count_constant, nb_count_term, nb_zero_term
from .batching import DeviceCounts
from .cells import CellSet

INIT_TYPES = ("mean", "sample")
#: elementwise work is done in pieces of about this many floats (1 MiB, cache-sized): 3x faster on CPU
#: than one big pass (measured), and never more than ``max_elements``
CACHE_ELEMENTS = 1 << 18


class RowView:
    """The counts of cells ``rows`` ((N,) long, repeats allowed) of a
    :class:`DeviceCounts`, with the same interface (``batch``, ``log_library``,
    ``log_factorial``, ``n_features``); nothing is copied but (N,) vectors."""

    def __init__(self, counts: DeviceCounts, rows: torch.Tensor):
        self.base, self.rows = counts, rows
        self.n_cells, self.n_features = int(rows.shape[0]), counts.n_features
        self.log_library = counts.log_library[rows]
        self.log_factorial = counts.log_factorial[rows]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base.batch(self.rows[idx])


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """Candidate starting points, C of them.

    Attributes
    ----------
    z
        (C, L) representations.
    component
        (C,) long: the main mixture component each candidate comes from.
    cov
        covariate key -> (C, 2) covariate representations (component means).
    cov_component
        covariate key -> (C,) long: the covariate mixture component of each candidate.
    """

    z: torch.Tensor
    component: torch.Tensor
    cov: dict[str, torch.Tensor] = field(default_factory=dict)
    cov_component: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.z.shape[0])

    def decoder_input(self, idx: torch.Tensor) -> torch.Tensor:
        """``[z, c_1, ...]`` of candidates ``idx`` ((C',) long): (C', L + 2 * n_cov)."""
        return torch.cat([self.z[idx]] + [c[idx] for c in self.cov.values()], dim=-1)


def candidate_starts(
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    init: str = "mean",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    reference: torch.Tensor | None = None,
    include_means: bool = True,
) -> Candidates:
    """Candidate starts: the main mixture's ``sample_new_points(init, n_samples)``
    ((K,) or (K * n_samples,) points; left out with ``include_means=False``),
    then the ``reference`` points ((R, L), e.g. fitted cells' representations;
    each counts as from its most probable component), times every component
    mean of each covariate mixture, as a Cartesian product (main candidate
    outermost)."""
    if init not in INIT_TYPES:
        raise ValueError(f"init must be one of {INIT_TYPES}, got {init!r}.")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    if include_means:
        z = gmm.sample_new_points(init, int(n_samples), generator=generator).detach()
    else:
        if reference is None or not reference.shape[0]:
            raise ValueError("include_means=False needs reference points.")
        z = gmm.mean.detach()[:0]
    comp = torch.arange(gmm.n_mix_comp, device=z.device).repeat_interleave(z.shape[0] // gmm.n_mix_comp)
    if reference is not None and reference.shape[0]:
        reference = reference.detach().to(z.device, z.dtype)
        z = torch.cat([z, reference])
        comp = torch.cat([comp, gmm.clustering(reference).to(comp.dtype)])
    sizes = [z.shape[0]] + [g.n_mix_comp for g in cov_gmms.values()]
    grids = torch.meshgrid(*[torch.arange(s, device=z.device) for s in sizes], indexing="ij")
    flat = [g.reshape(-1) for g in grids]
    keys = list(cov_gmms)
    return Candidates(
        z=z[flat[0]],
        component=comp[flat[0]],
        cov={k: cov_gmms[k].mean.detach()[flat[i + 1]] for i, k in enumerate(keys)},
        cov_component={k: flat[i + 1] for i, k in enumerate(keys)},
    )


# --------------------------------------------------------------------------- priors


def _prior_tables(
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cand: Candidates,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prior NLLs of the candidates by class.

    Returns ``main`` of shape (1, C) (no labels) or (n_label_classes + 1, C)
    (row ``label + 1``), and per covariate key a (n_classes + 1, C) table whose
    row ``code + 1`` is the covariate prior NLL given that class, +inf for
    candidates outside the class (row 0, class unknown: the full mixture).
    """
    if isinstance(gmm, GaussianMixtureSupervised) and labels is not None:
        rows = torch.arange(-1, gmm.Nclass, device=cand.z.device)
        main = torch.stack([-gmm.log_prob(cand.z, torch.full((cand.n,), int(v), device=cand.z.device)) for v in rows])
    else:
        main = -gmm.log_prob(cand.z).unsqueeze(0)
    tables = {}
    for key, cg in cov_gmms.items():
        comp_class = cg.component_class[cand.cov_component[key]]  # (C,)
        rows = []
        for v in range(-1, cg.Nclass):
            nll = -cg.log_prob(cand.cov[key], torch.full((cand.n,), v, device=cand.z.device))
            allowed = comp_class == v if v >= 0 else torch.ones_like(comp_class, dtype=torch.bool)
            rows.append(nll.masked_fill(~allowed, math.inf))
        tables[key] = torch.stack(rows)
    return main, tables


# --------------------------------------------------------------------------- NB scoring


def _log_library_grid(log_library: torch.Tensor, n_grid: int) -> tuple[torch.Tensor, float]:
    """``n_grid`` (>= 2) equally spaced points spanning ``log_library``, and their spacing."""
    lo, hi = float(log_library.min()), float(log_library.max())
    hi = max(hi, lo + 1e-3)
    grid = torch.linspace(lo, hi, max(int(n_grid), 2), dtype=log_library.dtype, device=log_library.device)
    return grid, (hi - lo) / (grid.shape[0] - 1)


def _dense_on_grid(
    log_frac: torch.Tensor, log_r: torch.Tensor, grid: torch.Tensor, max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense term ``D_c(t) = -sum_j r_j softplus(t + log p_cj - log r_j)`` and its
    derivative in ``t`` at every grid point: two (T, C') tensors, for log fractions
    (C', G) and log dispersions (G,)."""
    b = log_frac - log_r  # (C', G)
    r = torch.exp(log_r)
    step = max(1, min(int(max_elements), CACHE_ELEMENTS) // max(b.numel(), 1))
    values, slopes = [], []
    for t0 in range(0, grid.shape[0], step):
        arg = grid[t0 : t0 + step, None, None] + b  # (T', C', G)
        values.append(nb_zero_term(F.softplus(arg), r))
        slopes.append(-(torch.sigmoid(arg) @ r))
    return torch.cat(values), torch.cat(slopes)


def _hermite(values: torch.Tensor, slopes: torch.Tensor, start: float, h: float, t: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation of tabulated (T, C') values/slopes at grid
    ``start + k h`` to points ``t`` (B,): (B, C')."""
    n_grid = values.shape[0]
    u = ((t - start) / h).clamp(0.0, n_grid - 1.0)
    k = u.floor().long().clamp(max=n_grid - 2)
    s = (u - k).unsqueeze(-1)
    s2, s3 = s * s, s * s * s
    return (
        (2 * s3 - 3 * s2 + 1) * values[k]
        + (s3 - 2 * s2 + s) * h * slopes[k]
        + (-2 * s3 + 3 * s2) * values[k + 1]
        + (s3 - s2) * h * slopes[k + 1]
    )


def _log_prob_constant(counts: DeviceCounts, log_r: torch.Tensor, max_elements: int) -> torch.Tensor:
    """The candidate-independent part of each cell's NB log-likelihood,
    ``sum_{x>0} lgamma(x + r) - lgamma(r) - lgamma(x + 1)``: (n,)."""
    out = torch.empty(counts.n_cells, device=log_r.device)
    r = torch.exp(log_r)
    for start, stop in _row_chunks(counts.indptr.diff(), max_elements):
        idx = torch.arange(start, stop, device=log_r.device)
        flat, rows, vals = counts.batch(idx)
        v = nb_count_constant(vals, r, flat.remainder(counts.n_features)).to(out.dtype)
        out[start:stop] = torch.zeros(idx.shape[0], device=log_r.device).index_add_(0, rows, v)
    return out - counts.log_factorial


def _nonzero_term(
    counts: DeviceCounts, idx: torch.Tensor, log_frac: torch.Tensor, log_r: torch.Tensor
) -> torch.Tensor:
    """``sum_{x_ij>0} x_ij softplus(log r_j - log mu_icj)`` for rows ``idx`` (B,)
    against candidates with log fractions (C', G): (B, C')."""
    flat, rows, vals = counts.batch(idx)
    cols = flat.remainder(counts.n_features)
    log_mu = log_frac.index_select(1, cols).T + counts.log_library[idx][rows].unsqueeze(-1)  # (nnz, C')
    term = -nb_count_term(log_mu - log_r[cols].unsqueeze(-1), vals.unsqueeze(-1))
    return torch.zeros(idx.shape[0], log_frac.shape[0], device=log_frac.device).index_add_(0, rows, term)


def _bernoulli_nonzero_term(counts: DeviceCounts, idx: torch.Tensor, log_frac: torch.Tensor) -> torch.Tensor:
    """``sum_{x_ij>0} [log(1 - exp(-mu_icj)) + mu_icj]`` for rows ``idx`` (B,) against
    candidates with log fractions (C', G): (B, C') (see :func:`bernoulli_log_prob_sparse`)."""
    flat, rows, _ = counts.batch(idx)
    cols = flat.remainder(counts.n_features)
    log_mu = log_frac.index_select(1, cols).T + counts.log_library[idx][rows].unsqueeze(-1)  # (nnz, C')
    term = bernoulli_on_term(log_mu)
    return torch.zeros(idx.shape[0], log_frac.shape[0], device=log_frac.device).index_add_(0, rows, term)


def _row_chunks(cost: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed ``cost`` (n,) stays within ``budget``
    (a single row over budget forms its own range)."""
    csum = torch.cumsum(cost.detach().to("cpu", torch.int64), 0)
    n, chunks, start = csum.shape[0], [], 0
    while start < n:
        base = int(csum[start - 1]) if start else 0
        stop = int(torch.searchsorted(csum, base + int(budget), right=True))
        stop = min(max(stop, start + 1), n)
        chunks.append((start, stop))
        start = stop
    return chunks


def _class_groups(
    cells: CellSet, cand: Candidates, cov_gmms: dict[str, GaussianMixtureSupervised]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cells grouped by their covariate codes, each group with the candidates it
    may use: ``[(rows (n_g,) long, candidates (C_g,) long), ...]``. A known class
    admits only candidates at that class's components; -1 admits all. Loops
    over the distinct code combinations present, not over cells."""
    dev = cand.z.device
    keys = list(cov_gmms)
    if not keys:
        return [(torch.arange(cells.n, device=dev), torch.arange(cand.n, device=dev))]
    codes = torch.stack([cells.cov_codes[k].to(dev) for k in keys], dim=1)  # (n, n_cov)
    combos, inverse = torch.unique(codes, dim=0, return_inverse=True)
    groups = []
    for g, combo in enumerate(combos.tolist()):
        allowed = torch.ones(cand.n, dtype=torch.bool, device=dev)
        for key, code in zip(keys, combo):
            if code >= 0:
                allowed &= cov_gmms[key].component_class[cand.cov_component[key]] == code
        groups.append(((inverse == g).nonzero().squeeze(1), allowed.nonzero().squeeze(1)))
    return groups


def _iter_scores(
    module: DGDModule,
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
    mixture_prior: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows (B,), candidates (C',), scores (B, C'))``: the per-cell total
    NLL (NB + priors, nats) of those cells at those candidates. Covers every
    admissible (cell, candidate) pair exactly once (see :func:`_class_groups`);
    each cell's candidates come in increasing order. ``mixture_prior=False``
    leaves out the main mixture's term (the covariate priors stay)."""
    max_elements = max(int(max_elements), 1)
    decoder, gmm, cov_gmms = module.decoder, module.gmm, dict(module.cov_gmms)
    fidx = cells.feature_index or {}
    mods = list(cells.counts)
    nb_mods = [m for m in mods if isinstance(decoder.likelihoods[m], NegativeBinomial)]
    n_feat = sum(cells.counts[m].n_features for m in mods)
    log_r = {m: decoder.likelihoods[m].log_r if fidx.get(m) is None else decoder.likelihoods[m].log_r[fidx[m]]
             for m in nb_mods}
    main, tables = _prior_tables(gmm, cov_gmms, cand, cells.labels)
    main_row = torch.zeros(cells.n, dtype=torch.long, device=cand.z.device) if main.shape[0] == 1 else cells.labels + 1
    constant = _masked_sum(cells, {m: _log_prob_constant(cells.counts[m], log_r[m], max_elements) for m in nb_mods},
                           cand.z.device)
    exact = n_grid is None or cells.n <= 2 * int(n_grid)  # the grid costs about 2 n_grid exact rows
    grids = {} if exact else {m: _log_library_grid(cells.counts[m].log_library, int(n_grid)) for m in nb_mods}
    nnz = sum(cells.counts[m].indptr.diff() for m in mods)
    width = max(1, max_elements // max(n_feat, 1))  # candidates per chunk
    for rows_g, cands_g in _class_groups(cells, cand, cov_gmms):
        counts_g = {m: RowView(cells.counts[m], rows_g) for m in mods}
        for c0 in range(0, cands_g.shape[0], width):
            ci = cands_g[c0 : c0 + width]
            # candidates are decoded once for all cells, so continuous covariates sit at their mean (0) here;
            # the optimisation that follows uses each cell's own values
            log_frac = module.log_fractions(cand.z[ci], {k: v[ci] for k, v in cand.cov.items()}, mods,
                                            fidx or None)  # mod -> (C', G)
            tabs = {}
            for m in nb_mods if not exact else []:
                grid, h = grids[m]
                tabs[m] = _dense_on_grid(log_frac[m], log_r[m], grid, max_elements) + (float(grid[0]), h)
            row_cost = ci.shape[0] * (nnz[rows_g] + (n_feat if exact else 0))
            for r0, r1 in _row_chunks(row_cost, min(max_elements, CACHE_ELEMENTS)):
                local = torch.arange(r0, r1, device=cand.z.device)
                idx = rows_g[r0:r1]
                score = -constant[idx].unsqueeze(1).expand(-1, ci.shape[0])
                if mixture_prior:
                    score = score + main[main_row[idx].unsqueeze(1), ci]
                for key, table in tables.items():
                    score = score + table[(cells.cov_codes[key][idx] + 1).unsqueeze(1), ci]
                for m in mods:
                    t = counts_g[m].log_library[local]
                    if m not in log_r:  # Bernoulli: the dense term is -library (fractions sum to 1)
                        nll = torch.exp(t).unsqueeze(1) - _bernoulli_nonzero_term(counts_g[m], local, log_frac[m])
                    elif exact:
                        arg = t[:, None, None] + (log_frac[m] - log_r[m])  # (B, C', G)
                        nll = -nb_zero_term(F.softplus(arg), torch.exp(log_r[m])) + _nonzero_term(counts_g[m], local, log_frac[m], log_r[m])
                    else:
                        values, slopes, start, h = tabs[m]
                        nll = -_hermite(values, slopes, start, h, t) + _nonzero_term(counts_g[m], local, log_frac[m], log_r[m])
                    if m in cells.weight:
                        nll = nll * cells.weight[m][idx].unsqueeze(1)
                    score = score + nll
                yield idx, ci, score


def _masked_sum(cells: CellSet, per_modality: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Sum over modalities of per-cell (n,) values, each times the cell's modality weight."""
    total = torch.zeros(cells.n, device=device)
    for m, v in per_modality.items():
        total = total + (v * cells.weight[m] if m in cells.weight else v)
    return total


@torch.no_grad()
def candidate_scores(
    module: DGDModule,
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
    mixture_prior: bool = True,
) -> torch.Tensor:
    """Total NLL (nats) of every cell at every candidate: (n, C).

    Equals ``per_cell`` of :meth:`~dgdcell.module.DGDModule.loss`
    (``prior_scale=0``) with the cell placed at the candidate (continuous
    covariates at their mean, 0); candidates
    outside a cell's known covariate class are +inf (never scored).
    ``mixture_prior=False`` leaves out the main mixture's term.
    ``cells.rep`` is not read. Materialises (n, C): for many cells use
    :func:`top_candidates`.
    """
    out = torch.full((cells.n, cand.n), math.inf, device=cand.z.device)
    for idx, ci, s in _iter_scores(module, cells, cand, max_elements, n_grid, mixture_prior):
        out[idx.unsqueeze(1), ci] = s
    return out


@torch.no_grad()
def top_candidates(
    module: DGDModule,
    cells: CellSet,
    cand: Candidates,
    k: int = 1,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's ``k`` best candidates, best first: ``(index (n, k) long,
    score (n, k) nats)``; ties go to the lowest index. Memory stays within about
    ``max_elements`` floats plus (n, k). A cell with fewer than ``k`` admissible
    candidates repeats its best."""
    k = max(1, min(int(k), cand.n))
    best = torch.full((cells.n, k), math.inf, device=cand.z.device)
    best_idx = torch.full((cells.n, k), -1, dtype=torch.long, device=cand.z.device)
    for idx, ci, s in _iter_scores(module, cells, cand, max_elements, n_grid):
        vals = torch.cat([best[idx], s], dim=1)
        cols = torch.cat([best_idx[idx], ci.expand(idx.shape[0], -1)], dim=1)
        order = torch.sort(vals, dim=1, stable=True).indices[:, :k]
        best[idx] = vals.gather(1, order)
        best_idx[idx] = cols.gather(1, order)
    missing = best_idx < 0
    best_idx = torch.where(missing, best_idx[:, :1], best_idx)
    best = torch.where(missing, best[:, :1], best)
    return best_idx, best


def best_candidates(
    module: DGDModule,
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's best candidate: ``(index (n,) long, score (n,) nats)``; see :func:`top_candidates`."""
    idx, score = top_candidates(module, cells, cand, 1, max_elements, n_grid)
    return idx[:, 0], score[:, 0]


@torch.no_grad()
def candidate_posterior_mean(
    module: DGDModule,
    cells: CellSet,
    cand: Candidates,
    values: Callable[[torch.Tensor], torch.Tensor],
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
    temperature: float | Sequence[float] = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's posterior mean of ``values`` under an empirical prior: the
    candidates, equally likely a priori (the main mixture's density left out;
    covariate priors kept), weighted by the likelihood of the cell's counts
    there raised to ``1 / temperature``, ``w_ic ~ p(x_i | z_c, c_c)^(1/T)``
    (a tempered posterior; ``T = 1`` is Bayes' rule); ``values(ci)`` gives the
    (C', G) values at candidates ``ci``. ``temperature`` is one number or one
    per column of ``values`` (G,): each column is then the mean under its own
    weights, and the likelihood pass is shared by all of them. One pass over
    the (cell, candidate) pairs with a running log-sum-exp per distinct
    temperature, so memory stays within about ``max_elements`` floats plus
    (n, G). Returns ``(mean (n, G), effective sample size of the weights
    (n,))``; with several temperatures, the size at the one most columns use."""
    n = cells.n
    dev = cand.z.device
    per_column = not isinstance(temperature, (int, float))
    temps = torch.as_tensor(temperature if per_column else [temperature], dtype=torch.float64)
    distinct, column_group = torch.unique(temps, return_inverse=True)
    main = int(torch.bincount(column_group).argmax())  # the temperature most columns use (ties: the lowest)
    # one running log-sum-exp and accumulator per distinct temperature, over its columns (None: all of them)
    cols = [(column_group == g).nonzero().squeeze(1).to(dev) if per_column else None for g in range(len(distinct))]
    peak = torch.full((len(distinct), n), -math.inf, device=dev)
    total = torch.zeros(len(distinct), n, device=dev)
    total_sq = torch.zeros(len(distinct), n, device=dev)
    acc: list[torch.Tensor] = []
    last, last_values = None, None
    for idx, ci, score in _iter_scores(module, cells, cand, max_elements, n_grid, mixture_prior=False):
        if ci is not last:  # _iter_scores yields one candidate chunk for all its row chunks: decode it once
            last, last_values = ci, values(ci)
        if not acc:
            if per_column and temps.numel() != last_values.shape[1]:
                raise ValueError(f"{temps.numel()} temperatures for {last_values.shape[1]} columns of values")
            acc = [torch.zeros(n, last_values.shape[1] if c is None else c.numel(), device=dev,
                               dtype=last_values.dtype) for c in cols]
        for g, t in enumerate(distinct.tolist()):
            log_w = score / -t
            new_peak = torch.maximum(peak[g, idx], log_w.max(1).values)
            shrink = torch.exp(peak[g, idx] - new_peak)
            w = torch.exp(log_w - new_peak.unsqueeze(1))
            total[g, idx] = total[g, idx] * shrink + w.sum(1)
            total_sq[g, idx] = total_sq[g, idx] * shrink.square() + w.square().sum(1)
            acc[g][idx] = acc[g][idx] * shrink.unsqueeze(1) + w @ (last_values if cols[g] is None else
                                                                    last_values[:, cols[g]])
            peak[g, idx] = new_peak
    if not acc or not bool((total > 0).all()):
        raise ValueError("some cells have no admissible candidate (every candidate's likelihood is zero); "
                         "check that the cells' counts and covariate classes match the model.")
    means = [a / tot.unsqueeze(1) for a, tot in zip(acc, total)]
    if per_column:
        mean = torch.empty(n, temps.numel(), device=dev, dtype=means[0].dtype)
        for c, m in zip(cols, means):
            mean[:, c] = m
    else:
        mean = means[0]
    return mean, total[main].square() / total_sq[main]


@torch.no_grad()
def tempered_means(
    scores: torch.Tensor,
    values: Callable[[torch.Tensor], torch.Tensor],
    temperatures: Sequence[float],
    width: int = 1024,
) -> torch.Tensor:
    """The posterior means of ``values`` under the weights ``softmax(-scores / T)``
    for every ``T`` of ``temperatures``: ``(len(temperatures), n, G)``. ``scores``
    (n, C) are NLLs (+inf: a candidate left out for that cell, e.g. the cell's
    own point); ``values(ci)`` the (C', G) values at candidates ``ci``, decoded
    ``width`` candidates at a time."""
    temps = [float(t) for t in temperatures]
    lse = [torch.logsumexp(scores / -t, dim=1, keepdim=True) for t in temps]  # (n, 1) each
    out = None
    for c0 in range(0, scores.shape[1], width):
        ci = torch.arange(c0, min(c0 + width, scores.shape[1]), device=scores.device)
        vals = values(ci)
        part = torch.stack([torch.exp(scores[:, c0 : c0 + width] / -t - norm) @ vals for t, norm in zip(temps, lse)])
        out = part if out is None else out + part
    return out
