"""Fitting representations of new cells against a frozen decoder and frozen mixtures.

Two steps (torch only; no AnnData here):

1. **Candidate starts.** Every mixture component's mean (``init='mean'``) or
   ``n_samples`` draws from every component (``init='sample'``), combined
   (Cartesian product) with every component mean of each covariate mixture.
   Each cell is scored against every candidate by the full objective (NB
   negative log-likelihood + mixture prior + covariate prior given the cell's
   class) in a vectorised, chunked pass, and starts at its best candidate.
   A cell with a known covariate class only considers candidates at its own
   class's component(s); an unknown class (-1) considers them all.
2. **Optimisation.** Only the new representations (and covariate
   representations) move, by Adam on the full objective, until the mean loss
   stops improving.

Scoring cost. For cell ``i`` with log library ``t_i`` and candidate ``c`` with
log fractions ``log p_c`` (decoded once per candidate), the NB log-likelihood is

    sum_j -r_j softplus(t_i + log p_cj - log r_j)                 (dense term D_c(t_i))
  + sum_{j: x_ij > 0} [lgamma(x_ij + r_j) - lgamma(r_j) - lgamma(x_ij + 1)]   (no c: once per cell)
  - sum_{j: x_ij > 0} x_ij softplus(log r_j - t_i - log p_cj)      (non-zeros only)

The dense term depends on the cell only through ``t_i``, so it is evaluated on a
grid of ``n_grid`` log-library values per candidate (with its exact derivative)
and interpolated per cell by cubic Hermite interpolation (error ~1e-4 nats for
typical data; ``n_grid=None`` computes it exactly per cell). Work therefore
scales with ``nnz x candidates + n_grid x candidates x features`` instead of
``cells x candidates x features``; no intermediate exceeds about
``max_elements`` floats.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..latent import GaussianMixture, GaussianMixtureSupervised, RepresentationLayer
from ..nn import Decoder
from .batching import DeviceCounts
from .loop import representation_epoch
from .objective import CellSet

logger = logging.getLogger(__name__)

INIT_TYPES = ("mean", "sample")


@dataclass
class NewCellConfig:
    """Settings of :func:`fit_new_cells`.

    ``init``/``n_samples``: candidate starts (see :func:`candidate_starts`).
    ``lr``/``betas``: Adam on the representations. Stopping: after
    ``patience`` epochs in which the mean per-cell loss did not improve on the
    best by more than ``min_delta`` times its magnitude, or at ``max_epochs``;
    the best state is kept. ``batch_size`` cells are decoded at a time (the
    step is taken once per epoch with every cell's own gradient).
    ``max_elements`` bounds the floats of any intermediate in the candidate
    scoring; ``n_grid`` is the number of log-library grid points for its
    dense term (None: exact, per cell).
    """

    init: str = "mean"
    n_samples: int = 1
    max_epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-2
    betas: tuple[float, float] = (0.5, 0.7)
    patience: int = 5
    min_delta: float = 1e-4
    max_elements: int = 20_000_000
    n_grid: int | None = 64
    precondition: bool = True
    verbose: bool = True


@contextmanager
def frozen(*modules: nn.Module):
    """Context in which every parameter of ``modules`` has ``requires_grad=False``;
    each parameter's own flag is restored on exit, also on error."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


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

    def decoder_input(self, start: int, stop: int) -> torch.Tensor:
        """``[z, c_1, ...]`` of candidates ``start:stop``: (stop - start, L + 2 * n_cov)."""
        return torch.cat([self.z[start:stop]] + [c[start:stop] for c in self.cov.values()], dim=-1)


def candidate_starts(
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    init: str = "mean",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Candidates:
    """Candidate starts: the main mixture's ``sample_new_points(init, n_samples)``
    ((K,) or (K * n_samples,) points) times every component mean of each
    covariate mixture, as a Cartesian product (main candidate outermost)."""
    if init not in INIT_TYPES:
        raise ValueError(f"init must be one of {INIT_TYPES}, got {init!r}.")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    z = gmm.sample_new_points(init, int(n_samples), generator=generator).detach()
    comp = torch.arange(gmm.n_mix_comp, device=z.device).repeat_interleave(z.shape[0] // gmm.n_mix_comp)
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
    step = max(1, int(max_elements) // max(b.numel(), 1))
    values, slopes = [], []
    for t0 in range(0, grid.shape[0], step):
        arg = grid[t0 : t0 + step, None, None] + b  # (T', C', G)
        values.append(-(F.softplus(arg) @ r))
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
    r64 = torch.exp(log_r).double()
    for start, stop in _row_chunks(counts.indptr.diff(), max_elements):
        idx = torch.arange(start, stop, device=log_r.device)
        flat, rows, vals = counts.batch(idx)
        rc = r64.take(flat.remainder(counts.n_features))
        v = (torch.lgamma(vals.double() + rc) - torch.lgamma(rc)).to(out.dtype)
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
    term = vals.unsqueeze(-1) * F.softplus(log_r[cols].unsqueeze(-1) - log_mu)
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


def _iter_scores(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Yield ``(row_start, row_stop, cand_start, scores)`` with scores
    (rows, C') = the per-cell total NLL (NB + priors, nats) of those cells at
    those candidates. Covers every (cell, candidate) pair exactly once."""
    max_elements = max(int(max_elements), 1)
    fidx = cells.feature_index or {}
    mods = list(cells.counts)
    n_feat = {m: cells.counts[m].n_features for m in mods}
    log_r = {m: decoder.likelihoods[m].log_r if fidx.get(m) is None else decoder.likelihoods[m].log_r[fidx[m]]
             for m in mods}
    main, tables = _prior_tables(gmm, cov_gmms, cand, cells.labels)
    main_row = None if main.shape[0] == 1 else cells.labels + 1
    constant = sum(_log_prob_constant(cells.counts[m], log_r[m], max_elements) for m in mods)
    exact = n_grid is None or cells.n <= int(n_grid)
    grids = {} if exact else {m: _log_library_grid(cells.counts[m].log_library, int(n_grid)) for m in mods}
    nnz = sum(cells.counts[m].indptr.diff() for m in mods)
    width = max(1, max_elements // max(sum(n_feat.values()), 1))  # candidates per chunk
    for c0 in range(0, cand.n, width):
        c1 = min(c0 + width, cand.n)
        log_frac = decoder(cand.decoder_input(c0, c1), fidx or None)  # mod -> (C', G)
        tabs = {}
        for m in mods if not exact else []:
            grid, h = grids[m]
            tabs[m] = _dense_on_grid(log_frac[m], log_r[m], grid, max_elements) + (float(grid[0]), h)
        row_cost = (c1 - c0) * (nnz + (sum(n_feat.values()) if exact else 0))
        for r0, r1 in _row_chunks(row_cost, max_elements):
            idx = torch.arange(r0, r1, device=cand.z.device)
            score = (main[0] if main_row is None else main[main_row[idx]])[..., c0:c1] - constant[idx].unsqueeze(-1)
            for key, table in tables.items():
                score = score + table[cells.cov_codes[key][idx] + 1, c0:c1]
            for m in mods:
                t = cells.counts[m].log_library[idx]
                if exact:
                    arg = t[:, None, None] + (log_frac[m] - log_r[m])  # (B, C', G)
                    dense = -(F.softplus(arg) @ torch.exp(log_r[m]))
                else:
                    values, slopes, start, h = tabs[m]
                    dense = _hermite(values, slopes, start, h, t)
                score = score - dense + _nonzero_term(cells.counts[m], idx, log_frac[m], log_r[m])
            yield r0, r1, c0, score


@torch.no_grad()
def candidate_scores(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
) -> torch.Tensor:
    """Total NLL (nats) of every cell at every candidate: (n, C).

    Equals ``recon + prior`` of :func:`~dgdcell.train.objective.batch_loss`
    (``prior_scale=0``) with the cell placed at the candidate; covariate
    candidates outside a known class score +inf. ``cells.rep`` is not read.
    Materialises (n, C): for many cells use :func:`best_candidates`.
    """
    out = torch.empty(cells.n, cand.n, device=cand.z.device)
    for r0, r1, c0, s in _iter_scores(decoder, gmm, cov_gmms, cells, cand, max_elements, n_grid):
        out[r0:r1, c0 : c0 + s.shape[1]] = s
    return out


@torch.no_grad()
def best_candidates(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    cand: Candidates,
    max_elements: int = 20_000_000,
    n_grid: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's best candidate: ``(index (n,) long, score (n,) nats)``; ties go
    to the lowest index. Memory stays within about ``max_elements`` floats plus (n,)."""
    best = torch.full((cells.n,), math.inf, device=cand.z.device)
    best_idx = torch.zeros(cells.n, dtype=torch.long, device=cand.z.device)
    for r0, r1, c0, s in _iter_scores(decoder, gmm, cov_gmms, cells, cand, max_elements, n_grid):
        val, arg = s.min(dim=1)
        better = val < best[r0:r1]
        best[r0:r1] = torch.where(better, val, best[r0:r1])
        best_idx[r0:r1] = torch.where(better, arg + c0, best_idx[r0:r1])
    return best_idx, best


# --------------------------------------------------------------------------- optimisation


class ScaledRepresentation(RepresentationLayer):
    """Representations ``origin + scale * u`` (n, dim) whose parameter ``z`` holds
    the offsets ``u``, so that an Adam step of size ``lr`` moves each coordinate
    by about ``lr * scale``. ``forward(idx)`` returns the representations."""

    def __init__(self, origin: torch.Tensor, scale: torch.Tensor):
        super().__init__(origin.shape[1], origin.shape[0], torch.zeros_like(origin))
        self.z.data = self.z.data.to(origin.device)
        self.register_buffer("origin", origin.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            return self.origin + self.scale * self.z
        return self.origin[idx] + self.scale[idx] * self.z[idx]


def optimise_representations(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    config: NewCellConfig,
) -> dict[str, list]:
    """Adam on ``cells``' representations only, one step per epoch (each cell's own
    gradient, accumulated over batches of ``batch_size``), until the mean loss
    plateaus; the best evaluated state is kept. Returns the history: ``epoch``,
    ``loss``, ``reconstruction`` (mean per cell before each step, nats)."""
    params = cells.parameters()
    opt = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas))
    history: dict[str, list] = {"epoch": [], "loss": [], "reconstruction": []}
    best, best_state, stale = math.inf, None, 0
    bar = tqdm(range(int(config.max_epochs)), disable=not config.verbose, desc="dgd transform", unit="epoch",
               leave=False)
    try:
        for epoch in bar:
            before = [p.detach().clone() for p in params]
            loss, recon = representation_epoch(decoder, gmm, cov_gmms, cells, opt, config.batch_size, None)
            history["epoch"].append(epoch + 1)
            history["loss"].append(loss)
            history["reconstruction"].append(recon)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the new cells' loss became {loss} at epoch {epoch + 1}; try a lower lr or check the counts."
                )
            bar.set_postfix(loss=f"{loss:.1f}")
            if loss < best - config.min_delta * abs(best if math.isfinite(best) else loss):
                best, best_state, stale = loss, before, 0
            else:
                stale += 1
                if stale >= config.patience:
                    logger.info("new cells converged at epoch %d (loss %.3f)", epoch + 1, best)
                    break
    finally:
        bar.close()
        if best_state is not None:
            with torch.no_grad():
                for p, v in zip(params, best_state):
                    p.copy_(v)
    return history


def fit_new_cells(
    decoder: Decoder,
    gmm: GaussianMixture,
    cov_gmms: dict[str, GaussianMixtureSupervised],
    cells: CellSet,
    config: NewCellConfig,
    generator: torch.Generator | None = None,
) -> dict[str, list]:
    """Fit ``cells``' representations (in place) against the frozen decoder and
    mixtures: start at the best candidate, then optimise.

    The parameters of ``decoder``, ``gmm`` and ``cov_gmms`` are never changed;
    their ``requires_grad`` flags are off during the call and restored after.
    ``generator`` drives ``init='sample'``. Returns the optimisation history
    plus ``candidate`` (the chosen candidate per cell), ``start_loss`` (mean
    NLL at the chosen candidates), ``n_candidates`` and ``seconds_init``.
    """
    t0 = time.perf_counter()
    with frozen(decoder, gmm, *cov_gmms.values()):
        cand = candidate_starts(gmm, cov_gmms, config.init, config.n_samples, generator)
        idx, score = best_candidates(decoder, gmm, cov_gmms, cells, cand, config.max_elements, config.n_grid)
        with torch.no_grad():
            cells.rep.z.copy_(cand.z[idx])
            for key, rep in cells.cov_reps.items():
                rep.z.copy_(cand.cov[key][idx])
        seconds_init = time.perf_counter() - t0
        if config.precondition:
            work = replace(
                cells,
                rep=ScaledRepresentation(cells.rep.z, gmm.stddev()[cand.component[idx]]),
                cov_reps={k: ScaledRepresentation(r.z, cov_gmms[k].stddev()[cand.cov_component[k][idx]])
                          for k, r in cells.cov_reps.items()},
            )
        else:
            work = cells
        history = optimise_representations(decoder, gmm, cov_gmms, work, config)
        if work is not cells:
            with torch.no_grad():
                cells.rep.z.copy_(work.rep())
                for key, rep in cells.cov_reps.items():
                    rep.z.copy_(work.cov_reps[key]())
    history["candidate"] = idx.cpu().tolist()
    history["start_loss"] = [float(score.mean())]
    history["n_candidates"] = [cand.n]
    history["seconds_init"] = [seconds_init]
    return history
