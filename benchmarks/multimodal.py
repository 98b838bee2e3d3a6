"""Multi-modal data and covariates: what a second modality and a batch covariate buy.

1. CITE-seq PBMC 10k (``cite_pbmc10k_scmdc.h5mu``: RNA 1,000 genes + 14 proteins, 7 labelled
   types), K = 7:

   * ARI of ``dgd_cluster`` against the labels for a joint RNA + ADT fit and an RNA-only fit;
   * protein prediction: stratified 80/20 split (seed 0); a joint model fitted on the 80%;
     the held-out cells' RNA alone is embedded with ``transform`` and their proteins predicted
     with ``predict_modality``: its default (the weighted geometric mean of the decoded proteins
     under the empirical prior of the training representations, each protein tempered with the
     temperature ``fit`` calibrated for it), the weighted arithmetic mean instead
     (``average="arithmetic"``, the default before session 15), the default untempered
     (``temperature=1``), ``method="point"`` (decoded at the cell's ``transform`` point), and
     the default with a model fitted with ``modality_weights={"adt": 0.3}``; the same (without
     the weighted model) on the small CBMC CITE-seq file (``cite_cbmc_gse100866_scmdc_small.h5mu``:
     1,182 cells, 1,000 genes, 10 proteins). ``transform s`` is transform + predict_modality
     (for the point, arithmetic and untempered rows: predict_modality alone).
     Score: Spearman correlation per protein between the prediction and the measured log of
     per-cell normalised counts (``log1p(1e4 * x / total)``), averaged over proteins. Anchors:
     15-NN regression (mean of the neighbours' normalised log ADT) in the scanpy PCA space of
     RNA (normalize_total, log1p, scale, 50 PCs fitted on the 80%), and the same 15-NN
     regression on ``X_dgd`` (training cells as fitted with both modalities).

2. CellBench (``cellbench_lung5cl_3protocols_rna.h5ad``: 5 cell lines, 5 batches), K = 5, with
   and without ``covariate_keys=["batch"]``: ARI of ``dgd_cluster`` against the cell lines and
   batch mixing — for every cell the fraction of its 30 nearest neighbours (in ``X_dgd``) from
   other batches divided by the fraction expected under perfect mixing (1 - its batch's share
   of the cells); 1 is perfect mixing, 0 none. The scanpy PCA space is the reference, and scVI
   (``batch_key="batch"``) when ``scvi-tools`` is importable.

Usage (from the repository root)::

    python benchmarks/multimodal.py [--threads T] [--out benchmarks/results]

Writes ``<out>/multimodal.md`` and ``<out>/multimodal.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import logging  # noqa: E402

import common  # noqa: E402
from common import DATA_DIR, LABEL_KEY  # noqa: E402

log = logging.getLogger("multimodal")
SEED = 0
N_NEIGHBOURS_MIXING = 30
N_NEIGHBOURS_REGRESSION = 15


def log_normalised(X) -> np.ndarray:
    """``log1p(1e4 * x / total)`` per cell of a (n, G) count matrix: dense (n, G)."""
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    return np.log1p(1e4 * X / np.maximum(X.sum(1, keepdims=True), 1.0))


def spearman_per_feature(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column of ``pred`` with the same column of ``truth``: (G,)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(pred[:, j], truth[:, j]).statistic for j in range(truth.shape[1])])


def knn_regression(X_train, Y_train, X_test, k: int = N_NEIGHBOURS_REGRESSION) -> np.ndarray:
    """Mean of the ``k`` nearest training rows' ``Y`` for every test row: (n_test, G)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k).fit(X_train)
    idx = nn.kneighbors(X_test, return_distance=False)
    return Y_train[idx].mean(axis=1)


