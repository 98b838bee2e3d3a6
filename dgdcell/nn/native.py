"""Native CPU kernels, compiled on first use: the negative-binomial likelihood
and the Gaussian-mixture prior of a minibatch.

On the CPU the sparse NB likelihood of :mod:`dgdcell.nn.likelihoods` costs
about ten PyTorch operations over the (cells x features) arrays forward and
backward, each a pass through memory. ``nb_kernels.c`` (next to this file)
does the same work reading each cell's row once forward and once backward
while it is in the cache, vectorised and over PyTorch's threads. The mixture
prior of :mod:`dgdcell.latent.gmm` is tiny work spread over some forty small
PyTorch operations; ``dgdcell/latent/mixture_kernels.c`` does it in one call
forward and one backward. ``dgdcell/train/adam_kernels.c`` steps Adam over all
of a model's tensors in one call (:mod:`dgdcell.train.adam`).

They are plain C with no Python or PyTorch headers: the first call compiles them
with the system's C compiler (``$CC``, else ``cc``; about 0.5 s, with
``-O3 -march=native`` and OpenMP where available) into a cache folder
(``$DGDCELL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dgdcell`` or
``~/.cache/dgdcell``) under a name that changes with the source, the
compiler flags and the processor, and loads it with :mod:`ctypes`. Before
its first use each family of kernels is checked against its PyTorch
implementation on a small problem (values and gradients to 1e-4 relative;
see :func:`checked_kernels`).

Where there is no compiler, the build fails, a check fails, or
:data:`NATIVE_ON_CPU` is False (or ``DGDCELL_NATIVE=0`` is set), the
PyTorch implementations are used: the results agree to float32 rounding
either way. :func:`native_status` tells which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: set to False to use the PyTorch implementation everywhere
NATIVE_ON_CPU = os.environ.get("DGDCELL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")

#: the C sources, compiled into one library
SOURCES = tuple(Path(__file__).parent.parent / name for name in
                ("nn/nb_kernels.c", "latent/mixture_kernels.c", "train/adam_kernels.c"))
#: compiler flag sets tried in order (the first that builds is used)
#: (without OpenMP's threads, ``-fopenmp-simd`` still vectorises the loops on one thread)
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"],
    ["-O3", "-fno-math-errno", "-fopenmp-simd"],
    ["-O3", "-fno-math-errno"],
)
#: relative agreement with the PyTorch implementation required by the check
CHECK_TOLERANCE = 1e-4

#: the library (None until built, or when it cannot be), why, and each family's check result
_state: dict = {"lib": None, "tried": False, "reason": "not loaded yet", "checks": {}}
_CHECKING = object()
#: kernel family name -> its check (``check(lib)`` returns what disagrees, or None)
_CHECKS: dict = {}

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cache_dir() -> Path:
    explicit = os.environ.get("DGDCELL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dgdcell"


def _processor() -> str:
    """What identifies this processor's instruction set (the build uses ``-march=native``)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _writable_cache() -> Path:
    """The cache folder, created; a per-user temporary folder where it cannot be written."""
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"dgdcell-{getattr(os, 'getuid', lambda: 0)()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable folder for the compiled kernels (set DGDCELL_CACHE_DIR)")


