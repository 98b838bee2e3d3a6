"""Clustering / representation quality of dgdcell against the scanpy standard and scVI (issue #20).

Protocol, for each labelled RNA data set of ``common.LABELLED_SETS`` (raw counts, cells without
counts dropped; K = number of distinct labels in ``obs["cell_type"]``) and each seed of ``--seeds``
(default 0,1,2,3,4). The labels are used only to score, never to fit, stop or select.

* dgdcell (package defaults): ``DGD(n_components=K, seed=s).fit(adata)`` (``--max-epochs`` only for
  smoke tests). Scored: ARI and NMI of ``obs["dgd_cluster"]`` (the mixture component of each cell),
  ARI of Leiden tuned to K on ``obsm["X_dgd"]`` (``common.leiden_tuned``, Leiden seed s),
  leave-one-out 15-NN accuracy on ``X_dgd`` (``common.knn_accuracy``), epochs run and the seconds of
  ``DGD()`` + ``fit``.

  - Per-component purity: for every mixture component holding cells, the share of its majority
    label. Reported: the minimum purity over components, the size share (of all cells) of that least
    pure component, and catch-all components: those holding >= 5% of the cells with purity < 0.5.
    The same for the scanpy standard's Leiden clusters, so that a dgdcell catch-all can be told from
    labels that no clustering of the data separates.
  - Re-embedding: after the fit, ``dgd.transform(copy)`` on an untouched copy of the same cells
    (transform's defaults; it writes ``obs["dgd_cluster"]`` of the copy) and the share of cells whose
    cluster is unchanged ("re-embed agreement"). Transform's seconds are kept apart from the fit's.

* scanpy standard (``common.scanpy_standard``, seed s for PCA and Leiden): normalize_total(1e4),
  log1p, scale(max_value=10), PCA(50), Leiden tuned to K on the PCs; ARI / NMI, 15-NN accuracy on
  the PCs (the "PCA" of the targets).
* scVI (scvi-tools defaults, ``scvi.settings.seed = s``): ``SCVI.setup_anndata(adata)`` on the raw
  counts (no batch key), ``SCVI(adata, n_latent=20)``, ``.train()`` with scvi-tools' default epochs
  (its heuristic min(400, round(400 * 20000 / cells)): 400 on every set here; 90/10 train/validation
  split, batch size 128, no early stopping) on the CPU, ``get_latent_representation()``; Leiden
  tuned to K on it (seed s), ARI / NMI, 15-NN accuracy on the latent space.

Per data set and method: mean and sample standard deviation (ddof = 1) over the seeds of every
score. Published ARIs (K given, as quoted in issue #20 with the methods they come from) are shown
next to them. Targets of issue #20, each a yes/no per set:

* mean over the sets of dgd_cluster ARI >= the scanpy standard's mean + 0.08 (one verdict overall);
* dgd_cluster ARI >= max(scanpy, scVI) - 0.02 (seed means) on every set;
* seed sd of dgd_cluster ARI <= 0.03 on every set;
* 15-NN accuracy on ``X_dgd`` >= the PCA's - 0.01 (seed means) on every set;
* no catch-all component on any seed;
* re-embed agreement (seed mean) >= 95%.

Every (set, seed) result is cached as JSON in the output folder and reused by later runs, so a run can
be split across processes (``--datasets``, ``--seeds``) and resumed: dgd results in
``quality_dgd_<tag>.json`` (``--tag``, default ``default``; a cached result is reused whichever model
made it, with a warning when the last commit of its dgdcell package differs: give each model version
its own ``--tag``, or ``--recompute`` to refit), the scanpy and
scVI results in ``quality_peers.json`` (computed once; scVI is slow on a CPU). ``--report-only``
rebuilds the report from the caches alone (after a split run: with the full ``--datasets`` and
``--seeds``, since each process writes a report of its own subset).

Usage (from the repository root, one thread per process)::

    OMP_NUM_THREADS=1 python benchmarks/quality.py [--datasets a,b] [--seeds 0,1,2,3,4]
        [--tag NAME] [--dgd-src PATH] [--max-epochs N] [--skip-scvi] [--scvi-seeds 0]
        [--peers-only | --baseline-only | --report-only] [--recompute] [--out benchmarks/results]

``--dgd-src PATH`` imports dgdcell from another checkout (PATH holds the ``dgdcell`` package).
``--skip-scvi`` fits no scVI model (cached scVI results are still reported); ``--peers-only`` fits
scanpy and scVI only; ``--baseline-only`` the scanpy standard only.

Writes ``<out>/quality.md`` (mean ± sd per set and method, purity, re-embedding, published numbers,
verdicts), ``<out>/quality.csv`` (one row per set x seed x method), ``<out>/quality_summary.csv``
(mean and sd per set and method) and ``<out>/quality_verdicts.csv``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import random
import subprocess
import sys
import tempfile
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

import common
from common import LABEL_KEY, LABELLED_SETS

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
K_NN = 15
SCVI_LATENT = 20
CATCH_ALL_SHARE = 0.05   # a component holding at least this share of the cells ...
CATCH_ALL_PURITY = 0.5   # ... with a majority-label share below this is a catch-all
TARGET_MEAN_GAIN = 0.08  # mean ARI >= scanpy's + this
TARGET_PEER_SLACK = 0.02  # every set >= max(scanpy, scVI) - this
TARGET_SEED_SD = 0.03
TARGET_KNN_SLACK = 0.01
TARGET_AGREEMENT = 0.95
PEERS_CACHE = "quality_peers.json"
METHODS = ("dgd", "scanpy", "scvi")
METHOD_NAMES = {"dgd": "dgdcell", "scanpy": "scanpy standard", "scvi": "scVI"}

#: published ARIs with K given, as quoted in issue #20 ("published tables on these very files")
PUBLISHED = {
    "pbmc4k": ("0.78-0.84", "scDeepCluster, scDCC"),
    "worm_neuron": ("0.52-0.72", "scDeepCluster, graph-sc, scTAG"),
    "mouse_bladder": ("0.58-0.80", "scDeepCluster, scDCC, scTAG"),
    "cbmc_rna": ("0.62-0.68", "scSiameseClu, scGNN, scCDCG"),
}
PUBLISHED_SOURCES = [
    "scDeepCluster: Tian, Wan, Ma & Song 2019, *Nat Mach Intell* 1:191-198",
    "scDCC: Tian, Zhang, Ma & Song 2021, *Nat Commun* 12:1873",
    "scGNN: Wang et al. 2021, *Nat Commun* 12:1882",
    "graph-sc: Ciortan & Defrance 2022, *Bioinformatics* 38(5):1037-1044",
    "scTAG: Yu et al. 2022, AAAI-22",
    ("scCDCG and scSiameseClu: graph-based deep clustering methods as named in issue #20 "
     "(ranges quoted from the issue, not re-derived here)"),
]

# per-seed record fields (csv columns after the identifiers)
RECORD_FIELDS = [
    "ari", "nmi", "rep_leiden_ari", "knn_acc", "clusters_used", "leiden_resolution", "clusters_found",
    "epochs", "seconds", "min_purity", "least_pure_share", "least_pure_size", "weighted_purity",
    "n_catch_all", "catch_all_max_share", "catch_all", "reembed_agreement", "reembed_ari",
    "transform_seconds", "max_epochs", "version", "source", "commit", "date", "error",
]
INT_FIELDS = ["seed", "cells", "genes", "K", "clusters_used", "clusters_found", "epochs", "least_pure_size",
              "n_catch_all", "max_epochs"]
CSV_COLUMNS = ["dataset", "method", "seed", "cells", "genes", "K"] + RECORD_FIELDS
# scores summarised as mean ± sd: (record field, table column)
SUMMARY_SCORES = [
    ("ari", "cluster ARI"), ("nmi", "cluster NMI"), ("rep_leiden_ari", "Leiden(rep) ARI"),
    ("knn_acc", "15-NN acc"), ("min_purity", "min purity"), ("least_pure_share", "least-pure share"),
    ("reembed_agreement", "re-embed agreement"), ("epochs", "epochs"), ("seconds", "fit s"),
    ("transform_seconds", "transform s"),
]
MD_COLUMNS = ["dataset", "cells", "K", "method", "seeds", "cluster ARI", "cluster NMI", "Leiden(rep) ARI",
              "15-NN acc", "min purity", "least-pure share", "catch-all seeds", "re-embed agreement",
              "epochs", "fit s", "transform s", "published ARI"]
FMT = {"epochs": ".0f", "seconds": ".1f", "transform_seconds": ".1f"}


# --------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(1)
    except ImportError:
        pass


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def _git_commit(path: Path) -> str:
    """The short hash of the last commit that changed ``path`` (the dgdcell package), ``+dirty`` with
    uncommitted changes under ``path``, or ``?`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h", "--", "."],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 -- no git, not a checkout, ...
        return "?"
    return head + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- caches


def dgd_cache_path(out: Path, tag: str) -> Path:
    return out / f"quality_dgd_{tag}.json"


def dgd_key(dataset: str, seed: int, max_epochs: int | None) -> str:
    return f"{dataset}|seed={seed}|max_epochs={'default' if max_epochs is None else max_epochs}"


def peer_key(dataset: str, method: str, seed: int, max_epochs: int | None = None) -> str:
    suffix = "" if max_epochs is None else f"|max_epochs={max_epochs}"
    return f"{dataset}|{method}|seed={seed}{suffix}"


def load_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as fh:
        return json.load(fh)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock for read-modify-write of ``path`` by several processes (lock file in /tmp)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"dgdcell_quality_{digest}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def store(path: Path, key: str, record: dict) -> None:
    """Add ``record`` under ``key`` to the JSON cache ``path`` (re-read under a lock, written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        cache = load_cache(path)
        cache[key] = record
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- scores


def component_purity(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Purity of each cluster with cells (share of its majority label) and catch-all clusters.

    Returns the minimum purity, the size share and size of the least pure cluster (ties: the larger),
    the size-weighted mean purity and the catch-all clusters (share of cells >= ``CATCH_ALL_SHARE`` and
    purity < ``CATCH_ALL_PURITY``) as ``[cluster, share, purity]``.
    """
    import pandas as pd

    tab = pd.crosstab(pd.Series(pred, name="cluster"), pd.Series(truth, name="label"))
    sizes = tab.sum(axis=1).to_numpy()
    purity = tab.max(axis=1).to_numpy() / sizes
    n = float(sizes.sum())
    order = np.lexsort((-sizes, purity))  # lowest purity first, the larger on ties
    worst = order[0]
    catch = [[str(tab.index[i]), float(sizes[i] / n), float(purity[i])] for i in range(len(sizes))
             if sizes[i] / n >= CATCH_ALL_SHARE and purity[i] < CATCH_ALL_PURITY]
    return {
        "min_purity": float(purity[worst]),
        "least_pure_share": float(sizes[worst] / n),
        "least_pure_size": int(sizes[worst]),
        "weighted_purity": float((purity * sizes).sum() / n),
        "n_catch_all": len(catch),
        "catch_all_max_share": max((c[1] for c in catch), default=0.0),
        "catch_all": catch,
    }


def run_dgd(dgdcell, adata, n_clusters: int, seed: int, max_epochs: int | None) -> dict:
    """Fit DGD on a copy of ``adata``, score it, re-embed an untouched copy with ``transform``."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    a = adata.copy()
    fresh = adata.copy()
    fit_kwargs = {} if max_epochs is None else {"max_epochs": max_epochs}
    _seed_everything(seed)
    t = time.perf_counter()
    dgd = dgdcell.DGD(n_components=n_clusters, seed=seed)
    dgd.fit(a, verbose=False, **fit_kwargs)
    secs = time.perf_counter() - t

    pred = a.obs["dgd_cluster"].astype(str).to_numpy()
    ld_labels, ld_res, ld_found = common.leiden_tuned(a, n_clusters, use_rep="X_dgd", seed=seed)
    rec = {
        "ari": float(adjusted_rand_score(truth, pred)),
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "clusters_used": len(np.unique(pred)),
        "rep_leiden_ari": float(adjusted_rand_score(truth, ld_labels)),
        "leiden_resolution": ld_res,
        "clusters_found": ld_found,
        "knn_acc": common.knn_accuracy(np.asarray(a.obsm["X_dgd"]), truth, k=K_NN),
        "epochs": len(dgd.history["epoch"]),
        "seconds": float(secs),
    }
    rec.update(component_purity(truth, pred))

    t = time.perf_counter()
    dgd.transform(fresh, verbose=False)
    rec["transform_seconds"] = float(time.perf_counter() - t)
    re_pred = fresh.obs["dgd_cluster"].astype(str).to_numpy()
    # cells whose own representation was one of transform's starts are left out (they start at their answer)
    own = np.zeros(len(pred), dtype=bool)
    own[np.asarray(fresh.uns["dgd"]["transform"].get("reference_rows", []), dtype=np.int64)] = True
    rec["reembed_agreement"] = float((re_pred == pred)[~own].mean()) if (~own).any() else float("nan")
    rec["reembed_reference_cells"] = int(own.sum())
    rec["reembed_ari"] = float(adjusted_rand_score(truth, re_pred))
    return rec


def run_scanpy(adata, n_clusters: int, seed: int) -> dict:
    _seed_everything(seed)
    base = common.scanpy_standard(adata, n_clusters, seed=seed)
    rec = {"ari": base["ari"], "nmi": base["nmi"], "rep_leiden_ari": base["ari"], "knn_acc": base["knn_acc"],
           "leiden_resolution": base["leiden_resolution"], "clusters_found": base["n_clusters_found"],
           "clusters_used": base["n_clusters_found"], "seconds": base["seconds"]}
    # the same purity measures on its Leiden clusters, so that a catch-all can be told from labels no clustering
    # of the data separates
    rec.update(component_purity(adata.obs[LABEL_KEY].astype(str).to_numpy(), base["labels"]))
    return rec


def run_scvi(adata, n_clusters: int, seed: int, max_epochs: int | None = None) -> dict:
    """scVI with scvi-tools' defaults (20 latent dimensions), Leiden tuned to K on its latent space."""
    import logging

    import scvi
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    scvi.settings.verbosity = logging.WARNING
    scvi.settings.seed = seed
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    _seed_everything(seed)
    truth = adata.obs[LABEL_KEY].astype(str).to_numpy()
    a = adata.copy()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(a)
        model = scvi.model.SCVI(a, n_latent=SCVI_LATENT)
        model.train(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
        z = model.get_latent_representation()
    secs = time.perf_counter() - t
    a.obsm["X_scVI"] = np.asarray(z, dtype=np.float32)
    labels, res, found = common.leiden_tuned(a, n_clusters, use_rep="X_scVI", seed=seed)
    ari = float(adjusted_rand_score(truth, labels))
    return {"ari": ari, "nmi": float(normalized_mutual_info_score(truth, labels)), "rep_leiden_ari": ari,
            "knn_acc": common.knn_accuracy(a.obsm["X_scVI"], truth, k=K_NN), "leiden_resolution": res,
            "clusters_found": found, "clusters_used": found,
            "epochs": int(model.history["elbo_train"].shape[0]), "seconds": float(secs),
            "version": scvi.__version__}


# --------------------------------------------------------------------------- report


def _mean_sd(values) -> tuple[float, float, int]:
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    return float(np.mean(vals)), sd, len(vals)


def _pm(mean: float, sd: float, fmt: str = ".3f") -> str:
    if np.isnan(mean):
        return ""
    return format(mean, fmt) + ("" if np.isnan(sd) else " ± " + format(sd, fmt))


def collect(datasets, seeds, dgd_cache: dict, peers: dict, max_epochs, scvi_max_epochs, meta: dict) -> dict:
    """``{dataset: {method: [record per available seed]}}`` from the caches (records carry ``seed``)."""
    got: dict = {}
    for name in datasets:
        got[name] = {m: [] for m in METHODS}
        for s in seeds:
            r = dgd_cache.get(dgd_key(name, s, max_epochs))
            if r is not None:
                got[name]["dgd"].append(r)
            for method, me in (("scanpy", None), ("scvi", scvi_max_epochs)):
                r = peers.get(peer_key(name, method, s, me))
                if r is not None:
                    got[name][method].append(r)
        for recs in got[name].values():
            for r in recs:
                if name in meta:
                    continue
                meta[name] = {k: r.get(k) for k in ("cells", "genes", "K")}
    return got


def summarise(got: dict) -> dict:
    """``{dataset: {method: {field: (mean, sd, n)}, ...}}`` plus ``n_seeds``, ``catch_all_seeds``."""
    summ: dict = {}
    for name, by_method in got.items():
        summ[name] = {}
        for method, recs in by_method.items():
            if not recs:
                continue
            d = {f: _mean_sd([r.get(f) for r in recs]) for f, _ in SUMMARY_SCORES}
            d["n_seeds"] = len(recs)
            d["seeds"] = sorted(int(r["seed"]) for r in recs)
            if any("n_catch_all" in r for r in recs):
                d["catch_all_seeds"] = sum(int(r.get("n_catch_all", 0) > 0) for r in recs)
            summ[name][method] = d
    return summ


def table_rows(summ: dict, meta: dict, n_requested: int) -> list[dict]:
    rows = []
    for name, by_method in summ.items():
        pub = PUBLISHED.get(name)
        for method in METHODS:
            d = by_method.get(method)
            if d is None:
                continue
            row = {"dataset": name, "method": METHOD_NAMES[method],
                   "seeds": f"{d['n_seeds']}" + ("" if d["n_seeds"] == n_requested else f" of {n_requested}"),
                   **{k: meta.get(name, {}).get(k) for k in ("cells", "K")}}
            for field, col in SUMMARY_SCORES:
                row[col] = _pm(*d[field][:2], fmt=FMT.get(field, ".3f"))
            if "catch_all_seeds" in d:
                row["catch-all seeds"] = f"{d['catch_all_seeds']} of {d['n_seeds']}"
            if pub and not any(r["dataset"] == name for r in rows):  # on the set's first row
                row["published ARI"] = f"{pub[0]} ({pub[1]})"
            rows.append(row)
    # mean over the sets each method has
    for method in METHODS:
        have = [by[method] for by in summ.values() if method in by]
        if not have:
            continue
        row = {"dataset": "mean", "method": METHOD_NAMES[method], "seeds": f"{len(have)} sets"}
        for field, col in SUMMARY_SCORES:
            vals = [d[field][0] for d in have if not np.isnan(d[field][0])]
            row[col] = format(float(np.mean(vals)), FMT.get(field, ".3f")) if vals else ""
        rows.append(row)
    return rows


def verdicts(summ: dict) -> tuple[list[dict], list[str]]:
    """Per-set yes/no for every target of issue #20, and the overall lines."""
    yn = {True: "yes", False: "no"}
    rows = []
    for name, by in summ.items():
        d = by.get("dgd")
        if d is None:
            continue
        sc, sv = by.get("scanpy"), by.get("scvi")
        ari, sd = d["ari"][0], d["ari"][1]
        peers = [p["ari"][0] for p in (sc, sv) if p is not None]
        row = {"dataset": name, "dgd seeds": d["n_seeds"], "dgd ARI": format(ari, ".3f"),
               "scanpy ARI": format(sc["ari"][0], ".3f") if sc else "",
               "scVI ARI": format(sv["ari"][0], ".3f") if sv else ""}
        if peers:
            bar = max(peers) - TARGET_PEER_SLACK
            row["ARI >= max(peers) - 0.02"] = yn[ari >= bar] + ("" if sv else " (no scVI)")
        else:
            row["ARI >= max(peers) - 0.02"] = "n/a"
        row["seed sd <= 0.03"] = ("n/a (1 seed)" if np.isnan(sd)
                                  else f"{yn[sd <= TARGET_SEED_SD]} ({sd:.3f})")
        if sc:
            row["15-NN >= PCA - 0.01"] = (f"{yn[d['knn_acc'][0] >= sc['knn_acc'][0] - TARGET_KNN_SLACK]} "
                                          f"({d['knn_acc'][0]:.3f} vs {sc['knn_acc'][0]:.3f})")
        else:
            row["15-NN >= PCA - 0.01"] = "n/a"
        row["no catch-all"] = f"{yn[d['catch_all_seeds'] == 0]} ({d['catch_all_seeds']} of {d['n_seeds']} seeds)"
        ag = d["reembed_agreement"][0]
        row["re-embed >= 95%"] = "n/a" if np.isnan(ag) else f"{yn[ag >= TARGET_AGREEMENT]} ({ag:.3f})"
        rows.append(row)

    lines = []
    both = [(by["dgd"]["ari"][0], by["scanpy"]["ari"][0]) for by in summ.values() if "dgd" in by and "scanpy" in by]
    if both:
        m_dgd, m_sc = float(np.mean([b[0] for b in both])), float(np.mean([b[1] for b in both]))
        ok = m_dgd >= m_sc + TARGET_MEAN_GAIN
        lines.append(f"- mean dgd_cluster ARI >= scanpy + 0.08: **{yn[ok]}** ({m_dgd:.3f} vs {m_sc:.3f}, "
                     f"{m_dgd - m_sc:+.3f}, over {len(both)} sets)")
    for col in ("ARI >= max(peers) - 0.02", "seed sd <= 0.03", "15-NN >= PCA - 0.01", "no catch-all",
                "re-embed >= 95%"):
        n_yes = sum(r[col].startswith("yes") for r in rows)
        n_na = sum(r[col].startswith("n/a") for r in rows)
        judged = len(rows) - n_na
        verdict = "n/a" if not judged else yn[n_yes == judged]
        extra = f", {n_na} not judged" if n_na else ""
        lines.append(f"- {col} on every set: **{verdict}** ({n_yes} of {judged} sets{extra})")
    missing = [name for name, by in summ.items() if "dgd" not in by]
    if rows and missing:
        lines.append(f"- not judged (no dgd results): {', '.join(missing)}")
    return rows, lines


def _record_row(name: str, method: str, r: dict) -> dict:
    row = {"dataset": name, "method": method, **{k: r.get(k) for k in ("seed", "cells", "genes", "K")}}
    for f in RECORD_FIELDS:
        v = r.get(f)
        row[f] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return row


def write_report(out: Path, args, argv, got: dict, meta: dict, machine: str, started: str) -> None:
    import pandas as pd

    summ = summarise(got)
    rows = table_rows(summ, meta, len(args.seeds))
    vrows, vlines = verdicts(summ)

    csv_rows = [_record_row(name, m, r) for name, by in got.items() for m in METHODS for r in by[m]]
    df = pd.DataFrame(csv_rows, columns=CSV_COLUMNS)
    for c in INT_FIELDS:  # integers stay integers despite the empty cells of other methods
        df[c] = pd.to_numeric(df[c]).round().astype("Int64")
    df.to_csv(out / "quality.csv", index=False)
    summary_rows = []
    for name, by in summ.items():
        for method, d in by.items():
            row = {"dataset": name, "method": method, "seeds": d["n_seeds"], **meta.get(name, {})}
            for field, _ in SUMMARY_SCORES:
                row[f"{field} mean"], row[f"{field} sd"] = d[field][0], d[field][1]
            if method == "dgd":
                row["catch_all_seeds"] = d["catch_all_seeds"]
            summary_rows.append(row)
    pd.DataFrame(summary_rows).to_csv(out / "quality_summary.csv", index=False)
    if vrows:
        pd.DataFrame(vrows).to_csv(out / "quality_verdicts.csv", index=False)

    dgd_recs = [r for by in got.values() for r in by["dgd"]]
    sources = sorted({f"dgdcell {r.get('version')} from {r.get('source')} (commit {r.get('commit')})"
                      for r in dgd_recs})
    scvi_recs = [r for by in got.values() for r in by["scvi"]]
    scvi_seeds = {name: len(by["scvi"]) for name, by in got.items()}
    cmd = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    seeds_line = (f"- seeds: {','.join(map(str, args.seeds))}; dgd max epochs: "
                  f"{args.max_epochs if args.max_epochs is not None else 'package default'}; "
                  f"dgd cache tag `{args.tag}`")
    protocol = ("- protocol: K = number of labels; dgdcell = `DGD(n_components=K, seed=s).fit(adata)` with the "
                "package defaults, cluster = `obs['dgd_cluster']` (mixture component), Leiden(rep) = Leiden "
                "tuned to K on `obsm['X_dgd']`; scanpy standard = normalize_total(1e4), log1p, "
                "scale(max_value=10), PCA(50), Leiden tuned to K (its cluster and Leiden(rep) are the same "
                "clustering); scVI = `SCVI(adata, n_latent=20)` on raw counts, scvi-tools' default epochs, "
                "Leiden tuned to K on the latent space. 15-NN acc = leave-one-out 15-NN majority vote on the "
                "representation (scanpy: the 50 PCs). Leiden: igraph, exact 15-NN graph, resolution bisected "
                "to K, seeded with s")
    stats = ("- mean ± sd over the seeds (sd with ddof = 1; none with one seed); 'mean' rows average the set "
             "means over the sets each method has")
    purity = (f"- purity: share of the majority label per mixture component with cells; 'least-pure share' = "
              f"the size share of the least pure component; a catch-all holds >= {CATCH_ALL_SHARE:.0%} of the "
              f"cells with purity < {CATCH_ALL_PURITY}")
    reembed = ("- re-embed agreement: share of training cells whose `dgd_cluster` from `fit` equals the one "
               "`transform` (defaults) gives for an untouched copy of the same cells, leaving out the cells whose "
               "own representation is one of transform's reference starts (`n_reference`); transform s is not in "
               "fit s")
    timing = ("- fit s: wall-clock of DGD() + fit (dgd), of the whole pipeline (scanpy), of setup + train + "
              "latent (scVI); metrics not included")
    header = [
        f"- date: {started}",
        f"- machine: {machine}",
        f"- command: `{cmd}` (one thread per process: `OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`)",
        seeds_line,
        "- dgd: " + ("; ".join(sources) if sources else "no results in the cache"),
        "- scVI seeds per set: " + ", ".join(f"{k} {v}" for k, v in scvi_seeds.items())
        + (f" (scvi-tools {scvi_recs[0].get('version')})" if scvi_recs else ""),
        protocol, stats, purity, reembed, timing,
    ]
    footer = ["## Targets (issue #20)", ""] + vlines
    if vrows:
        footer += ["", common.markdown_table(vrows)]
    footer += ["", "## Published ARIs (K given)", "",
               ("Ranges quoted in issue #20 from published tables on these very files; these methods often "
                "tune per data set. Sources:"), ""]
    footer += [f"- {name}: {rng} ({who})" for name, (rng, who) in PUBLISHED.items()]
    footer += [""] + [f"- {s}" for s in PUBLISHED_SOURCES]
    for method, what in (("dgd", "component"), ("scanpy", "Leiden cluster")):
        catch = [(name, r["seed"], c) for name, by in got.items() for r in by[method] for c in r.get("catch_all", [])]
        if catch:
            footer += ["", f"## Catch-all clusters ({METHOD_NAMES[method]})", ""]
            footer += [f"- {name} seed {s}: {what} {c[0]} holds {c[1]:.1%} of the cells, purity {c[2]:.2f}"
                       for name, s, c in catch]
    errs = [(name, m, r["seed"], r["error"]) for name, by in got.items() for m in METHODS for r in by[m]
            if r.get("error")]
    if errs:
        footer += ["", "## Errors", ""] + [f"- {n} {m} seed {s}: {e}" for n, m, s, e in errs]

    parts = ["# dgdcell quality benchmark vs the scanpy standard and scVI", ""] + header + [""]
    parts.append(common.markdown_table(rows, columns=MD_COLUMNS))
    parts += [""] + footer
    (out / "quality.md").write_text("\n".join(parts) + "\n")

    print(common.markdown_table(rows, columns=MD_COLUMNS[:4] + MD_COLUMNS[5:16]), flush=True)
    print("[quality] " + "\n[quality] ".join(vlines), flush=True)
    for r in vrows:
        print("[quality] " + "; ".join(f"{k}: {v}" for k, v in r.items()), flush=True)
    print(f"[quality] wrote {out / 'quality.md'}, {out / 'quality.csv'}, {out / 'quality_summary.csv'}"
          + (f", {out / 'quality_verdicts.csv'}" if vrows else ""), flush=True)


# --------------------------------------------------------------------------- main


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None,
                   help="comma-separated subset of: " + ",".join(LABELLED_SETS))
    p.add_argument("--seeds", type=_seeds, default=list(DEFAULT_SEEDS), help="comma-separated seeds (default 0-4)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="passed to DGD.fit (default: the package default; for smoke tests)")
    p.add_argument("--tag", default="default", help="dgd cache: <out>/quality_dgd_<tag>.json")
    p.add_argument("--dgd-src", default=None,
                   help="import dgdcell from this checkout (the folder holding the dgdcell package)")
    p.add_argument("--recompute", action="store_true", help="refit dgd even where the cache has a result")
    p.add_argument("--skip-scvi", action="store_true", help="fit no scVI model (cached results are reported)")
    p.add_argument("--scvi-seeds", type=_seeds, default=None, help="seeds to fit scVI for (default: --seeds)")
    p.add_argument("--scvi-max-epochs", type=int, default=None,
                   help="scVI epochs (default: scvi-tools' default; other values are cached apart)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--peers-only", action="store_true", help="scanpy standard and scVI only (fill the cache)")
    mode.add_argument("--baseline-only", action="store_true", help="scanpy standard only")
    mode.add_argument("--report-only", action="store_true", help="fit nothing; rebuild the report from the caches")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (caches and report)")
    args = p.parse_args(argv)
    args.datasets = common.select_datasets(p, args.datasets)
    if not args.seeds:
        p.error("--seeds is empty")
    if args.scvi_seeds is None:
        args.scvi_seeds = list(args.seeds)
    return args


def import_dgdcell(src: str | None):
    if src is not None:
        src_path = Path(src).resolve()
        if not (src_path / "dgdcell" / "__init__.py").exists():
            raise SystemExit(f"--dgd-src {src}: no dgdcell package there")
        sys.path.insert(0, str(src_path))
        for mod in [m for m in sys.modules if m == "dgdcell" or m.startswith("dgdcell.")]:
            del sys.modules[mod]
    import dgdcell

    pkg = Path(dgdcell.__file__).resolve().parent
    return dgdcell, {"version": getattr(dgdcell, "__version__", "?"), "source": str(pkg.parent),
                     "commit": _git_commit(pkg)}


def _attempt(what: str, fit):
    """``fit()``, or None after printing its error: a failed fit is reported, left uncached, and the run goes on."""
    try:
        return fit()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
        print(f"[quality] {what} failed: {type(exc).__name__}: {exc} (not cached)", flush=True)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="zero-centering a sparse array")  # sc.pp.scale
    _seed_everything(0)

    machine = common.machine_description()
    started = _now()
    print(f"[quality] {machine}", flush=True)
    print(f"[quality] data: {common.DATA_DIR}", flush=True)

    do_dgd = not (args.peers_only or args.baseline_only or args.report_only)
    do_scanpy = not args.report_only
    do_scvi = not (args.skip_scvi or args.baseline_only or args.report_only)
    dgdcell, dgd_info = None, {}
    if do_dgd:
        dgdcell, dgd_info = import_dgdcell(args.dgd_src)
        print(f"[quality] dgdcell {dgd_info['version']} from {dgd_info['source']} (commit {dgd_info['commit']})",
              flush=True)
    peers_path = out / PEERS_CACHE
    dgd_path = dgd_cache_path(out, args.tag)

    if not args.report_only:
        print("[quality] warming up scanpy/numba ...", flush=True)
        common.warmup(0)
        for name in args.datasets:
            peers = load_cache(peers_path)
            dgd_cache = load_cache(dgd_path)
            # scanpy records from before the purity columns are refitted
            todo_sc = [s for s in args.seeds
                       if do_scanpy and "min_purity" not in peers.get(peer_key(name, "scanpy", s), {})]
            todo_dgd = [s for s in args.seeds
                        if do_dgd and (args.recompute or dgd_key(name, s, args.max_epochs) not in dgd_cache)]
            todo_scvi = [s for s in args.scvi_seeds
                         if do_scvi and peer_key(name, "scvi", s, args.scvi_max_epochs) not in peers]
            stale = [s for s in args.seeds if do_dgd and s not in todo_dgd
                     and dgd_cache[dgd_key(name, s, args.max_epochs)].get("commit") != dgd_info["commit"]]
            if stale:
                print(f"[quality] {name}: cached dgd seeds {stale} come from commit "
                      f"{dgd_cache[dgd_key(name, stale[0], args.max_epochs)].get('commit')}, not "
                      f"{dgd_info['commit']}; reused (--recompute or another --tag to refit)", flush=True)
            if not (todo_sc or todo_dgd or todo_scvi):
                print(f"[quality] {name}: everything cached", flush=True)
                continue
            adata = LABELLED_SETS[name](verbose=False)
            K = int(adata.obs[LABEL_KEY].nunique())
            ident = {"dataset": name, "cells": int(adata.n_obs), "genes": int(adata.n_vars), "K": K,
                     "dropped_zero_count_cells": int(adata.uns["benchmark_n_dropped_zero_counts"])}

            def done(method, seed, rec, path, key, name=name, ident=ident):
                rec = {**ident, "method": method, "seed": int(seed), "date": _now(), **rec}
                store(path, key, rec)
                shown = ", ".join(f"{k} {rec[k]:.3f}" if isinstance(rec[k], float) else f"{k} {rec[k]}"
                                  for k in ("ari", "nmi", "rep_leiden_ari", "knn_acc", "min_purity",
                                            "n_catch_all", "reembed_agreement", "epochs", "seconds")
                                  if k in rec)
                print(f"[quality] {name} {method} seed {seed}: {shown}", flush=True)

            for s in todo_sc:
                done("scanpy", s, run_scanpy(adata, K, s), peers_path, peer_key(name, "scanpy", s))
            for s in todo_dgd:
                rec = _attempt(f"{name} dgd seed {s}", lambda: run_dgd(dgdcell, adata, K, s, args.max_epochs))
                if rec is not None:
                    rec.update(dgd_info, max_epochs=args.max_epochs)
                    done("dgd", s, rec, dgd_path, dgd_key(name, s, args.max_epochs))
            for s in todo_scvi:
                rec = _attempt(f"{name} scVI seed {s}", lambda: run_scvi(adata, K, s, args.scvi_max_epochs))
                if rec is not None:
                    rec["max_epochs"] = args.scvi_max_epochs
                    done("scvi", s, rec, peers_path, peer_key(name, "scvi", s, args.scvi_max_epochs))

    meta: dict = {}
    got = collect(args.datasets, args.seeds, load_cache(dgd_path), load_cache(peers_path),
                  args.max_epochs, args.scvi_max_epochs, meta)
    write_report(out, args, argv, got, meta, machine, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