def batch_mixing(X, batches: np.ndarray, k: int = N_NEIGHBOURS_MIXING) -> float:
    """Mean over cells of (share of the k nearest neighbours from other batches) /
    (1 - share of the cell's batch among all cells)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    _, codes = np.unique(batches, return_inverse=True)
    other = (codes[idx] != codes[:, None]).mean(1)
    expected = 1.0 - np.bincount(codes)[codes] / codes.size
    return float(np.mean(other / expected))


def scanpy_pca(adata_train, adata_test=None, n_pcs: int = 50):
    """Scanpy PCA of RNA fitted on ``adata_train`` (normalize_total, log1p, scale); returns the
    train scores and, with ``adata_test``, its projection (scaled with the train statistics)."""
    import scanpy as sc

    def prep(a):
        a = a.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)

    Xtr = prep(adata_train)
    mean, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0

    def scale(X):
        return np.clip((X - mean) / sd, -10, 10)

    from sklearn.decomposition import PCA

    pca = PCA(n_components=n_pcs, random_state=SEED).fit(scale(Xtr))
    out = pca.transform(scale(Xtr))
    return out if adata_test is None else (out, pca.transform(scale(prep(adata_test))))


def cite_rows() -> list[dict]:
    import mudata
    from sklearn.metrics import adjusted_rand_score as ari

    import dgdcell

    mdata = mudata.read_h5mu(DATA_DIR / "cite_pbmc10k_scmdc.h5mu")
    labels = mdata.obs[LABEL_KEY].astype(str).to_numpy()
    k = len(np.unique(labels))
    rows = []
    for name, mods in (("RNA only", ["rna"]), ("RNA + ADT", None)):
        m = mdata.copy()
        t0 = time.perf_counter()
        dgd = dgdcell.DGD(n_components=k, seed=SEED).fit(m, modalities=mods, verbose=False)
        rows.append({
            "data set": "CITE PBMC 10k", "setting": name, "cells": m.n_obs,
            "ARI dgd_cluster": ari(labels, m.obs["dgd_cluster"]),
            "epochs": dgd.fit_settings["n_epochs"], "fit s": time.perf_counter() - t0,
        })
        log.info(f"CITE {name}: ARI {rows[-1]['ARI dgd_cluster']:.3f}")
    return rows + protein_rows("cite_pbmc10k_scmdc.h5mu", "CITE PBMC 10k", (1.0, 0.3), mdata) + protein_rows(
        "cite_cbmc_gse100866_scmdc_small.h5mu", "CITE CBMC (small)", (1.0,))


def protein_rows(filename: str, data_name: str, weights, mdata=None) -> list[dict]:
    """Proteins of held-out cells (stratified 20%, seed 0) predicted from their RNA alone; one row per estimator."""
    import mudata
    from sklearn.model_selection import train_test_split

    import dgdcell

    if mdata is None:
        mdata = mudata.read_h5mu(DATA_DIR / filename)
    labels = mdata.obs[LABEL_KEY].astype(str).to_numpy()
    k = len(np.unique(labels))
    idx = np.arange(mdata.n_obs)
    train, test = (np.sort(v) for v in train_test_split(idx, test_size=0.2, stratify=labels, random_state=SEED))
    m_train = mdata[train].copy()
    truth = log_normalised(mdata.mod["adt"].X[test])
    adt_train = log_normalised(mdata.mod["adt"].X[train])
    proteins = list(mdata.mod["adt"].var_names)
    estimates = {}
    for weight in weights:
        rna_test = mdata.mod["rna"][test].copy()
        fitted = m_train.copy()
        t0 = time.perf_counter()
        dgd = dgdcell.DGD(n_components=k, seed=SEED, modality_weights={"adt": weight}).fit(fitted, verbose=False)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dgd.transform(rna_test, verbose=False)
        pred = dgd.predict_modality(rna_test, "adt").to_numpy()
        transform_s = time.perf_counter() - t0
        name = "predict_modality" + ("" if weight == 1.0 else f", modality_weights={{'adt': {weight}}}")
        estimates[name] = (spearman_per_feature(np.log(pred), truth), fit_s, transform_s)
        if weight == 1.0:
            t0 = time.perf_counter()
            point = dgd.predict_modality(rna_test, "adt", method="point").to_numpy()
            estimates["predict_modality(method='point')"] = (spearman_per_feature(np.log(point), truth), None,
                                                             time.perf_counter() - t0)
            t0 = time.perf_counter()
            arithmetic = dgd.predict_modality(rna_test, "adt", average="arithmetic").to_numpy()
            estimates["predict_modality(average='arithmetic')"] = (spearman_per_feature(np.log(arithmetic), truth),
                                                                   None, time.perf_counter() - t0)
            t0 = time.perf_counter()
            untempered = dgd.predict_modality(rna_test, "adt", temperature=1).to_numpy()
            estimates["predict_modality(temperature=1)"] = (spearman_per_feature(np.log(untempered), truth), None,
                                                            time.perf_counter() - t0)
            knn = knn_regression(fitted.obsm["X_dgd"], adt_train, rna_test.obsm["X_dgd"])
            estimates["15-NN on X_dgd"] = (spearman_per_feature(knn, truth), None, None)
    pca_train, pca_test = scanpy_pca(mdata.mod["rna"][train], mdata.mod["rna"][test])
    estimates["15-NN on scanpy PCA (anchor)"] = (
        spearman_per_feature(knn_regression(pca_train, adt_train, pca_test), truth), None, None)
    rows = []
    for estimator, (values, fit_s, transform_s) in estimates.items():
        log.info(f"{data_name} ADT from RNA, {estimator}: mean Spearman {values.mean():.3f}")
        rows.append({
            "data set": data_name, "setting": f"ADT of held-out cells from RNA: {estimator}",
            "cells": len(test), "mean Spearman": float(np.mean(values)), "min Spearman": float(np.min(values)),
            "per protein": " ".join(f"{p}:{v:.2f}" for p, v in zip(proteins, values)),
            "fit s": fit_s, "transform s": transform_s,
        })
    return rows


def cellbench_rows() -> list[dict]:
    from sklearn.metrics import adjusted_rand_score as ari

    import dgdcell

    adata = dgdcell.datasets.cellbench()
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy()
    k = len(np.unique(labels))
    rows = []
    for name, cov in (("no covariate", None), ("covariate_keys=['batch']", ["batch"])):
        a = adata.copy()
        t0 = time.perf_counter()
        dgd = dgdcell.DGD(n_components=k, covariate_keys=cov, seed=SEED).fit(a, verbose=False)
        rows.append({
            "data set": "CellBench", "setting": f"DGD, {name}", "cells": a.n_obs,
            "ARI dgd_cluster": ari(labels, a.obs["dgd_cluster"]),
            "batch mixing": batch_mixing(a.obsm["X_dgd"], batches),
            "label 15-NN accuracy": common.knn_accuracy(a.obsm["X_dgd"], labels),
            "epochs": dgd.fit_settings["n_epochs"], "fit s": time.perf_counter() - t0,
        })
        log.info(f"CellBench {name}: ARI {rows[-1]['ARI dgd_cluster']:.3f}, mixing {rows[-1]['batch mixing']:.3f}")
    pcs = scanpy_pca(adata)
    rows.append({"data set": "CellBench", "setting": "scanpy PCA (no correction)", "cells": adata.n_obs,
                 "batch mixing": batch_mixing(pcs, batches),
                 "label 15-NN accuracy": common.knn_accuracy(pcs, labels)})
    try:
        import scvi  # noqa: F401
    except ImportError:
        log.info("scvi-tools is not importable: scVI row skipped")
    else:
        rows.append(scvi_row(adata, labels, batches, k))
    return rows


def scvi_row(adata, labels, batches, k: int) -> dict:
    """scVI with ``batch_key='batch'`` (default settings), Leiden on its latent tuned to ``k`` clusters."""
    import scvi
    from sklearn.metrics import adjusted_rand_score as ari

    a = adata.copy()
    scvi.settings.seed = SEED
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a)
    model.train(enable_progress_bar=False)
    a.obsm["X_scvi"] = model.get_latent_representation()
    seconds = time.perf_counter() - t0
    clusters, _, _ = common.leiden_tuned(a, k, "X_scvi", seed=SEED)
    return {"data set": "CellBench", "setting": "scVI batch_key='batch' (Leiden, K clusters)", "cells": a.n_obs,
            "ARI dgd_cluster": ari(labels, clusters),
            "batch mixing": batch_mixing(a.obsm["X_scvi"], batches),
            "label 15-NN accuracy": common.knn_accuracy(a.obsm["X_scvi"], labels), "fit s": seconds}


COLUMNS = ["data set", "setting", "cells", "ARI dgd_cluster", "batch mixing", "label 15-NN accuracy",
           "mean Spearman", "min Spearman", "epochs", "fit s", "transform s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    rows = cite_rows() + cellbench_rows()
    out = Path(args.out)
    per_protein = [f"- {r['data set']}, {r['setting']}: {r['per protein']}" for r in rows if "per protein" in r]
    text = common.write_table(
        rows, out / "multimodal.md", out / "multimodal.csv", "Multi-modal data and batch covariates",
        columns=COLUMNS, csv_columns=COLUMNS + ["per protein"],
        header_lines=[f"{_dt.date.today()}, {common.machine_description()}, torch threads {args.threads}; "
                      "`python benchmarks/multimodal.py`. Defaults, seed 0, K = number of labelled classes."],
        footer_lines=["Spearman per protein (held-out 20%):", ""] + per_protein,
        floatfmts={"fit s": ".0f", "transform s": ".1f", "epochs": ".0f"},
    )
    print(text)


if __name__ == "__main__":
    main()
