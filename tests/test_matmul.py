"""The CPU matrix-product route (dgdcell.train.matmul): exact or not used."""

import pytest
import torch

from dgdcell.train import matmul


def test_accuracy_check_separates_float32_from_bfloat16():
    assert matmul.float32_accurate(torch.matmul)
    assert not matmul.float32_accurate(lambda a, b: a.bfloat16().float() @ b.bfloat16().float())


def _setting():
    return torch.backends.mkldnn.matmul.fp32_precision if matmul._settable() else None


def test_context_is_exact_and_restores_the_setting():
    before = _setting()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 120, generator=gen), torch.randn(120, 500, generator=gen)
    with matmul.onednn_float32_matmul("cpu"):
        inside = a @ b
        assert matmul.float32_accurate(torch.matmul)  # whatever route is taken, float32 accuracy holds
    assert _setting() == before
    torch.testing.assert_close(inside, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="boom"):
        with matmul.onednn_float32_matmul("cpu"):
            raise RuntimeError("boom")
    assert _setting() == before


def test_switch_and_other_devices_leave_pytorch_default(monkeypatch):
    before = _setting()
    with matmul.onednn_float32_matmul("cuda"):  # only the device type is read: no GPU needed
        assert _setting() == before
    monkeypatch.setattr(matmul, "ONEDNN_ON_CPU", False)
    with matmul.onednn_float32_matmul("cpu"):
        assert _setting() == before


def test_an_inexact_route_is_not_used(monkeypatch):
    if not matmul._settable():
        pytest.skip("this PyTorch has no oneDNN float32 precision switch")
    monkeypatch.setattr(matmul, "_exact", None)
    monkeypatch.setattr(matmul, "_check", lambda: False)
    before = _setting()
    with matmul.onednn_float32_matmul("cpu"):
        assert _setting() == before
    monkeypatch.setattr(matmul, "_exact", None)
    monkeypatch.setattr(matmul, "_check", lambda: True)
    with matmul.onednn_float32_matmul("cpu"):
        assert _setting() == "bf16"
    assert _setting() == before
