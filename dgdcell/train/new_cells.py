"""Fitting representations of new cells against a frozen decoder and frozen mixtures.

Two steps (torch only; no AnnData here):

1. **Candidate starts** (:mod:`dgdcell.train.candidates`): the mixture components'
   means or draws (and training cells' representations), each cell scored against
   every admissible candidate in a vectorised, chunked pass.
2. **Optimisation.** Each cell is optimised from its ``n_starts`` best
   candidates (only the new representations move; decoder and mixtures are
   frozen); after a short race only the better start continues. Each epoch
   every active row takes one step of ``torch.optim.SparseAdam`` on its own
   gradient, in units of the start component's standard deviation, and each
   row stops on its own plateau, so converged cells cost nothing.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..module import DGDModule
from .candidates import Candidates, RowView, candidate_starts, top_candidates
from .cells import CellSet

logger = logging.getLogger(__name__)


@dataclass
class NewCellConfig:
    """Settings of :func:`fit_new_cells`.

    ``init``/``n_samples``: candidate starts (see :func:`candidate_starts`);
    ``n_starts``: how many best-scored candidates each cell is optimised from,
    raced for ``race_epochs`` epochs, after which only the better continues.
    ``lr``/``betas``/``lr_decay``: Adam on the representations; with
    ``precondition`` the step is in units of the start component's standard
    deviation, and row ``i``'s ``t``-th step is ``lr * lr_decay ** (t - 1)``.
    Stopping, per (cell, start): after ``patience`` epochs without improving
    on its best loss by more than ``min_delta`` times the best's magnitude, or
    at ``max_epochs``; the best state is kept. ``batch_size`` cells are decoded
    at a time. ``max_elements`` bounds the floats of any intermediate in the
    candidate scoring; ``n_grid`` is the number of log-library grid points for
    its dense term (None, or at most ``2 * n_grid`` cells: exact, per cell).
    """

    init: str = "mean"
    n_samples: int = 10
    max_epochs: int = 100
    batch_size: int = 1024
    lr: float = 0.3
    betas: tuple[float, float] = (0.5, 0.7)
    patience: int = 5
    min_delta: float = 1e-4
    max_elements: int = 20_000_000
    n_grid: int | None = 64
    n_starts: int = 2
    race_epochs: int = 5
    precondition: bool = True
    lr_decay: float = 0.9
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


# --------------------------------------------------------------------------- optimisation


def _row_cell_set(cells: CellSet, rows: torch.Tensor) -> CellSet:
    """A CellSet whose row ``i`` is cell ``rows[i]`` of ``cells`` (representations not carried)."""
    return CellSet(
        rep=cells.rep,
        cov_reps=cells.cov_reps,
        counts={m: RowView(c, rows) for m, c in cells.counts.items()},
        cov_codes={k: v[rows] for k, v in cells.cov_codes.items()},
        labels=None if cells.labels is None else cells.labels[rows],
        feature_index=cells.feature_index,
        weight={m: v[rows] for m, v in cells.weight.items()},
        continuous=None if cells.continuous is None else cells.continuous[rows],
    )


@dataclass
class _Rows:
    """Optimisation state of N (cell, start) rows: offsets and their best values."""

    offset: list[torch.Tensor]
    best_offset: list[torch.Tensor]
    best: torch.Tensor
    last: torch.Tensor
    last_recon: torch.Tensor
    stale: torch.Tensor
    active: torch.Tensor

    @classmethod
    def start(cls, origin: list[torch.Tensor]) -> "_Rows":
        n, dev = origin[0].shape[0], origin[0].device
        inf = torch.full((n,), math.inf, device=dev)
        return cls([torch.zeros_like(o) for o in origin], [torch.zeros_like(o) for o in origin], inf.clone(),
                   inf.clone(), inf.clone(), torch.zeros(n, dtype=torch.long, device=dev),
                   torch.ones(n, dtype=torch.bool, device=dev))

    @torch.no_grad()
    def record(self, idx: torch.Tensor, loss: torch.Tensor, recon: torch.Tensor, min_delta: float) -> None:
        """Log the losses (B,) of rows ``idx`` at their current offsets; keep each row's best."""
        best = self.best[idx]
        improved = loss < best - min_delta * best.abs().nan_to_num(posinf=0.0)
        for bo, o in zip(self.best_offset, self.offset):
            bo[idx] = torch.where(improved.unsqueeze(-1), o[idx], bo[idx])
        self.best[idx] = torch.where(improved, loss, best)
        self.stale[idx] = torch.where(improved, 0, self.stale[idx] + 1)
        self.last[idx], self.last_recon[idx] = loss, recon