def _build(cc: str) -> Path:
    """Compile the kernels (or find them in the cache); returns the library's path.
    A cached build of any flag set is taken before compiling, so a machine where
    the first sets fail does not retry them in every process."""
    source = b"".join(path.read_bytes() for path in SOURCES)
    folder = _writable_cache()
    suffix = ".dll" if sys.platform == "win32" else ".so"
    targets = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([cc] + flags).encode() + _processor().encode()).hexdigest()[:16]
        targets.append((flags, folder / f"nb_kernels-{key}{suffix}"))
    cached = [target for _, target in targets if target.exists()]
    if cached:
        return cached[0]
    errors = []
    for flags, target in targets:
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, SOURCES)]
        if sys.platform != "win32":
            cmd.append("-lm")
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}: {err}")
            continue
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: parallel processes may build at once
            logger.info("compiled dgdcell's native kernels in %.1f s (%s)", time.perf_counter() - t0, " ".join(flags))
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.dgd_nb_forward.restype = ctypes.c_int
    lib.dgd_nb_forward.argtypes = [_I, _I, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.dgd_nb_backward.restype = ctypes.c_int
    lib.dgd_nb_backward.argtypes = [_I, _I, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.dgd_nb_forward_csr.restype = ctypes.c_int
    lib.dgd_nb_forward_csr.argtypes = [_I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.dgd_nb_backward_csr.restype = ctypes.c_int
    lib.dgd_nb_backward_csr.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int,
                                        ctypes.c_int]
    _F, _D, _C = ctypes.c_float, ctypes.c_double, ctypes.c_int
    lib.dgd_mixture_forward.restype = _C
    lib.dgd_mixture_forward.argtypes = [_I, _I, _I, _P, _P, _P, _I, _P, _C, _F, _F, _F, _P, _P, _C]
    lib.dgd_mixture_backward.restype = _C
    lib.dgd_mixture_backward.argtypes = [_I, _I, _I, _P, _P, _P, _I, _P, _C, _P, _P, _F, _P, _P, _P, _P,
                                         _F, _P, _P, _P, _C]
    lib.dgd_parameter_prior.restype = _D
    lib.dgd_parameter_prior.argtypes = [_I, _I, _P, _P, _P, _I] + [_D] * 8 + [_P, _P, _P]
    lib.dgd_adam_step.restype = None
    lib.dgd_adam_step.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _C]
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def nb_forward(lib, logits, log_library, log_r, rows, flat_index, values, log_factorial):
    """(B,) log-likelihoods and (B,) row log-sum-exps of the logits; None when
    the non-zeros are not in row order. All arguments contiguous CPU tensors:
    float32 (B, G) logits, (B,) log libraries, (G,) log dispersions, int64
    rows / flat indices and float32 values of the non-zeros, (B,) log factorials."""
    b, g = logits.shape
    out = torch.empty(b, dtype=torch.float32)
    lse = torch.empty(b, dtype=torch.float32)
    code = lib.dgd_nb_forward(
        b, g, _ptr(logits), _ptr(log_library), _ptr(log_r), rows.shape[0], _ptr(rows), _ptr(flat_index),
        _ptr(values), _ptr(log_factorial), _ptr(out), _ptr(lse), torch.get_num_threads(),
    )
    if code == -2:
        raise MemoryError("dgdcell's native NB kernel could not allocate its work space")
    return None if code else (out, lse)


def nb_backward(lib, logits, log_library, lse, log_r, rows, flat_index, values, grad, want_logits, want_library, want_r):
    """Gradients of :func:`nb_forward`'s output weighted by ``grad`` (B,): for
    the logits (B, G), the log libraries (B,) and the log dispersions (G,),
    each None when not wanted; None for all when the non-zeros are out of order."""
    b, g = logits.shape
    d_logits = torch.empty(b, g, dtype=torch.float32) if want_logits else None
    d_lib = torch.empty(b, dtype=torch.float32) if want_library else None
    d_r = torch.empty(g, dtype=torch.float32) if want_r else None
    code = lib.dgd_nb_backward(
        b, g, _ptr(logits), _ptr(log_library), _ptr(lse), _ptr(log_r), rows.shape[0], _ptr(rows),
        _ptr(flat_index), _ptr(values), _ptr(grad), _ptr(d_logits), _ptr(d_lib), _ptr(d_r),
        torch.get_num_threads(),
    )
    if code == -2:
        raise MemoryError("dgdcell's native NB kernel could not allocate its work space")
    return None if code else (d_logits, d_lib, d_r)


def nb_forward_csr(lib, logits, log_library, log_r, start, length, indices, values, log_factorial):
    """:func:`nb_forward` with the non-zeros of cell ``i`` at positions
    ``start[i] .. start[i] + length[i] - 1`` ((B,) int64 each) of a CSR
    matrix's (nnz,) int32 ``indices`` and float32 ``values`` (read in place);
    None when a span or a column is out of range."""
    b, g = logits.shape
    out = torch.empty(b, dtype=torch.float32)
    lse = torch.empty(b, dtype=torch.float32)
    code = lib.dgd_nb_forward_csr(
        b, g, _ptr(logits), _ptr(log_library), _ptr(log_r), _ptr(start), _ptr(length), indices.shape[0],
        _ptr(indices), _ptr(values), _ptr(log_factorial), _ptr(out), _ptr(lse), torch.get_num_threads(),
    )
    if code == -2:
        raise MemoryError("dgdcell's native NB kernel could not allocate its work space")
    return None if code else (out, lse)


def nb_backward_csr(lib, logits, log_library, lse, log_r, start, length, indices, values, grad,
                    want_logits, want_library, want_r, check_columns=True):
    """:func:`nb_backward` with the non-zeros as in :func:`nb_forward_csr`
    (``check_columns=False``: the forward pass has checked these arrays' columns)."""
    b, g = logits.shape
    d_logits = torch.empty(b, g, dtype=torch.float32) if want_logits else None
    d_lib = torch.empty(b, dtype=torch.float32) if want_library else None
    d_r = torch.empty(g, dtype=torch.float32) if want_r else None
    code = lib.dgd_nb_backward_csr(
        b, g, _ptr(logits), _ptr(log_library), _ptr(lse), _ptr(log_r), _ptr(start), _ptr(length),
        indices.shape[0], _ptr(indices), _ptr(values), _ptr(grad), _ptr(d_logits), _ptr(d_lib), _ptr(d_r),
        int(check_columns), torch.get_num_threads(),
    )
    if code == -2:
        raise MemoryError("dgdcell's native NB kernel could not allocate its work space")
    return None if code else (d_logits, d_lib, d_r)


#: log-weight modes of the mixture kernels (see mixture_kernels.c)
SHARED_LOG_WEIGHTS, ROW_LOG_WEIGHTS, WEIGHT_LOGITS = 0, 1, 2


def mixture_forward(lib, x, mean, neglogvar, log_w, mode, pi_term, sign=1.0, add=0.0):
    """``sign * logsumexp_k(log_w_k + log N(x_i | m_k, exp(-nlv_k))) + add`` per
    row, (B,) float32, and the responsibilities (B, K). Contiguous float32
    CPU tensors: ``x`` (B, D), ``mean`` (K, D), ``neglogvar`` (K, 1|D),
    ``log_w`` (K,) or (B, K) as ``mode`` says (shared log weights, a row
    each, or weight logits)."""
    b, d = x.shape
    k = mean.shape[0]
    out = torch.empty(b, dtype=torch.float32)
    resp = torch.empty(b, k, dtype=torch.float32)
    code = lib.dgd_mixture_forward(b, k, d, _ptr(x), _ptr(mean), _ptr(neglogvar), neglogvar.shape[1], _ptr(log_w),
                                   mode, pi_term, sign, add, _ptr(out), _ptr(resp), torch.get_num_threads())
    if code:
        raise MemoryError("dgdcell's native mixture kernel could not allocate its work space")
    return out, resp


def mixture_backward(lib, x, mean, neglogvar, log_w, mode, resp, grad, sign, want, prior_coef=0.0,
                     prior_grads=(None, None, None)):
    """Gradients of :func:`mixture_forward` weighted by ``grad`` (B,) for
    ``want`` = (x, mean, neglogvar, log_w) (None where not wanted); with
    ``prior_coef``, ``prior_coef * grad.sum()`` times ``prior_grads`` (for the
    mean, the weight logits and neglogvar) is added (see mixture_kernels.c)."""
    b, d = x.shape
    k = mean.shape[0]
    shapes = ((b, d), (k, d), tuple(neglogvar.shape), tuple(log_w.shape) if mode == ROW_LOG_WEIGHTS else (k,))
    outs = [torch.empty(s, dtype=torch.float32) if w else None for s, w in zip(shapes, want)]
    code = lib.dgd_mixture_backward(
        b, k, d, _ptr(x), _ptr(mean), _ptr(neglogvar), neglogvar.shape[1], _ptr(log_w), mode, _ptr(resp),
        _ptr(grad), sign, *map(_ptr, outs), prior_coef, *map(_ptr, prior_grads), torch.get_num_threads(),
    )
    if code:
        raise MemoryError("dgdcell's native mixture kernel could not allocate its work space")
    return outs


def parameter_prior(lib, mean, weight, neglogvar, constants, want=(True, True, True)):
    """Log density of a mixture's parameters under their priors (a float) and
    its gradients for ``mean`` (K, D), ``weight`` (K,) and ``neglogvar``
    (K, 1|D) (None where not wanted; ``neglogvar`` None leaves its prior out).
    ``constants``: radius, sharpness and log normaliser of the softball,
    alpha and log normaliser of the Dirichlet, mean, sd and log normaliser of
    the Gaussian (see mixture_kernels.c)."""
    k, d = mean.shape
    grads = [torch.empty(t.shape, dtype=torch.float32) if w and t is not None else None
             for t, w in zip((mean, weight, neglogvar), want)]
    nlv_dim = 0 if neglogvar is None else neglogvar.shape[1]
    value = lib.dgd_parameter_prior(k, d, _ptr(mean), _ptr(weight), _ptr(neglogvar), nlv_dim, *constants,
                                    *map(_ptr, grads))
    return value, grads


def _self_check(lib) -> str | None:
    """Compare the kernels with the PyTorch implementation on a small
    problem; returns what disagrees, or None."""
    from .likelihoods import _NBSparse  # the PyTorch implementation

    gen = torch.Generator().manual_seed(0)
    b, g = 7, 37
    logits = torch.randn(b, g, generator=gen) * 2
    log_lib = torch.rand(b, generator=gen) * 6 + 2
    log_r = torch.randn(g, generator=gen)
    counts = torch.poisson(torch.softmax(logits, 1) * log_lib.exp().unsqueeze(1), generator=gen)
    counts[0, :3] = torch.tensor([40.0, 17.0, 16.0])  # counts beyond the tables
    rows, cols = counts.nonzero(as_tuple=True)
    flat, values = rows * g + cols, counts[rows, cols]
    log_fact = torch.zeros(b).index_add_(0, rows, torch.lgamma(values + 1))
    weight = torch.rand(b, generator=gen) + 0.5
    x = logits.clone().requires_grad_()
    ll = log_lib.clone().requires_grad_()
    lr = log_r.clone().requires_grad_()
    with torch.enable_grad():  # the first call may come from inside a forward pass
        ref = _NBSparse.apply(x, ll, lr, flat, rows, values, log_fact)
        ref_grads = torch.autograd.grad((ref * weight).sum(), (x, ll, lr))
    ref = ref.detach()
    fwd = nb_forward(lib, logits, log_lib, log_r, rows, flat, values, log_fact)
    if fwd is None:
        return "the forward kernel refused ordered non-zeros"
    bwd = nb_backward(lib, logits, log_lib, fwd[1], log_r, rows, flat, values, weight, True, True, True)
    if bwd is None:
        return "the backward kernel refused ordered non-zeros"
    # the same cells as CSR rows, in reverse order
    length = torch.bincount(rows, minlength=b)
    start = (length.cumsum(0) - length).flip(0).contiguous()
    length = length.flip(0).contiguous()
    cols = (flat - rows * g).to(torch.int32)
    back = torch.arange(b - 1, -1, -1)
    fwd_csr = nb_forward_csr(lib, logits[back], log_lib[back], log_r, start, length, cols, values, log_fact[back])
    if fwd_csr is None:
        return "the CSR forward kernel refused valid rows"
    bwd_csr = nb_backward_csr(lib, logits[back], log_lib[back], fwd_csr[1], log_r, start, length, cols, values,
                              weight[back].contiguous(), True, True, True)
    if bwd_csr is None:
        return "the CSR backward kernel refused valid rows"
    csr = (fwd_csr[0][back], bwd_csr[0][back], bwd_csr[1][back], bwd_csr[2])
    for layout, got in (("", (fwd[0], *bwd)), ("CSR ", csr)):
        for name, ours, theirs in zip(("log-likelihood", "logit gradient", "library gradient", "dispersion gradient"),
                                      got, (ref, *ref_grads)):
            scale = theirs.abs().max().clamp_min(1.0)
            err = float((ours - theirs).abs().max() / scale)
            if not err <= CHECK_TOLERANCE:
                return f"{layout}{name} differs from PyTorch's by {err:.2e} relative"
    return None


def _library():
    """The compiled and loaded library, or None (built once per process)."""
    if not NATIVE_ON_CPU:
        return None
    if _state["tried"]:
        return _state["lib"]
    _state["tried"] = True
    cc = _compiler()
    if cc is None:
        _state["reason"] = "no C compiler found ($CC, cc, gcc, clang)"
        logger.info("dgdcell's native kernels are off: %s; using PyTorch operations", _state["reason"])
        return None
    try:
        _state["lib"], _state["reason"] = _load(_build(cc)), "compiled"
    except Exception as err:  # noqa: BLE001 - any failure means: use PyTorch
        _state["reason"] = f"{type(err).__name__}: {err}"
        logger.warning("dgdcell's native kernels are off (%s); using PyTorch operations", _state["reason"])
    return _state["lib"]


def register_check(family: str, check) -> None:
    """Declare a family of kernels and its check: ``check(lib)`` compares them
    with their PyTorch implementation and returns what disagrees, or None."""
    _CHECKS[family] = check


def checked_kernels(family: str):
    """The library when it is built and the kernels of ``family`` pass their
    check (run once per process), else None."""
    lib = _library()
    if lib is None:
        return None
    checks = _state.setdefault("checks", {})
    if checks.get(family, "") is _CHECKING:  # the check itself runs the kernels
        return lib
    if family not in checks:
        checks[family] = _CHECKING
        try:
            with torch.enable_grad():  # the first call may come from inside a forward pass
                checks[family] = _CHECKS[family](lib)
        except Exception as err:  # noqa: BLE001 - any failure means: use PyTorch
            checks[family] = f"{type(err).__name__}: {err}"
        if checks[family] is not None:
            logger.warning("dgdcell's native %s kernels are off (%s); using PyTorch operations", family, checks[family])
    return None if checks[family] is not None else lib


def native_kernels():
    """The loaded kernel library with the NB kernels checked, or None (see
    the module's text for when it is None)."""
    return checked_kernels("NB")


def native_status() -> str:
    """One line: whether the native kernels are in use on the CPU, and why."""
    if not NATIVE_ON_CPU:
        return "off (switched off)"
    if _library() is None:
        return f"off ({_state['reason']})"
    problems = {family: _state["checks"][family] for family in _CHECKS if checked_kernels(family) is None}
    if not problems:
        return "on (compiled and checked)"
    if len(problems) == len(_CHECKS):
        return "off (" + "; ".join(f"{f}: {p}" for f, p in problems.items()) + ")"
    on = [f for f in _CHECKS if f not in problems]
    return f"on for {', '.join(on)} (" + "; ".join(f"{f} off: {p}" for f, p in problems.items()) + ")"


register_check("NB", _self_check)
