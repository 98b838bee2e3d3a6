"""Speed and memory of dgdcell at 10k, 100k and 1M cells x 2,000 genes.

    python benchmarks/speed.py [--sizes 10000,100000,1000000] [--genes 2000] [--epochs 3]
                               [--batch-sizes 256,1024] [--device cpu|cuda|auto] [--threads N]
                               [--out benchmarks/results]

Data: simulated negative-binomial counts (see :func:`simulate_counts`): 10 cell types, log-normal
library sizes (median ~800 counts over the 2,000 genes), per-gene dispersions around 2, about 9%
non-zeros. Model: the default architecture (``DGD(latent_dim=20, n_components=10)``: trunk
2 x 100, head 2 x 100).

For every size, in this process:

* **loop**: ``DGD(init="zero").fit(adata, max_epochs=E, early_stopping=False)`` (no PCA/Leiden
  start): seconds per epoch (training + validation cells; the fastest of the E epochs), cells per
  second, peak RSS during its training loop (and peak GPU memory on CUDA), seconds before the loop;
* **transform**: ``transform`` of 2,000 newly simulated cells against that model, seconds per
  1,000 cells;
* **full fit**: the default ``DGD().fit(adata, max_epochs=1, early_stopping=False)``: seconds before
  its loop (reading, PCA + Leiden start) and peak RSS of the whole call.

Peak RSS is measured per phase (Linux ``/proc/self/clear_refs``; elsewhere the process's peak so
far). Writes ``<out>/speed.md``, ``speed.csv`` (after every size) and ``speed.png`` (time and memory
against cells); the machine and its load average are recorded with the numbers. Other processes on
the machine slow 2-thread torch work down several-fold: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
# a --epoch-worker process imports whichever dgdcell its PYTHONPATH names (see compare), not this tree's
sys.path[:0] = [str(HERE)] if "--epoch-worker" in sys.argv else [str(HERE), str(HERE.parent)]

import common  # noqa: E402

#: static findings written under the table (measured while optimising; see the issue #5 report)
NOTES = [
    "## Where the time goes (development notes)",
    "",
    "History of the speed rounds. The native C kernels, the oneDNN matrix-product switch and the native Adam "
    "described below were removed in the one-module redesign (everything is PyTorch now); "
    "`python benchmarks/speed.py --compare-with db16e32` measures the PyTorch version against the last native "
    "one side by side (`speed_compare.md`: 1.09x its throughput at 100k cells on this machine).",
    "",
    "Measured on the 2-core AMD EPYC (Zen 4) above with torch 2.13, simulated data as here, minibatch 256. "
    "Per minibatch of 256 cells x 2,000 genes, by timers inside the loop (ms): decoder forward 1.1 (the "
    "output layer's GEMM most of it), slicing the counts 0.7, the NB likelihood 1.8 forward and 1.5 backward "
    "(of which the lgamma / digamma tables 0.65 each), mixture prior 0.6, the rest of the backward pass "
    "(output-layer GEMMs, trunk) 3.2, Adam 0.5 -- about 10 ms in all, so ~25k cells/s. At 50 genes "
    "(dense work negligible) a minibatch still costs ~4.4 ms: per-operation overhead (~300 small tensor "
    "operations forward and backward), which is why 1,024-cell minibatches run 1.3-1.6x more cells per "
    "second. (Measured before the third round below, which brings a 256-cell minibatch to about 8.7 ms, "
    "29k cells/s, in this table's 100k row.)",
    "",
    "Issue #5, second round: validation passes in minibatches of up to 2^22 decoded values "
    "with the decoder and mixtures frozen (the same result: each validation cell's gradient is its own, "
    "one step per epoch), the log-softmax fused into the NB likelihood (one (B, G) pass and allocation "
    "fewer), the count table's positions computed once for forward and backward, one Adam for decoder and "
    "mixtures, the counts of consecutive minibatches sliced together. Paired runs (old and new code at "
    "the same time, one core each, 30k cells): at 50 genes 36-48k -> 60-68k cells/s, at 2,000 genes "
    "+0-10%, inside the noise. Losses are unchanged to 4 decimals. After that round's table was measured: the "
    "mixture log density as one operation with a hand-written backward (forward + backward of a 256-cell "
    "minibatch 390-440 -> 210-280 us in isolation).",
    "",
    "Issue #5, third round: float32 matrix products on the CPU through oneDNN instead of MKL "
    "where a start-up check finds oneDNN exact (`dgdcell.train.matmul`; MKL takes slow paths on this AMD "
    "processor: the output layer's three products for a 256-cell minibatch 550-650 -> 250-320 us each "
    "in isolation, equal to float32 rounding), gathers with `index_select` instead of `take` / advanced "
    "indexing (2.5-3x faster for a minibatch's ~46k non-zeros), the counts' chunked slicing in fewer "
    "passes, and the mixtures' parameter priors as one operation with a hand-written backward. Paired "
    "runs (old and new code at the same time, one core each, 20k cells): 17k -> 20-26k cells/s; two "
    "threads, one after the other: 22-25k -> 26-29k cells/s.",
    "",
    "Issue #5, fifth round (this table): the remaining per-minibatch overheads. The NB likelihood reads a "
    "minibatch's counts in place from the CSR arrays (`nb_log_prob_csr`: the kernels take each cell's start "
    "and length in the whole matrix; slicing the counts 0.51-0.53 -> 0.02-0.05 ms per minibatch); the mixture "
    "prior with its log-softmax weights and parameter priors as one native call forward and one backward "
    "(`dgdcell/latent/mixture_kernels.c`; forward + backward 0.67-0.74 -> 0.27 ms in isolation, forward 0.7 -> "
    "0.18 ms in a step); the decoder's and mixtures' Adam step as one native call with the arithmetic of "
    "PyTorch's fused CPU Adam (`dgdcell/train/adam.py`; 0.55-0.78 -> 0.25 ms in a step, and no "
    "`torch._dynamo` import, 1.2-1.5 s once per process, which `torch.optim.Adam`'s constructor triggers). "
    "In a training step (timers, 6k cells): 7.0-7.6 -> 5.0-5.3 ms -- input 0.1-0.15, decoder forward 0.74-0.99, "
    "slicing 0.02-0.03, NB forward 0.69-0.74, mixture prior 0.18, backward 2.7-3.0, Adam 0.25. Paired in "
    "one process (epochs alternating with the fourth round's slicing and PyTorch prior, Adam unchanged; 20k "
    "cells, batch 256): median 34.5k -> 39.6k cells/s. This benchmark at 100k cells, batch 256, alternating with "
    "the fourth round's code (old, new, old, new): 37.2k, 61.8k, 36.7k, 46.7k cells/s; the same code's 100k row "
    "earlier the same day: 39.5k and 40.0k. A perf profile of the 100k loop: oneDNN's matrix "
    "products 25% of both cores' time, the native kernels 23%, PyTorch's own CPU code 11%, Python 5%, and "
    "OpenMP's waiting threads 28% -- the second core idles while the first runs the serial part of a step "
    "(Python, operator dispatch, small tensors), about half of the wall time.",
    "",
    "Issue #5, fourth round: native CPU kernels for the NB likelihood (`dgdcell/nn/nb_kernels.c`, "
    "compiled on first use by `dgdcell.nn.native`). PyTorch's version makes about ten passes over the (256, "
    "2,000) arrays forward and backward, and its exp and log come from MKL's vector math library, which is "
    "slow on this AMD processor (a (256, 2,000) exp 263 us and log 334 us on 2 threads, against 98 us for a "
    "sigmoid, which uses PyTorch's own vectorised code). The kernels read each row once forward (max, sum of "
    "exp, softplus of mu / r, the row's non-zeros) and once backward (probabilities, the NB gradient, the "
    "non-zeros, the log-softmax backward) while it is in the L1 cache, with exp and log as polynomials that "
    "gcc vectorises to AVX-512, counts <= 16 from per-feature tables and larger ones from Stirling series. "
    "In isolation (256 x 2,000, 45k non-zeros, 2 threads): forward 1.8-2.2 -> 0.55-0.87 ms, backward "
    "1.4-1.8 -> 0.85-1.16 ms. In a training step (timers, 6k cells): 10.4 -> 7.7 ms per minibatch -- input "
    "0.19, decoder forward 1.1, slicing the counts 0.54, NB forward 0.78, mixture prior 0.68, backward 3.7 "
    "(the NB 1.0 of it, the output layer's two products most of the rest), Adam 0.66. Paired in one "
    "process (epochs alternating between the two implementations, 20k cells, batch 256): 31-32k -> "
    "37-42k cells/s, losses equal to 0.02 nats per cell after 8 epochs. What remains at batch 256 is "
    "mostly per-operation overhead (~300 small PyTorch operations per step) and the three output-layer "
    "matrix products (~0.3 ms each, near this CPU's float32 peak).",
    "",
    "The dense work is bound by memory traffic, not arithmetic: a pass over a (256, 2,000) float32 array "
    "that has left the cache costs 140-250 us against 15-30 us while cached (an addition 29 -> 197 us, a "
    "mat-vec 30 -> 249 us after touching 64 MB), and a minibatch makes about 20 such passes. Forming "
    "the NB gradients already in the forward pass, while the arrays are cached (two saved arrays "
    "instead of three, a two-pass backward), measured equal in paired runs and was not kept.",
    "",
    "This machine's speed drifts: the same fixed GEMM + sigmoid loop ran 2.6x slower in the first "
    "second of an 8 s run than in its last, and the unchanged code's 100k-cell epoch took 3.4 s on one day "
    "and 4.5 s on the next. Compare rows of one run only.",
    "",
    "Before issue #5's changes, one thread: 1M cells took 226 CPU s per epoch with a 9.1 GB peak (a dense "
    "(cells x 20) representation gradient per minibatch, int64 and float64 copies of the counts); after the "
    "first round: 58 s and 5.3 GB.",
    "",
    "Tried and not kept: `torch.compile` of decoder + likelihood (46 s to compile, ~10% faster steps) and of "
    "the whole minibatch loss (graph breaks, recompilations: slower); "
    "lgamma / digamma of `x + r` by recurrence + asymptotic series in torch ops (2-4x slower than "
    "`torch.lgamma` / `torch.digamma`: many small passes); glibc malloc thresholds (no page faults in the "
    "loop to save); freezing the garbage collector (2 full collections in 4 epochs); calling `torch._fused_adam_` directly "
    "instead of `torch.optim.Adam(fused=True)` (80 us per minibatch, through a private API); scalar instead "
    "of vectorised scatters in the native kernels' non-zero loops (AMD's AVX-512 scatters are slow, but the "
    "scalar loop measured no faster).",
    "",
    "Memory at 1M cells (~1.4 GB of CSR counts): canonical float32 CSR counts are read without a copy "
    "(the fit shares the AnnData's arrays and never writes them), the training and validation counts are "
    "row views of them, the PCA start's log-normalised matrix shares their index arrays and is built in "
    "row blocks, cluster probabilities and the EM start run in row chunks: loop peak 3.9 -> 2.8 GB, whole "
    "fit 5.7 -> 3.1-3.2 GB; the start (reading, PCA, Leiden) 33 -> 24-27 s.",
]
#: cells simulated per chunk (dense float32 work of chunk x genes)
CHUNK = 8192
N_TYPES = 10
LIBRARY_BINS = 64


# --------------------------------------------------------------------------- data


def _type_profiles(n_genes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Expression fractions (N_TYPES, G) that sum to 1 per type, and dispersions (G,).

    A log-normal base profile; each type changes 20% of the genes by a log-fold change
    drawn from N(0, 1.5^2)."""
    base = rng.normal(0.0, 3.0, n_genes)
    shift = rng.normal(0.0, 1.5, (N_TYPES, n_genes)) * (rng.random((N_TYPES, n_genes)) < 0.2)
    logits = base + shift
    frac = np.exp(logits - logits.max(1, keepdims=True))
    return frac / frac.sum(1, keepdims=True), np.exp(rng.normal(np.log(2.0), 0.5, n_genes))


