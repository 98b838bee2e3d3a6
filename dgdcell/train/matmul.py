"""Float32 matrix products on the CPU through oneDNN, where that is exact.

PyTorch sends float32 matrix products on the CPU to MKL, which takes slow
code paths on some processors (AMD's among them: a 256 x 100 by 100 x 2,000
product, the decoder's output layer, runs about 2x slower there than
oneDNN's float32 kernel). PyTorch routes them to oneDNN only when it may use
bfloat16 arithmetic (``torch.backends.mkldnn.matmul.fp32_precision =
"bf16"``). Whether oneDNN then really rounds to bfloat16 depends on the
processor and the oneDNN version (processors with bfloat16 matrix units,
such as Intel's AMX, are where it can); on the AMD EPYC (Zen 4) of our
benchmarks it computes in float32 (rounding errors within a few times MKL's).

:func:`onednn_float32_matmul` therefore allows that route only after
checking, once per process, that products computed through it agree with
float64 ones to float32 accuracy; where oneDNN would round to bfloat16, the
training keeps PyTorch's default and loses nothing in precision.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

#: set to False to keep PyTorch's default float32 matrix products everywhere
ONEDNN_ON_CPU = True
#: largest relative error (to the products' scale) that counts as float32
#: accuracy; bfloat16 inputs give about 1e-3 on the check's products
FLOAT32_TOLERANCE = 1e-5

_exact: bool | None = None


def _settable() -> bool:
    """Whether this PyTorch has the oneDNN float32 precision switch (2.9+) and oneDNN."""
    mkldnn = torch.backends.mkldnn
    return hasattr(mkldnn, "matmul") and hasattr(mkldnn.matmul, "fp32_precision") and mkldnn.is_available()


@contextmanager
def _precision(value: str):
    """Context with ``torch.backends.mkldnn.matmul.fp32_precision = value``,
    restored on exit (also on error)."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


def onednn_is_exact() -> bool:
    """Whether float32 products routed through oneDNN keep float32 accuracy
    on this machine (checked once per process, in a few milliseconds).

    The check is :func:`float32_accurate` of products routed through oneDNN.
    """
    global _exact
    if _exact is None:
        _exact = _settable() and _check()
        logger.debug("oneDNN float32 matrix products %s", "exact: used on the CPU" if _exact else "not used")
    return _exact


def _check() -> bool:
    with _precision("bf16"):
        return float32_accurate(torch.matmul)


def float32_accurate(product) -> bool:
    """Whether ``product(a, b)`` (a float32 matrix product) agrees with
    float64 to :data:`FLOAT32_TOLERANCE` on random matrices shaped like a
    decoder layer's forward and backward products (all three transpositions;
    inner sizes 100 to 2,000). The error of each entry is taken relative to
    the product of the norms of its row and column."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 100, generator=gen)
    w = torch.randn(2000, 100, generator=gen)
    g = torch.randn(256, 2000, generator=gen)
    for a, b in [(x, w.t()), (g.t(), x), (g, w)]:
        ref = a.double() @ b.double()
        scale = (a.double().square().sum(1, keepdim=True) * b.double().square().sum(0, keepdim=True)).sqrt()
        if float(((product(a, b).double() - ref).abs() / scale).max()) > FLOAT32_TOLERANCE:
            return False
    return True


@contextmanager
def onednn_float32_matmul(device: torch.device | str):
    """Context in which float32 matrix products on the CPU go through oneDNN
    when :func:`onednn_is_exact` (and :data:`ONEDNN_ON_CPU`) allow it; a no-op
    on other devices or otherwise. The previous setting is restored on exit.
    The switch is process-wide: other threads' products during the context
    take the same route."""
    if torch.device(device).type != "cpu" or not ONEDNN_ON_CPU or not onednn_is_exact():
        yield
        return
    with _precision("bf16"):
        yield