def optimise_starts(
    module: DGDModule,
    cells: CellSet,
    starts: list[torch.Tensor],
    scales: list[torch.Tensor],
    config: NewCellConfig,
) -> tuple[list[torch.Tensor], dict[str, list]]:
    """Minimise each cell's loss over its representations from ``k`` starts.

    Parameters
    ----------
    starts
        ``[z (n, k, L), c_1 (n, k, 2), ...]`` (covariates in the module's order):
        ``k`` starting points per cell, best-scored first.
    scales
        Same shapes: per-coordinate step scales; the optimiser works on offsets
        ``u`` with ``x = start + scale * u``, so a step moves a coordinate by
        about ``lr * scale`` (the start component's standard deviation puts
        cells of tight and broad components on an equal footing).

    Every (cell, start) row takes one ``torch.optim.SparseAdam`` step per
    epoch on its own gradient (read with a sparse backward, so rows that have
    stopped keep their state untouched); the step size of epoch ``t`` is
    ``lr * lr_decay ** t``. A row stops when its loss has not improved on its
    best by more than ``min_delta`` times the best's magnitude for
    ``patience`` epochs; with ``k > 1``, after ``race_epochs`` only each
    cell's best row continues. Returns each cell's best representations
    ``[(n, L), (n, 2), ...]`` and the history: ``epoch``, ``loss`` /
    ``reconstruction`` (mean per cell of its best row's latest values, nats)
    and ``n_active`` (rows that stepped).
    """
    n, k = starts[0].shape[:2]
    keys = module.covariate_keys
    rows_cell = torch.arange(n, device=starts[0].device).repeat_interleave(k)
    view = _row_cell_set(cells, rows_cell) if k > 1 else cells
    origin = [s.reshape(n * k, -1) for s in starts]
    scale = [s.reshape(n * k, -1) for s in scales]
    rows = _Rows.start(origin)
    offsets = [nn.Parameter(o) for o in rows.offset]
    rows.offset = offsets
    opt = torch.optim.SparseAdam(offsets, lr=config.lr, betas=config.betas)

    def step(idx: torch.Tensor) -> None:
        x = [og[idx] + sc[idx] * F.embedding(idx, u, sparse=True) for og, sc, u in zip(origin, scale, offsets)]
        out = module.loss(view.minibatch(idx, z=x[0], cov=dict(zip(keys, x[1:]))))
        loss = out.per_cell
        loss.sum().backward()
        rows.record(idx, loss.detach(), out.reconstruction_total.detach(), config.min_delta)

    history: dict[str, list] = {"epoch": [], "loss": [], "reconstruction": [], "n_active": []}
    bar = tqdm(range(int(config.max_epochs)), disable=True if not config.verbose else None, desc="dgd transform",
               unit="epoch", leave=False)
    try:
        for epoch in bar:
            act = rows.active.nonzero().squeeze(1)
            if act.numel() == 0:
                break
            opt.zero_grad(set_to_none=True)
            for idx in act.split(int(config.batch_size)):
                step(idx)
            for group in opt.param_groups:
                group["lr"] = config.lr * config.lr_decay**epoch
            opt.step()
            if not torch.isfinite(rows.last[act]).all():
                raise FloatingPointError(
                    f"the new cells' loss became non-finite at epoch {epoch + 1}; try a lower lr or check the counts."
                )
            rows.active &= rows.stale < int(config.patience)
            if k > 1 and epoch + 1 == int(config.race_epochs):
                winner = torch.arange(n, device=act.device) * k + rows.best.view(n, k).argmin(dim=1)
                rows.active &= torch.zeros_like(rows.active).index_fill_(0, winner, True)
            pick = _pick(rows.best, n, k)
            history["epoch"].append(epoch + 1)
            history["loss"].append(float(rows.last[pick].mean()))
            history["reconstruction"].append(float(rows.last_recon[pick].mean()))
            history["n_active"].append(int(act.numel()))
            bar.set_postfix(loss=f"{history['loss'][-1]:.1f}", active=int(rows.active.sum()))
    finally:
        bar.close()
    pick = _pick(rows.best, n, k)
    with torch.no_grad():
        out = [(og[pick] + sc[pick] * bo[pick]).detach() for og, sc, bo in zip(origin, scale, rows.best_offset)]
    return out, history


