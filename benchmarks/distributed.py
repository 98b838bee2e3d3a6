"""Data-parallel fitting: 1 vs N processes (gloo, one thread each) on simulated counts.

Simulates ``--cells`` cells x ``--genes`` genes (negative-binomial counts of ``--groups``
expression programmes, written once to ``--data``), then fits them

- in one process (the single-process code path), and
- with ``torchrun --standalone --nproc-per-node N`` (the data-parallel path, gloo),

each process with one torch thread, for ``--epochs`` epochs (no early stopping). Every
collective of :class:`dgdcell.train.distributed.Comm` is timed, so the communication share
is (time inside collectives) / (epoch time): on a shared CPU this includes the time a rank
waits for a slower one. Results go to ``--out`` (markdown) and a JSON next to it.

Run (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/distributed.py --cells 200000 --genes 2000 --epochs 3

The estimate for larger runs built from these figures is in ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def simulate(path: Path, n_cells: int, n_genes: int, n_groups: int, seed: int = 0, block: int = 20_000) -> None:
    """NB counts (dispersion 5, library sizes log-normal around 1,500) of ``n_groups``
    programmes, built in blocks of cells as float32 CSR and written to ``path``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=n_genes)
    programmes = base * np.exp(rng.normal(0.0, 1.0, size=(n_groups, n_genes)))
    programmes /= programmes.sum(1, keepdims=True)
    groups = rng.integers(0, n_groups, size=n_cells)
    parts = []
    for lo in range(0, n_cells, block):
        g = groups[lo : lo + block]
        mu = programmes[g] * rng.lognormal(np.log(1500.0), 0.4, size=(g.size, 1))
        parts.append(sp.csr_matrix(rng.negative_binomial(5.0, 5.0 / (5.0 + mu)).astype(np.float32)))
    obs = pd.DataFrame({"group": pd.Categorical([f"g{i}" for i in groups])},
                       index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(sp.vstack(parts, format="csr"), obs=obs,
                       var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


def worker(args) -> None:
    """One process: fit the data, time the collectives, write this rank's figures as JSON."""
    import torch

    torch.set_num_threads(1)
    import anndata as ad

    import dgdcell
    from dgdcell.train import distributed

    spent: dict[str, float] = {}
    collective = distributed.Comm._collective

    def timed(self, what, fn, *a, **kw):
        t = time.perf_counter()
        try:
            return collective(self, what, fn, *a, **kw)
        finally:
            # the epochs' collectives: per minibatch the gradients, per epoch the loss totals
            key = {"the gradient all_reduce": "gradient all_reduce", "summing the losses": "loss totals"}.get(
                what, "start and outputs")
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

    distributed.Comm._collective = timed
    t0 = time.perf_counter()
    adata = ad.read_h5ad(args.data)
    read_s = time.perf_counter() - t0
    model = dgdcell.DGD(n_components=args.groups, seed=0, device="cpu")
    t1 = time.perf_counter()
    model.fit(adata, max_epochs=args.epochs, early_stopping=False, verbose=False, batch_size=args.batch_size)
    fit_s = time.perf_counter() - t1
    h = model.history
    seconds = np.diff([0.0, *h["seconds"]]).tolist()
    allreduce_ms = None
    if model.fit_settings.get("world_size", 1) > 1:  # the wire cost alone: the ranks in step (barrier), then time it
        dist = torch.distributed
        buf = torch.zeros(sum(p.numel() for p in model.module.parameters() if p.requires_grad))
        times = []
        for i in range(220):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            if i >= 20:
                times.append(time.perf_counter() - t)
        allreduce_ms = 1e3 * float(np.median(times))
    rank = distributed.process_rank()
    out = {
        "rank": rank, "world_size": int(model.fit_settings.get("world_size", 1)), "n_cells": adata.n_obs,
        "n_genes": adata.n_vars, "nnz": int(adata.X.nnz), "read_s": read_s, "fit_s": fit_s,
        "start_s": fit_s - h["seconds"][-1], "epoch_s": seconds, "collective_s": spent,
        "allreduce_ms": allreduce_ms, "n_batches": -(-int(h["n_train"][0]) // args.batch_size),
        "n_params": sum(p.numel() for p in model.module.parameters() if p.requires_grad),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "train_loss": h["train_loss"], "val_loss": h["val_loss"],
    }
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"rank{rank}.json").write_text(json.dumps(out))


def run(args, world: int, out: Path) -> list[dict]:
    """Fit in one process (``world == 1``: the single-process path) or under torchrun."""
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), "--data", str(args.data),
              "--epochs", str(args.epochs), "--groups", str(args.groups), "--batch-size", str(args.batch_size)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def summarise(runs: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for world, ranks in runs.items():
        epochs = np.array([r["epoch_s"] for r in ranks])  # (ranks, epochs)
        # the first epoch also pays one-off costs (minibatch plans, allocator); report the later ones
        per_epoch = float(np.median(epochs.max(0)[1:] if epochs.shape[1] > 1 else epochs.max(0)))
        comm = [sum(v for k, v in r["collective_s"].items() if k != "start and outputs") / sum(r["epoch_s"])
                for r in ranks]
        grad = [r["collective_s"].get("gradient all_reduce", 0.0) / sum(r["epoch_s"]) for r in ranks]
        wire = ranks[0]["allreduce_ms"]
        rows.append({
            "allreduce_ms": wire, "wire_share": 0.0 if wire is None else wire * 1e-3 * ranks[0]["n_batches"] / per_epoch,
            "n_params": ranks[0]["n_params"], "n_batches": ranks[0]["n_batches"],
            "processes": world, "s_per_epoch": per_epoch, "cells_per_s": ranks[0]["n_cells"] / per_epoch,
            "comm_share": float(np.mean(comm)), "grad_share": float(np.mean(grad)),
            "start_s": float(max(r["start_s"] for r in ranks)), "peak_rss_gb": float(max(r["peak_rss_gb"] for r in ranks)),
            "final_train_loss": ranks[0]["train_loss"][-1], "final_val_loss": ranks[0]["val_loss"][-1],
        })
    return rows


def write(rows: list[dict], args, info: dict, path: Path) -> None:
    base = rows[0]["s_per_epoch"]
    lines = [
        "# Data-parallel fitting: 1 vs N processes (gloo, one thread each)",
        "",
        f"Simulated counts: {info['n_cells']:,} cells x {info['n_genes']:,} genes ({info['nnz'] / info['n_cells']:.0f} "
        f"non-zeros per cell), {args.groups} expression programmes; `DGD(n_components={args.groups})`, default "
        f"start (PCA + Leiden), batch size {args.batch_size}, {args.epochs} epochs without early stopping. Every "
        f"process has one torch thread; the machine ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores) is shared with other jobs, so the figures vary from run to run.",
        "",
        f"Load average (1 min) before / after: {args.load[0]:.1f} / {args.load[1]:.1f}.",
        "",
        "Reproduce: `OMP_NUM_THREADS=1 python benchmarks/distributed.py " + " ".join(args.argv) + "`",
        "",
        "| processes | s / epoch | cells / s | speed-up | communication share | of which gradient all_reduce "
        "| all_reduce alone (ms) | wire share | start (s) | peak RSS / process (GB) | final train loss "
        "| final val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['s_per_epoch']:.1f} | {r['cells_per_s']:,.0f} | {base / r['s_per_epoch']:.2f} "
            f"| {100 * r['comm_share']:.1f}% | {100 * r['grad_share']:.1f}% "
            f"| {'' if r['allreduce_ms'] is None else format(r['allreduce_ms'], '.2f')} | {100 * r['wire_share']:.1f}% "
            f"| {r['start_s']:.1f} "
            f"| {r['peak_rss_gb']:.2f} | {r['final_train_loss']:.2f} | {r['final_val_loss']:.2f} |")
    lines += [
        "",
        "- *s / epoch*: median over the epochs after the first of the slowest rank's epoch time (training "
        "minibatches with their gradient all_reduce, the representation step, the validation pass).",
        "- *communication share*: time inside collectives / epoch time, averaged over the ranks. A collective "
        "returns only when every rank has reached it, so this includes waiting for a slower rank (on this shared "
        "2-core machine, mostly that); *gradient all_reduce* is the per-minibatch one.",
        f"- *all_reduce alone*: median time of one all_reduce of the {rows[-1]['n_params']:,} decoder and mixture "
        "parameters (float32) with the ranks brought into step by a barrier first, measured after the fit: the "
        f"cost of the wire and gloo itself. *wire share* = that x {rows[-1]['n_batches']} minibatches / epoch time.",
        "- *start*: from the call of `fit` to the first epoch (reading the file excluded): PCA + Leiden + "
        "mixture on rank 0, broadcast to the others, counts to the device.",
        "- The losses of 1 and N processes agree (the ranks' minibatches make up one process's).",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", type=Path, default=None, help="h5ad to simulate into / read (default: in /tmp)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a]
    if args.data is None:
        args.data = Path("/tmp") / f"dgdcell_distributed_{args.cells}x{args.genes}.h5ad"
    if args.worker:
        worker(args)
        return
    if not args.data.is_file():
        t = time.perf_counter()
        simulate(args.data, args.cells, args.genes, args.groups)
        print(f"simulated {args.data} in {time.perf_counter() - t:.0f} s", flush=True)
    runs = {}
    args.load = [os.getloadavg()[0]]
    for world in args.processes:
        runs[world] = run(args, world, Path(tempfile.mkdtemp(prefix=f"dgdcell_distributed_{world}_")))
        print(f"{world} process(es): epochs {[round(s, 1) for s in runs[world][0]['epoch_s']]} s", flush=True)
    args.load.append(os.getloadavg()[0])
    rows = summarise(runs)
    info = runs[args.processes[0]][0]
    write(rows, args, info, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "runs": {str(k): v for k, v in runs.items()}},
                                                        indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
