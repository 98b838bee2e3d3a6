"""Scale: one epoch on millions of cells with the counts streamed from disk, against the in-memory path.

    python benchmarks/scale.py [--cells 5000000] [--memory-cells 1000000] [--genes 2000]
                               [--dir /tmp/dgd_scale] [--out benchmarks/results] [--keep]

1. **Data**, written to ``<dir>`` block by block (never the whole matrix in memory): ``--cells``
   simulated cells x ``--genes`` genes as a CSR ``.h5ad`` (``atlas_<cells>.h5ad``), and its first
   ``--memory-cells`` cells as a second file. The counts are :func:`speed.simulate_counts`' (NB
   counts of 10 cell types, log-normal library sizes with median ~800, dispersions ~2: about 9%
   non-zeros, what 2,000 highly variable genes of a 10x data set hold), simulated 250,000 cells at
   a time with a seed per block, and appended through anndata's own sparse dataset
   (``anndata.io.sparse_dataset(...).append``).
2. **Fits**, each in a fresh subprocess with one torch thread: the default
   ``DGD(device="cpu").fit(adata, max_epochs=1)`` (PCA + Leiden start on 10k cells, one epoch of
   training and validation, outputs written), on

   * ``in-memory``: ``anndata.read_h5ad(file)`` of the ``--memory-cells`` file;
   * ``backed``: ``anndata.read_h5ad(file, backed="r")`` of the same file, and of the
     ``--cells`` file.

   Per fit: seconds to open the file, seconds of the whole ``fit`` call, seconds of its epoch
   (``history["seconds"][0]``: training + validation cells, the reads from disk included), and
   the process's peak resident memory (``resource.getrusage(...).ru_maxrss``, the whole process:
   Python, torch, the AnnData, everything).
3. Writes ``<out>/scale.md`` and ``scale.csv``: the table, the in-memory peak scaled linearly to
   ``--cells`` and the target (a third of it), and the seconds per epoch against the in-memory
   path's scaled to the same number of cells. The files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRITE_BLOCK = 250_000


def write_atlas(paths: dict[int, Path], n_genes: int, block: int = WRITE_BLOCK) -> dict:
    """Write the largest of ``paths`` (cells -> file) block by block, and each smaller one
    from the same first blocks. Returns the number of non-zeros and seconds per file."""
    import anndata as ad
    import h5py
    import pandas as pd

    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from speed import simulate_counts

    sizes = sorted(paths)
    n = sizes[-1]
    if any(s % block for s in sizes):
        raise ValueError(f"sizes {sizes} must be multiples of the write block {block}")
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    names = pd.Index([f"cell{i}" for i in range(n)])
    t0 = time.perf_counter()
    files, out = {}, {}
    try:
        for s in sizes:
            # the skeleton: obs and var of all its cells, no X yet (anndata writes it)
            ad.AnnData(obs=pd.DataFrame(index=names[:s]), var=var).write_h5ad(paths[s])
            files[s] = h5py.File(paths[s], "a")
            if "X" in files[s]:
                del files[s]["X"]
        nnz = 0
        for k, start in enumerate(range(0, n, block)):
            X = simulate_counts(block, n_genes, seed=1000 + k).X
            nnz += X.nnz
            for s, f in files.items():
                if start >= s:
                    continue
                if start == 0:
                    ad.io.write_elem(f, "X", X)
                else:
                    ad.io.sparse_dataset(f["X"]).append(X)
                if start + block == s:
                    out[s] = {"nnz": nnz, "write_s": time.perf_counter() - t0}
            print(f"  wrote cells {start + block:,} / {n:,} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    finally:
        for f in files.values():
            f.close()
    return out


def _stored_nnz(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"]["indptr"][-1])


def worker(mode: str, path: str) -> None:
    """One fit in this (fresh) process; prints its measures as one JSON line."""
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    import dgdcell

    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    dgd = dgdcell.DGD(device="cpu").fit(adata, max_epochs=1, early_stopping=False, verbose=False)
    t_fit = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    hwm = _vm_hwm_gb()
    print(json.dumps({
        "mode": mode, "cells": adata.n_obs, "open_s": t_open, "fit_s": t_fit,
        "epoch_s": float(dgd.history["seconds"][0]), "peak_rss_gb": peak, "vm_hwm_gb": hwm,
        "block_size": dgd.fit_settings.get("block_size"),
        "clusters": int(adata.obs["dgd_cluster"].nunique()),
    }), flush=True)


def _vm_hwm_gb() -> float:
    """Linux's VmHWM of this process (its own address space's peak RSS; NaN elsewhere)."""
    try:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) * 1024 / 1e9


def run_worker(mode: str, path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(path)],
                          check=False, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{mode} fit of {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=5_000_000)
    p.add_argument("--memory-cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dgd_scale"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--reuse", action="store_true", help="reuse the files in --dir when they exist")
    p.add_argument("--only", default="", help="comma-separated modes of the fits to run (default: all)")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--write", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.write:
        paths = {int(k): Path(v) for k, v in json.loads(args.write[0]).items()}
        print(json.dumps({str(k): v for k, v in write_atlas(paths, int(args.write[1]), int(args.write[2])).items()}))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    n, m = args.cells, args.memory_cells
    paths = {s: args.dir / f"atlas_{s}.h5ad" for s in {n, m}}
    load_before = os.getloadavg()
    print(f"writing {sorted(paths)} cells x {args.genes} genes to {args.dir}", flush=True)
    if not all(p.is_file() for p in paths.values()) or not args.reuse:
        # written in a subprocess: a child's ru_maxrss counts the RSS of the process that forks it (Linux keeps the
        # high-water mark across fork + exec), so this process stays small for the fits' measures
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write", json.dumps(
            {str(s): str(p) for s, p in paths.items()}), str(args.genes), str(min(WRITE_BLOCK, m))], check=True,
            capture_output=True, text=True)
        written = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    else:
        written = {s: {"nnz": _stored_nnz(p), "write_s": float("nan")} for s, p in paths.items()}
    sizes_gb = {s: p.stat().st_size / 1e9 for s, p in paths.items()}
    rows = []
    try:
        for mode, s in (("in-memory", m), ("backed", n), ("backed", m)):
            if args.only and f"{mode}:{s}" not in args.only.split(","):
                continue
            print(f"fit: {mode}, {s:,} cells", flush=True)
            r = run_worker(mode, paths[s])
            r.update(nnz_pct=100 * written[s]["nnz"] / (s * args.genes), file_gb=sizes_gb[s])
            rows.append(r)
            print("  ", r, flush=True)
    finally:
        if not args.keep:
            for path in paths.values():
                path.unlink(missing_ok=True)
    report(rows, args, written, load_before)


def report(rows: list[dict], args, written: dict, load_before) -> None:
    n, m = args.cells, args.memory_cells
    mem = next(r for r in rows if r["mode"] == "in-memory")
    big = next(r for r in rows if r["mode"] == "backed" and r["cells"] == n)
    same = next((r for r in rows if r["mode"] == "backed" and r["cells"] == m), None)
    cols = ["mode", "cells", "nnz_pct", "file_gb", "open_s", "fit_s", "epoch_s", "vm_hwm_gb", "peak_rss_gb",
            "block_size"]
    with open(args.out / "scale.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = {"nnz_pct": "{:.1f}", "file_gb": "{:.2f}", "open_s": "{:.1f}", "fit_s": "{:.0f}", "epoch_s": "{:.0f}",
           "vm_hwm_gb": "{:.2f}", "peak_rss_gb": "{:.2f}"}
    write_s = written[n]["write_s"]
    how = (f"{write_s:.0f} s for {n:,} cells" if write_s == write_s
           else "reused from an earlier run of this script, `--reuse`")
    lines = [
        "# dgdcell at scale: counts streamed from disk (backed AnnData)",
        "",
        (f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores shared with "
         f"other sessions' jobs (load average before {', '.join(f'{x:.2f}' for x in load_before)}, after "
         f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}): the seconds are several times an idle machine's; "
         f"Python {platform.python_version()}; one torch thread per fit; CPU"),
        f"- command: `python benchmarks/scale.py --cells {n} --memory-cells {m} --genes {args.genes}`",
        (f"- data: simulated NB counts (`speed.simulate_counts`, a seed per block of cells) of {args.genes} genes, "
         f"{big['nnz_pct']:.1f}% non-zeros (about what 2,000 highly variable genes of 10x data hold), written block "
         f"by block to CSR .h5ad files through anndata's sparse dataset ({how})"),
        ("- each row: a fresh process, `DGD(device='cpu').fit(adata, max_epochs=1, early_stopping=False)` "
         "(the default PCA + Leiden start on 10k cells, one epoch of training + validation cells, outputs written); "
         "`epoch s` is `history['seconds'][0]` (for `backed` the reads from disk included), `fit s` the whole call; "
         "`peak RSS` is the process's `resource.getrusage(RUSAGE_SELF).ru_maxrss` (Python, torch, the AnnData with "
         "its obs names, everything; the launcher that forks it stays small, since Linux carries a parent's "
         "high-water mark into the child), `VmHWM` the kernel's peak RSS of the process's own address space; "
         "`block` the cells per block of the block-wise shuffle (one read per block)"),
        "",
        "| mode | cells | nnz % | file GB | open s | fit s | epoch s | VmHWM GB | peak RSS GB | block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [str(r["mode"]), f"{r['cells']:,}"] + [fmt[c].format(r[c]) for c in cols[2:-1]] + [
            str(r["block_size"] or "")]
        lines.append("| " + " | ".join(cells) + " |")
    scaled_rss = mem["peak_rss_gb"] * n / m
    scaled_epoch = mem["epoch_s"] * n / m
    ok = big["peak_rss_gb"] < scaled_rss / 3
    lines += [
        "",
        (f"- memory: the in-memory path's peak at {m:,} cells scaled linearly to {n:,} is {scaled_rss:.1f} GB; the "
         f"target is a third of it, {scaled_rss / 3:.1f} GB; the streamed fit of {n:,} cells peaked at "
         f"{big['peak_rss_gb']:.2f} GB ({'met' if ok else 'NOT met'}: {big['peak_rss_gb'] / scaled_rss:.0%} of the "
         "scaled in-memory peak)."),
        (f"- time: one streamed epoch of {n:,} cells took {big['epoch_s']:.0f} s against {scaled_epoch:.0f} s for "
         f"the in-memory epoch at {m:,} cells scaled to {n:,} ({big['epoch_s'] / scaled_epoch:.2f}x)"
         + (f"; at {m:,} cells streamed / in memory: {same['epoch_s']:.0f} / {mem['epoch_s']:.0f} s per epoch."
            if same else ".")),
        "",
        "What the streamed path holds in memory: per cell its representation (20 floats) with its gradient and "
        "Adam's two moments (the best state kept for early stopping once the guided epochs are over), a library "
        "size, a log-factorial, a row pointer, its start and its name in `obs`; per block the counts of one block "
        "of cells. The counts are read once by the streaming pass (checks, library sizes), twice by the PCA start "
        "(feature statistics, projection; plus its 10k sampled rows) and about twice per epoch (the training "
        "cells' blocks, then the validation cells', whose covering row ranges are read whole).",
    ]
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
