"""Data-parallel fit and transform on torch.distributed (gloo; processes of one thread each)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import torch

import dgdcell
from dgdcell.pl import adjusted_rand_index
from dgdcell.train import distributed as dd
from dgdcell.train.loop import _batches

from ._distributed_worker import EPOCHS, FIT, TRANSFORM
from .conftest import make_counts

ROOT = Path(__file__).resolve().parents[1]
#: a rank that is still running after this many seconds counts as hung
HANG_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in dd.TORCHRUN_ENV + ("LOCAL_RANK",)}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
            **extra}


def _launch(task: str, out: Path, world: int = 2) -> list[int]:
    """Run ``tests/_distributed_worker.py TASK OUT`` as ``world`` processes with torchrun's
    environment; their exit codes (a hang fails the test)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests._distributed_worker", task, str(out)], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(world)]
    try:
        return [p.wait(timeout=HANG_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- in this process
def test_auto_detection_and_settings(monkeypatch):
    for key in dd.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not dd.resolve_distributed(None) and not dd.resolve_distributed(False)
    assert dd.open_comm(None, torch.device("cpu")) is None  # one process: nothing touched
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="torchrun"):
        dd.open_comm(True, torch.device("cpu"))
    with pytest.raises(ValueError, match="distributed must be"):
        dd.resolve_distributed("yes")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dd.resolve_distributed(None) and not dd.resolve_distributed(False)


def test_shard_batches_are_one_process_batches():
    """The ranks' batches k together are one process's batch k (same generator state)."""
    n, size, world = 23, 5, 3
    single = _batches(SimpleNamespace(n=n, counts={}), size, torch.Generator().manual_seed(7), "cpu")
    blocks = np.array_split(np.arange(n), world)
    parts = [_batches(SimpleNamespace(n=len(b), counts={}), size, torch.Generator().manual_seed(7), "cpu",
                      shard=(int(b[0]), n)) for b in blocks]
    assert all(len(p) == len(single) for p in parts)
    for k, batch in enumerate(single):
        joined = torch.cat([p[k] + int(b[0]) for p, b in zip(parts, blocks)])
        assert sorted(joined.tolist()) == sorted(batch.tolist())


def test_one_process_group_gives_the_single_process_fit(one_thread, tmp_path):
    """distributed=True in a process group of one (made by the caller, kept by fit) runs the
    data-parallel code path and gives the single-process result bit for bit."""
    kw = {"n_components": 3, "latent_dim": 3, "seed": 0, "device": "cpu"}
    fit = {"max_epochs": 6, "guide_epochs": 2, "verbose": False, "batch_size": 64}
    a, b = make_counts(), make_counts()
    single = dgdcell.DGD(**kw).fit(a, **fit)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    try:
        shared = dgdcell.DGD(**kw).fit(b, distributed=True, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
                                       **fit)
        assert torch.distributed.is_initialized()  # the caller's group is left alone
        query = make_counts(seed=3)
        shared.transform(query, distributed=True, verbose=False, max_epochs=5)
    finally:
        torch.distributed.destroy_process_group()
    assert single.history["train_loss"] == shared.history["train_loss"]
    assert torch.equal(single.representation, shared.representation)
    assert np.array_equal(a.obs["dgd_cluster"], b.obs["dgd_cluster"])
    assert shared.fit_settings["world_size"] == 1
    loaded = dgdcell.DGD.load(tmp_path / "ckpt")  # the final save: one complete weights file, no shards left
    assert torch.equal(loaded.representation, shared.representation)
    assert not (tmp_path / "ckpt" / "shards").exists()
    plain = make_counts(seed=3)
    single.transform(plain, verbose=False, max_epochs=5)
    np.testing.assert_allclose(query.obsm["X_dgd"], plain.obsm["X_dgd"], atol=1e-5)


# --------------------------------------------------------------------------- two processes
def test_two_processes_match_one_process(one_thread, tmp_path):
    """Two gloo processes against one process on CellBench: same losses per epoch, decoder,
    mixture, clusters and transformed cells (the ranks' batches make up one process's)."""
    assert _launch("fit", tmp_path) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in r0["module"]:  # the replicas never drift apart
        assert torch.equal(r0["module"][key], r1["module"][key]), key
    assert torch.equal(r0["z"], r1["z"]) and torch.equal(r0["query_z"], r1["query_z"])

    adata = dgdcell.datasets.cellbench()
    model = dgdcell.DGD(n_components=5, seed=0, device="cpu").fit(adata, max_epochs=EPOCHS, verbose=False, **FIT)
    assert r0["fit_settings"]["world_size"] == 2 and len(r0["history"]["epoch"]) == len(model.history["epoch"])
    for key in ("train_loss", "val_loss", "train_reconstruction"):
        np.testing.assert_allclose(r0["history"][key], model.history[key], rtol=1e-3)
    assert adjusted_rand_index(adata.obs["dgd_cluster"], r0["cluster"].numpy()) >= 0.95
    for key, value in model.module.state_dict().items():
        # summation order differs between one and two processes; over the epochs of Adam a few of the
        # decoder's weights drift by a few 1e-3 (measured on one CPU: 1 weight, 0.0034; on another: 11 of a
        # layer's 10,000, at most 0.0023, relative norm of the difference 0.0014), the rest agree closely
        a, b = r0["module"][key].numpy(), value.numpy()
        off = ~np.isclose(a, b, rtol=1e-2, atol=1e-3)
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
        assert off.mean() <= 2e-3 and np.abs(a - b).max() <= 1e-2 and rel <= 5e-3, (key, int(off.sum()), rel)

    query = dgdcell.datasets.cellbench()[::4].copy()
    model.transform(query, verbose=False, **TRANSFORM)
    # with its own weights (a few 1e-3 apart) most cells land close; the optimisation of a cell from its start
    # amplifies the weights' difference (measured: median 0.007, 90% 0.04; a cell whose best start flips, 2)
    dist = np.abs(query.obsm["X_dgd"] - r0["query_z"].numpy()).max(1)
    assert np.median(dist) < 0.05
    # with the two-process weights the one-process transform is the two-process transform (measured: 2e-7)
    model.module.load_state_dict(r0["module"])
    same = dgdcell.datasets.cellbench()[::4].copy()
    model.transform(same, verbose=False, **TRANSFORM)
    np.testing.assert_allclose(same.obsm["X_dgd"], r0["query_z"].numpy(), atol=1e-5)


def test_killed_rank_stops_the_others(tmp_path):
    """Rank 1 is killed (SIGKILL) in epoch 4: rank 0 stops with a DistributedError instead of
    hanging, and the checkpoint of epoch 3 (one shard per rank) loads."""
    codes = _launch("kill", tmp_path)
    assert codes[1] == -9 and codes[0] not in (0, -9)
    error = (tmp_path / "error0.txt").read_text()
    assert error.startswith("DistributedError") and "another process" in error
    model = dgdcell.DGD.load(tmp_path / "ckpt")
    assert model.history["epoch"] == [1, 2, 3]
    assert model.representation.shape == (150, 3) and torch.isfinite(model.representation).all()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "shards").iterdir()) == [
        "representation.3.0-of-2.pt", "representation.3.1-of-2.pt"]


