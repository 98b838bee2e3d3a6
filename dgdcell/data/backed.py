"""Counts read from disk, one block of cells at a time (backed AnnData).

Nothing here knows about torch. A :class:`BackedCounts` wraps the on-disk
matrix of a backed AnnData (``anndata.read_h5ad(path, backed="r")``: its
``.X`` is anndata's own sparse dataset, ``anndata.abc.CSRDataset``; a dense
backed ``.X`` is an ``h5py.Dataset``) and reads contiguous row ranges through
that object's own slicing, so no h5 or zarr format is parsed here. One
streaming pass (:meth:`BackedCounts.scan`) checks the values and computes
everything needed per cell up front: library sizes, the log-factorial constant
``sum_j lgamma(x_ij + 1)`` and the number of non-zeros per row. Afterwards
only (n_obs,) vectors stay in memory; counts are read per block.

Blocks are cut at the same row boundaries as :func:`~dgdcell.data.row_blocks`
of an in-memory CSR of the same matrix, so passes over a :class:`BackedCounts`
and over the in-memory matrix sum the same numbers in the same order.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import scipy.sparse as sp

from .checks import check_count_dtype, check_count_values
from .sparse import row_blocks, to_csr

logger = logging.getLogger(__name__)

#: a streaming pass reads row blocks of about this many non-zeros (float32 + int32: ~32 MB)
SCAN_BLOCK_NNZ = 1 << 22
#: rows of a sample closer than this many stored non-zeros are read as one range (:meth:`BackedCounts.take`)
TAKE_GAP_NNZ = 1 << 15


def is_backed_matrix(X) -> bool:
    """Whether ``X`` is an on-disk matrix of a backed AnnData (anndata's sparse
    dataset, or a dense ``h5py.Dataset``) rather than one in memory."""
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return False
    if hasattr(X, "to_memory") and hasattr(X, "format"):  # anndata's CSRDataset / CSCDataset
        return True
    return type(X).__module__.startswith("h5py")


class BackedCounts:
    """The counts of one on-disk matrix, read in blocks of rows.

    Parameters
    ----------
    X
        The backed matrix (``adata.X`` of a backed AnnData): anndata's CSR
        sparse dataset or a dense ``h5py.Dataset``. A CSC dataset is refused
        (every row block would read the whole file).
    where
        How the matrix is named in error messages (e.g. ``"adata.X"``).
    columns
        (G,) int positions of the columns to keep, in the order wanted (new
        cells aligned to a model's features); None: all.

    Attributes
    ----------
    shape
        (n_obs, n_features).
    indptr
        (n_obs + 1,) int64 cumulative non-zeros per row (as stored; after
        :meth:`scan`, of the canonical rows: explicit zeros dropped).
    library, log_factorial, n_on
        (n_obs,) float64 sums, float32 ``sum_j lgamma(x_ij + 1)`` and int64
        numbers of non-zero entries per row; set by :meth:`scan`.
    binary
        When True, :meth:`read` returns counts set to 1 where > 0 (a
        Bernoulli modality; see :meth:`binarised`).

    Rows are read with :meth:`read` (a contiguous range) or :meth:`take`
    (sorted rows, read as the contiguous ranges that cover them, block by
    block); both return canonical float32 CSR, like :func:`~dgdcell.data.to_csr`.
    """

    def __init__(self, X, where: str = "adata.X", columns: np.ndarray | None = None):
        fmt = getattr(X, "format", None)
        if fmt is not None and fmt != "csr":
            raise ValueError(
                f"{where} is stored on disk as {fmt.upper()}; reading blocks of cells from it would read the whole "
                "file each time. Rewrite it as CSR once, e.g. adata = anndata.read_h5ad(path); "
                "adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(new_path), or fit in memory."
            )
        if len(getattr(X, "shape", ())) != 2:
            raise ValueError(f"{where} is not a 2-D matrix (shape {getattr(X, 'shape', None)}).")
        self.X, self.where = X, where
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.shape = (int(X.shape[0]), int(X.shape[1]) if columns is None else int(self.columns.size))
        self.dtype = np.dtype(X.dtype)
        self.binary = False
        self.library: np.ndarray | None = None
        self.log_factorial: np.ndarray | None = None
        self.n_on: np.ndarray | None = None
        self.indptr = self._stored_indptr()

    def _stored_indptr(self) -> np.ndarray:
        """The stored row pointer (sparse) or one computed from the shape (dense), int64."""
        group = getattr(self.X, "group", None)
        if group is not None and "indptr" in group:
            return np.asarray(group["indptr"][...], dtype=np.int64)
        n, g = self.X.shape
        return np.arange(n + 1, dtype=np.int64) * int(g)

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def blocks(self, block_nnz: int | None = None):
        """``(start, stop)`` row ranges of about ``block_nnz`` (default :data:`SCAN_BLOCK_NNZ`)
        non-zeros each (at least one row)."""
        for a, b, _, _ in row_blocks(_Pointer(self.indptr, self.shape), block_nnz or SCAN_BLOCK_NNZ):
            yield a, b

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as canonical float32 CSR (1 where > 0 when :attr:`binary`)."""
        csr = to_csr(self._raw(start, stop))
        if self.binary:
            csr = sp.csr_matrix((np.ones_like(csr.data), csr.indices, csr.indptr), shape=csr.shape, copy=False)
        return csr

    def _raw(self, start: int, stop: int):
        """Rows ``start:stop`` as stored (scipy sparse or dense), of the kept columns."""
        raw = self.X[int(start) : int(stop)]
        return raw if self.columns is None else raw[:, self.columns]

    def take(self, rows: np.ndarray, block_nnz: int | None = None, gap_nnz: int | None = None) -> sp.csr_matrix:
        """Rows ``rows`` ((m,) int, sorted ascending, no repeats) as canonical
        float32 CSR. Neighbouring rows are read together as one contiguous
        range when fewer than ``gap_nnz`` stored non-zeros lie between them
        (and the range stays within about ``block_nnz``); far-apart rows are
        read on their own, so a sample of a large file reads about its own
        rows, not the file."""
        block_nnz, gap_nnz = block_nnz or SCAN_BLOCK_NNZ, TAKE_GAP_NNZ if gap_nnz is None else gap_nnz
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        if (np.diff(rows) <= 0).any():
            raise ValueError("BackedCounts.take needs sorted rows without repeats.")
        gap = self.indptr[rows[1:]] - self.indptr[rows[:-1] + 1]
        cuts = np.concatenate([[0], np.flatnonzero(gap > gap_nnz) + 1, [rows.size]])
        parts = []
        for i0, i1 in itertools.pairwise(cuts):
            i = int(i0)
            while i < i1:  # a long run of close rows is read in ranges of about block_nnz
                limit = self.indptr[rows[i]] + block_nnz
                j = min(max(i + 1, int(np.searchsorted(self.indptr[rows[i:i1] + 1], limit, side="right")) + i), int(i1))
                lo, hi = int(rows[i]), int(rows[j - 1]) + 1
                parts.append(self.read(lo, hi)[rows[i:j] - lo])
                i = j
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    def scan(self, available_layers: list[str] | None = None) -> BackedCounts:
        """The streaming pass: check every value (as :func:`~dgdcell.data.checks.check_counts`
        does, block by block) and compute :attr:`library`, :attr:`log_factorial`,
        :attr:`n_on` and the canonical :attr:`indptr`. Returns ``self``."""
        from scipy.special import gammaln

        n, g = self.shape
        check_count_dtype(self.shape, self.dtype, self.where)
        library = np.empty(n, dtype=np.float64)
        log_factorial = np.empty(n, dtype=np.float32)
        n_on = np.empty(n, dtype=np.int64)
        for a, b in self.blocks():
            raw = self._raw(a, b)
            check_count_values(raw.data if sp.issparse(raw) else np.asarray(raw).ravel(), self.where, available_layers)
            csr = to_csr(raw)
            row = np.repeat(np.arange(b - a), np.diff(csr.indptr))
            library[a:b] = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
            log_factorial[a:b] = np.bincount(row, weights=gammaln(csr.data.astype(np.float64) + 1.0), minlength=b - a)
            n_on[a:b] = np.diff(csr.indptr)
        self.library, self.log_factorial, self.n_on = library, log_factorial, n_on
        self.indptr = np.concatenate([[0], np.cumsum(n_on)]).astype(np.int64)
        logger.info("scanned %s from disk: %d cells x %d features, %d non-zeros", self.where, n, g, self.nnz)
        return self

    def binarised(self) -> BackedCounts:
        """A view of the same file whose counts read as 1 where > 0, with
        library sizes (and log-factorials) recounted for 0/1 values."""
        out = object.__new__(BackedCounts)
        out.__dict__.update(self.__dict__)
        out.binary = True
        if self.n_on is not None:
            out.library = self.n_on.astype(np.float64)
            out.log_factorial = np.zeros(self.n_obs, dtype=np.float32)  # lgamma(2) = 0
        return out

    def rows_identical(self) -> bool:
        """Whether every row holds the same counts (compared block by block with the first row)."""
        if self.n_obs < 2 or (self.n_on != self.n_on[0]).any():
            return False
        first = self.read(0, 1)
        for a, b in self.blocks():
            csr = self.read(a, b)
            k = int(self.n_on[0])
            if not ((csr.indices.reshape(b - a, k) == first.indices).all()
                    and (csr.data.reshape(b - a, k) == first.data).all()):
                return False
        return True

    def __repr__(self) -> str:
        return f"BackedCounts({self.where}, {self.shape[0]} x {self.shape[1]}, on disk)"


class _Pointer:
    """The ``indptr`` and ``shape`` of a matrix, enough for :func:`~dgdcell.data.row_blocks`."""

    def __init__(self, indptr: np.ndarray, shape: tuple[int, int]):
        self.indptr, self.shape, self.nnz = indptr, shape, int(indptr[-1])


def row_source(matrix) -> BackedCounts | InMemoryRows:
    """The counts of one modality (CSR in memory or :class:`BackedCounts`) as an
    object with ``shape``, ``indptr``, ``blocks``, ``read`` and ``take``."""
    return matrix if isinstance(matrix, BackedCounts) else InMemoryRows(matrix)


class InMemoryRows:
    """An in-memory CSR with the reading interface of :class:`BackedCounts`
    (rows are slices of it), so one pass serves both."""

    def __init__(self, csr: sp.csr_matrix):
        self.csr, self.shape, self.indptr = csr, csr.shape, csr.indptr

    def blocks(self, block_nnz: int | None = None):
        for a, b, _, _ in row_blocks(self.csr, block_nnz or SCAN_BLOCK_NNZ):
            yield a, b

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        return self.csr[int(start) : int(stop)]

    def _raw(self, start: int, stop: int):
        """Rows ``start:stop`` as stored (scipy sparse or dense), of the kept columns."""
        raw = self.X[int(start) : int(stop)]
        return raw if self.columns is None else raw[:, self.columns]

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.csr[np.asarray(rows)]
