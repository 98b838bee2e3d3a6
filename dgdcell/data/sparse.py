"""Canonical CSR counts and passes over their row blocks (shared by in-memory and on-disk counts)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def to_csr(X) -> sp.csr_matrix:
    """Any dense/sparse numeric matrix as canonical CSR float32 (explicit zeros dropped).

    A matrix that already is one (CSR, float32, sorted indices without
    duplicates, no stored zeros: what AnnData files usually hold) is not
    copied: the result shares its arrays, so callers must never write into
    them (replace arrays instead, as :func:`dgdcell.model._binarise` does).
    """
    if hasattr(X, "to_memory"):  # backed sparse datasets
        X = X.to_memory()
    if _is_canonical_float32_csr(X):
        return sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape, copy=False)
    if sp.issparse(X):
        out = sp.csr_matrix(X, dtype=np.float32, copy=True)
    else:
        out = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    return out


def row_blocks(csr: sp.csr_matrix, block_nnz: int):
    """``(row_start, row_stop, nnz_start, nnz_stop)`` of consecutive row blocks
    of ``csr`` holding about ``block_nnz`` non-zeros each (at least one row),
    for passes over large count matrices whose temporaries must stay small."""
    n = csr.shape[0]
    cuts = np.searchsorted(csr.indptr, np.arange(0, csr.nnz + block_nnz, block_nnz)[1:], side="left")
    edges = np.unique(np.concatenate([[0], np.minimum(cuts, n), [n]]))
    for a, b in zip(edges[:-1], edges[1:]):
        yield int(a), int(b), int(csr.indptr[a]), int(csr.indptr[b])


def _is_canonical_float32_csr(X) -> bool:
    """CSR float32 with sorted, duplicate-free indices and no stored zeros."""
    return (
        sp.issparse(X) and X.format == "csr" and X.dtype == np.float32 and bool(X.has_canonical_format)
        and np.count_nonzero(X.data) == X.data.size
    )
