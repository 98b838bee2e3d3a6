"""Clustering / representation quality of dgdcell against the scanpy-standard baseline.

For each labelled RNA data set (K = number of distinct labels):

* scanpy standard: normalize_total(1e4) -> log1p -> scale -> PCA(50) -> Leiden tuned to K
  clusters; ARI / NMI vs the labels, leave-one-out 15-NN accuracy on the PCs;
* dgdcell (unless ``--baseline-only``): ``DGD(n_components=K, seed=0).fit(adata)``; ARI / NMI
  of ``obs["dgd_cluster"]``, ARI of Leiden (tuned to K) on ``obsm["X_dgd"]``, 15-NN accuracy
  on ``X_dgd``, epochs run, fit time and the number of distinct DGD clusters used.

Usage (from the repository root)::

    python benchmarks/quality.py [--datasets a,b] [--max-epochs N] [--baseline-only]
                                 [--out benchmarks/results]

Writes ``<out>/quality.md`` and ``<out>/quality.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import random
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

MD_COLUMNS = [
    "dataset", "cells", "genes", "K",
    "scanpy ARI", "scanpy NMI", "scanpy kNN acc", "scanpy s",
    "dgd cluster ARI", "dgd NMI", "dgd clusters used", "leiden(X_dgd) ARI", "dgd kNN acc",
    "epochs", "dgd s",
]
CSV_COLUMNS = MD_COLUMNS + [
    "zero-count cells dropped", "scanpy leiden resolution", "scanpy clusters found",
    "leiden(X_dgd) resolution", "leiden(X_dgd) clusters found", "dgd error",
]
# columns averaged in the "mean" row
MEAN_COLUMNS = [
    "scanpy ARI", "scanpy NMI", "scanpy kNN acc", "scanpy s",
    "dgd cluster ARI", "dgd NMI", "leiden(X_dgd) ARI", "dgd kNN acc", "epochs", "dgd s",
]
FLOATFMTS = {"scanpy s": ".1f", "dgd s": ".1f", "epochs": ".0f",
             "scanpy leiden resolution": ".4f", "leiden(X_dgd) resolution": ".4f"}

# console layout: (column, width)
_CONSOLE = [("dataset", 14), ("cells", 6), ("genes", 6), ("K", 3),
            ("scanpy ARI", 7), ("scanpy NMI", 7), ("scanpy kNN acc", 7), ("scanpy s", 7),
            ("dgd cluster ARI", 7), ("dgd NMI", 7), ("dgd clusters used", 5),
            ("leiden(X_dgd) ARI", 7), ("dgd kNN acc", 7), ("epochs", 6), ("dgd s", 7)]
_SHORT = {"scanpy ARI": "scARI", "scanpy NMI": "scNMI", "scanpy kNN acc": "scKNN", "scanpy s": "sc_s",
          "dgd cluster ARI": "dgARI", "dgd NMI": "dgNMI", "dgd clusters used": "used",
          "leiden(X_dgd) ARI": "ldARI", "dgd kNN acc": "dgKNN", "epochs": "ep", "dgd s": "dg_s"}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _console_header() -> str:
    return " ".join(f"{_SHORT.get(c, c):>{w}}" if i else f"{_SHORT.get(c, c):<{w}}"
                    for i, (c, w) in enumerate(_CONSOLE))


def _console_row(row: dict) -> str:
    out = []
    for i, (c, w) in enumerate(_CONSOLE):
        v = row.get(c)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            s = "-"
        elif isinstance(v, float):
            s = format(v, FLOATFMTS.get(c, ".3f"))
        else:
            s = str(v)
        out.append(f"{s:<{w}}" if i == 0 else f"{s:>{w}}")
    return " ".join(out)


def run_dgd(dgdcell, adata, n_clusters: int, max_epochs: int | None, seed: int = SEED) -> dict:
    """Fit DGD on ``adata`` (modified in place) and compute the dgd columns."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    fit_kwargs = {} if max_epochs is None else {"max_epochs": max_epochs}
    t = time.perf_counter()
    dgd = dgdcell.DGD(n_components=n_clusters, seed=seed)
    dgd.fit(adata, verbose=False, **fit_kwargs)
    secs = time.perf_counter() - t

    pred = adata.obs["dgd_cluster"].astype(str).to_numpy()
    ld_labels, ld_res, ld_found = common.leiden_tuned(adata, n_clusters, use_rep="X_dgd", seed=seed)
    return {
        "dgd cluster ARI": float(adjusted_rand_score(truth, pred)),
        "dgd NMI": float(normalized_mutual_info_score(truth, pred)),
        "dgd clusters used": int(len(np.unique(pred))),
        "leiden(X_dgd) ARI": float(adjusted_rand_score(truth, ld_labels)),
        "leiden(X_dgd) resolution": ld_res,
        "leiden(X_dgd) clusters found": ld_found,
        "dgd kNN acc": common.knn_accuracy(np.asarray(adata.obsm["X_dgd"]), truth, k=15),
        "epochs": int(len(dgd.history["epoch"])),
        "dgd s": float(secs),
    }


def _mean_row(rows: list[dict]) -> dict:
    mean = {"dataset": "mean"}
    for c in MEAN_COLUMNS:
        vals = [r[c] for r in rows if r.get(c) is not None and not (isinstance(r[c], float) and np.isnan(r[c]))]
        mean[c] = float(np.mean(vals)) if vals else None
    return mean


