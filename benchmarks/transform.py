"""New cells: quality and speed of ``DGD.transform`` on held-out cells.

For each labelled RNA data set (K = number of distinct labels):

* stratified random 80/20 split of the cells by label (seed 0);
* ``DGD(n_components=K, seed=0).fit(train, verbose=False)`` on the 80%;
* ``dgd.transform(new, verbose=False)`` on the 20% (timed: best of ``--repeats`` runs, which give
  identical results);
* ARI of ``obs['dgd_cluster']`` vs the labels on the training cells and on the new cells;
* the same for the training cells re-embedded by ``transform`` (the estimator the new cells get);
* 15-NN label transfer: a majority vote of the 15 nearest training cells (on ``obsm['X_dgd']`` as
  written by fit) for every new cell, scored against its label; for reference also the
  leave-one-out 15-NN accuracy on the training cells (the ceiling for transfer), and transfer
  from the training cells re-embedded by ``transform`` (the same estimator as the new cells);
* the same without the training cells' representations among the candidate starts
  (``transform(n_reference=0)``, the behaviour before they were added): new ARI, kNN transfer, final loss;
* re-embed agreement: the share of training cells whose cluster from ``transform`` equals fit's, leaving
  out the cells whose own representation was one of the reference starts, with and without them;
* seconds per 1,000 new cells (also scaled to 2,000 genes, assuming linear cost in genes),
  transform epochs and steps per cell, fit epochs and seconds.

Usage (from the repository root)::

    python benchmarks/transform.py [--datasets a,b] [--max-epochs N] [--threads T]
                                   [--repeats R] [--out benchmarks/results]

Writes ``<out>/transform.md`` and ``<out>/transform.csv`` (rewritten after every data set).
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
TEST_SIZE = 0.2

MD_COLUMNS = [
    "dataset", "cells", "genes", "K", "new cells",
    "train ARI", "new ARI", "ARI gap", "kNN transfer", "train LOO kNN",
    "re-embedded train ARI", "ARI gap (re-embedded)", "kNN transfer (re-embedded ref)",
    "new ARI (no ref)", "kNN transfer (no ref)", "re-embed agreement", "re-embed agreement (no ref)",
    "final loss", "final loss (no ref)",
    "s / 1k cells", "s / 1k cells x 2k genes", "transform epochs", "steps / cell",
    "fit epochs", "fit s",
]
CSV_COLUMNS = MD_COLUMNS + ["transform s", "transform s (all runs)", "transform s (no ref)", "candidates", "start loss",
                            "error"]
MEAN_COLUMNS = ["train ARI", "new ARI", "ARI gap", "kNN transfer", "train LOO kNN", "re-embedded train ARI",
                "ARI gap (re-embedded)", "kNN transfer (re-embedded ref)", "new ARI (no ref)", "kNN transfer (no ref)",
                "re-embed agreement", "re-embed agreement (no ref)", "final loss", "final loss (no ref)",
                "s / 1k cells", "s / 1k cells x 2k genes", "transform epochs", "steps / cell", "fit epochs", "fit s"]
FLOATFMTS = {"s / 1k cells": ".2f", "s / 1k cells x 2k genes": ".2f", "transform epochs": ".0f",
             "steps / cell": ".1f", "fit epochs": ".0f", "fit s": ".0f", "ARI gap": "+.3f", "ARI gap (re-embedded)": "+.3f",
             "transform s": ".2f", "start loss": ".2f", "final loss": ".2f", "final loss (no ref)": ".2f",
             "transform s (no ref)": ".2f"}


def split(labels: np.ndarray, test_size: float = TEST_SIZE, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random split: sorted (train, new) row indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.size)
    train, new = train_test_split(idx, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(new)


def run_one(dgdcell, adata, max_epochs: int | None, repeats: int, cache: Path | None = None) -> dict:
    """Fit on 80% (or load the fit from ``cache``), transform 20%; the metric columns of one row."""
    from sklearn.metrics import adjusted_rand_score

    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    K = int(np.unique(labels).size)
    tr, te = split(labels)
    train, new = adata[tr].copy(), adata[te].copy()
    y_tr, y_new = labels[tr], labels[te]

    saved = None if cache is None else cache / f"{adata.uns['benchmark_name']}_e{max_epochs}"
    if saved is not None and saved.is_dir():
        import anndata as ad

        model = dgdcell.DGD.load(saved / "model")
        train = ad.read_h5ad(saved / "train.h5ad")
        fit_s = float(train.uns["benchmark_fit_seconds"])
    else:
        t = time.perf_counter()
        model = dgdcell.DGD(n_components=K, seed=SEED)
        model.fit(train, verbose=False, **({} if max_epochs is None else {"max_epochs": max_epochs}))
        fit_s = time.perf_counter() - t
        if saved is not None:
            model.save(saved / "model")
            train.uns["benchmark_fit_seconds"] = fit_s
            train.write_h5ad(saved / "train.h5ad")

    runs = []
    for _ in range(max(1, repeats)):
        target = new.copy()
        t = time.perf_counter()
        model.transform(target, verbose=False)
        runs.append(time.perf_counter() - t)
    rec = target.uns["dgd"]["transform"]
    secs = min(runs)

    again = train.copy()  # the training cells re-embedded by transform: a reference from the same estimator
    model.transform(again, verbose=False)
    base = new.copy()  # without the training cells among the starts
    t = time.perf_counter()
    model.transform(base, verbose=False, n_reference=0)
    base_s = time.perf_counter() - t
    again0 = train.copy()
    model.transform(again0, verbose=False, n_reference=0)
    own = np.zeros(train.n_obs, dtype=bool)
    own[np.asarray(again.uns["dgd"]["transform"]["reference_rows"], dtype=np.int64)] = True
    fitted = train.obs["dgd_cluster"].astype(str).to_numpy()

    def agreement(a) -> float:
        return float((a.obs["dgd_cluster"].astype(str).to_numpy() == fitted)[~own].mean())

    z_tr, z_new = np.asarray(train.obsm["X_dgd"]), np.asarray(target.obsm["X_dgd"])
    train_ari = float(adjusted_rand_score(y_tr, train.obs["dgd_cluster"].astype(str)))
    new_ari = float(adjusted_rand_score(y_new, target.obs["dgd_cluster"].astype(str)))
    again_ari = float(adjusted_rand_score(y_tr, again.obs["dgd_cluster"].astype(str)))
    per_1k = secs / new.n_obs * 1000.0
    return {
        "new cells": int(new.n_obs),
        "train ARI": train_ari,
        "new ARI": new_ari,
        "ARI gap": new_ari - train_ari,
        "kNN transfer": common.knn_transfer_accuracy(z_tr, y_tr, z_new, y_new, k=15),
        "train LOO kNN": common.knn_accuracy(z_tr, y_tr, k=15),
        "re-embedded train ARI": again_ari,
        "ARI gap (re-embedded)": new_ari - again_ari,
        "kNN transfer (re-embedded ref)": common.knn_transfer_accuracy(
            np.asarray(again.obsm["X_dgd"]), y_tr, z_new, y_new, k=15),
        "new ARI (no ref)": float(adjusted_rand_score(y_new, base.obs["dgd_cluster"].astype(str))),
        "kNN transfer (no ref)": common.knn_transfer_accuracy(z_tr, y_tr, np.asarray(base.obsm["X_dgd"]), y_new, k=15),
        "re-embed agreement": agreement(again),
        "re-embed agreement (no ref)": agreement(again0),
        "final loss (no ref)": float(np.asarray(base.uns["dgd"]["transform"]["history"]["loss"])[-1]),
        "transform s (no ref)": float(base_s),
        "s / 1k cells": per_1k,
        "s / 1k cells x 2k genes": per_1k * 2000.0 / adata.n_vars,
        "transform epochs": int(rec["n_epochs"]),
        "steps / cell": float(rec["cell_epochs"]),
        "fit epochs": int(len(model.history["epoch"])),
        "fit s": float(fit_s),
        "transform s": float(secs),
        "transform s (all runs)": " ".join(f"{r:.2f}" for r in runs),
        "candidates": int(rec["n_candidates"]),
        "start loss": float(rec["history"]["start_loss"]),
        "final loss": float(np.asarray(rec["history"]["loss"])[-1]),
    }


def _mean_row(rows: list[dict]) -> dict:
    mean = {"dataset": "mean"}
    for c in MEAN_COLUMNS:
        vals = [r[c] for r in rows if isinstance(r.get(c), (int, float)) and np.isfinite(r[c])]
        mean[c] = float(np.mean(vals)) if vals else None
    return mean


def _summary(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("new ARI") is not None]
    if not ok:
        return ["- no data set finished"]
    n = len(ok)
    return [
        f"- new-cell ARI within 0.03 of training ARI (|gap| <= 0.03): {sum(abs(r['ARI gap']) <= 0.03 for r in ok)} of {n}; "
        f"of the re-embedded training cells' ARI: {sum(abs(r['ARI gap (re-embedded)']) <= 0.03 for r in ok)} of {n}",
        f"- kNN transfer >= 0.9: {sum(r['kNN transfer'] >= 0.9 for r in ok)} of {n}; "
        f">= train LOO kNN - 0.03: {sum(r['kNN transfer'] >= r['train LOO kNN'] - 0.03 for r in ok)} of {n}; "
        f"from the re-embedded reference >= 0.9: {sum(r['kNN transfer (re-embedded ref)'] >= 0.9 for r in ok)} of {n}",
        f"- <= 2 s per 1,000 cells x 2,000 genes: {sum(r['s / 1k cells x 2k genes'] <= 2.0 for r in ok)} of {n}",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None, help="comma-separated subset of: " + ",".join(LABELLED_SETS))
    p.add_argument("--max-epochs", type=int, default=None, help="passed to DGD.fit (default: package default)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=2, help="timed transform runs per data set (best is reported)")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    p.add_argument("--model-cache", default=None,
                   help="folder to save fitted models in and reuse them from (for iterating on transform only; "
                        "stale when fit changes)")
    args = p.parse_args(argv)
    args.datasets = common.select_datasets(p, args.datasets)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    import dgdcell

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = common.machine_description()
    started = _dt.datetime.now().astimezone()
    print(f"[transform] {machine}", flush=True)
    print(f"[transform] dgdcell {dgdcell.__version__} from {Path(dgdcell.__file__).parent}", flush=True)
    header = [
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine}",
        "- command: `" + " ".join(["python benchmarks/transform.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        f"- split: stratified random {1 - TEST_SIZE:.0%}/{TEST_SIZE:.0%} by cell_type (seed {SEED}); "
        f"fit: `DGD(n_components=K, seed={SEED}).fit(train, verbose=False"
        + (")`" if args.max_epochs is None else f", max_epochs={args.max_epochs})`")
        + "; transform: `dgd.transform(new, verbose=False)` (package defaults)",
        "- ARI: obs['dgd_cluster'] vs cell_type (train: as written by fit; new: by transform); "
        "kNN transfer: 15-NN majority vote from the training cells' X_dgd onto the new cells' X_dgd; "
        "train LOO kNN: leave-one-out 15-NN on the training cells (the ceiling for transfer); "
        "re-embedded: the training cells passed through transform too (the estimator the new cells get; "
        "fit's own X_dgd is not refitted against the final decoder)",
        f"- seconds: wall clock of transform, best of {args.repeats} runs; 'x 2k genes' scales linearly to "
        "2,000 genes. The machine is shared with other work, so timings are noisy.",
    ]
    rows: list[dict] = []
    notes: list[str] = []
    for name in args.datasets:
        adata = LABELLED_SETS[name](verbose=False)
        row = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars,
               "K": int(adata.obs[LABEL_KEY].nunique())}
        t = time.perf_counter()
        try:
            row.update(run_one(dgdcell, adata, args.max_epochs, args.repeats,
                               None if args.model_cache is None else Path(args.model_cache)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            notes.append(f"- {name}: failed ({row['error']})")
            traceback.print_exc()
        rows.append(row)
        print(f"[transform] {name} ({time.perf_counter() - t:.0f} s): "
              + ", ".join(f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                          for k in MD_COLUMNS[4:]), flush=True)
        common.write_table(
            rows + [_mean_row(rows)], out / "transform.md", out / "transform.csv",
            title="dgdcell transform: new cells against a frozen model",
            columns=MD_COLUMNS, csv_columns=CSV_COLUMNS, header_lines=header,
            footer_lines=_summary(rows) + notes, floatfmts=FLOATFMTS,
        )
    for line in _summary(rows) + notes:
        print(f"[transform] {line}", flush=True)
    print(f"[transform] wrote {out / 'transform.md'} and {out / 'transform.csv'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