def _pick(best: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Row of each cell's best start: (n,) long."""
    return torch.arange(n, device=best.device) * k + best.view(n, k).argmin(dim=1)


def fit_new_cells(
    module: DGDModule,
    cells: CellSet,
    config: NewCellConfig,
    generator: torch.Generator | None = None,
    candidates: Candidates | None = None,
) -> dict[str, list]:
    """Fit ``cells``' representations (written into ``cells.rep`` and
    ``cells.cov_reps``) against the frozen module: score the candidates,
    optimise from each cell's ``n_starts`` best, keep the best.

    The module's parameters are never changed; their ``requires_grad`` flags
    are off during the call and restored after. ``generator`` drives
    ``init='sample'``. Returns the optimisation history plus ``candidate``
    (each cell's best-scored candidate), ``start_loss`` (mean NLL there),
    ``n_candidates`` and ``seconds_init``. ``candidates`` (default: drawn
    here by :func:`candidate_starts` from ``config`` and ``generator``) lets
    several blocks of cells share one draw.
    """
    t0 = time.perf_counter()
    keys = module.covariate_keys
    gmm, cov_gmms = module.gmm, dict(module.cov_gmms)
    with frozen(module):
        cand = candidates if candidates is not None else candidate_starts(gmm, cov_gmms, config.init,
                                                                          config.n_samples, generator)
        idx, score = top_candidates(module, cells, cand, config.n_starts, config.max_elements, config.n_grid)
        starts = [cand.z[idx]] + [cand.cov[k][idx] for k in keys]
        if config.precondition:
            scales = [gmm.stddev[cand.component[idx]]] + [
                cov_gmms[k].stddev[cand.cov_component[k][idx]] for k in keys
            ]
        else:
            scales = [torch.ones_like(s) for s in starts]
        seconds_init = time.perf_counter() - t0
        out, history = optimise_starts(module, cells, starts, scales, config)
    with torch.no_grad():
        cells.rep.z.copy_(out[0])
        for key, value in zip(keys, out[1:]):
            cells.cov_reps[key].z.copy_(value)
    logger.info(
        "embedded %d cells: %d candidates, %d epochs (%.1f steps per cell), mean loss %.2f at the best start -> %.2f",
        cells.n, cand.n, len(history["epoch"]), sum(history["n_active"]) / max(cells.n, 1),
        float(score[:, 0].mean()), history["loss"][-1] if history["loss"] else math.nan,
    )
    history["candidate"] = idx[:, 0].cpu().tolist()
    history["start_loss"] = [float(score[:, 0].mean())]
    history["n_candidates"] = [cand.n]
    history["seconds_init"] = [seconds_init]
    return history


def merge_histories(parts: list[tuple[int, dict[str, list]]]) -> dict[str, list]:
    """One history of :func:`fit_new_cells` from those of blocks of cells,
    ``[(n_cells, history), ...]`` in cell order: per epoch the cell-weighted
    mean loss and reconstruction (a block that stopped earlier counts with its
    last values, as a stopped cell does within a block) and the summed
    ``n_active``; ``candidate`` concatenated, ``start_loss`` the weighted
    mean, ``seconds_init`` the sum."""
    if len(parts) == 1:
        return parts[0][1]
    n = sum(size for size, _ in parts)
    n_epochs = max(len(h["epoch"]) for _, h in parts)
    out: dict[str, list] = {"epoch": list(range(1, n_epochs + 1))}
    for key in ("loss", "reconstruction"):
        out[key] = [sum(size * h[key][min(e, len(h[key]) - 1)] for size, h in parts if h[key]) / n
                    for e in range(n_epochs)]
    out["n_active"] = [sum(h["n_active"][e] for _, h in parts if e < len(h["n_active"])) for e in range(n_epochs)]
    out["candidate"] = [c for _, h in parts for c in h["candidate"]]
    out["start_loss"] = [sum(size * h["start_loss"][0] for size, h in parts) / n]
    out["n_candidates"] = parts[0][1]["n_candidates"]
    out["seconds_init"] = [sum(h["seconds_init"][0] for _, h in parts)]
    return out
