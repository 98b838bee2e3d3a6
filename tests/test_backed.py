"""Counts streamed from disk: a backed AnnData fits and transforms as the same data in memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

import dgdcell
from dgdcell.data import backed as backed_module
from dgdcell.data import read_data
from dgdcell.data.backed import BackedCounts
from dgdcell.train.batching import DeviceCounts
from dgdcell.train.loop import epoch_order
from dgdcell.train.streaming import StreamedCounts

from .conftest import make_counts

SMALL = {"latent_dim": 4, "n_components": 3, "device": "cpu"}


@pytest.fixture
def h5ad(tmp_path):
    """A small generated data set written to an .h5ad: (path, the AnnData in memory)."""
    adata = make_counts(n_per_group=(90, 70, 60), n_genes=50, seed=3)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path, adata


def _open(path):
    return ad.read_h5ad(path, backed="r")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backed_fit_equals_in_memory_fit_with_the_same_blocks(h5ad):
    path, _ = h5ad
    memory, backed = ad.read_h5ad(path), _open(path)
    kw = {"max_epochs": 6, "batch_size": 32, "block_size": 64, "verbose": False}
    a = dgdcell.DGD(**SMALL).fit(memory, **kw)
    b = dgdcell.DGD(**SMALL).fit(backed, **kw)
    np.testing.assert_array_equal(memory.obsm["X_dgd"], backed.obsm["X_dgd"])
    np.testing.assert_array_equal(memory.obsm["X_dgd_cluster_probs"], backed.obsm["X_dgd_cluster_probs"])
    assert a.history["train_loss"] == b.history["train_loss"] and a.history["val_loss"] == b.history["val_loss"]
    for (name, p), q in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(p, q), name
    assert backed.isbacked and b.fit_settings["block_size"] == 64


def test_backed_fit_smaller_than_a_block_equals_the_default_in_memory_fit(h5ad):
    path, _ = h5ad
    memory, backed = ad.read_h5ad(path), _open(path)
    dgdcell.DGD(**SMALL).fit(memory, max_epochs=4, verbose=False)
    dgdcell.DGD(**SMALL).fit(backed, max_epochs=4, verbose=False)  # one block of DEFAULT_BLOCK_CELLS
    np.testing.assert_array_equal(memory.obsm["X_dgd"], backed.obsm["X_dgd"])


def test_block_wise_shuffle_fits_as_well_as_a_full_shuffle(h5ad):
    path, adata = h5ad
    memory, backed = ad.read_h5ad(path), _open(path)
    a = dgdcell.DGD(**SMALL).fit(memory, max_epochs=25, batch_size=32, verbose=False, early_stopping=False)
    b = dgdcell.DGD(**SMALL).fit(backed, max_epochs=25, batch_size=32, block_size=50, verbose=False,
                                 early_stopping=False)
    truth = adata.obs["group"].to_numpy()
    assert adjusted_rand_score(memory.obs["dgd_cluster"], backed.obs["dgd_cluster"]) >= 0.9
    assert adjusted_rand_score(truth, backed.obs["dgd_cluster"]) >= 0.9
    assert abs(a.history["val_loss"][-1] - b.history["val_loss"][-1]) <= 0.02 * abs(a.history["val_loss"][-1])


def test_epoch_order_is_block_wise_and_covers_every_cell():
    gen = torch.Generator().manual_seed(0)
    perm, sizes = epoch_order(230, 16, gen, block_size=50)
    assert sorted(perm.tolist()) == list(range(230)) and sum(sizes) == 230
    for batch in perm.split(sizes):
        assert len(set((batch // 50).tolist())) == 1  # no minibatch spans two blocks
    blocks = (perm // 50).tolist()
    assert [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]] == list(dict.fromkeys(blocks))
    # without blocks (or a block of all the cells): the permutation of the in-memory path, unchanged
    plain, plain_sizes = epoch_order(230, 16, torch.Generator().manual_seed(0))
    assert plain_sizes == [16] * 14 + [6]
    assert torch.equal(plain, torch.randperm(230, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(epoch_order(230, 16, torch.Generator().manual_seed(0), 500)[0], plain)


def test_streamed_counts_give_the_in_memory_triplets_and_hold_one_block(h5ad):
    path, adata = h5ad
    backed = _open(path)
    source = BackedCounts(backed.X).scan()
    library = source.library
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 180, replace=False))
    streamed = StreamedCounts(source, library, torch.device("cpu"), block_cells=40).subset(rows)
    memory = DeviceCounts(adata.X, library, torch.device("cpu")).subset(rows)
    torch.testing.assert_close(streamed.log_library, memory.log_library, rtol=0, atol=0)
    torch.testing.assert_close(streamed.log_factorial, memory.log_factorial, rtol=0, atol=0)
    perm, sizes = epoch_order(180, 16, torch.Generator().manual_seed(1), block_size=40)
    batches = list(perm.split(sizes))
    streamed.prepare(batches)
    memory.prepare(batches)
    for idx in batches:
        for s, m in zip(streamed.batch(idx), memory.batch(idx)):
            assert torch.equal(s, m)
    assert streamed.n_reads == 5  # one read per block of 40 cells
    assert streamed.max_chunk_cells <= 40
    # an unplanned minibatch is read on its own
    idx = torch.tensor([5, 170, 3])
    for s, m in zip(streamed.batch(idx), memory.batch(idx)):
        assert torch.equal(s, m)


def test_take_reads_sampled_rows_equal_to_memory(h5ad):
    path, adata = h5ad
    source = BackedCounts(_open(path).X).scan()
    rows = np.sort(np.random.default_rng(2).choice(adata.n_obs, 37, replace=False))
    for block_nnz, gap_nnz in ((None, None), (64, 0), (10_000, 10_000)):
        got = source.take(rows, block_nnz, gap_nnz)
        want = adata.X[rows]
        assert (got != want).nnz == 0 and got.dtype == np.float32 and got.has_canonical_format


def test_read_data_streams_without_materialising_the_counts(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    X = sp.random(24000, 200, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.ceil(X.data * 10)
    path = tmp_path / "moderate.h5ad"
    ad.AnnData(X).write_h5ad(path)
    counts_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    monkeypatch.setattr(backed_module, "SCAN_BLOCK_NNZ", 1 << 14)
    backed = _open(path)
    tracemalloc.start()
    try:
        data = read_data(backed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(data.counts["rna"], BackedCounts) and data.backed
    assert peak < 0.2 * counts_bytes, (peak, counts_bytes)  # (n,) vectors and one block, never the matrix
    np.testing.assert_array_equal(data.library["rna"], np.asarray(X.sum(1)).ravel())


def test_transform_on_backed_data_equals_in_memory(h5ad):
    path, _ = h5ad
    model = dgdcell.DGD(**SMALL).fit(ad.read_h5ad(path), max_epochs=5, verbose=False)
    memory, backed = ad.read_h5ad(path), _open(path)
    model.transform(memory, max_epochs=8, verbose=False)
    model.transform(backed, max_epochs=8, verbose=False)
    np.testing.assert_array_equal(memory.obsm["X_dgd"], backed.obsm["X_dgd"])
    # block by block (from disk or memory alike): the same cells, the same results
    memory_blocks, backed_blocks = ad.read_h5ad(path), _open(path)
    model.transform(memory_blocks, max_epochs=8, verbose=False, block_size=64)
    model.transform(backed_blocks, max_epochs=8, verbose=False, block_size=64)
    np.testing.assert_array_equal(memory_blocks.obsm["X_dgd"], backed_blocks.obsm["X_dgd"])
    np.testing.assert_allclose(memory_blocks.obsm["X_dgd"], memory.obsm["X_dgd"], atol=1e-3)
    record = backed_blocks.uns["dgd"]["transform"]
    assert record["block_size"] == 64 and len(record["history"]["loss"]) >= 1


def test_transform_backed_with_missing_features(tmp_path):
    adata = make_counts(n_per_group=(60, 50, 40), n_genes=40, seed=5)
    model = dgdcell.DGD(**SMALL).fit(adata.copy(), max_epochs=3, verbose=False)
    query = adata[:, 5:].copy()  # 5 training genes missing
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    memory, backed = ad.read_h5ad(path), _open(path)
    model.transform(memory, max_epochs=4, verbose=False)
    model.transform(backed, max_epochs=4, verbose=False)
    np.testing.assert_array_equal(memory.obsm["X_dgd"], backed.obsm["X_dgd"])
    assert backed.uns["dgd"]["transform"]["features"]["rna"]["n_missing"] == 5


def test_bernoulli_on_backed_counts_equals_in_memory(h5ad):
    path, _ = h5ad
    memory, backed = ad.read_h5ad(path), _open(path)
    kw = {"max_epochs": 3, "block_size": 100, "verbose": False}
    dgdcell.DGD(**SMALL, likelihood="bernoulli").fit(memory, **kw)
    dgdcell.DGD(**SMALL, likelihood="bernoulli").fit(backed, **kw)
    np.testing.assert_array_equal(memory.obsm["X_dgd"], backed.obsm["X_dgd"])


def test_errors_name_the_setting_and_leave_file_and_objects_unchanged(h5ad, tmp_path):
    path, adata = h5ad
    before = _digest(path)
    backed = _open(path)
    for bad in (0, -3, 2.5, "64", True):
        with pytest.raises(ValueError, match="block_size"):
            dgdcell.DGD(**SMALL).fit(backed, max_epochs=1, block_size=bad, verbose=False)
    with pytest.raises(ValueError, match="modality_key.*backed.*to_memory"):
        dgdcell.DGD(**SMALL, modality_key="kind").fit(_with_kind(adata, tmp_path), max_epochs=1, verbose=False)
    model = dgdcell.DGD(**SMALL).fit(ad.read_h5ad(path), max_epochs=1, verbose=False)
    with pytest.raises(ValueError, match="block_size"):
        model.transform(backed, block_size=0, verbose=False)
    assert list(backed.obsm.keys()) == [] and "dgd_cluster" not in backed.obs and "dgd" not in backed.uns
    assert _digest(path) == before


def _with_kind(adata, tmp_path):
    two = adata.copy()
    two.var["kind"] = ["rna"] * 40 + ["adt"] * 10
    path = tmp_path / "two.h5ad"
    two.write_h5ad(path)
    return _open(path)


def test_csc_and_non_count_files_are_refused_with_the_fix(h5ad, tmp_path):
    _, adata = h5ad
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc_path = tmp_path / "csc.h5ad"
    csc.write_h5ad(csc_path)
    with pytest.raises(ValueError, match="CSC.*Rewrite it as CSR"):
        dgdcell.DGD(**SMALL).fit(_open(csc_path), max_epochs=1, verbose=False)
    logged = adata.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    logged_path = tmp_path / "logged.h5ad"
    logged.write_h5ad(logged_path)
    opened = _open(logged_path)
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values"):
        dgdcell.DGD(**SMALL).fit(opened, max_epochs=1, verbose=False)
    assert "X_dgd" not in opened.obsm


def test_dense_backed_matrix_is_streamed(tmp_path, h5ad):
    _, adata = h5ad
    dense = adata.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    backed = _open(path)
    data = read_data(backed)
    assert isinstance(data.counts["rna"], BackedCounts)
    assert (data.counts["rna"].read(0, adata.n_obs) != adata.X).nnz == 0


def test_zarr_store_read_through_anndata_sparse_dataset(h5ad, tmp_path):
    zarr = pytest.importorskip("zarr")
    path, adata = h5ad
    store = tmp_path / "cells.zarr"
    adata.write_zarr(store)
    group = zarr.open(store, mode="r")
    lazy = ad.AnnData(X=ad.io.sparse_dataset(group["X"]), obs=ad.io.read_elem(group["obs"]),
                      var=ad.io.read_elem(group["var"]))
    memory = ad.read_h5ad(path)
    kw = {"max_epochs": 3, "block_size": 100, "verbose": False}
    dgdcell.DGD(**SMALL).fit(memory, **kw)
    dgdcell.DGD(**SMALL).fit(lazy, **kw)
    assert isinstance(read_data(lazy).counts["rna"], BackedCounts)
    np.testing.assert_array_equal(memory.obsm["X_dgd"], lazy.obsm["X_dgd"])


def test_merge_histories_weights_blocks_by_their_cells():
    from dgdcell.train.new_cells import merge_histories

    a = {"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "reconstruction": [3.0, 2.0, 1.0], "n_active": [2, 2, 1],
         "candidate": [0, 1], "start_loss": [4.0], "n_candidates": [3], "seconds_init": [0.5]}
    b = {"epoch": [1], "loss": [6.0], "reconstruction": [5.0], "n_active": [1], "candidate": [2],
         "start_loss": [7.0], "n_candidates": [3], "seconds_init": [0.25]}
    out = merge_histories([(2, a), (1, b)])
    assert out["epoch"] == [1, 2, 3] and out["n_active"] == [3, 2, 1] and out["candidate"] == [0, 1, 2]
    np.testing.assert_allclose(out["loss"], [(6 + 6) / 3, (4 + 6) / 3, (2 + 6) / 3])
    np.testing.assert_allclose(out["start_loss"], [5.0])
    assert out["seconds_init"] == [0.75] and merge_histories([(2, a)]) is a
