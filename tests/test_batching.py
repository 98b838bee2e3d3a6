"""Minibatch slicing of the counts, the fused sparse NB likelihood and the
sparse representation gradients of the training loop."""

from contextlib import contextmanager

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgdcell.nn.likelihoods import nb_log_prob_sparse
from dgdcell.train import batching
from dgdcell.train.batching import DeviceCounts
from dgdcell.train.loop import _sparse_view
from dgdcell.train.cells import CellSet

from .reference import nb_log_prob
from dgdcell.latent import RepresentationLayer


def _csr(n=50, g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.6, size=(n, g)).astype(np.float32) * (rng.random((n, g)) < 0.3)
    x[3] = 0  # an empty row
    x[7, 5] = 12345.0
    return sp.csr_matrix(x)


def _reference(csr, idx):
    """The non-zeros of rows ``idx`` from scipy: (flat, rows, values) in row order."""
    sub = csr[idx.numpy()].tocoo()
    order = np.lexsort((sub.col, sub.row))
    r, c = sub.row[order], sub.col[order]
    return r * csr.shape[1] + c, r, sub.data[order]


def _assert_batch(out, ref):
    flat, rows, vals = out
    assert flat.dtype == torch.long and rows.dtype == torch.long and vals.dtype == torch.float32
    np.testing.assert_array_equal(flat.numpy(), ref[0])
    np.testing.assert_array_equal(rows.numpy(), ref[1])
    np.testing.assert_array_equal(vals.numpy(), ref[2])


@contextmanager
def forbid_sync():
    """Inside, any tensor -> Python number conversion (a device sync on GPU) raises."""
    names = ("__int__", "__index__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def boom(*args, **kwargs):
        raise AssertionError("synchronising call")

    try:
        for name in names:
            setattr(torch.Tensor, name, boom)
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


@pytest.mark.parametrize("storage", ["device", "host"])
def test_batch_equals_scipy_slicing_and_prepared_batches_never_sync(storage):
    csr = _csr()
    lib = np.asarray(csr.sum(1)).ravel() + 1.0
    counts = DeviceCounts(csr, lib, torch.device("cpu"), storage=storage)
    assert counts.storage == storage
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.randperm(50, generator=gen).split(16))
    counts.prepare(batches)  # one synchronisation for the whole epoch
    with forbid_sync():
        outs = [counts.batch(b) for b in batches]
    with pytest.raises(AssertionError, match="synchronising"), forbid_sync():
        counts.batch(batches[0].clone())  # not prepared: needs its total
    refs = [_reference(csr, b) for b in batches]
    for out, ref in zip(outs, refs):
        _assert_batch(out, ref)
    # an unplanned index tensor (same values, another object) takes the synchronising path, same result
    _assert_batch(counts.batch(batches[0].clone()), refs[0])
    torch.testing.assert_close(counts.log_library, torch.as_tensor(np.log(lib), dtype=torch.float32))


def test_batches_sliced_in_chunks_equal_scipy_slicing_in_any_order(monkeypatch):
    """Device storage slices consecutive planned batches together (chunks of CHUNK_NNZ non-zeros);
    with tiny chunks (several per epoch, a batch larger than a chunk, an empty batch) every batch is
    still exactly scipy's, asked for in order, out of order or twice, and without synchronising."""
    monkeypatch.setattr(batching, "CHUNK_NNZ", 40)
    csr = _csr()
    counts = DeviceCounts(csr, np.asarray(csr.sum(1)).ravel() + 1.0, torch.device("cpu"), storage="device")
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    batches = list(perm[:45].split(7)) + [torch.tensor([3]), perm[45:]]  # row 3 is empty
    counts.prepare(batches)
    assert len(counts._chunks) > 2
    order = list(range(len(batches))) + [4, 0, 0, len(batches) - 1, 2]
    with forbid_sync():
        outs = [counts.batch(batches[i]) for i in order]
    for i, out in zip(order, outs):
        _assert_batch(out, _reference(csr, batches[i]))


def test_host_storage_equals_device_storage_and_shares_memory():
    csr = _csr(seed=1)
    lib = np.asarray(csr.sum(1)).ravel() + 1.0
    dev = DeviceCounts(csr, lib, torch.device("cpu"), storage="device")
    host = DeviceCounts(csr, lib, torch.device("cpu"), storage="host")
    idx = torch.tensor([3, 7, 0, 49, 7, 12])  # repeats and an empty row
    for a, b in zip(dev.batch(idx), host.batch(idx)):
        assert torch.equal(a, b)
    assert torch.equal(dev.log_factorial, host.log_factorial)
    # int32 indices and float32 values are used in place (no copy of the CSR arrays)
    assert host.indices.dtype == torch.int32 and host.values.dtype == torch.float32
    assert host.indices.data_ptr() == csr.indices.ctypes.data
    assert host.values.data_ptr() == csr.data.ctypes.data
    assert DeviceCounts(csr, lib, torch.device("cpu")).storage == "device"  # auto: no CUDA
    with pytest.raises(ValueError, match="storage"):
        DeviceCounts(csr, lib, torch.device("cpu"), storage="disk")


