"""Adam for the fitting loop: one native call per step on the CPU.

``torch.optim.Adam(fused=True)`` updates the decoder's and mixtures' dozen
tensors in one kernel, but its Python side (parameter groups, state look-ups,
the step counters' bookkeeping) costs a few hundred microseconds per
minibatch, and building the first one imports ``torch._dynamo`` (about a
second, once per process). :class:`Adam` keeps the same arithmetic
(PyTorch's fused CPU Adam: no weight decay, no amsgrad) and steps every tensor
in one call of ``dgdcell/train/adam_kernels.c`` when the native kernels are
available and every parameter is a float32 CPU tensor; otherwise it wraps
``torch.optim.Adam`` (fused where the device supports it), e.g. on a GPU.
"""

from __future__ import annotations

import ctypes

import torch

from ..nn import native


class Adam:
    """Adam over ``params``: tensors, or parameter groups (dicts with
    ``params`` and optionally their own ``lr``), as for ``torch.optim.Adam``.

    Only what the fitting loop needs: :meth:`zero_grad` and :meth:`step`.
    A parameter whose gradient is None does not step (its step count stays).
    Gradients must be dense (sparse ones are made dense for the step).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float = 1e-8):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.params: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        self.lrs = [float(g.get("lr", lr)) for g in groups for _ in g["params"]]
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        simple = all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in self.params)
        self._lib = native.checked_kernels("Adam") if simple else None
        self._torch = None
        if self._lib is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
            self._torch = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=fused)
            return
        n = len(self.params)
        self._exp_avg = [torch.zeros_like(p) for p in self.params]
        self._exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._steps = (ctypes.c_int64 * n)()
        self._sizes = (ctypes.c_int64 * n)(*[p.numel() for p in self.params])
        self._lr_array = (ctypes.c_float * n)(*self.lrs)
        self._pointers = ctypes.c_void_p * n

    @property
    def native(self) -> bool:
        """Whether steps go through the native kernel."""
        return self._lib is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none``) or fill them with zeros."""
        if self._torch is not None:
            self._torch.zero_grad(set_to_none=set_to_none)
            return
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every parameter that has a gradient."""
        if self._torch is not None:
            self._torch.step()
            return
        grads = []
        for p in self.params:
            g = p.grad
            if g is not None and (g.is_sparse or not g.is_contiguous() or g.dtype != torch.float32):
                g = g.to_dense().to(torch.float32).contiguous()
            grads.append(g)
        ptr = self._pointers
        self._lib.dgd_adam_step(
            len(self.params),
            ptr(*[p.data_ptr() for p in self.params]),
            ptr(*[None if g is None else g.data_ptr() for g in grads]),
            ptr(*[m.data_ptr() for m in self._exp_avg]),
            ptr(*[v.data_ptr() for v in self._exp_avg_sq]),
            self._sizes, self._lr_array, self._steps, self.betas[0], self.betas[1], self.eps,
            torch.get_num_threads(),
        )


def reference_adam_steps(params, grads_per_step, lrs, betas, eps=1e-8):
    """Adam in float64 tensor operations (the formula of :mod:`dgdcell.train.adam_kernels`):
    ``params`` (tensors) after one step per entry of ``grads_per_step`` (a list
    of per-parameter gradients, None for no step). For checks and tests."""
    b1, b2 = betas
    out = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in out]
    v = [torch.zeros_like(p) for p in out]
    t = [0] * len(out)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            t[i] += 1
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = v[i].sqrt() / (1 - b2 ** t[i]) ** 0.5 + eps
            out[i] = out[i] - lrs[i] / (1 - b1 ** t[i]) * m[i] / denom
    return out


def _check_native(lib) -> str | None:
    """Three steps of the native Adam against :func:`reference_adam_steps`
    (a large tensor split over threads, small ones, one without a gradient in
    a step); returns what disagrees, or None."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 400), (7,), (5, 3)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    lrs = [1e-3, 1e-2, 5e-2]
    steps = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    steps[1][2] = None
    ours = [p.clone() for p in params]
    opt = Adam([{"params": [p], "lr": lr} for p, lr in zip(ours, lrs)], lr=lrs[0], betas=(0.5, 0.7))
    if not opt.native:
        return "the optimiser did not take the native kernel"
    for grads in steps:
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
    for i, (a, b) in enumerate(zip(ours, reference_adam_steps(params, steps, lrs, (0.5, 0.7)))):
        err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0))
        if not err <= 1e-5:
            return f"tensor {i} differs from the reference by {err:.2e} relative"
    if list(opt._steps) != [3, 3, 2]:
        return f"step counts {list(opt._steps)} instead of [3, 3, 2]"
    return None


native.register_check("Adam", _check_native)
