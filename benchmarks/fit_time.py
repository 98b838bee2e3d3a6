"""Wall time of a default fit on the ~5,000-cell sets (issue target: <= 60 s on a 2-core CPU).

    python benchmarks/fit_time.py [--datasets pbmc4k,cite_pbmc_rna] [--out benchmarks/results]

Run it on an otherwise idle machine: two-thread OpenMP work slows down several-fold when other
processes compete for the cores. Writes ``<out>/fit_time.md`` and ``fit_time.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import dgdcell  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datasets", default="pbmc4k,cite_pbmc_rna,worm_neuron")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    rows = []
    for name in args.datasets.split(","):
        adata = common.LABELLED_SETS[name](verbose=False)
        k = adata.obs[common.LABEL_KEY].nunique()
        t0 = time.perf_counter()
        model = dgdcell.DGD(n_components=k, seed=0).fit(adata, verbose=False)
        total = time.perf_counter() - t0
        h = model.history
        epochs = len(h["epoch"])
        train_s = h["seconds"][-1]
        rows.append({
            "dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "K": k,
            "fit s (total)": total, "start s (PCA + graph clustering)": total - train_s, "epochs": epochs,
            "s / epoch": train_s / epochs, "cells / s per epoch": adata.n_obs / (train_s / epochs),
            "ARI": adjusted_rand_score(adata.obs[common.LABEL_KEY], adata.obs["dgd_cluster"]),
        })
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in rows[-1].items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_table(rows, out / "fit_time.md", out / "fit_time.csv", "dgdcell default fit: wall time",
                       header_lines=[f"- machine: {common.machine_description()}",
                                     "- command: `python benchmarks/fit_time.py` on an idle machine",
                                     "- default settings: `DGD(n_components=K, seed=0).fit(adata)`"])


if __name__ == "__main__":
    main()