@pytest.mark.parametrize("storage", ["device", "host"])
def test_subset_equals_sliced_matrix(storage):
    csr = _csr(seed=2)
    lib = np.asarray(csr.sum(1)).ravel() + 1.0
    rows = np.array([10, 3, 44, 3, 0])
    full = DeviceCounts(csr, lib, torch.device("cpu"), storage=storage)
    sub = full.subset(rows)
    ref = DeviceCounts(csr[rows], lib[rows], torch.device("cpu"), storage=storage)
    assert sub.n_cells == 5 and sub.indices is full.indices
    idx = torch.tensor([4, 1, 2])
    for a, b in zip(sub.batch(idx), ref.batch(idx)):
        assert torch.equal(a, b)
    for name in ("log_library", "log_factorial", "indptr", "row_nnz"):
        assert torch.equal(getattr(sub, name), getattr(ref, name)), name
    nested = full.subset(torch.tensor([44, 3, 10])).subset([2, 0])  # torch rows, a subset of a subset
    for a, b in zip(nested.batch(torch.tensor([0, 1])), ref.batch(torch.tensor([0, 2]))):
        assert torch.equal(a, b)


def test_log_factorial_in_row_blocks_equals_one_pass(monkeypatch):
    from scipy.special import gammaln

    csr = _csr(n=200, seed=3)
    one = np.asarray(sp.csr_matrix((gammaln(csr.data.astype(np.float64) + 1), csr.indices, csr.indptr),
                                   shape=csr.shape).sum(1), dtype=np.float32).ravel()
    monkeypatch.setattr(batching, "_CHUNK_NNZ", 17)
    np.testing.assert_array_equal(batching._log_factorial(csr), one)


def test_fused_nb_matches_autograd_reference_with_weights():
    torch.manual_seed(0)
    n, g = 7, 25
    x = torch.poisson(torch.rand(n, g) * 5) * (torch.rand(n, g) < 0.5)
    x[2] = 0
    x[4, 3] = 5000.0
    rows, cols = x.nonzero(as_tuple=True)
    log_mu = (3 * torch.randn(n, g)).double().requires_grad_(True)
    log_r = (2 * torch.randn(g)).double().requires_grad_(True)
    log_fact = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, torch.lgamma(x[rows, cols].double() + 1))
    log_fact.requires_grad_(True)
    w = torch.rand(n, dtype=torch.float64)  # a non-uniform upstream gradient
    ours = nb_log_prob_sparse(log_mu, log_r, rows * g + cols, rows, x[rows, cols].double(), log_fact)
    ref = nb_log_prob(x.double(), log_mu, log_r).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-9)
    got = torch.autograd.grad((ours * w).sum(), [log_mu, log_r, log_fact])
    want = torch.autograd.grad((ref * w).sum(), [log_mu, log_r])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(got[2], -w)
    # frozen dispersions (fitting new cells): only the log-mean gradient, the same one
    frozen = nb_log_prob_sparse(log_mu, log_r.detach(), rows * g + cols, rows, x[rows, cols].double())
    (only,) = torch.autograd.grad((frozen * w).sum(), [log_mu])
    torch.testing.assert_close(only, want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("table", [True, False])
def test_fused_softmax_nb_matches_autograd_reference(table, monkeypatch):
    """Logits plus library sizes in: the same values and gradients (logits, library, dispersions)
    as log_softmax + library outside, through the reference NB; on the CPU's table path and on
    the direct path a GPU takes."""
    import dgdcell.nn.likelihoods as lk

    monkeypatch.setattr(lk, "_use_table", lambda values: table)
    torch.manual_seed(1)
    n, g = 6, 30
    x = torch.poisson(torch.rand(n, g) * 6) * (torch.rand(n, g) < 0.5)
    x[1] = 0
    x[3, 2] = 400.0  # above the table's counts
    rows, cols = x.nonzero(as_tuple=True)
    vals = x[rows, cols].double()
    logits = (2 * torch.randn(n, g)).double().requires_grad_(True)
    log_lib = (5 + torch.randn(n)).double().requires_grad_(True)
    log_r = torch.randn(g).double().requires_grad_(True)
    w = torch.rand(n, dtype=torch.float64)
    ours = nb_log_prob_sparse(logits, log_r, rows * g + cols, rows, vals, log_library=log_lib)
    ref = nb_log_prob(x.double(), torch.log_softmax(logits, -1) + log_lib.unsqueeze(-1), log_r).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-9)
    got = torch.autograd.grad((ours * w).sum(), [logits, log_lib, log_r])
    want = torch.autograd.grad((ref * w).sum(), [logits, log_lib, log_r])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
    # frozen dispersions and library sizes (representation-only passes): the same logit gradient
    frozen = nb_log_prob_sparse(logits, log_r.detach(), rows * g + cols, rows, vals, log_library=log_lib.detach())
    (only,) = torch.autograd.grad((frozen * w).sum(), [logits])
    torch.testing.assert_close(only, want[0], rtol=1e-10, atol=1e-9)


