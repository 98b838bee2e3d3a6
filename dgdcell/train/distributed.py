"""Data-parallel fitting on ``torch.distributed``: cells sharded across processes.

A DGD's per-cell representations are parameters touched only by their own
cell's counts, so each process (rank) owns a disjoint shard of the cells
together with their representations and optimiser state, while the decoder
and mixture parameters are replicated. Per minibatch every rank computes the
gradient of its own cells' loss and the ranks sum these gradients with one
``all_reduce`` of a flattened buffer, so every replica takes the same Adam
step: the global minibatch is the union of the ranks' minibatches.

Why an explicit ``all_reduce`` and not ``DistributedDataParallel``: the
objective is ``DGDModule.loss`` (a method, not ``forward``, which DDP hooks
into); the validation and new-cell passes run the same module frozen and must
not trigger reductions; and in the guided phase some parameters may get no
gradient, which DDP only tolerates with ``find_unused_parameters``. One
flattened ``all_reduce`` per minibatch sends the same bytes as DDP's buckets;
what it gives up is DDP's overlap of communication with the backward pass
(worth having on GPUs with large decoders; see ``docs/distributed.md``).

:class:`Comm` is the only place that talks to ``torch.distributed``; the
training loop and the model call its few verbs (``sum``, ``reduce_gradients``,
``broadcast``, ``gather_rows``, ``agree``) and never the library directly. In
one process they get ``comm=None`` and run exactly the code they ran before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: how long a collective waits for the other processes before failing (a rank that hangs,
#: rather than dies, is detected after this; a rank that dies is detected at once)
TIMEOUT = timedelta(minutes=30)
#: the environment variables torchrun sets that ``init_process_group(init_method='env://')`` reads
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


#: whether the default process group is one that :func:`open_comm` initialised (kept for later calls)
_OURS = {"group": False, "atexit": False}


class DistributedError(RuntimeError):
    """A collective failed because another process stopped, failed or timed out."""


@dataclass
class Comm:
    """One process's view of a data-parallel fit.

    Attributes
    ----------
    rank, world_size
        This process's rank and the number of processes.
    device
        Where collective buffers live: the CUDA device with NCCL, the CPU with gloo.
    model_device
        Where this rank's model and cells live (see :func:`model_device`).
    owned
        True when :func:`open_comm` initialised the process group (it stays
        open for later calls, is destroyed at exit, or at once by
        :func:`abort_comm` after an error); False for a group the caller made.
    """

    rank: int
    world_size: int
    device: torch.device
    owned: bool
    model_device: torch.device

    # ------------------------------------------------------------------ sharding
    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's part of ``rows``: contiguous blocks, sizes differing by at most one."""
        return np.array_split(np.asarray(rows), self.world_size)[self.rank]

    def block(self, n_local: int) -> tuple[int, int]:
        """``(start, n_total)``: this rank's ``n_local`` cells are cells ``start
        .. start + n_local - 1`` of the ``n_total`` of all ranks (contiguous
        blocks in rank order, as :meth:`shard` makes them); one ``all_gather``."""
        sizes = torch.cat(self.gather(torch.tensor([int(n_local)], dtype=torch.int64))).tolist()
        return int(sum(sizes[: self.rank])), int(sum(sizes))

    # ------------------------------------------------------------------ collectives
    def _collective(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # gloo / NCCL errors (DistBackendError) are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed, so another process stopped, failed or "
                f"timed out (see its own error above). Every process stops; restart the fit (from the last "
                f"checkpoint: DGD.load(checkpoint_dir) and fit(..., warm_start=True)). [{err}]"
            ) from err

    def sum(self, *values: torch.Tensor | float) -> list[float]:
        """The sums over all ranks of scalar ``values`` (tensors or numbers), in
        float64, from one ``all_reduce``; the one host synchronisation of the call."""
        buf = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(()) for v in values])
        self._collective("summing the losses", torch.distributed.all_reduce, buf)
        return buf.tolist()

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace the gradient of each of ``params`` by its sum over all ranks:
        one ``all_reduce`` of their flattened gradients, no host synchronisation.
        A parameter without a gradient counts as zero (and then has one)."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self._collective("the gradient all_reduce", torch.distributed.all_reduce, flat)
        flat = flat.to(params[0].device)
        for p, g in zip(params, flat.split([q.numel() for q in params])):
            p.grad = g.view_as(p)

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite every tensor (in place, any device) with rank 0's."""
        for t in tensors:
            buf = t.detach() if t.device == self.device else t.detach().to(self.device)
            self._collective("broadcasting rank 0's start", torch.distributed.broadcast, buf, 0)
            if buf is not t:
                with torch.no_grad():
                    t.copy_(buf)

    def gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``local`` ((n_r, ...), the same trailing shape and dtype
        everywhere, n_r may differ), on the host, in rank order: one
        ``all_gather`` of the lengths and one of the rows padded to the longest."""
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        sizes[self.rank] = local.shape[0]
        self._collective("gathering the shard sizes", torch.distributed.all_reduce, sizes)
        sizes = sizes.tolist()
        padded = local.new_zeros((max(sizes), *local.shape[1:]), device=self.device)
        padded[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("gathering the shards", torch.distributed.all_gather, parts, padded)
        return [p[:s].cpu() for p, s in zip(parts, sizes)]

    def gather_rows(self, n: int, rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(n, ...) on the host from every rank's ``local`` values of its cells
        ``rows`` ((n_r,) positions in 0..n-1; the ranks' rows partition them)."""
        values, where = torch.cat(self.gather(local.detach())), torch.cat(self.gather(torch.as_tensor(rows).long()))
        out = values.new_empty((n, *values.shape[1:]))
        out[where] = values
        return out

    def agree(self, what: str, fn: Callable[[], object] | None = None):
        """Run ``fn`` (on this rank; None: nothing) and make every rank learn
        whether it failed anywhere: an ``all_reduce`` of one flag per rank. A
        failing rank re-raises its own error; the others raise a
        :class:`DistributedError` naming the failed ranks, so all stop together
        and the collectives stay in step. Returns ``fn``'s result."""
        failed = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        error, result = None, None
        try:
            result = fn() if fn is not None else None
        except Exception as err:  # noqa: BLE001 (any error: re-raised here, reported to every rank below)
            error = err
            failed[self.rank] = 1.0
        self._collective(f"checking that every rank succeeded in {what}", torch.distributed.all_reduce, failed)
        if error is not None:
            raise error
        bad = [r for r, f in enumerate(failed.tolist()) if f]
        if bad:
            raise DistributedError(f"rank(s) {bad} of {self.world_size} failed in {what} (see their errors); "
                                   f"every process stops.")
        return result