def _summary_lines(rows: list[dict], dgd_status: str | None) -> list[str]:
    n_sets = len(rows)
    both = [r for r in rows if r.get("dgd cluster ARI") is not None]
    if not both:
        return [f"dgd not run: {dgd_status}" if dgd_status else "dgd not run"]
    n = len(both)
    suffix = "" if n == n_sets else f" (dgd ran on {n} of the {n_sets} sets)"
    wins = sum(r["dgd cluster ARI"] >= r["scanpy ARI"] for r in both)
    m_dgd = float(np.mean([r["dgd cluster ARI"] for r in both]))
    m_sc = float(np.mean([r["scanpy ARI"] for r in both]))
    ld_wins = sum(r["leiden(X_dgd) ARI"] >= r["scanpy ARI"] for r in both)
    return [
        f"- dgd_cluster ARI >= scanpy ARI on {wins} of {n} sets{suffix}",
        f"- mean ARI dgd vs scanpy: {m_dgd:.3f} vs {m_sc:.3f} ({m_dgd - m_sc:+.3f})",
        f"- Leiden on X_dgd >= Leiden on PCA on {ld_wins} of {n} sets",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None,
                   help="comma-separated subset of: " + ",".join(LABELLED_SETS))
    p.add_argument("--max-epochs", type=int, default=None,
                   help="passed to DGD.fit (default: the package default)")
    p.add_argument("--baseline-only", action="store_true", help="only run the scanpy baseline")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = p.parse_args(argv)
    args.datasets = common.select_datasets(p, args.datasets)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="zero-centering a sparse array")  # sc.pp.scale
    _seed_everything(SEED)

    machine = common.machine_description()
    started = _dt.datetime.now().astimezone()
    print(f"[quality] {machine}", flush=True)
    print(f"[quality] data: {common.DATA_DIR}", flush=True)

    dgdcell = None
    dgd_status = None
    if args.baseline_only:
        dgd_status = "--baseline-only"
    else:
        try:
            import dgdcell  # noqa: F401
        except Exception as exc:  # ImportError, or an error while importing the package
            dgd_status = f"import dgdcell failed ({type(exc).__name__}: {exc})"
            print(f"[quality] {dgd_status}; writing the baseline only", flush=True)
            dgdcell = None
        else:
            v = getattr(dgdcell, "__version__", "?")
            print(f"[quality] dgdcell {v} from {Path(dgdcell.__file__).parent}", flush=True)

    print("[quality] warming up scanpy/numba ...", flush=True)
    common.warmup(SEED)

    rows: list[dict] = []
    notes: list[str] = []
    print(_console_header(), flush=True)
    for name in args.datasets:
        adata = LABELLED_SETS[name](verbose=False)
        K = int(adata.obs[LABEL_KEY].nunique())
        row = {"dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "K": K,
               "zero-count cells dropped": int(adata.uns["benchmark_n_dropped_zero_counts"])}

        _seed_everything(SEED)
        base = common.scanpy_standard(adata, K, seed=SEED)
        row.update({"scanpy ARI": base["ari"], "scanpy NMI": base["nmi"],
                    "scanpy kNN acc": base["knn_acc"], "scanpy s": base["seconds"],
                    "scanpy leiden resolution": base["leiden_resolution"],
                    "scanpy clusters found": base["n_clusters_found"]})
        if base["n_clusters_found"] != K:
            notes.append(f"- {name}: scanpy Leiden found {base['n_clusters_found']} clusters, not {K}")

        if dgdcell is not None:
            _seed_everything(SEED)
            try:
                row.update(run_dgd(dgdcell, adata, K, args.max_epochs, seed=SEED))
                if row["leiden(X_dgd) clusters found"] != K:
                    notes.append(f"- {name}: Leiden on X_dgd found "
                                 f"{row['leiden(X_dgd) clusters found']} clusters, not {K}")
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                row["dgd error"] = msg
                notes.append(f"- {name}: dgd failed ({msg})")
                traceback.print_exc()
                sys.stderr.flush()
        rows.append(row)
        print(_console_row(row), flush=True)

    mean = _mean_row(rows)
    print(_console_row(mean), flush=True)

    dropped = ", ".join(f"{r['dataset']} {r['zero-count cells dropped']}" for r in rows)
    header = [
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine}",
        "- command: `" + " ".join(["python benchmarks/quality.py",
                                    *(argv if argv is not None else sys.argv[1:])]) + "`",
        f"- max epochs: {args.max_epochs if args.max_epochs is not None else 'package default'}; seed {SEED}",
        "- scanpy standard: normalize_total(target_sum=1e4), log1p, scale(max_value=10), PCA(50), "
        "Leiden (igraph, 15-NN graph) with the resolution bisected to give K clusters; "
        "kNN acc = leave-one-out 15-NN majority vote on the 50 PCs (dgd: on X_dgd)",
        "- 'dgd cluster' = obs['dgd_cluster'] (GMM component); 'leiden(X_dgd)' = Leiden tuned to K on "
        "obsm['X_dgd']; seconds are wall-clock (scanpy: whole pipeline; dgd: DGD() + fit)",
        f"- zero-count cells dropped: {dropped}",
    ]
    footer = _summary_lines(rows, dgd_status) + notes
    for line in footer:
        print(f"[quality] {line}", flush=True)
    common.write_table(
        rows + [mean], out / "quality.md", out / "quality.csv",
        title="dgdcell quality benchmark vs scanpy standard",
        columns=MD_COLUMNS, csv_columns=CSV_COLUMNS,
        header_lines=header, footer_lines=footer, floatfmts=FLOATFMTS,
    )
    print(f"[quality] wrote {out / 'quality.md'} and {out / 'quality.csv'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
