"""Time to quality: epochs and time a default fit needs, and how minibatch sizes compare.

    python benchmarks/schedules.py [--datasets pbmc4k,cbmc_rna,cite_pbmc_rna] [--schedules 256,1024,1024x2]
                                   [--threads 2] [--out benchmarks/results]

A schedule ``B`` is a minibatch size; ``BxF`` also multiplies the decoder and mixture learning rates
by F (they step once per minibatch, so larger batches take fewer, possibly larger, steps). The
representations step once per epoch from their own gradients; a per-minibatch representation step
would give the same result (each cell is visited once per epoch), so it is not a separate schedule.

For every data set and schedule: ``DGD(n_components=K, seed=0).fit(adata, batch_size=B, ...)`` with
all other settings at their defaults (early stopping included). After every epoch the ARI of the mixture
clusters (all cells) against the labels is recorded, with the wall and CPU seconds so far. Reported:
the epochs run, the best (kept) epoch, the final ARI and the range of the per-epoch ARIs, the epoch /
seconds at which the ARI first came within 0.01 of its final value ("time to final ARI"), and the
epoch / CPU seconds at which the validation loss first came within 0.1% of its best value after the
guided phase. CPU seconds (this process) are less sensitive to other load on the machine than wall
seconds.

Writes ``<out>/schedules.md`` and ``schedules.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import dgdcell  # noqa: E402
import dgdcell._fitting  # noqa: E402

#: static reading of the development run (2-core AMD EPYC, 2 threads), written under the table
NOTES = [
    "Reading (development run, fifth speed round): every schedule reaches its final ARI 1-3 epochs after the "
    "start -- the PCA + Leiden start and the guided phase fix the clusters, and the epochs after that lower the "
    "validation loss until early stopping while the ARI moves by at most ~0.02. At the default learning rates "
    "1,024 cells per batch need 1.5-2.4x the epochs of 256 (fit wall 1.0-1.7x, a better best validation loss "
    "on 2 of 3 sets); with the learning rates doubled (`1024x2`) 0.95-2.4x the epochs, fit wall times "
    "0.7-1.4x those of 256, a worse best validation loss on CITE-seq (331 against 319 nats per cell). An epoch "
    "with 1,024 cells per batch takes 1.3-1.5x less CPU time than with 256, but no schedule is better in both "
    "time and quality than the default (256) on every set. Epochs, losses and ARIs are deterministic (the "
    "same in repeated runs); the seconds vary with other load on the machine.",
]
#: the ARI counts as reached within this distance of its final value
TOLERANCE = 0.01
#: the validation loss counts as reached within this share of its best value
LOSS_TOLERANCE = 1e-3


def _split(n: int, seed: int, train_size: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The (train, validation) cell indices ``DGD.fit`` draws (its first use of its generator)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = min(int(round((1.0 - train_size) * n)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def parse_schedule(text: str) -> tuple[int, float]:
    """``'1024x2'`` -> (1024, 2.0); ``'256'`` -> (256, 1.0)."""
    size, _, factor = text.partition("x")
    return int(size), float(factor or 1.0)


def fit_with_trace(adata, k: int, batch_size: int, lr_factor: float = 1.0, seed: int = 0
                   ) -> tuple[dgdcell.DGD, list[dict]]:
    """Default fit with per-epoch ARI, wall and CPU seconds (a wrapper around the training loop)."""
    truth = adata.obs[common.LABEL_KEY].astype(str).to_numpy()
    train_idx, val_idx = _split(adata.n_obs, seed)
    trace: list[dict] = []
    inner = dgdcell._fitting.train
    t0, c0 = time.perf_counter(), time.process_time()

    def traced(decoder, gmm, cov_gmms, train_cells, val_cells, config, generator=None, on_epoch_end=None):
        assert train_cells.n == train_idx.size, "the split no longer matches DGD.fit's"

        def record(epoch: int, history: dict) -> None:
            with torch.no_grad():
                labels = np.empty(adata.n_obs, dtype=np.int64)
                labels[train_idx] = gmm.sample_probs(train_cells.rep.z).argmax(1).cpu().numpy()
                if val_cells is not None:
                    labels[val_idx] = gmm.sample_probs(val_cells.rep.z).argmax(1).cpu().numpy()
            trace.append({"epoch": epoch, "ari": adjusted_rand_score(truth, labels),
                          "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                          "val_loss": history["val_loss"][-1]})
            if on_epoch_end is not None:
                on_epoch_end(epoch, history)

        return inner(decoder, gmm, cov_gmms, train_cells, val_cells, config, generator, record)

    dgdcell._fitting.train = traced
    try:
        model = dgdcell.DGD(n_components=k, seed=seed).fit(
            adata, batch_size=batch_size, lr_decoder=1e-3 * lr_factor, lr_mixture=1e-2 * lr_factor, verbose=False)
    finally:
        dgdcell._fitting.train = inner
    return model, trace


def _first(trace: list[dict], key: str, ok) -> dict:
    """The first trace entry whose ``key`` satisfies ``ok`` (the last entry if none does)."""
    return next((t for t in trace if ok(t[key])), trace[-1])


def summarise(name: str, adata, k: int, schedule: str, model, trace: list[dict], wall: float, cpu: float) -> dict:
    final = adjusted_rand_score(adata.obs[common.LABEL_KEY], adata.obs["dgd_cluster"])
    aris = [t["ari"] for t in trace]
    guided = model.fit_settings["guide_epochs"]
    val = [t["val_loss"] for t in trace]
    best = guided + 1 + int(np.argmin(val[guided:])) if len(val) > guided else len(val)
    best_loss = min(val[guided:] or val)
    ari_at = _first(trace, "ari", lambda v: v >= final - TOLERANCE)
    loss_at = _first(trace[guided:] or trace, "val_loss", lambda v: v <= best_loss + LOSS_TOLERANCE * abs(best_loss))
    return {
        "dataset": name, "cells": adata.n_obs, "K": k, "schedule": schedule,
        "epochs run": len(trace), "best epoch": best, "final ARI": final,
        "ARI range": f"{min(aris):.3f}-{max(aris):.3f}",
        "epoch reaching final ARI": ari_at["epoch"], "wall s to final ARI": ari_at["wall"],
        "best val loss": best_loss, "epoch reaching best val loss": loss_at["epoch"],
        "CPU s to best val loss": loss_at["cpu"],
        "fit wall s": wall, "fit CPU s": cpu, "CPU s / epoch": trace[-1]["cpu"] / len(trace),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="pbmc4k,cbmc_rna,cite_pbmc_rna")
    p.add_argument("--schedules", default="256,1024,1024x2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    load_before = os.getloadavg()
    rows = []
    for name in common.select_datasets(p, args.datasets):
        adata = common.LABELLED_SETS[name](verbose=False)
        k = adata.obs[common.LABEL_KEY].nunique()
        for schedule in args.schedules.split(","):
            a = adata.copy()
            t0, c0 = time.perf_counter(), time.process_time()
            model, trace = fit_with_trace(a, k, *parse_schedule(schedule))
            rows.append(summarise(name, a, k, schedule, model, trace, time.perf_counter() - t0,
                                  time.process_time() - c0))
            print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in rows[-1].items()}, flush=True)
            common.write_table(
                rows, out / "schedules.md", out / "schedules.csv", "Time to quality: minibatch schedules",
                header_lines=[
                    f"- machine: {common.machine_description()}",
                    common.load_average_line(load_before),
                    f"- command: `python benchmarks/schedules.py --datasets {args.datasets} "
                    f"--schedules {args.schedules} --threads {args.threads}`",
                    "- schedule `B`: `DGD(n_components=K, seed=0).fit(adata, batch_size=B)`, everything else default "
                    "(20 guided epochs, early stopping with patience 10); `BxF`: also `lr_decoder` and `lr_mixture` "
                    "times F",
                    f"- time to final ARI: first epoch whose ARI (all cells) is within {TOLERANCE} of the final "
                    "ARI; seconds include the PCA + Leiden start; `ARI range`: lowest-highest per-epoch ARI",
                    f"- best val loss: lowest validation loss (nats per cell) after the guided epochs; reached: first "
                    f"epoch within {LOSS_TOLERANCE:.1%} of it",
                ],
                footer_lines=NOTES, floatfmts={"final ARI": ".3f", "CPU s / epoch": ".2f"}, floatfmt=".1f",
            )


if __name__ == "__main__":
    main()