def test_sparse_view_accumulates_the_dense_gradient_at_batch_rows():
    torch.manual_seed(0)
    csr = _csr(n=20, g=8)
    counts = DeviceCounts(csr, np.asarray(csr.sum(1)).ravel() + 1.0, torch.device("cpu"))

    def cells():
        z = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
        return CellSet(rep=RepresentationLayer(3, 20, z), cov_reps={"b": RepresentationLayer(2, 20, z[:, :2])},
                       counts={"rna": counts})

    dense, sparse = cells(), cells()
    view = _sparse_view(sparse)
    assert view.n == 20 and view.rep.n_rep == 3 and view.parameters()[0] is sparse.rep.z
    for idx in torch.randperm(20).split(6):
        for c in (dense, view):
            (c.rep(idx).square().sum() + 3 * c.cov_reps["b"](idx).sum()).backward()
    assert sparse.rep.z.grad.layout == torch.strided
    torch.testing.assert_close(sparse.rep.z.grad, dense.rep.z.grad, rtol=0, atol=0)
    torch.testing.assert_close(sparse.cov_reps["b"].z.grad, dense.cov_reps["b"].z.grad, rtol=0, atol=0)


def test_count_terms_table_and_direct_paths_match_scipy():
    from scipy.special import digamma, gammaln

    from dgdcell.nn.likelihoods import TABLE_COUNTS, _count_terms

    x = torch.tensor([0.0, 1.0, 2.0, 7.0, TABLE_COUNTS, TABLE_COUNTS + 1, 30.0, 1000.0, 1e6] * 6)  # 0: stored zero
    r = torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 1e4], dtype=torch.float64)
    cols = torch.arange(6).repeat_interleave(9)
    xn, rn = x.double().numpy(), r.numpy()[cols.numpy()]
    for step, special, ref in ((torch.log, torch.lgamma, gammaln(xn + rn) - gammaln(rn)),
                               (torch.reciprocal, torch.digamma, digamma(xn + rn) - digamma(rn))):
        for table in (True, False):  # True: the CPU path, False: the GPU path
            got = _count_terms(x, r, cols, step, special, table=table).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-8)


def test_frozen_parameters_are_restored_also_after_an_error():
    """Validation passes freeze the decoder and mixtures; every flag comes back as it was
    (a 'fixed' covariance stays frozen), also when the pass raises."""
    from torch import nn

    from dgdcell.latent import GaussianMixture
    from dgdcell.train import frozen

    dec = nn.Linear(3, 2)
    gmm = GaussianMixture(4, 3, covariance_type="fixed")
    before = [p.requires_grad for m in (dec, gmm) for p in m.parameters()]
    assert before.count(False) == 1  # the fixed covariance
    with frozen(dec, gmm):
        assert not any(p.requires_grad for m in (dec, gmm) for p in m.parameters())
    assert [p.requires_grad for m in (dec, gmm) for p in m.parameters()] == before
    with pytest.raises(RuntimeError), frozen(dec, gmm):
        raise RuntimeError("boom")
    assert [p.requires_grad for m in (dec, gmm) for p in m.parameters()] == before


def test_validation_batch_size_does_not_change_the_fit(monkeypatch):
    """Validation representations step once per epoch on their own gradients, so fitting them in
    larger minibatches (the default) gives the fit of minibatches of batch_size."""
    import dgdcell.train.loop as loop
    from dgdcell import DGD

    from .conftest import make_counts

    adata = make_counts(n_per_group=(40, 30, 30), seed=2)
    fits = []
    for elements in (1, 1 << 22):  # 16-cell validation minibatches (4 of them), then all 50 cells at once
        monkeypatch.setattr(loop, "REPRESENTATION_BATCH_ELEMENTS", elements)
        model = DGD(latent_dim=4, n_components=3, seed=0).fit(adata, max_epochs=6, batch_size=16, train_size=0.5,
                                                                early_stopping=False, verbose=False)
        fits.append((model.history["val_loss"], adata.obsm["X_dgd"].copy()))
    np.testing.assert_allclose(fits[0][0], fits[1][0], rtol=1e-5)
    np.testing.assert_allclose(fits[0][1], fits[1][1], atol=1e-4)