def merge_rank_histories(comm: Comm, history: dict[str, list], n_local: int) -> dict[str, list]:
    """One history of :func:`~dgdcell.train.new_cells.fit_new_cells` for the
    cells of all ranks from each rank's own (``n_local`` cells each): per
    epoch the cell-weighted mean of the ranks' losses (a rank that stopped
    earlier counts with its last values) and the sum of their active rows;
    ``candidate`` concatenated in rank order; ``start_loss`` weighted;
    ``seconds_init`` the slowest rank's."""
    n_epochs = len(history["epoch"])
    table = torch.tensor([[float(n_local), float(n_epochs), float(history["start_loss"][0]),
                           float(history["seconds_init"][0])]], dtype=torch.float64)
    ranks = torch.cat(comm.gather(table))
    sizes, epochs = ranks[:, 0], ranks[:, 1].long()
    n_max = int(epochs.max())
    per_epoch = torch.zeros(n_max, 3, dtype=torch.float64)  # loss, reconstruction, active rows
    if n_epochs:
        per_epoch[:n_epochs] = torch.tensor(list(zip(history["loss"], history["reconstruction"], history["n_active"])),
                                            dtype=torch.float64)
        per_epoch[n_epochs:, :2] = per_epoch[n_epochs - 1, :2]
    parts = comm.gather(per_epoch)
    weights = (sizes / sizes.sum()).reshape(-1, 1)
    loss = sum(w * p[:, 0] for w, p in zip(weights, parts))
    recon = sum(w * p[:, 1] for w, p in zip(weights, parts))
    active = sum(p[:, 2] for p in parts)
    out = dict(history)
    out["epoch"] = list(range(1, n_max + 1))
    out["loss"] = [float(v) for v in loss] if n_max else []
    out["reconstruction"] = [float(v) for v in recon] if n_max else []
    out["n_active"] = [int(v) for v in active] if n_max else []
    out["candidate"] = torch.cat(comm.gather(torch.as_tensor(history["candidate"], dtype=torch.int64))).tolist()
    out["start_loss"] = [float((weights[:, 0] * ranks[:, 2]).sum())]
    out["seconds_init"] = [float(ranks[:, 3].max())]
    return out


