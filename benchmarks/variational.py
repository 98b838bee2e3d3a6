"""Per-cell posteriors and the evidence: ``posterior='map'`` vs ``'normal'``, K chosen by evidence.

For each labelled RNA data set (labels are used only to score, never to fit or to choose K):

* a seeded 80 / 20 split of the cells into fit and test cells (at most ``--max-cells`` cells in all);
* for ``posterior`` in ``map``, ``normal``:
  - ``DGD(n_components=K_labels, posterior=...)`` fitted on the fit cells: ARI of ``dgd_cluster``
    against the labels; seconds per epoch;
  - the test cells embedded with ``transform`` and scored with ``score`` (importance-sampled
    ``log p(x)`` per cell, ``--samples`` draws; the Laplace proposal for ``map``): the held-out
    log-likelihood per cell (mean over test cells, nats);
  - ``DGD(n_components=CANDIDATES, posterior=...)`` (K chosen by the package's rule, ``AUTO_METHOD``): chosen K, ARI.
* cost: seconds per epoch of ``normal`` over ``map`` (same data, same run, one torch thread).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/variational.py [--datasets a,b] [--max-epochs N]
        [--max-cells N] [--no-auto] [--out benchmarks/results]
    OMP_NUM_THREADS=1 python benchmarks/variational.py --cost [--datasets a,b] [--max-cells N]

Writes ``<out>/variational.md`` and ``<out>/variational.csv`` (rewritten after every data set);
``--cost``: ``<out>/variational_cost.md`` / ``.csv`` (map and normal fits interleaved, which a shared
CPU needs for a fair ratio).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # use the checkout's dgdcell even if it is not installed

import common  # noqa: E402
from common import LABEL_KEY, LABELLED_SETS  # noqa: E402

SEED = 0
#: candidate K of the automatic choice (independent of the labels)
CANDIDATES = [2, 4, 6, 8, 10, 12, 14, 16, 20]

COLUMNS = [
    "dataset", "cells", "genes", "K labels",
    "map ARI", "normal ARI", "map test log p(x)", "normal test log p(x)", "normal - map log p(x)",
    "map K auto", "map ARI auto", "normal K auto", "normal ARI auto",
    "map s/epoch", "normal s/epoch", "cost ratio",
]
CSV_COLUMNS = COLUMNS + ["map epochs", "normal epochs", "map test elbo", "normal test elbo",
                         "map test log p(x) se", "normal test log p(x) se", "seconds", "error"]
FLOATFMTS = {"map test log p(x)": ".1f", "normal test log p(x)": ".1f", "normal - map log p(x)": ".2f",
             "map s/epoch": ".3f", "normal s/epoch": ".3f", "cost ratio": ".2f", "seconds": ".0f"}


FOOTER = [
    "- the s/epoch columns come from fits run one after the other on a CPU shared with other jobs; for the cost "
    "ratio use `variational_cost.md` (`--cost`: map and normal fits interleaved)",
]


def _k_error_lines(rows: list[dict]) -> list[str]:
    """The mean absolute difference between the chosen K and the label count, per posterior."""
    lines = []
    for posterior in ("map", "normal"):
        errs = [abs(r[f"{posterior} K auto"] - r["K labels"]) for r in rows if r.get(f"{posterior} K auto") is not None]
        if errs:
            lines.append(f"- {posterior}: mean |K auto - K labels| = {np.mean(errs):.1f} over {len(errs)} sets")
    return lines


def _subsample(adata, max_cells: int, seed: int):
    if adata.n_obs <= max_cells:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    return adata[keep].copy()


def run_one(dgdcell, adata, k: int, posterior: str, args) -> dict:
    """Fit with K = labels, transform + score the test cells; then (unless --no-auto) K by evidence."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(SEED)
    test = np.zeros(adata.n_obs, dtype=bool)
    test[rng.choice(adata.n_obs, adata.n_obs // 5, replace=False)] = True
    fit, held = adata[~test].copy(), adata[test].copy()
    truth = fit.obs[LABEL_KEY].astype(str).to_numpy()
    kw = {"verbose": False, "max_epochs": args.max_epochs}
    model = dgdcell.DGD(n_components=k, posterior=posterior, seed=SEED).fit(fit, **kw)
    out = {
        f"{posterior} ARI": float(adjusted_rand_score(truth, fit.obs["dgd_cluster"].astype(str))),
        f"{posterior} epochs": len(model.history["epoch"]),
        # the median epoch (a shared CPU makes single epochs slow now and then)
        f"{posterior} s/epoch": float(np.median(np.diff([0.0, *model.history["seconds"]]))),
    }
    model.transform(held, verbose=False)
    model.score(held, n_samples=args.samples)
    out[f"{posterior} test log p(x)"] = float(held.obs["dgd_log_evidence"].mean())
    out[f"{posterior} test log p(x) se"] = float(np.sqrt((held.obs["dgd_log_evidence_se"] ** 2).sum()) / held.n_obs)
    out[f"{posterior} test elbo"] = float(held.obs["dgd_elbo"].mean())
    if not args.no_auto:
        auto = dgdcell.DGD(n_components=CANDIDATES, posterior=posterior, seed=SEED).fit(fit, **kw)
        out[f"{posterior} K auto"] = int(auto.gmm.n_mix_comp)
        out[f"{posterior} ARI auto"] = float(adjusted_rand_score(truth, fit.obs["dgd_cluster"].astype(str)))
    return out


def cost(dgdcell, adata, k: int, rounds: int = 3, epochs: int = 12) -> dict:
    """Seconds per epoch of map and normal fits interleaved (map, normal, map, ...) on the same data, so
    that load from other jobs falls on both alike; the median epoch of each, and their ratio."""
    per = {"map": [], "normal": []}
    for _ in range(rounds):
        for posterior in per:
            m = dgdcell.DGD(n_components=k, posterior=posterior, seed=SEED).fit(
                adata, max_epochs=epochs, guide_epochs=0, early_stopping=False, verbose=False)
            per[posterior] += list(np.diff([0.0, *m.history["seconds"]])[1:])
    out = {f"{p} s/epoch": float(np.median(v)) for p, v in per.items()}
    out["cost ratio"] = out["normal s/epoch"] / out["map s/epoch"]
    return out


def main_cost(args) -> int:
    """``--cost``: the interleaved cost measurement alone, into ``<out>/variational_cost.md``."""
    import torch

    torch.set_num_threads(1)
    import dgdcell

    rows = []
    for name in args.datasets:
        adata = _subsample(LABELLED_SETS[name](verbose=False), args.max_cells, SEED)
        row = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars}
        row.update(cost(dgdcell, adata, int(adata.obs[LABEL_KEY].nunique())))
        rows.append(row)
        print(f"[variational] {row}", flush=True)
    header = [f"- machine: {common.machine_description()}",
              "- command: `OMP_NUM_THREADS=1 python benchmarks/variational.py --cost "
              + " ".join(sys.argv[2:]) + "`",
              "- 3 rounds of (map fit, normal fit), 12 epochs each, no guided phase; the median epoch of each "
              "(the first epoch of every fit left out); batch size 256, one sample per cell per step"]
    common.write_table(rows, Path(args.out) / "variational_cost.md", Path(args.out) / "variational_cost.csv",
                       title="cost of posterior='normal' per epoch (interleaved with map)",
                       columns=["dataset", "cells", "genes", "map s/epoch", "normal s/epoch", "cost ratio"],
                       header_lines=header, floatfmts=FLOATFMTS)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None, help="comma-separated subset of: " + ",".join(LABELLED_SETS))
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epoch cap of every fit (default: the package's, with early stopping; n_components='auto' "
                        "needs a converged screening fit)")
    p.add_argument("--max-cells", type=int, default=3000, help="cells per data set at most (seeded subsample)")
    p.add_argument("--samples", type=int, default=32, help="importance samples per test cell")
    p.add_argument("--no-auto", action="store_true", help="skip n_components chosen by evidence")
    p.add_argument("--cost", action="store_true", help="only the interleaved map / normal cost per epoch")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = p.parse_args(argv)
    args.datasets = common.select_datasets(p, args.datasets)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cost:
        return main_cost(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(1)
    import dgdcell
    from dgdcell._evidence import AUTO_METHOD

    machine = common.machine_description()
    started = _dt.datetime.now().astimezone()
    print(f"[variational] {machine}; dgdcell from {Path(dgdcell.__file__).parent}", flush=True)
    header = [
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine} (a CPU shared with other jobs: seconds are indicative, the ratio less so)",
        "- command: `" + " ".join(["OMP_NUM_THREADS=1 python benchmarks/variational.py",
                                    *(argv if argv is not None else sys.argv[1:])]) + "`",
        f"- seed {SEED} only; at most {args.max_cells} cells per set (seeded subsample); "
        + ("the package's default epoch cap with early stopping" if args.max_epochs is None else
           f"every fit capped at {args.max_epochs} epochs (early stopping may end sooner)")
        + "; 80 / 20 fit / test split of the cells",
        "- ARI: `obs['dgd_cluster']` of the fit cells vs the labels; 'test log p(x)': mean over the test cells "
        f"(embedded by `transform`) of `score(n_samples={args.samples})` (importance-sampled log p(x), nats per "
        "cell; proposal: the Normal posterior, or for map the Laplace approximation at the point)",
        f"- K auto: `n_components={CANDIDATES}`, chosen by the package's rule (`dgdcell._evidence.AUTO_METHOD` = "
        f"'{AUTO_METHOD}', see docs/posteriors.md, \"Choosing K\") on the fit cells; labels never used; "
        "'ARI auto' is the ARI of the fit with that K",
        "- s/epoch: median training seconds per epoch of the K = labels fit; cost ratio = normal / map",
    ]
    rows: list[dict] = []
    for name in args.datasets:
        t0 = time.perf_counter()
        adata = _subsample(LABELLED_SETS[name](verbose=False), args.max_cells, SEED)
        k = int(adata.obs[LABEL_KEY].nunique())
        row = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "K labels": k}
        for posterior in ("map", "normal"):
            try:
                row.update(run_one(dgdcell, adata, k, posterior, args))
            except Exception as exc:  # keep going: one failure does not lose the other sets
                row["error"] = f"{posterior}: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        if row.get("map test log p(x)") is not None and row.get("normal test log p(x)") is not None:
            row["normal - map log p(x)"] = row["normal test log p(x)"] - row["map test log p(x)"]
        if row.get("map s/epoch") and row.get("normal s/epoch"):
            row["cost ratio"] = row["normal s/epoch"] / row["map s/epoch"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[variational] {row}", flush=True)
        mean = {"dataset": "mean"}
        for c in ("map ARI", "normal ARI", "map ARI auto", "normal ARI auto", "normal - map log p(x)", "cost ratio"):
            vals = [r[c] for r in rows if r.get(c) is not None]
            mean[c] = float(np.mean(vals)) if vals else None
        common.write_table(rows + [mean], out / "variational.md", out / "variational.csv",
                           title="dgdcell posteriors (map vs normal) and K chosen by evidence",
                           columns=COLUMNS, csv_columns=CSV_COLUMNS, header_lines=header,
                           footer_lines=FOOTER + _k_error_lines(rows), floatfmts=FLOATFMTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
