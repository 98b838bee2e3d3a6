"""Counts read from disk block by block for training: the interface of :class:`DeviceCounts`.

:class:`StreamedCounts` stands in for :class:`~dgdcell.train.batching.DeviceCounts`
where the counts are a :class:`~dgdcell.data.backed.BackedCounts` (a backed
AnnData's ``.X``): it holds only (n_cells,) vectors (file rows, log library
sizes, log-factorials, non-zeros per row) on the device, and the counts of one
*chunk* of consecutive minibatches at a time. A chunk is read from disk once
(anndata's sparse-dataset slicing of contiguous row ranges), made a
:class:`DeviceCounts` (sent to the device once) and sliced per minibatch
exactly as in memory, so a minibatch's triplets are the same as the in-memory
path's. Reads are per chunk, never per cell or per minibatch.

Chunks follow the epoch's order: :meth:`StreamedCounts.prepare` groups
consecutive minibatches that lie in the same block of ``block_cells``
consecutive cells. With the block-wise shuffle of the training loop
(``TrainConfig.block_size`` equal to ``block_cells``) every block is one
chunk, read once per epoch; a minibatch that spans blocks is read on its own.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..data.backed import BackedCounts
from .batching import DeviceCounts

logger = logging.getLogger(__name__)

#: cells per block of the block-wise shuffle and per read when counts stream from disk
#: (at 2,000 genes and ~5% non-zeros, ~50 MB of counts per block)
DEFAULT_BLOCK_CELLS = 65536


class StreamedCounts:
    """Counts of one modality on disk, sliced into COO minibatches on ``device``.

    Parameters
    ----------
    source
        The scanned on-disk counts (:meth:`BackedCounts.scan` done).
    library
        (n_obs,) library sizes of all the file's cells (> 0).
    device
        Where minibatches (and each chunk's counts) live.
    block_cells
        Cells per block (see the module's description).
    rows
        (n_cells,) file rows of this set's cells (default: all, in file order).

    Attributes
    ----------
    log_library, log_factorial, row_nnz
        (n_cells,) on ``device``, as in :class:`DeviceCounts`.
    n_reads, max_chunk_cells, max_chunk_nnz
        Chunks read so far and the largest held at once (cells, non-zeros).
    """

    def __init__(self, source: BackedCounts, library: np.ndarray, device: torch.device,
                 block_cells: int = DEFAULT_BLOCK_CELLS, rows: np.ndarray | None = None):
        if source.log_factorial is None:
            raise ValueError("StreamedCounts needs scanned counts (BackedCounts.scan()).")
        self.source, self.device, self.block_cells = source, torch.device(device), int(block_cells)
        self._library = np.asarray(library, dtype=np.float64)
        self.rows = np.arange(source.n_obs, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n_cells, self.n_features = int(self.rows.size), int(source.shape[1])
        self.storage = "disk"
        self.log_library = torch.as_tensor(np.log(self._library[self.rows]).astype(np.float32), device=self.device)
        self.log_factorial = torch.as_tensor(source.log_factorial[self.rows], device=self.device)
        self.row_nnz = torch.as_tensor(source.n_on[self.rows], device=self.device)
        self.n_reads, self.max_chunk_cells, self.max_chunk_nnz = 0, 0, 0
        self._reset()

    def _reset(self) -> None:
        self._plan: dict[int, tuple[torch.Tensor, int, int]] = {}
        self._chunk_batches: list[tuple[int, int]] = []
        self._positions, self._offsets, self._sizes = np.empty(0, np.int64), np.zeros(1, np.int64), []
        self._loaded = None

    @property
    def indptr(self) -> torch.Tensor:
        """(n_cells + 1,) int64 on ``device``: cumulative non-zeros of the rows."""
        return torch.cat([self.row_nnz.new_zeros(1), self.row_nnz.cumsum(0)])

    def subset(self, rows) -> StreamedCounts:
        """The counts of cells ``rows`` of this set ((n_sub,) int), on the same file."""
        rows = np.asarray(torch.as_tensor(rows, dtype=torch.long).cpu().numpy())
        return StreamedCounts(self.source, self._library, self.device, self.block_cells, self.rows[rows])

    def prepare(self, batches: list[torch.Tensor]) -> None:
        """Plan the reads for these minibatches ((B_k,) long each, on ``device``;
        one epoch's): one device->host transfer of their indices, then
        consecutive minibatches within one block form a chunk, read once."""
        self._reset()
        if not batches:
            return
        sizes = [int(b.shape[0]) for b in batches]
        flat = torch.cat(batches).cpu().numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        lo = np.minimum.reduceat(flat, offsets[:-1]) // self.block_cells
        hi = np.maximum.reduceat(flat, offsets[:-1]) // self.block_cells
        key = np.where(lo == hi, lo, -1 - np.arange(len(batches)))  # a batch spanning blocks is a chunk alone
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        chunk_of = np.cumsum(np.isin(np.arange(len(batches)), starts)) - 1
        bounds = np.append(starts, len(batches))
        self._chunk_batches = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        self._positions, self._offsets, self._sizes = flat, offsets, sizes
        self._plan = {id(b): (b, int(c), j) for j, (b, c) in enumerate(zip(batches, chunk_of))}

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zeros of rows ``idx`` as :meth:`DeviceCounts.batch` gives them
        (the same triplets). A planned minibatch is sliced from its chunk (read
        when first needed); an unplanned one is read on its own."""
        plan = self._plan.get(id(idx))
        if plan is None or plan[0] is not idx:
            positions = idx.cpu().numpy().astype(np.int64)
            counts, local = self._read(positions, [positions.size])
            return counts.batch(local[0])
        chunk, j = plan[1], plan[2]
        if self._loaded is None or self._loaded[0] != chunk:
            self._loaded = None  # the previous chunk is released before the next is read
            j0, j1 = self._chunk_batches[chunk]
            positions = self._positions[self._offsets[j0] : self._offsets[j1]]
            counts, local = self._read(positions, self._sizes[j0:j1])
            self._loaded = (chunk, counts, {j0 + i: t for i, t in enumerate(local)})
        _, counts, local = self._loaded
        return counts.batch(local[j])

    def _read(self, positions: np.ndarray, sizes: list[int]) -> tuple[DeviceCounts, list[torch.Tensor]]:
        """The cells at ``positions`` read from disk (their distinct file rows,
        ascending) as a :class:`DeviceCounts` prepared for the minibatches
        ``positions.split(sizes)``, renumbered into it."""
        file_rows = self.rows[positions]
        distinct = np.unique(file_rows)
        csr = self.source.take(distinct)
        counts = DeviceCounts(csr, self._library[distinct], self.device, storage="device",
                              log_factorial=self.source.log_factorial[distinct])
        local = list(torch.as_tensor(np.searchsorted(distinct, file_rows), device=self.device).split(sizes))
        counts.prepare(local)
        self.n_reads += 1
        self.max_chunk_cells = max(self.max_chunk_cells, int(distinct.size))
        self.max_chunk_nnz = max(self.max_chunk_nnz, int(csr.nnz))
        return counts, local