def _truncated_nb(mu: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws from NB(mu, r) conditioned on being > 0 (float64 arrays of equal shape)."""
    out = np.empty(mu.shape, dtype=np.float32)
    p0 = (r / (r + mu)) ** r
    big = p0 < 0.5  # rejection of zeros costs at most 2 draws on average
    todo = np.flatnonzero(big)
    while todo.size:
        x = rng.poisson(rng.gamma(r[todo], mu[todo] / r[todo]))
        out[todo[x > 0]] = x[x > 0]
        todo = todo[x == 0]
    # inverse CDF from 1 upward for small means (few steps: the pmf falls fast)
    small = np.flatnonzero(~big)
    m, rr, q = mu[small], r[small], p0[small]
    u = q + (1.0 - q) * rng.random(small.size)
    k = np.ones(small.size)
    pk = q * rr * m / (m + rr)
    cdf = q + pk
    active = np.flatnonzero(cdf < u)
    for _ in range(1000):
        if not active.size:
            break
        a = active
        pk[a] *= (k[a] + rr[a]) / (k[a] + 1.0) * m[a] / (m[a] + rr[a])
        k[a] += 1.0
        cdf[a] += pk[a]
        active = a[cdf[a] < u[a]]
    out[small] = k
    return out


def simulate_counts(n_cells: int, n_genes: int = 2000, seed: int = 0, profiles_seed: int = 0):
    """Simulated raw counts as an AnnData (CSR float32 ``.X``, ``obs['cell_type']``).

    ``x_ij ~ NB(s_i p_{t_i j}, r_j)``: type ``t_i`` uniform over 10 types, library ``s_i``
    log-normal (median 1,000, sd 0.6 in log space, quantised to 64 log-spaced levels so that the
    zero probabilities form a small table), fractions and dispersions from ``profiles_seed``
    (shared by training and new cells). Exact NB sampling: a uniform draw per entry against the
    zero probability, then zero-truncated NB values at the non-zeros only, in chunks of cells,
    so memory grows with the non-zeros.
    """
    import anndata as ad
    import pandas as pd
    import torch

    frac, r = _type_profiles(n_genes, np.random.default_rng(profiles_seed))
    rng = np.random.default_rng(seed)
    types = rng.integers(0, N_TYPES, n_cells)
    levels = np.exp(np.linspace(np.log(100.0), np.log(20000.0), LIBRARY_BINS))
    lib = np.clip(np.exp(rng.normal(np.log(800.0), 0.6, n_cells)), levels[0], levels[-1])
    level = np.abs(np.log(lib)[:, None] - np.log(levels)[None, :]).argmin(1)
    mu = levels[None, :, None] * frac[:, None, :]  # (type, level, G)
    p0 = torch.from_numpy(((r / (r + mu)) ** r).reshape(-1, n_genes).astype(np.float32))
    group = torch.from_numpy(types * LIBRARY_BINS + level)
    gen = torch.Generator().manual_seed(seed)
    indptr, indices, data = [np.zeros(1, dtype=np.int64)], [], []
    for s in range(0, n_cells, CHUNK):
        g = group[s : s + CHUNK]
        hit = torch.rand(g.shape[0], n_genes, generator=gen) >= p0[g]
        row, col = hit.nonzero(as_tuple=True)
        row, col = row.numpy(), col.numpy()
        gi = g.numpy()[row]
        data.append(_truncated_nb(mu.reshape(-1, n_genes)[gi, col], r[col], rng))
        indices.append(col.astype(np.int32))
        indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(row, minlength=g.shape[0])))
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n_cells, n_genes))
    empty = np.flatnonzero(np.diff(X.indptr) == 0)
    if empty.size:  # the model rejects cells without counts: give each one count in its top gene
        X = X.tolil()
        X[empty, frac[types[empty]].argmax(1)] = 1.0
        X = X.tocsr()
    obs = pd.DataFrame({"cell_type": pd.Categorical(types.astype(str))}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X, obs=obs, var=var)


# --------------------------------------------------------------------------- measuring


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that memory a
    previous phase freed does not count as resident in the next one; no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB: since the last :func:`reset_peak_rss`
    on Linux, since the start elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


class Phase:
    """Context measuring wall seconds, peak RSS (GB) and, on CUDA, peak GPU memory (GB)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        release_free_memory()
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
        else:
            self.gpu_gb = None
        self.seconds = time.perf_counter() - self.t0
        self.rss_gb = peak_rss_gb()
        return False


def fit_measured(adata, device, max_epochs: int, batch_size: int, **model_kw):
    """``DGD(**model_kw).fit(adata, ...)`` without early stopping, measured as a whole and, separately,
    its training loop (``dgdcell._fitting.train``, wrapped): ``(model, fit Phase, loop Phase, seconds
    from the fit's start to the loop's)``."""
    import dgdcell
    import dgdcell._fitting

    inner, loops = dgdcell._fitting.train, []

    def train(*args, **kwargs):
        loops.append(Phase(device))
        with loops[-1]:
            return inner(*args, **kwargs)

    dgdcell._fitting.train = train
    try:
        with Phase(device) as fit:
            model = dgdcell.DGD(n_components=N_TYPES, seed=0, device=str(device), **model_kw)
            model.fit(adata, max_epochs=max_epochs, early_stopping=False, batch_size=batch_size, verbose=False)
    finally:
        dgdcell._fitting.train = inner
    return model, fit, loops[-1], loops[-1].t0 - fit.t0


def measure_size(n_cells: int, args, device) -> dict:
    """All measurements for one data size (see the module docstring): one result row."""
    t0 = time.perf_counter()
    adata = simulate_counts(n_cells, args.genes, seed=0)
    row = {"cells": n_cells, "genes": args.genes, "nnz %": 100.0 * adata.X.nnz / (n_cells * args.genes),
           "simulate s": time.perf_counter() - t0}
    print(f"[speed] {n_cells} cells simulated in {row['simulate s']:.1f} s ({row['nnz %']:.1f}% non-zeros)", flush=True)

    rows = []
    for batch_size in args.batch_sizes:
        model, _, loop, setup = fit_measured(adata, device, args.epochs, batch_size, init="zero")
        epochs = np.diff([0.0] + list(model.history["seconds"]))
        epoch_s = float(np.min(epochs))
        line = row if not rows else {k: row[k] for k in ("cells", "genes", "nnz %", "simulate s")}
        line.update({"batch": batch_size, "s / epoch": epoch_s, "median s / epoch": float(np.median(epochs)),
                     "cells / s": n_cells / epoch_s, "loop peak RSS GB": loop.rss_gb})
        if loop.gpu_gb is not None:
            line["loop peak GPU GB"] = loop.gpu_gb
        line["setup s (read, split, counts)"] = setup
        print(f"[speed] loop, batch {batch_size}: {epoch_s:.2f} s / epoch (median {np.median(epochs):.2f}), "
              f"{n_cells / epoch_s:,.0f} cells/s, peak RSS {loop.rss_gb:.2f} GB", flush=True)
        if not rows:  # new cells are mapped onto the first batch size's model
            new = simulate_counts(args.transform_cells, args.genes, seed=1)
            with Phase(device) as tr:
                model.transform(new, verbose=False)
            line["transform s / 1k cells"] = tr.seconds / (args.transform_cells / 1000)
            del new
        rows.append(line)
        del model

    _, full, _, start = fit_measured(adata, device, 1, args.batch_sizes[0])
    row.update({"start s (setup + PCA + Leiden)": start, "full fit s (1 epoch)": full.seconds,
                "full fit peak RSS GB": full.rss_gb})
    if full.gpu_gb is not None:
        row["full fit peak GPU GB"] = full.gpu_gb
    print(f"[speed] transform {row['transform s / 1k cells']:.2f} s / 1k cells; full fit: start {start:.1f} s, "
          f"peak RSS {full.rss_gb:.2f} GB", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Seconds per epoch and peak RSS against cells (log-log), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    for b in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == b]
        ax_t.plot([r["cells"] for r in mine], [r["s / epoch"] for r in mine], "o-", label=f"training epoch (batch {b})")
        ax_m.plot([r["cells"] for r in mine], [r["loop peak RSS GB"] for r in mine], "o-",
                  label=f"training loop (batch {b})")
    full = [r for r in rows if "full fit peak RSS GB" in r]
    cells = [r["cells"] for r in full]
    ax_t.plot(cells, [r["start s (setup + PCA + Leiden)"] for r in full], "s--", label="start (setup + PCA + Leiden)")
    ax_t.set(xscale="log", yscale="log", xlabel="cells", ylabel="seconds", title="time")
    ax_m.plot(cells, [r["full fit peak RSS GB"] for r in full], "s--", label="full fit")
    if "loop peak GPU GB" in rows[0]:
        ax_m.plot([r["cells"] for r in rows], [r["loop peak GPU GB"] for r in rows], "^:", label="GPU (loop)")
    ax_m.set(xscale="log", xlabel="cells", ylabel="GB", title="peak memory", ylim=(0, None))
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def epoch_worker(path: str, epochs: int, init: str, threads: int) -> None:
    """Run in a subprocess by :func:`compare`: fit the h5ad at ``path`` with whatever
    ``dgdcell`` is first on the path, print one JSON line with the per-epoch seconds,
    the whole fit's seconds and the seconds before its first epoch."""
    import json

    import anndata as ad
    import torch

    torch.set_num_threads(threads)
    import dgdcell

    adata = ad.read_h5ad(path)
    fits = []
    for _ in range(2 if init == "pca" else 1):  # the start: also a second fit in the same (warm) process
        t0 = time.perf_counter()
        model = dgdcell.DGD(n_components=N_TYPES, seed=0, device="cpu", init=init)
        model.fit(adata, max_epochs=epochs, early_stopping=False, verbose=False, guide_epochs=0)
        fits.append((time.perf_counter() - t0, list(model.history["seconds"])))
    (total, seconds), (total2, seconds2) = fits[0], fits[-1]
    print(json.dumps({"epochs": list(np.diff([0.0] + seconds)), "fit": total, "loop": seconds[-1],
                      "fit2": total2, "loop2": seconds2[-1],
                      "version": dgdcell.__version__, "file": dgdcell.__file__}), flush=True)


def compare(args) -> None:
    """This tree's dgdcell against git revision ``args.compare_with``, side by side in one
    run: each round runs the same fit in a fresh process of each, alternating, on the same
    simulated file. Writes ``<out>/speed_compare.md``."""
    import json
    import subprocess
    import tarfile
    import tempfile

    repo = HERE.parent
    work = Path(tempfile.mkdtemp(prefix="dgdcell-compare-"))
    base = work / "baseline"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", args.compare_with, "dgdcell"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(base, filter="data")
    trees = {"this tree": repo, f"baseline {args.compare_with}": base}
    jobs = [("loop", args.compare_cells, args.epochs, "zero"), ("start", args.start_cells, 5, "pca")]
    rows = []
    load_before = os.getloadavg()
    for kind, n, epochs, init in jobs:
        path = work / f"sim{n}.h5ad"
        simulate_counts(n, args.genes, seed=0).write_h5ad(path)
        results = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--epoch-worker", str(path),
                                       "--epochs", str(epochs), "--init", init, "--threads", str(args.threads or 2)],
                                      env=env, capture_output=True, text=True, cwd=work)
                if done.returncode:
                    raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
                res = json.loads(done.stdout.strip().splitlines()[-1])
                assert Path(res["file"]).resolve().is_relative_to(Path(tree).resolve()), res["file"]
                results[name].append(res)
                print(f"[compare] {kind} {n} cells, round {r + 1}, {name}: epochs "
                      f"{[round(e, 2) for e in res['epochs']]}, fit {res['fit']:.1f} s", flush=True)
        for name, res in results.items():
            best = [min(x["epochs"]) for x in res]
            before = [x["fit"] - x["loop"] for x in res]
            rows.append({"measure": kind, "code": name, "cells": n, "epochs": epochs,
                         "median of best s / epoch": float(np.median(best)),
                         "cells / s": n / float(np.median(best)),
                         "median fit s": float(np.median([x["fit"] for x in res])),
                         "median s before the loop": float(np.median(before)),
                         "share before the loop": float(np.median([b / x["fit"] for b, x in zip(before, res)])),
                         "share before the loop, 2nd fit": float(np.median([(x["fit2"] - x["loop2"]) / x["fit2"]
                                                                            for x in res]))})
    mine = {r["measure"]: r for r in rows if r["code"] == "this tree"}
    theirs = {r["measure"]: r for r in rows if r["code"] != "this tree"}
    for r in rows:
        r["throughput vs baseline"] = r["cells / s"] / theirs[r["measure"]]["cells / s"]
    out = Path(args.out)
    common.write_table(
        rows, out / "speed_compare.md", out / "speed_compare.csv",
        f"dgdcell speed: this tree against {args.compare_with}, side by side",
        header_lines=[
            f"- machine: {common.machine_description()}",
            common.load_average_line(load_before),
            f"- command: `python benchmarks/speed.py --compare-with {args.compare_with} --compare-cells "
            f"{args.compare_cells} --start-cells {args.start_cells} --epochs {args.epochs} --rounds {args.rounds}`",
            "- each round runs each code in a fresh process, alternating (this tree, baseline, this tree, ...), "
            f"{args.threads or 2} torch threads, on the same simulated file (see `simulate_counts`; 2,000 genes)",
            "- `loop`: `DGD(init='zero').fit(max_epochs=E, early_stopping=False)`; `median of best s / epoch`: the "
            "median over rounds of each round's fastest epoch (training + validation cells)",
            "- `start`: the default `DGD().fit(max_epochs=5)` (PCA + Leiden start, no guided phase); "
            "`s before the loop` = the fit's seconds minus its training loop's (reading, checks, PCA, Leiden, "
            "optimiser set-up; writing the outputs included); the first fit in a fresh process pays one-time "
            "imports (torch.optim's first optimiser imports torch._dynamo, igraph imports matplotlib), the 2nd "
            "fit in the same process does not",
        ],
        footer_lines=[f"Throughput ratio at {args.compare_cells} cells (this tree / baseline): "
                      f"{mine['loop']['cells / s'] / theirs['loop']['cells / s']:.2f}. Start: "
                      f"{mine['start']['share before the loop']:.0%} of the 5-epoch fit before its first epoch "
                      f"(baseline {theirs['start']['share before the loop']:.0%}); a second fit in the same process "
                      f"{mine['start']['share before the loop, 2nd fit']:.0%} (baseline "
                      f"{theirs['start']['share before the loop, 2nd fit']:.0%})."],
        floatfmts={"cells / s": ",.0f", "share before the loop": ".2f", "share before the loop, 2nd fit": ".2f",
                   "throughput vs baseline": ".2f"},
        floatfmt=".2f",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-with", default=None, metavar="REV",
                   help="instead of the size table: this tree against git revision REV, side by side "
                        "(writes speed_compare.md)")
    p.add_argument("--compare-cells", type=int, default=100000, help="cells of the --compare-with loop measurement")
    p.add_argument("--start-cells", type=int, default=20000, help="cells of the --compare-with start measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of --compare-with")
    p.add_argument("--epoch-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--init", default="zero", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated cell counts")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of the loop measurement (the fastest and the median are reported)")
    p.add_argument("--batch-sizes", default="256",
                   help="comma-separated minibatch sizes of the loop measurement (transform and full fit use the first)")
    p.add_argument("--transform-cells", type=int, default=2000)
    p.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto' (CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    if args.epoch_worker:
        return epoch_worker(args.epoch_worker, args.epochs, args.init, args.threads or 2)
    if args.compare_with:
        return compare(args)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    import torch

    from dgdcell.model import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_before = os.getloadavg()
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        rows.extend(measure_size(n, args, device))
        write(rows, out, args, device, load_before)
    plot(rows, out / "speed.png")