def world_size() -> int:
    """The number of processes of the default process group, or else of torchrun's environment."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_world_size()


def process_rank() -> int:
    """This process's rank: in the default process group, or else in torchrun's environment (0 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0) if _env_world_size() > 1 else 0
    except ValueError:
        return 0


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def resolve_distributed(distributed) -> bool:
    """Whether a call with ``distributed`` (True / False / None: auto) runs data-parallel.

    Auto (None): yes when a process group with more than one process is
    initialised, or torchrun's environment says ``WORLD_SIZE`` > 1."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None (auto: under torchrun or an initialised "
                         f"process group), got {distributed!r}.")
    if distributed is False:
        return False
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return distributed is True or dist.get_world_size() > 1
    if distributed is None:
        return _env_world_size() > 1
    return True


def open_comm(distributed, device: torch.device) -> Comm | None:
    """The :class:`Comm` of a call with ``distributed`` (see
    :func:`resolve_distributed`), or None for one process (nothing is touched then).

    Uses the default process group when one is initialised; otherwise
    initialises it from torchrun's environment (``env://``; NCCL when
    ``device`` is CUDA, gloo otherwise; timeout :data:`TIMEOUT`). A group
    initialised here stays open for later calls (``fit`` then ``transform``)
    and is destroyed when the process exits, or by :func:`abort_comm` after
    an error: initialising the default group a second time in one process
    can meet the first one's rendezvous keys in torchrun's store and hang."""
    if not resolve_distributed(distributed):
        return None
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("distributed=True, but this PyTorch build has no torch.distributed; install a PyTorch "
                           "with distributed support or fit with distributed=False.")
    device = torch.device(device)
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
        if missing:
            raise ValueError(
                f"distributed=True needs an initialised process group or torchrun's environment (missing "
                f"{missing}); launch with 'torchrun --nproc-per-node N your_script.py' (or 'torchrun ... -m "
                f"dgdcell fit ...'), call torch.distributed.init_process_group() first, or pass distributed=False."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        _OURS["group"] = True
        if not _OURS["atexit"]:
            atexit.register(_close_at_exit)
            _OURS["atexit"] = True
    owned = _OURS["group"]
    backend = dist.get_backend()
    here = model_device(device)
    if backend == "nccl" and here.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which needs CUDA tensors, but the model's device is "
                         f"{device}; use device='cuda' or a gloo process group.")
    comm = Comm(dist.get_rank(), dist.get_world_size(), here if backend == "nccl" else torch.device("cpu"), owned,
                here)
    logger.info("data-parallel: rank %d of %d (%s, %s process group)", comm.rank, comm.world_size, backend,
                "a new" if owned else "the caller's")
    return comm


def abort_comm(comm: Comm | None) -> None:
    """After an error: destroy the process group if :func:`open_comm` made it,
    so that the other ranks' pending collectives fail at once instead of
    waiting for :data:`TIMEOUT` (a caller's group is left to the caller)."""
    if comm is not None and comm.owned:
        _destroy_ours()


def _destroy_ours() -> None:
    if _OURS["group"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OURS["group"] = False


def _close_at_exit() -> None:
    """At a normal exit: wait for every rank (under the command line, rank 0
    still writes the outputs while the others are done), then destroy the
    group on all ranks together. A gloo rank whose peer had already torn its
    side down was seen to abort at exit (SIGABRT, 'terminate called without an
    active exception'). After an error the group is already gone
    (:func:`abort_comm`) and nothing waits."""
    if _OURS["group"] and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # a peer gone already: destroy regardless
            torch.distributed.barrier()
    _destroy_ours()


def model_device(device: torch.device) -> torch.device:
    """The device of this rank's model: ``cuda`` without an index becomes
    ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun starts them)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device
