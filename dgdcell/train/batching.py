"""Counts on the training device, sliced per minibatch without densifying."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class DeviceCounts:
    """CSR counts of one modality held as torch tensors on ``device``.

    Parameters
    ----------
    csr
        (n_cells, G) scipy CSR of raw counts.
    library
        (n_cells,) library sizes (> 0).
    device
        Where the tensors live.

    ``batch(idx)`` returns the non-zeros of rows ``idx`` as COO triplets with
    rows renumbered 0..len(idx)-1; nothing is ever densified.
    """

    def __init__(self, csr: sp.csr_matrix, library: np.ndarray, device: torch.device):
        self.n_cells, self.n_features = csr.shape
        self.indptr = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
        self.indices = torch.as_tensor(csr.indices.astype(np.int64), device=device)
        self.values = torch.as_tensor(csr.data.astype(np.float32), device=device)
        self.log_library = torch.as_tensor(np.log(library).astype(np.float32), device=device)
        # sum_j lgamma(x_ij + 1) per cell: a constant of the data, computed once
        log_fact = sp.csr_matrix((_lgamma1p(csr.data), csr.indices, csr.indptr), shape=csr.shape).sum(axis=1)
        self.log_factorial = torch.as_tensor(np.asarray(log_fact, dtype=np.float32).ravel(), device=device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zeros of rows ``idx`` ((B,) long): ``(flat_index, rows, values)``, each
        (nnz_batch,), where ``flat_index = row * G + col`` addresses a (B, G) matrix."""
        start = self.indptr[idx]
        length = self.indptr[idx + 1] - start
        total = int(length.sum())
        rows = torch.repeat_interleave(torch.arange(idx.shape[0], device=idx.device), length, output_size=total)
        offset = torch.cumsum(length, 0) - length
        pos = start[rows] + torch.arange(total, device=idx.device) - offset[rows]
        return rows * self.n_features + self.indices[pos], rows, self.values[pos]


def _lgamma1p(x: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(x.astype(np.float64) + 1.0)
