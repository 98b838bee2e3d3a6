"""dgdcell's Adam (one native call per step on the CPU) takes the steps of
torch.optim.Adam, and falls back to it where the kernels do not apply."""

from __future__ import annotations

import pytest
import torch

from dgdcell.nn import native
from dgdcell.train.adam import Adam, reference_adam_steps

needs_kernels = pytest.mark.skipif(native.checked_kernels("Adam") is None,
                                   reason=f"native kernels: {native.native_status()}")


def _problem(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(200, 400), (400,), (10, 20), (10,)]  # the first is split over threads
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    steps = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(5)]
    steps[2][3] = None  # no gradient: no step for that tensor
    steps[3][0] = None
    return params, steps


def _run(cls, params, steps, **kw):
    ours = [p.clone().requires_grad_() for p in params]
    groups = [{"params": ours[:2], "lr": 1e-3}, {"params": ours[2:], "lr": 3e-2}]
    opt = cls(groups, lr=1e-3, betas=(0.5, 0.7), **kw)
    for grads in steps:
        opt.zero_grad(set_to_none=True)
        for p, g in zip(ours, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return opt, [p.detach() for p in ours]


@needs_kernels
def test_native_adam_takes_torch_adams_steps():
    params, steps = _problem()
    opt, ours = _run(Adam, params, steps)
    assert opt.native
    for fused in (True, False):
        _, theirs = _run(torch.optim.Adam, params, steps, fused=fused)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    lrs = [1e-3, 1e-3, 3e-2, 3e-2]
    for a, b in zip(ours, reference_adam_steps(params, steps, lrs, (0.5, 0.7))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert list(opt._steps) == [4, 5, 5, 4]


@needs_kernels
def test_native_adam_is_the_same_on_one_thread_and_several():
    params, steps = _problem(seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = _run(Adam, params, steps)
    finally:
        torch.set_num_threads(threads)
    _, many = _run(Adam, params, steps)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_fallback_to_torch_adam(monkeypatch):
    """float64 parameters, or the kernels switched off, go through torch.optim.Adam."""
    params, steps = _problem(seed=2, dtype=torch.float64)
    opt, ours = _run(Adam, params, steps)
    assert not opt.native
    _, theirs = _run(torch.optim.Adam, params, steps, fused=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(native, "NATIVE_ON_CPU", False)
    params32 = [p.float() for p in params]
    steps32 = [[None if g is None else g.float() for g in s] for s in steps]
    opt, ours = _run(Adam, params32, steps32)
    assert not opt.native
    _, theirs = _run(torch.optim.Adam, params32, steps32, fused=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@needs_kernels
def test_zero_grad_and_sparse_gradients():
    """zero_grad(set_to_none=False) keeps zero-filled gradients; a sparse
    gradient steps like its dense form."""
    z = torch.randn(6, 3, requires_grad=True)
    dense = z.detach().clone().requires_grad_()
    opt, ref = Adam([z], lr=0.1, betas=(0.9, 0.99)), Adam([dense], lr=0.1, betas=(0.9, 0.99))
    idx = torch.tensor([0, 4, 4])
    torch.nn.functional.embedding(idx, z, sparse=True).sum().backward()
    torch.nn.functional.embedding(idx, dense).sum().backward()
    assert z.grad.is_sparse
    opt.step()
    ref.step()
    torch.testing.assert_close(z.detach(), dense.detach())
    opt.zero_grad(set_to_none=False)
    assert z.grad is not None and not z.grad.to_dense().any()
    opt.zero_grad()
    assert z.grad is None