def test_cli_under_torchrun(tmp_path):
    """'torchrun -m dgdcell fit' with two processes: one output file, one model, one summary."""
    src, dst, model_dir = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "model"
    make_counts().write_h5ad(src)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dgdcell",
           "fit", str(src), "-o", str(dst), "--model-dir", str(model_dir), "--max-epochs", "3",
           "--n-components", "3", "--latent-dim", "3", "--batch-size", "64"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "model", "out.h5ad"]
    assert done.stdout.count("fitted 180 cells") == 1
    out = ad.read_h5ad(dst)
    assert out.obsm["X_dgd"].shape == (180, 3) and out.uns["dgd"]["fit"]["world_size"] == 2
    assert dgdcell.DGD.load(model_dir).representation.shape == (180, 3)


def test_failed_shard_write_keeps_the_last_checkpoint(one_thread, tmp_path, monkeypatch):
    """A rank that cannot write its checkpoint shard stops the fit with its own error; the folder
    keeps the last complete checkpoint and nothing of the failed one; the model is as it was."""
    import dgdcell._fitting as fitting

    write = fitting.write_shard

    def failing(path, name, *args, **kwargs):
        if name.startswith("representation.3."):
            raise OSError("disk full (simulated)")
        return write(path, name, *args, **kwargs)

    monkeypatch.setattr(fitting, "write_shard", failing)
    adata = make_counts()
    model = dgdcell.DGD(n_components=3, latent_dim=3, seed=0, device="cpu")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    try:
        with pytest.raises(OSError, match="disk full"):
            model.fit(adata, max_epochs=6, batch_size=64, verbose=False, distributed=True,
                      checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    finally:
        torch.distributed.destroy_process_group()
    assert model.module is None and "X_dgd" not in adata.obsm
    assert [p.name for p in (tmp_path / "ckpt" / "shards").iterdir()] == ["representation.2.0-of-1.pt"]
    assert dgdcell.DGD.load(tmp_path / "ckpt").history["epoch"] == [1, 2]
