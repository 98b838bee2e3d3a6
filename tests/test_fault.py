"""Fault tolerance: a fit killed mid-way resumes from its checkpoint, and a checkpoint
is never left half-written, whenever the process dies."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dgdcell import DGD

from .conftest import make_counts

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(latent_dim=3, n_components=3, seed=0)


def _history_length(directory: Path) -> int:
    """Epochs recorded in the checkpoint's config.json (0 while there is none)."""
    try:
        return len(json.loads((directory / "config.json").read_text())["history"]["epoch"])
    except FileNotFoundError:
        return 0


def test_killed_fit_resumes_from_its_checkpoint(tmp_path):
    adata = make_counts(n_per_group=(40, 30, 30), n_genes=40)
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import anndata as ad, torch
        torch.set_num_threads(1)
        from dgdcell import DGD
        adata = ad.read_h5ad({str(data)!r})
        DGD(**{MODEL!r}).fit(adata, max_epochs=100000, early_stopping=False, guide_epochs=2,
                             checkpoint_dir={str(ckpt)!r}, checkpoint_every=1, verbose=False)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _history_length(ckpt) < 3:
            assert proc.poll() is None, f"the fit ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    model = DGD.load(ckpt, device="cpu")
    saved = {k: list(v) for k, v in model.history.items()}
    n_saved = len(saved["epoch"])
    assert n_saved >= 3 and saved["epoch"] == list(range(1, n_saved + 1))
    assert model.obs_names == list(adata.obs_names)

    model.fit(adata, warm_start=True, max_epochs=5, early_stopping=False, checkpoint_dir=ckpt, verbose=False)
    h = model.history
    assert h["epoch"] == list(range(1, n_saved + 6))  # the saved epochs, then 5 more
    for key in ("train_loss", "val_loss", "seconds"):
        assert h[key][:n_saved] == saved[key] and len(h[key]) == n_saved + 5
    assert all(b >= a for a, b in zip(h["seconds"], h["seconds"][1:]))
    # a warm start continues, it does not start over: no worse than where it stopped
    assert h["train_loss"][-1] <= saved["train_loss"][-1] + 0.01 * abs(saved["train_loss"][-1])
    assert h["val_loss"][-1] <= saved["val_loss"][-1] + 0.01 * abs(saved["val_loss"][-1])
    # results written into the AnnData and into the checkpoint
    assert adata.obsm["X_dgd"].shape == (adata.n_obs, 3) and np.isfinite(adata.obsm["X_dgd"]).all()
    assert "dgd_cluster" in adata.obs and len(adata.uns["dgd"]["history"]["epoch"]) == n_saved + 5
    assert _history_length(ckpt) == n_saved + 5
    np.testing.assert_array_equal(DGD.load(ckpt, device="cpu").get_latent_representation(), adata.obsm["X_dgd"])


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the library catches a BaseException that is not an Exception."""


def _crash_at(monkeypatch, target: int, partial: bool) -> dict:
    """Make the ``target``-th file-system step of writing a model raise :class:`Killed`.

    Steps are ``torch.save``, ``Path.write_text`` and ``os.replace`` calls in the order the
    library makes them; with ``partial`` a ``torch.save``/``write_text`` step first writes the
    first half of its bytes (a process killed mid-write). Returns a record of the steps and of
    every representation passed to ``torch.save``.
    """
    record = {"steps": [], "saved_reps": []}
    real_save, real_write, real_replace = torch.save, Path.write_text, os.replace

    def step(kind):
        record["steps"].append(kind)
        return len(record["steps"]) == target

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "representation" in obj:
            record["saved_reps"].append(obj["representation"].clone())
        if step("save"):
            if partial:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Killed
        return real_save(obj, f, *args, **kwargs)

    def write_text(self, text, *args, **kwargs):
        if step("write_text"):
            if partial:
                real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise Killed
        return real_write(self, text, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if step("replace"):
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(os, "replace", replace)
    return record


@pytest.fixture(scope="module")
def small():
    return make_counts(n_per_group=(30, 30, 30), n_genes=30)


def _steps_per_checkpoint(small, tmp_path, monkeypatch) -> int:
    record = _crash_at(monkeypatch, target=-1, partial=False)
    DGD(**MODEL).fit(small.copy(), max_epochs=1, guide_epochs=0, checkpoint_dir=tmp_path / "probe", checkpoint_every=1,
                     verbose=False)
    monkeypatch.undo()
    return len(record["steps"]) // 2  # epoch 1's checkpoint, then the final write


@pytest.mark.parametrize("partial", [False, True])
def test_a_checkpoint_is_loadable_whenever_the_writer_dies(small, tmp_path, monkeypatch, partial):
    """Kill the fit at every file-system step of writing the second checkpoint (epoch 2):
    the directory always holds a loadable model, at epoch 1 or 2, never a torn file."""
    per = _steps_per_checkpoint(small, tmp_path, monkeypatch)
    assert per >= 2
    for offset in range(1, per + 1):
        ckpt = tmp_path / f"ckpt_{partial}_{offset}"
        record = _crash_at(monkeypatch, target=per + offset, partial=partial)
        adata = small.copy()
        with pytest.raises(Killed):
            DGD(**MODEL).fit(adata, max_epochs=5, guide_epochs=0, early_stopping=False, checkpoint_dir=ckpt,
                             checkpoint_every=1, verbose=False)
        monkeypatch.undo()
        assert len(record["steps"]) == per + offset  # died where intended
        assert "X_dgd" not in adata.obsm and "dgd" not in adata.uns  # a dead fit writes nothing
        model = DGD.load(ckpt, device="cpu")
        assert len(model.history["epoch"]) in (1, 2)
        assert any(torch.equal(model.representation, rep) for rep in record["saved_reps"][:2])
        model.fit(adata, warm_start=True, max_epochs=1, verbose=False)  # and it resumes
        assert adata.obsm["X_dgd"].shape == (adata.n_obs, 3)


def test_a_checkpoint_pair_is_from_one_epoch_whenever_the_writer_dies(small, tmp_path, monkeypatch):
    per = _steps_per_checkpoint(small, tmp_path, monkeypatch)
    for offset in range(1, per + 1):
        ckpt = tmp_path / f"ckpt_{offset}"
        record = _crash_at(monkeypatch, target=per + offset, partial=False)
        with pytest.raises(Killed):
            DGD(**MODEL).fit(small.copy(), max_epochs=5, guide_epochs=0, early_stopping=False, checkpoint_dir=ckpt,
                             checkpoint_every=1, verbose=False)
        monkeypatch.undo()
        model = DGD.load(ckpt, device="cpu")
        epoch = len(model.history["epoch"])
        assert torch.equal(model.representation, record["saved_reps"][epoch - 1])


def test_a_nan_loss_leaves_the_last_finite_checkpoint_to_resume_from(small, tmp_path, monkeypatch):
    from .reference import nan_reconstruction_after

    n_batches = 1  # 90 cells * 0.9 train in one batch of 256: one training batch per epoch
    # training batch + validation batch per epoch: epoch 4 starts at call 7
    nan_reconstruction_after(6 * n_batches, monkeypatch)
    ckpt = tmp_path / "ckpt"
    adata = small.copy()
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 4"):
        DGD(**MODEL).fit(adata, max_epochs=20, guide_epochs=0, checkpoint_dir=ckpt, checkpoint_every=1, verbose=False)
    monkeypatch.undo()
    assert "X_dgd" not in adata.obsm
    model = DGD.load(ckpt, device="cpu")
    assert model.history["epoch"] == [1, 2, 3]  # the last finite epoch
    assert all(np.isfinite(model.history[k]).all() for k in ("train_loss", "val_loss"))
    weights = json.loads((ckpt / "config.json").read_text()).get("weights_file", "weights.pt")
    tensors = torch.load(ckpt / weights, weights_only=True)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    model.fit(adata, warm_start=True, max_epochs=2, lr_decoder=1e-4, verbose=False)
    assert model.history["epoch"] == [1, 2, 3, 4, 5] and np.isfinite(adata.obsm["X_dgd"]).all()


def test_ctrl_c_still_writes_the_checkpoint_and_the_results(small, tmp_path, monkeypatch):
    import dgdcell.train.loop as loop

    real = loop.representation_epoch
    calls = {"n": 0}

    def interrupt_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "representation_epoch", interrupt_on_fourth)
    ckpt = tmp_path / "ckpt"
    adata = small.copy()
    DGD(**MODEL).fit(adata, max_epochs=20, guide_epochs=0, checkpoint_dir=ckpt, checkpoint_every=10, verbose=False)
    model = DGD.load(ckpt, device="cpu")
    assert model.history["epoch"] == [1, 2, 3]
    np.testing.assert_array_equal(model.get_latent_representation(), adata.obsm["X_dgd"])
    assert list(adata.uns["dgd"]["history"]["epoch"]) == [1, 2, 3]


def test_resuming_twice_from_one_checkpoint_gives_identical_results(small, tmp_path):
    ckpt = tmp_path / "ckpt"
    DGD(**MODEL).fit(small.copy(), max_epochs=3, guide_epochs=0, checkpoint_dir=ckpt, verbose=False)
    a, b = small.copy(), small.copy()
    DGD.load(ckpt, device="cpu").fit(a, warm_start=True, max_epochs=3, verbose=False)
    DGD.load(ckpt, device="cpu").fit(b, warm_start=True, max_epochs=3, verbose=False)
    np.testing.assert_array_equal(a.obsm["X_dgd"], b.obsm["X_dgd"])
    np.testing.assert_array_equal(a.uns["dgd"]["history"]["val_loss"], b.uns["dgd"]["history"]["val_loss"])
    assert not np.array_equal(a.obsm["X_dgd"], DGD.load(ckpt).get_latent_representation())  # it did train
