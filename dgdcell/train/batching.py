"""Counts for training, sliced per minibatch without densifying.

The CSR arrays live either on the training device (``storage='device'``) or
in host memory (``storage='host'``: only each minibatch's non-zeros are
gathered on the host, into pinned memory when the device is CUDA, and copied
with ``non_blocking=True``). Memory therefore grows with the number of
non-zeros, never with cells x features.

Slicing a minibatch needs its number of non-zeros to size the output. Asked
on the fly that is a device->host synchronisation per batch; :meth:`DeviceCounts.prepare`
instead computes the totals of all batches of an epoch in one vectorised pass
and one transfer, after which :meth:`DeviceCounts.batch` never synchronises.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import scipy.sparse as sp
import torch

from ..data.reading import row_blocks

logger = logging.getLogger(__name__)

STORAGES = ("auto", "device", "host")
#: with ``storage='auto'`` on CUDA, counts stay on the host when their CSR
#: arrays would take more than this share of the free device memory
HOST_STORAGE_SHARE = 0.25
#: with device storage, consecutive planned minibatches are sliced together
#: in chunks of about this many non-zeros (see :meth:`DeviceCounts.batch`)
CHUNK_NNZ = 1 << 18
#: the log-factorial constant is summed over row blocks of about this many non-zeros (float64 temporaries)
_CHUNK_NNZ = 1 << 22


class DeviceCounts:
    """CSR counts of one modality, sliced into COO minibatches on ``device``.

    Parameters
    ----------
    csr
        (n_cells, G) scipy CSR of raw counts. Its ``indices`` (int32) and
        float32 ``data`` are shared, not copied, when the storage is host
        memory (or the device is the CPU) and their dtypes already fit.
    library
        (n_cells,) library sizes (> 0).
    device
        Where minibatches (and, with ``storage='device'``, the CSR arrays) live.
    storage
        ``'device'``, ``'host'``, or ``'auto'`` (default): ``'host'`` on CUDA
        when the CSR arrays would take more than :data:`HOST_STORAGE_SHARE`
        of the free device memory, else ``'device'``.

    Attributes
    ----------
    start, row_nnz
        (n_cells,) int64 on ``device``: each row's first position in the CSR
        arrays and its number of non-zeros.
    log_library, log_factorial
        (n_cells,) float32 on ``device``: log library size and
        ``sum_j lgamma(x_ij + 1)`` (a constant of the data).

    ``batch(idx)`` returns the non-zeros of rows ``idx`` as COO triplets with
    rows renumbered 0..len(idx)-1; nothing is ever densified. ``subset(rows)``
    gives the counts of some cells without copying the CSR arrays.
    """

    def __init__(self, csr: sp.csr_matrix, library: np.ndarray, device: torch.device, storage: str = "auto",
                 log_factorial: np.ndarray | None = None):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}.")
        device = torch.device(device)
        csr = sp.csr_matrix(csr)
        self.n_cells, self.n_features = csr.shape
        self.device = device
        self.storage = _choose_storage(storage, csr, device)
        home = device if self.storage == "device" else torch.device("cpu")
        self.indices = _shared(csr.indices, np.int32, home)  # column numbers; positions stay int64
        self.values = _shared(csr.data, np.float32, home)
        indptr = torch.from_numpy(csr.indptr.astype(np.int64))
        start, nnz = indptr[:-1], indptr.diff()
        self._host_start, self._host_nnz = (start, nnz) if self.storage == "host" else (None, None)
        self.start, self.row_nnz = start.to(device), nnz.to(device)
        self.log_library = torch.as_tensor(np.log(library).astype(np.float32), device=device)
        self.log_factorial = torch.as_tensor(_log_factorial(csr) if log_factorial is None else
                                             np.asarray(log_factorial, dtype=np.float32), device=device)
        self._pin = self.storage == "host" and device.type == "cuda"
        self._planned: dict[int, tuple[torch.Tensor, int, torch.Tensor | None, int | None]] = {}
        self._chunks: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
        self._chunk = None

    @property
    def indptr(self) -> torch.Tensor:
        """(n_cells + 1,) int64 on ``device``: cumulative non-zeros of the rows
        (row ``i`` has ``indptr[i + 1] - indptr[i]`` of them)."""
        return torch.cat([self.row_nnz.new_zeros(1), self.row_nnz.cumsum(0)])

    def subset(self, rows) -> "DeviceCounts":
        """The counts of cells ``rows`` ((n_sub,) int, numpy or torch; repeats
        allowed), sharing this object's CSR arrays: only (n_sub,) vectors are
        new. Equal to ``DeviceCounts(csr[rows], library[rows], ...)``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = copy.copy(self)
        on_device = rows.to(self.device)
        out.n_cells = int(rows.shape[0])
        out.start, out.row_nnz = self.start[on_device], self.row_nnz[on_device]
        out.log_library, out.log_factorial = self.log_library[on_device], self.log_factorial[on_device]
        if self.storage == "host":
            out._host_start, out._host_nnz = self._host_start[rows.cpu()], self._host_nnz[rows.cpu()]
        out._planned, out._chunks, out._chunk = {}, {}, None
        return out

    def prepare(self, batches: list[torch.Tensor]) -> None:
        """Make :meth:`batch` synchronisation-free for exactly these index
        tensors ((B_k,) long each, on ``device``; e.g. one epoch's batches).

        All their non-zero totals come from one vectorised pass over the
        concatenated indices and one device->host transfer: of the totals,
        or with host storage of the indices themselves (the totals are then
        computed on the host). Replaces the previous plan.
        """
        self._planned = {}
        self._chunk = None
        if not batches:
            return
        sizes = [b.shape[0] for b in batches]
        flat = torch.cat(batches)
        host = flat.cpu() if self.storage == "host" else None
        lengths = self._host_nnz[host] if host is not None else self.row_nnz[flat]
        csum = lengths.cumsum(0)[torch.tensor(sizes).cumsum(0).to(lengths.device) - 1]
        totals = torch.diff(csum, prepend=csum.new_zeros(1)).tolist()
        parts = host.split(sizes) if host is not None else [None] * len(batches)
        chunks = _chunk_numbers(totals) if self.storage == "device" else [None] * len(batches)
        self._chunks = _group_chunks(batches, totals, chunks)
        self._planned = {id(b): (b, t, h, c) for b, t, h, c in zip(batches, totals, parts, chunks)}

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zeros of rows ``idx`` ((B,) long, on ``device``):
        ``(flat_index, rows, values)``, each (nnz_batch,) on ``device``, where
        ``flat_index = row * G + col`` (long) addresses a (B, G) matrix, ``rows``
        (long) is the position in ``idx`` and ``values`` (float32) the counts.
        Rows come in the order of ``idx``, columns as stored within a row.
        Synchronisation-free when ``idx`` was passed to :meth:`prepare`."""
        plan = self._planned.get(id(idx))
        if plan is not None and plan[0] is idx:
            total, host_idx, chunk = plan[1], plan[2], plan[3]
            if chunk is not None:
                return self._from_chunk(idx, chunk)
        else:  # unplanned: the total costs one synchronisation
            total, host_idx = int(self.row_nnz[idx].sum()), (idx.cpu() if self.storage == "host" else None)
        length = self.row_nnz[idx]
        rows = torch.repeat_interleave(torch.arange(idx.shape[0], device=idx.device), length, output_size=total)
        if self.storage == "host":
            cols, values = self._gather_host(host_idx, total)
        else:
            pos = row_positions(self.start[idx], length, total)
            cols, values = self.indices.index_select(0, pos), self.values.index_select(0, pos)
        return rows * self.n_features + cols, rows, values

    def _from_chunk(self, idx: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch` for a planned batch with device storage: its chunk
        of consecutive batches (up to :data:`CHUNK_NNZ` non-zeros) is sliced
        in one vectorised pass the first time one of them is asked for, and
        every batch of it is then three views (fewer, larger operations than
        slicing each batch alone; the same triplets)."""
        if self._chunk is None or self._chunk[0] != chunk:
            batches, totals = self._chunks[chunk]
            ids = torch.cat(batches)
            total = sum(totals)
            length = self.row_nnz[ids]
            # each row's number within its own batch, repeated for its non-zeros
            local = torch.cat([torch.arange(b.shape[0], device=ids.device) for b in batches])
            rows = torch.repeat_interleave(local, length, output_size=total)
            pos = row_positions(self.start[ids], length, total)
            flat = torch.mul(rows, self.n_features).add_(self.indices.index_select(0, pos))
            offsets = [0]
            for t in totals:
                offsets.append(offsets[-1] + t)
            where = {id(b): (o, t) for b, o, t in zip(batches, offsets, totals)}
            self._chunk = (chunk, flat, rows, self.values.index_select(0, pos), where)
        _, flat, rows, values, where = self._chunk
        o, t = where[id(idx)]
        return flat[o : o + t], rows[o : o + t], values[o : o + t]

    def _gather_host(self, idx: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns (long) and values of rows ``idx`` ((B,) long, on the host),
        gathered on the host (into pinned buffers on CUDA) and sent to the
        device without blocking: (total,) each."""
        pos = row_positions(self._host_start[idx], self._host_nnz[idx], total)
        cols = torch.empty(total, dtype=self.indices.dtype, pin_memory=self._pin)
        values = torch.empty(total, dtype=self.values.dtype, pin_memory=self._pin)
        torch.index_select(self.indices, 0, pos, out=cols)
        torch.index_select(self.values, 0, pos, out=values)
        return cols.to(self.device, non_blocking=True).long(), values.to(self.device, non_blocking=True)


def row_positions(start: torch.Tensor, length: torch.Tensor, total: int) -> torch.Tensor:
    """Positions in a CSR matrix's arrays of the non-zeros of B rows with first
    positions ``start`` and counts ``length`` ((B,) long), row after row:
    (total,) long, ``total = length.sum()``."""
    shift = start - (torch.cumsum(length, 0) - length)
    return torch.repeat_interleave(shift, length, output_size=total).add_(torch.arange(total, device=start.device))


def _chunk_numbers(totals: list[int]) -> list[int]:
    """Chunk number of each of consecutive batches with ``totals`` non-zeros:
    a chunk closes once it holds :data:`CHUNK_NNZ` non-zeros."""
    out, chunk, filled = [], 0, 0
    for t in totals:
        if filled and filled + t > CHUNK_NNZ:
            chunk, filled = chunk + 1, 0
        out.append(chunk)
        filled += t
    return out


def _group_chunks(batches: list[torch.Tensor], totals: list[int], chunks: list) -> dict:
    """chunk number -> (its batches, their non-zero totals), in order."""
    out: dict = {}
    for b, t, c in zip(batches, totals, chunks):
        if c is not None:
            out.setdefault(c, ([], []))
            out[c][0].append(b)
            out[c][1].append(t)
    return out


def _choose_storage(storage: str, csr: sp.csr_matrix, device: torch.device) -> str:
    """Resolve ``'auto'``: host memory on CUDA when the CSR arrays (int32
    indices, float32 values) would take more than :data:`HOST_STORAGE_SHARE`
    of the free device memory."""
    if storage != "auto":
        return storage
    if device.type != "cuda":
        return "device"
    need = 8 * csr.nnz + 8 * (csr.shape[0] + 1)
    free, _ = torch.cuda.mem_get_info(device)
    if need > HOST_STORAGE_SHARE * free:
        logger.info("counts (%.2f GB) stay in host memory and stream per minibatch", need / 1e9)
        return "host"
    return "device"


def _shared(array: np.ndarray, dtype, device: torch.device) -> torch.Tensor:
    """``array`` as a torch tensor of ``dtype`` on ``device``; on the CPU the
    memory is shared when no conversion is needed."""
    array = np.asarray(array)
    if array.dtype != dtype or not array.flags.writeable:
        array = array.astype(dtype)
    return torch.from_numpy(array).to(device)


def _log_factorial(csr: sp.csr_matrix) -> np.ndarray:
    """``sum_j lgamma(x_ij + 1)`` per row, (n_cells,) float32, summed in
    float64 over row blocks of about ``_CHUNK_NNZ`` non-zeros so that
    temporaries stay small (each row's sum is the same as in one pass)."""
    from scipy.special import gammaln

    out = np.empty(csr.shape[0], dtype=np.float32)
    for a, b, lo, hi in row_blocks(csr, _CHUNK_NNZ):
        row = np.repeat(np.arange(b - a), np.diff(csr.indptr[a : b + 1]))
        out[a:b] = np.bincount(row, weights=gammaln(csr.data[lo:hi].astype(np.float64) + 1.0), minlength=b - a)
    return out
