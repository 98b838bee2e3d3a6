"""The fitting loop: alternating updates, validation, early stopping, history."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_int
from ..module import DGDModule
from .cells import CellSet
from .new_cells import frozen

if TYPE_CHECKING:
    from .distributed import Comm

logger = logging.getLogger(__name__)

#: representation-only passes (validation cells) decode up to this many values
#: (cells x features) per minibatch: 2,048 cells at 2,000 features
REPRESENTATION_BATCH_ELEMENTS = 1 << 22


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Learning rates are Adam step sizes; ``betas`` are Adam's. Early stopping
    watches the validation loss (per cell); an epoch improves on the best when
    its loss is lower by more than ``min_delta`` times the best's magnitude.
    The fit stops after ``patience`` epochs without such an improvement unless
    the loss is still falling: the robust (Theil-Sen) trend of the last
    ``2 * patience`` losses promises more than that improvement over the next
    ``patience`` epochs (:func:`still_improving`). A noisy loss that keeps
    falling slowly thus does not end the fit on a lucky low point.
    During the first ``warmup_epochs`` epochs the representations stay fixed
    (only the decoder and mixtures learn), so that noisy gradients from a
    random decoder do not scramble a data-driven start. During the first
    ``guide_epochs`` epochs each cell's prior is its guide component alone
    (see :class:`CellSet`), when the cells carry guides. Cells with Normal
    posteriors use ``n_samples`` reparameterised samples per cell per step.

    ``block_size`` (None: every epoch is a random permutation of all cells)
    makes the shuffle block-wise: the cells are cut into blocks of
    ``block_size`` consecutive cells, every epoch visits the blocks in a
    random order and the cells of each block in a random order, and no
    minibatch spans two blocks (:func:`epoch_order`). Counts streamed from
    disk are read one block at a time this way; the same setting gives an
    in-memory fit the same minibatches.
    """

    max_epochs: int = 300
    batch_size: int = 256
    lr_decoder: float = 1e-3
    lr_representation: float = 1e-2
    lr_mixture: float = 1e-2
    betas: tuple[float, float] = (0.5, 0.7)
    early_stopping: bool = True
    patience: int = 10
    min_delta: float = 1e-4
    warmup_epochs: int = 0
    guide_epochs: int = 0
    n_samples: int = 1
    block_size: int | None = None
    verbose: bool = True

    def checked(self) -> "TrainConfig":
        """This config with every setting validated (a ValueError names the
        setting and the fix) and converted to its type."""
        for name, low in (("max_epochs", 1), ("batch_size", 1), ("patience", 1), ("warmup_epochs", 0),
                          ("guide_epochs", 0), ("n_samples", 1)):
            setattr(self, name, check_int(name, getattr(self, name), low))
        for name in ("lr_decoder", "lr_representation", "lr_mixture"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= MAX_LR:
                raise ValueError(f"{name} must be a number in (0, {MAX_LR}] (an Adam step size; default "
                                 f"{getattr(TrainConfig, name)}), got {value!r}.")
            setattr(self, name, float(value))
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (Adam's, default {TrainConfig.betas}), got "
                             f"{self.betas!r}.")
        self.betas = betas
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or not (
                math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0 (a relative improvement), got {self.min_delta!r}.")
        self.min_delta = float(self.min_delta)
        if self.block_size is not None:
            self.block_size = check_int("block_size", self.block_size, 1)
        self.early_stopping, self.verbose = bool(self.early_stopping), bool(self.verbose)
        return self

    def settings(self) -> dict:
        """The settings as recorded with a fitted model (``verbose`` left out)."""
        out = asdict(self)
        out.pop("verbose")
        out["betas"] = list(out["betas"])
        return out


#: the largest learning rate accepted
MAX_LR = 1.0



def epoch_order(n: int, batch_size: int, generator: torch.Generator | None,
                block_size: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """One epoch's order of ``n`` cells and its minibatch sizes (on the host).

    Without ``block_size`` (or with ``block_size >= n``): a random
    permutation drawn from ``generator`` (identity order when None) cut into
    minibatches of ``batch_size``. With it, block-wise: cells
    ``[k * block_size, (k + 1) * block_size)`` form block ``k``; the blocks come in
    a random order, the cells within each block in a random order, and each
    block is cut into minibatches of its own (its last may be smaller), so
    that the cells of a minibatch, and of consecutive minibatches, lie in one
    block of consecutive rows. Vectorised: one permutation of the blocks and
    one random key per cell."""
    if generator is None or block_size is None or block_size >= n:
        perm = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        return perm, [min(batch_size, n - s) for s in range(0, n, batch_size)]
    n_blocks = -(-n // block_size)
    rank = torch.empty(n_blocks, dtype=torch.long)
    rank[torch.randperm(n_blocks, generator=generator)] = torch.arange(n_blocks)
    block_of = torch.arange(n) // block_size
    key = rank[block_of].to(torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)
    perm = torch.argsort(key)
    sizes = []
    for block in torch.argsort(rank).tolist():  # blocks in visiting order (a loop over blocks, not cells)
        size = min(block_size, n - block * block_size)
        sizes += [min(batch_size, size - s) for s in range(0, size, batch_size)]
    return perm, sizes


def _batches(cells: CellSet, batch_size: int, generator: torch.Generator | None, device,
             shard: tuple[int, int] | None = None, block_size: int | None = None) -> list[torch.Tensor]:
    """One epoch's minibatches of ``cells`` (:func:`epoch_order`) sent to
    ``device`` once and split into (B,) long index tensors. The counts are
    prepared for these batches, so slicing them needs no per-batch
    synchronisation (counts on disk: one read per block).

    ``shard = (start, n_total)`` (a data-parallel fit): ``cells`` are cells
    ``start .. start + n - 1`` of a set of ``n_total`` spread over the ranks.
    The order is then of all ``n_total`` (every rank draws the same one
    from the same generator state, as one process would) and each of its
    batches keeps this rank's cells, renumbered from 0: the ranks' batches
    ``k`` together are one process's batch ``k``. A rank's batch may be empty."""
    n = cells.n if shard is None else shard[1]
    perm, sizes = epoch_order(n, batch_size, generator, block_size)
    if shard is None:
        batches = list(perm.to(device).split(sizes))
    else:
        start = shard[0]
        mine = (perm >= start) & (perm < start + cells.n)
        batch_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
        counts = torch.bincount(batch_of[mine], minlength=len(sizes))
        batches = list((perm[mine] - start).to(device).split(counts.tolist()))
    for counts in cells.counts.values():
        counts.prepare([b for b in batches if b.numel()])
    return batches


class _SparseRows(nn.Module):
    """Stands in for a :class:`~dgdcell.latent.RepresentationLayer` during
    training: the same rows of the same ``z``, read with a sparse backward, so
    a minibatch adds its (B, d) gradient into ``z.grad`` at its own rows
    instead of building a dense (n, d) gradient per batch (which makes an
    epoch cost O(n^2 / B)). ``z.grad`` must be a dense tensor already."""

    def __init__(self, rep: nn.Module):
        super().__init__()
        self.rep = rep
        self.n_rep, self.n_sample = rep.n_rep, rep.n_sample
        self.variational = bool(getattr(rep, "variational", False))

    @property
    def z(self) -> nn.Parameter:
        return self.rep.z

    @property
    def log_std(self) -> nn.Parameter:
        return self.rep.log_std

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(len(idx), n_rep) rows of ``z`` (all of ``z`` when None)."""
        return self.rep.z if idx is None else F.embedding(idx, self.rep.z, sparse=True)

    def log_std_rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(len(idx), n_rep) rows of a Normal representation's ``log_std``, read the same way."""
        return self.rep.log_std if idx is None else F.embedding(idx, self.rep.log_std, sparse=True)


def _sparse_view(cells: CellSet) -> CellSet:
    """``cells`` with every representation read through :class:`_SparseRows`;
    their gradients are allocated (zeros) here if they do not exist yet."""
    for p in cells.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return replace(cells, rep=_SparseRows(cells.rep), cov_reps={k: _SparseRows(r) for k, r in cells.cov_reps.items()})


def adam(params: list[torch.Tensor] | list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` over ``params`` (tensors, or parameter groups: dicts
    with ``params`` and optionally their own ``lr``), fused into one kernel
    per step where this PyTorch and device support it, else its default."""
    # each attempt gets its own copies of the groups: the optimiser writes its defaults ("fused": True)
    # into the dicts it is given, also when it then refuses them
    fresh = lambda: [dict(p) if isinstance(p, dict) else p for p in params]  # noqa: E731
    try:
        return torch.optim.Adam(fresh(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused not available for this device / version (torch < 2.4 on CPU)
        return torch.optim.Adam(fresh(), lr=lr, betas=betas)


def theil_sen_slope(values: list[float]) -> float:
    """The Theil-Sen slope of ``values`` against their positions: the median of
    the slopes between every pair of points (robust to single outlying epochs)."""
    y = np.asarray(values, dtype=np.float64)
    i, j = np.triu_indices(len(y), 1)
    return float(np.median((y[j] - y[i]) / (j - i)))


def still_improving(losses: list[float], patience: int, min_delta: float, best: float) -> bool:
    """Whether the last ``2 * patience`` of ``losses`` still fall by more than
    ``min_delta * |best|`` per ``patience`` epochs on their Theil-Sen trend (and
    True while fewer losses are known: too early to tell)."""
    window = 2 * patience
    if len(losses) < window:
        return True
    return -theil_sen_slope(losses[-window:]) * patience > min_delta * abs(best)


def _snapshot(modules: dict) -> dict:
    return {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}


def _restore(modules: dict, state: dict) -> None:
    for name, m in modules.items():
        m.load_state_dict(state[name])


def _totals(comm: Comm | None, *values: torch.Tensor | float) -> list[float]:
    """The values as floats: summed over the ranks of a data-parallel fit (one
    ``all_reduce``), this process's own otherwise."""
    return [float(v) for v in values] if comm is None else comm.sum(*values)


def representation_epoch(
    module: DGDModule,
    cells: CellSet,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator | None,
    step: bool = True,
    guided: bool = False,
    comm: Comm | None = None,
    shard: tuple[int, int] | None = None,
    n_samples: int = 1,
    noise_generator: torch.Generator | None = None,
    stats: dict | None = None,
    block_size: int | None = None,
) -> tuple[float, float]:
    """One pass over ``cells`` stepping only their representations (decoder and
    mixtures untouched; no step when ``step`` is False). Returns the mean
    per-cell loss and reconstruction NLL before the step (over the cells of
    every rank with ``comm``, whose ``cells`` are the ``shard`` of
    :func:`_batches`; the pass itself stays local); ``stats``, when given,
    receives the mean ``rate`` too. Normal posteriors draw ``n_samples``
    samples per cell from ``noise_generator``.

    Each cell's gradient is its own and the step comes once, after the pass,
    so the minibatch size does not change the result: the pass uses
    minibatches of at least ``batch_size`` cells and up to
    :data:`REPRESENTATION_BATCH_ELEMENTS` decoded values each, and the
    module's parameters are frozen meanwhile (no gradients are computed for them).
    ``block_size``: the block-wise order of :func:`epoch_order`."""
    view = _sparse_view(cells)
    optimizer.zero_grad(set_to_none=False)
    params = cells.parameters()
    total = torch.zeros((), device=cells.rep.z.device)
    recon_total = torch.zeros((), device=cells.rep.z.device)
    rate_total = torch.zeros((), device=cells.rep.z.device)
    n_values = max(sum(c.n_features for c in cells.counts.values()), 1) * int(n_samples)
    size = max(int(batch_size), REPRESENTATION_BATCH_ELEMENTS // n_values)
    with frozen(module):
        for idx in _batches(cells, size, generator, cells.rep.z.device, shard, block_size):
            if not idx.numel():  # a rank's part of a global batch can be empty
                continue
            out = module.loss(view.minibatch(idx), prior_scale=0.0, guided=guided, n_samples=n_samples,
                              generator=noise_generator)
            loss = out.loss
            loss.backward(inputs=params)
            total += loss.detach()
            recon_total += out.reconstruction_total.detach().sum()
            rate_total += out.rate.detach().sum()
    if step:
        optimizer.step()
    total, recon_total, rate_total, n = _totals(comm, total, recon_total, rate_total, cells.n)
    if stats is not None:
        stats["rate"] = rate_total / n
    return total / n, recon_total / n


#: the log stds of Normal posteriors step this many times the representations' learning rate
LOG_STD_LR_FACTOR = 10.0


def representation_groups(cells: CellSet, lr: float) -> list[dict]:
    """Adam parameter groups of ``cells``: the points (means) at ``lr``; the log
    stds of Normal posteriors at ``LOG_STD_LR_FACTOR * lr`` (a once-per-epoch
    step of size ``lr`` in log space would need hundreds of epochs to move a
    standard deviation by the factor of ten that library sizes spread it)."""
    params = cells.parameters()
    if not cells.variational:
        return [{"params": params, "lr": lr}]
    log_std = cells.rep.log_std
    return [{"params": [p for p in params if p is not log_std], "lr": lr},
            {"params": [log_std], "lr": lr * LOG_STD_LR_FACTOR}]


def noise_generator(generator: torch.Generator | None, device) -> torch.Generator | None:
    """A generator for posterior samples on ``device``: ``generator`` itself on the
    CPU, else a device generator seeded from one draw of it (None: None)."""
    if generator is None:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    return torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))


def train(
    module: DGDModule,
    train_cells: CellSet,
    val_cells: CellSet | None,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    on_epoch_end: Callable[[int, dict[str, list]], None] | None = None,
    comm: Comm | None = None,
) -> dict[str, list]:
    """Fit the module (decoder, mixtures) and the representations by MAP; returns the history.

    Per minibatch the decoder and mixtures take an Adam step; the training
    representations accumulate their gradients over the epoch and take one
    Adam step at its end (each cell's gradient is its own, so this equals a
    per-batch step). Validation representations are fitted the same way
    against the current module, which they never change; their loss drives
    early stopping, and the best state is restored at the end.

    History keys: ``epoch``, ``train_loss``, ``train_reconstruction``,
    ``val_loss``, ``val_reconstruction`` (per cell, nats); with Normal
    posteriors also ``train_rate``, ``val_rate`` (R) and ``train_elbo``,
    ``val_elbo`` (``-(D + R)``; D is the reconstruction); ``seconds``
    (cumulative), and per fit ``stopped`` (``'early_stopping'``,
    ``'max_epochs'`` or ``'interrupted'``) and ``best_epoch`` (0: none, the
    last state is kept). On KeyboardInterrupt the best state so far is kept;
    an interrupt before there is one (during the guided or warm-up epochs)
    propagates.

    ``on_epoch_end(epoch, history)`` (epoch counted from 1), when given, is
    called after every completed epoch with finite losses (e.g. to write a
    checkpoint); it sees the current, not the best, state.

    Data-parallel (``comm``, see :mod:`dgdcell.train.distributed`): the cell
    sets are this rank's shards (contiguous blocks, :meth:`Comm.block`) and
    the module a replica; ``generator`` must be in the same state on every
    rank. Every rank draws the permutation one process would draw and keeps
    its own cells of each batch (:func:`_batches`), so the ranks' batches
    ``k`` together are one process's batch ``k``; the module's gradients are
    summed over the ranks after each backward pass and the parameter prior
    is scaled by global counts, so every replica takes one process's step
    (up to the order of floating-point sums). The losses (hence early
    stopping, the best epoch and the history) are totals over all ranks, so
    every rank takes the same decisions. An interrupt propagates (there is no
    agreed state to keep).
    """
    device = train_cells.rep.z.device
    mixture_params = [p for g in module.mixtures() for p in g.parameters() if p.requires_grad]
    # decoder and mixtures step together: one optimiser, a parameter group (learning rate) each
    groups = [{"params": list(module.decoder.parameters()), "lr": config.lr_decoder}]
    if mixture_params:
        groups.append({"params": mixture_params, "lr": config.lr_mixture})
    opt_model = adam(groups, config.lr_decoder, config.betas)
    opt_rep = adam(representation_groups(train_cells, config.lr_representation), config.lr_representation,
                   config.betas)
    opt_val = adam(representation_groups(val_cells, config.lr_representation), config.lr_representation,
                   config.betas) if val_cells is not None else None
    modules: dict[str, nn.Module] = {"module": module, "train_rep": train_cells.rep}
    modules.update({f"train_cov/{k}": r for k, r in train_cells.cov_reps.items()})
    if val_cells is not None:
        modules["val_rep"] = val_cells.rep
        modules.update({f"val_cov/{k}": r for k, r in val_cells.cov_reps.items()})

    variational = train_cells.variational
    keys = ["epoch", "train_loss", "train_reconstruction", "val_loss", "val_reconstruction", "seconds"]
    if variational:
        keys += ["train_rate", "train_elbo", "val_rate", "val_elbo"]
    history: dict[str, list] = {k: [] for k in keys}
    noise = noise_generator(generator, device) if variational else None
    best = math.inf
    best_state, best_epoch = None, 0
    stopped = "max_epochs"
    stale = 0
    n_train = train_cells.n
    shard = val_shard = None
    if comm is not None:
        shard = comm.block(n_train)
        n_train = shard[1]
        val_shard = None if val_cells is None else comm.block(val_cells.n)
    model_params = [p for g in groups for p in g["params"]]
    train_view = _sparse_view(train_cells)
    t0 = time.perf_counter()
    quiet = not config.verbose or (comm is not None and comm.rank != 0)
    bar = tqdm(range(config.max_epochs), disable=True if quiet else None, desc="dgd", unit="epoch", leave=False)
    try:
        for epoch in bar:
            module.train()
            opt_rep.zero_grad(set_to_none=False)
            total = torch.zeros((), device=device)
            recon_total = torch.zeros((), device=device)
            rate_total = torch.zeros((), device=device)
            guided = epoch < config.guide_epochs
            for idx in _batches(train_cells, config.batch_size, generator, device, shard, config.block_size):
                opt_model.zero_grad(set_to_none=True)
                if idx.numel():  # (a rank's part of a global batch can be empty; it still takes part below)
                    out = module.loss(train_view.minibatch(idx), prior_scale=idx.shape[0] / n_train, guided=guided,
                                      n_samples=config.n_samples, generator=noise)
                    loss = out.loss
                    loss.backward()
                    total += loss.detach()
                    recon_total += out.reconstruction_total.detach().sum()
                    if variational:
                        rate_total += out.rate.detach().sum()
                if comm is not None:
                    comm.reduce_gradients(model_params)
                opt_model.step()
            warm = epoch < config.warmup_epochs
            if not warm:
                opt_rep.step()
            total, recon_total, rate_total = _totals(comm, total, recon_total, rate_total)
            train_loss = total / n_train
            history["epoch"].append(epoch + 1)
            history["train_loss"].append(train_loss)
            history["train_reconstruction"].append(recon_total / n_train)
            stats = {"rate": rate_total / n_train}
            if variational:
                history["train_rate"].append(stats["rate"])
                history["train_elbo"].append(-(history["train_reconstruction"][-1] + stats["rate"]))
            if val_cells is not None:
                val_loss, val_recon = representation_epoch(
                    module, val_cells, opt_val, config.batch_size, generator, step=not warm, guided=guided, comm=comm,
                    shard=val_shard, n_samples=config.n_samples, noise_generator=noise, stats=stats,
                    block_size=config.block_size,
                )
            else:
                val_loss, val_recon = train_loss, history["train_reconstruction"][-1]
            history["val_loss"].append(val_loss)
            history["val_reconstruction"].append(val_recon)
            if variational:
                history["val_rate"].append(stats["rate"])
                history["val_elbo"].append(-(val_recon + stats["rate"]))
            history["seconds"].append(time.perf_counter() - t0)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                restored = "the best state so far was restored" if best_state is not None else "no earlier state to keep"
                if best_state is not None:
                    _restore(modules, best_state)
                raise FloatingPointError(
                    f"loss became {train_loss if not math.isfinite(train_loss) else val_loss} at epoch {epoch + 1}; "
                    f"{restored}. Try lower learning rates (lr_decoder) or check the input counts."
                )
            bar.set_postfix(train=f"{train_loss:.1f}", val=f"{val_loss:.1f}", phase="guided" if guided else "free")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, history)
            if warm or guided:
                continue
            if val_loss < best - config.min_delta * abs(best if math.isfinite(best) else val_loss):
                best = val_loss
                best_state, best_epoch = _snapshot(modules), epoch + 1
                stale = 0
            else:
                stale += 1
                free = history["val_loss"][max(config.warmup_epochs, config.guide_epochs):]
                if config.early_stopping and stale >= config.patience and not still_improving(
                        free, config.patience, config.min_delta, best):
                    logger.info("early stopping at epoch %d (best validation loss %.3f)", epoch + 1, best)
                    stopped = "early_stopping"
                    break
    except KeyboardInterrupt:
        if best_state is None or comm is not None:
            raise
        done = min(len(v) for v in history.values())  # drop the half-recorded epoch
        for v in history.values():
            del v[done:]
        stopped = "interrupted"
        logger.warning("training interrupted after %d epochs: keeping the best state so far (epoch %d)", done,
                       best_epoch)
    finally:
        bar.close()
    if best_state is not None:
        _restore(modules, best_state)
    history["stopped"] = [stopped]
    history["best_epoch"] = [best_epoch]
    return history
