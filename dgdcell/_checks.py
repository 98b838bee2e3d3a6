"""Checks of user settings: each failure is a ValueError that names the setting and the fix."""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import torch


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (no bools, no floats such as 2.5)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound} (an integer), got {value!r}.")
    return int(value)


def check_number(name: str, value, low: float = 0.0, high: float = math.inf, open_low: bool = True) -> float:
    """``value`` as a finite float in ``(low, high]`` (``[low, high]`` without ``open_low``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) > low if open_low else float(value) >= low) and float(value) <= high
    if not ok:
        span = f"{'(' if open_low else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}.")
    return float(value)


def check_pair(name: str, value, low: float = 0.0) -> tuple[float, float]:
    """Two finite numbers, each > ``low``."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (a, b), got {value!r}.") from None
    return check_number(f"{name}[0]", a, low), check_number(f"{name}[1]", b, low)


def check_widths(name: str, value) -> list[int]:
    """Hidden layer widths: a sequence of integers >= 1 (may be empty)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of layer widths such as (100, 100), got {value!r}.")
    return [check_int(f"{name}[{i}]", w, 1) for i, w in enumerate(value)]


#: device types a DGD runs on
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; ``'cpu'``, ``'cuda'``, ``'cuda:N'``, ``'mps'``
    or a ``torch.device`` of those types, checked to be available here."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r} ({err}).") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but this PyTorch sees no CUDA device; use device='cpu' or 'auto'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but there are {torch.cuda.device_count()} CUDA devices.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but Apple's MPS is not available here; use device='cpu' or 'auto'.")
    return dev


def check_not_view(adata, call: str) -> None:
    """Warn when ``adata`` is an AnnData view: the results are written into it, which makes it an object
    of its own (anndata's implicit copy): the parent is left unchanged, and a view made in the call
    itself (``dgd.fit(adata[mask])``) is lost with its results."""
    if getattr(adata, "is_view", False):
        warnings.warn(
            f"{call}() got a view of an AnnData (e.g. adata[mask]): its results are written into that view, which "
            f"becomes a copy of its own; the parent AnnData is not changed. Keep a handle on it: "
            f"sub = adata[mask].copy(); dgd.{call}(sub).", UserWarning, stacklevel=3)