def write(rows: list[dict], out: Path, args, device, load_before) -> None:
    """``speed.md`` and ``speed.csv`` for the rows so far."""
    common.write_table(
        rows, out / "speed.md", out / "speed.csv", "dgdcell speed and memory (simulated counts)",
        header_lines=[
            f"- machine: {common.machine_description()}; device {device}",
            common.load_average_line(load_before),
            f"- command: `python benchmarks/speed.py --sizes {args.sizes} --genes {args.genes} --epochs {args.epochs} "
            f"--batch-sizes {','.join(map(str, args.batch_sizes))} --device {args.device}`",
            "- data: simulated NB counts, 10 cell types, log-normal library sizes (median ~800), "
            "dispersions ~2 (see `simulate_counts`); model: default architecture (latent 20, trunk 2 x 100, "
            "head 2 x 100), 10 components",
            "- `s / epoch`: fastest of the epochs of `DGD(init='zero').fit(max_epochs=E, batch_size=batch)` "
            "(training + validation cells), `median s / epoch` their median; `cells / s` = cells / (s / epoch); `loop peak RSS`: peak resident memory during its training "
            "loop (the AnnData, the fit's copies of the counts and the model included); `setup s`: that fit's time "
            "before the loop (reading, checks, split, counts to the device)",
            f"- `transform s / 1k cells`: `transform` of {args.transform_cells} new cells against that model "
            "(the first batch size's); it and the `full fit` columns are given once per size",
            "- `full fit`: the default `DGD().fit(max_epochs=1)` (first batch size); `start s`: its time before the loop (setup, PCA, "
            "Leiden); `full fit peak RSS`: peak resident memory of the whole call",
        ],
        footer_lines=NOTES,
        floatfmts={"cells / s": ",.0f", "nnz %": ".1f", "simulate s": ".1f"},
        floatfmt=".2f",
    )


if __name__ == "__main__":
    main()
