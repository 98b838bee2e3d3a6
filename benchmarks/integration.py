"""Data integration: dgdcell's batch/condition covariate side by side with scVI and scanpy PCA.

Data sets

* CellBench (``dgdcell.datasets.cellbench()``: 1,021 cells, 5 cell lines in ``cell_type``, 5 batches
  in ``batch``), all cells.
* Kang 2018 PBMC, IFN-beta (``kang2018_pbmc_ifnb_ctrl_stim_rna.h5ad``; condition ctrl/stim in
  ``obs['batch']``), a subsample of ``--kang-cells`` cells (default 4,000), stratified by condition,
  seed 0. The file has no cell types: populations are Leiden clusters (resolution 0.5) of the scanpy
  standard PCA, each cluster named by the PBMC marker set with the highest mean log-normalised
  expression (CD14 Mono: CD14, LYZ, S100A8; CD16 Mono: FCGR3A, MS4A7; T: CD3D, CD3E, IL7R; CD8 T: CD8A;
  NK: NKG7, GNLY; B: MS4A1, CD79A; Mk: PPBP, PF4; see ``PBMC_MARKERS``; no DC set, its markers are
  not among the 3,000 genes). Clusters that get
  the same name are merged. These populations are the label for the conservation metrics.

Methods (one thread, seed 0)

* scanpy PCA (normalize_total 1e4, log1p, scale, 50 PCs), no correction: ``X_pca``;
* dgdcell ``DGD(covariate_keys=["batch"], seed=0)``, package defaults (``--dgd-epochs`` caps epochs
  if given): ``X_dgd``;
* dgdcell with per-cell Normal posteriors, ``DGD(covariate_keys=["batch"], posterior="normal", seed=0)``:
  ``X_dgd`` (posterior means). Its verdicts are listed beside the default's;
* scVI ``SCVI.setup_anndata(batch_key="batch")``, default model, ``max_epochs`` 100 (CellBench) /
  50 (Kang subsample): ``X_scVI``.

Metrics

* scib-metrics 0.5.10 individual functions on exact (sklearn) k-NN graphs, with the neighbour counts
  of ``scib_metrics.benchmark.Benchmarker`` (90 for iLISI, 50 for kBET, 15 for graph connectivity):
  mixing = ``ilisi_knn``, ``kbet_per_label``, ``graph_connectivity``; conservation =
  ``nmi_ari_cluster_labels_kmeans`` (NMI, ARI), ``silhouette_label`` (rescaled to [0, 1]).
* 30-NN mixing: for each cell the share of its 30 nearest neighbours (Euclidean, in the embedding)
  from another batch, divided by the share expected under perfect mixing (1 - its batch's share of
  the cells); mean over cells (1 = perfect).
* Kang counterfactual ratio: the 30 genes with the largest log2 fold change of mean normalised counts
  (normalize_total 1e4, no log), stim vs ctrl, among genes detected in at least 10% of the stimulated
  cells; stimulated cells decoded as control (``get_normalized_expression(adata,
  transform_batch="ctrl")``, fractions) divided, gene by gene, by the mean decoded level of the
  control cells (each model's own decoding); median over the 30 genes (1 = the condition's effect
  removed). The same ratio with the stimulated cells decoded as themselves is given for reference.
* Marker stability: per population, mean decoded profile of the stimulated cells decoded as
  themselves vs decoded as control over 50 marker genes (the 50 most variable genes, seurat flavour,
  that have |log2 fold change| < 1 stim vs ctrl); Pearson correlation of log(mean fraction); the
  minimum over populations (with at least 20 stimulated cells).
* Cell-type marker stability (the issue's "decoded expression of cell-type markers stays put"): the
  union of every population's 10 top markers (scanpy ``rank_genes_groups``, Wilcoxon, control cells
  only, population vs the rest); for each population the genes among them whose own stim vs ctrl
  log2 fold change within that population is below 1 in magnitude (the genes the stimulation does not
  move there), and the same Pearson correlation over those genes; the minimum over populations. The
  first marker set above is kept for comparison with earlier runs: its most variable genes are mostly
  not cell-type markers, and in CD14 monocytes several of them fall 5-24x with the stimulation (see
  ``docs/mixture.md``), so a counterfactual that removes the stimulation lowers it.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/integration.py [--datasets cellbench,kang] [--kang-cells 4000]

Each data set's rows are cached in ``<out>/integration_<name>.json`` (so the two sets can run as two
processes); the markdown ``<out>/integration.md`` and csv ``<out>/integration.csv`` are written from all
cached sets present.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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

import common  # noqa: E402
from common import DATA_DIR  # noqa: E402

SEED = 0
K_MIX = 30
KANG_FILE = "kang2018_pbmc_ifnb_ctrl_stim_rna.h5ad"
N_INDUCED = 30
N_MARKERS = 50
#: top markers per population (control cells) for the cell-type marker stability
N_TYPE_MARKERS = 10

PBMC_MARKERS = {
    "CD14 Mono": ["CD14", "LYZ", "S100A8", "S100A9"],
    "CD16 Mono": ["FCGR3A", "MS4A7"],
    "CD4 T": ["CD3D", "CD3E", "IL7R", "CCR7"],
    "CD8 T": ["CD8A", "CD8B"],
    "NK": ["NKG7", "GNLY", "GZMB"],
    "B": ["MS4A1", "CD79A", "CD79B"],
    "Mk": ["PPBP", "PF4"],
    # DC / pDC markers (CLEC10A, FCER1A, LILRA4, IL3RA) are not among the file's 3,000 genes; HLA-DQA1
    # alone would also claim the B cells, so no DC set.
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lognorm(adata):
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def pca_embedding(adata, n_pcs: int = 50) -> np.ndarray:
    import scanpy as sc

    b = lognorm(adata)
    sc.pp.scale(b, max_value=10)
    sc.pp.pca(b, n_comps=n_pcs, random_state=SEED)
    return np.asarray(b.obsm["X_pca"], dtype=np.float32)


def mixing_30nn(X, batches, k: int = K_MIX) -> float:
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    _, codes = np.unique(np.asarray(batches), return_inverse=True)
    other = (codes[idx] != codes[:, None]).mean(1)
    expected = 1.0 - np.bincount(codes)[codes] / codes.size
    return float(np.mean(other / expected))


def scib_scores(X, batches, labels) -> dict:
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float32)
    batches, labels = np.asarray(batches).astype(str), np.asarray(labels).astype(str)
    dist, idx = NearestNeighbors(n_neighbors=90).fit(X).kneighbors(X)  # self included, as in scib
    nn90 = NeighborsResults(indices=idx, distances=dist)
    out = {}
    out["iLISI"] = float(sm.ilisi_knn(nn90, batches))
    try:
        out["kBET"] = float(sm.kbet_per_label(nn90.subset_neighbors(50), batches, labels))
    except Exception as exc:  # noqa: BLE001
        log(f"kBET failed: {exc!r}")
        out["kBET"] = float("nan")
    out["graph conn."] = float(sm.graph_connectivity(nn90.subset_neighbors(15), labels))
    out["30-NN mixing"] = mixing_30nn(X, batches)
    na = sm.nmi_ari_cluster_labels_kmeans(X, labels)
    out["ARI"], out["NMI"] = float(na["ari"]), float(na["nmi"])
    out["silhouette label"] = float(sm.silhouette_label(X, labels))
    return out


def fit_dgd(adata, max_epochs, posterior: str = "map"):
    import dgdcell

    a = adata.copy()
    t0 = time.perf_counter()
    model = dgdcell.DGD(covariate_keys=["batch"], seed=SEED, posterior=posterior)
    model.fit(a, max_epochs=max_epochs)
    secs = time.perf_counter() - t0
    return model, a, secs, len(model.history["epoch"])


def fit_scvi(adata, max_epochs: int):
    import scvi

    a = adata.copy()
    scvi.settings.seed = SEED
    scvi.settings.num_threads = 1
    scvi.settings.dl_num_workers = 0
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a)
    model.train(max_epochs=max_epochs, enable_progress_bar=False, accelerator="cpu", devices=1)
    a.obsm["X_scVI"] = model.get_latent_representation()
    secs = time.perf_counter() - t0
    return model, a, secs, int(model.history["elbo_train"].shape[0])


# --------------------------------------------------------------------------- Kang


def kang_subsample(n_cells: int):
    import anndata as ad

    adata = ad.read_h5ad(DATA_DIR / KANG_FILE)
    rng = np.random.default_rng(SEED)
    conds = adata.obs["batch"].astype(str).to_numpy()
    levels = np.unique(conds)
    per = n_cells // len(levels)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(conds == c), per, replace=False) for c in levels]))
    a = adata[keep].copy()
    a.obs["batch"] = a.obs["batch"].astype(str).astype("category")
    import scipy.sparse as sp

    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def kang_populations(adata):
    import pandas as pd
    import scanpy as sc

    b = lognorm(adata)
    sc.pp.scale(b, max_value=10)
    sc.pp.pca(b, n_comps=30, random_state=SEED)
    sc.pp.neighbors(b, n_neighbors=15, random_state=SEED, transformer="sklearn")
    sc.tl.leiden(b, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=SEED)
    ln = lognorm(adata)
    names = [n for n in PBMC_MARKERS if any(g in ln.var_names for g in PBMC_MARKERS[n])]
    scores = np.column_stack([
        np.asarray(ln[:, [g for g in PBMC_MARKERS[n] if g in ln.var_names]].X.mean(axis=1)).ravel() for n in names
    ])
    df = pd.DataFrame(scores, columns=names)
    df["cluster"] = b.obs["leiden"].to_numpy()
    means = df.groupby("cluster", observed=True).mean()
    # CD8 T is a T cell with CD8 on top of CD3: name a T cluster CD8 when its CD8 score beats its CD4 T score / 2
    mapping = {}
    for cl, row in means.iterrows():
        best = row.idxmax()
        if best in ("CD4 T", "CD8 T") and "CD8 T" in row:
            best = "CD8 T" if row["CD8 T"] > 0.5 * row["CD4 T"] and row["CD8 T"] > 0.5 else "CD4 T"
        mapping[cl] = best
    labels = b.obs["leiden"].map(mapping).astype(str).to_numpy()
    return labels, mapping


def normalised_counts(X):
    """Counts scaled to 10,000 per cell (no log), CSR."""
    return X.multiply(1e4 / np.asarray(X.sum(1)).ravel()[:, None]).tocsr()


def induced_and_markers(adata):
    import scanpy as sc

    X = adata.X
    norm = normalised_counts(X)
    stim = adata.obs["batch"].astype(str).to_numpy() == "stim"
    m_s = np.asarray(norm[stim].mean(0)).ravel()
    m_c = np.asarray(norm[~stim].mean(0)).ravel()
    eps = 1e-2
    lfc = np.log2((m_s + eps) / (m_c + eps))
    det = np.asarray((X[stim] > 0).mean(0)).ravel()
    cand = np.flatnonzero(det >= 0.10)
    induced = cand[np.argsort(-lfc[cand])][:N_INDUCED]
    ln = lognorm(adata)
    sc.pp.highly_variable_genes(ln, n_top_genes=1000, flavor="seurat")
    disp = ln.var["dispersions_norm"].to_numpy()
    order = np.argsort(-np.nan_to_num(disp, nan=-np.inf))
    markers = [j for j in order if abs(lfc[j]) < 1.0][:N_MARKERS]
    return induced, np.array(markers), lfc


def type_markers(adata, pops: np.ndarray) -> dict[str, np.ndarray]:
    """Population -> indices of the cell-type markers that the stimulation leaves alone in it (see the
    module docstring): the union of the populations' top Wilcoxon markers on control cells, minus the
    genes whose within-population stim vs ctrl |log2 fold change| is at least 1."""
    import pandas as pd
    import scanpy as sc

    stim = adata.obs["batch"].astype(str).to_numpy() == "stim"
    ln = lognorm(adata[~stim])
    ln.obs["population"] = pd.Categorical(np.asarray(pops[~stim]).astype(str))
    sc.tl.rank_genes_groups(ln, "population", method="wilcoxon", n_genes=N_TYPE_MARKERS)
    names = ln.uns["rank_genes_groups"]["names"]
    pos = {g: j for j, g in enumerate(adata.var_names)}
    union = sorted({pos[g] for grp in names.dtype.names for g in names[grp]})
    norm = normalised_counts(adata.X)
    out = {}
    for p in np.unique(pops):
        s_, c_ = stim & (pops == p), ~stim & (pops == p)
        if s_.sum() < 20 or c_.sum() < 20:
            continue
        lfc = np.log2((np.asarray(norm[s_].mean(0)).ravel() + 1e-2) / (np.asarray(norm[c_].mean(0)).ravel() + 1e-2))
        out[str(p)] = np.array([j for j in union if abs(lfc[j]) < 1.0])
    return out


def counterfactual_stats(expr_self: np.ndarray, expr_ctrl: np.ndarray, stim: np.ndarray, pops: np.ndarray,
                         induced: np.ndarray, markers: np.ndarray, typed: dict | None = None) -> dict:
    ctrl_level = expr_self[~stim][:, induced].mean(0)
    ratio_cf = expr_ctrl[stim][:, induced].mean(0) / ctrl_level
    ratio_obs = expr_self[stim][:, induced].mean(0) / ctrl_level
    cors = {}
    for p in np.unique(pops):
        sel = stim & (pops == p)
        if sel.sum() < 20:
            continue
        a = np.log(expr_self[sel][:, markers].mean(0) + 1e-12)
        b = np.log(expr_ctrl[sel][:, markers].mean(0) + 1e-12)
        cors[str(p)] = float(np.corrcoef(a, b)[0, 1])
    typed_cors = {}
    for p, genes in (typed or {}).items():
        sel = stim & (pops == p)
        a = np.log(expr_self[sel][:, genes].mean(0) + 1e-12)
        b = np.log(expr_ctrl[sel][:, genes].mean(0) + 1e-12)
        typed_cors[p] = float(np.corrcoef(a, b)[0, 1])
    out = {"CF ratio (median, 30 genes)": float(np.median(ratio_cf)),
           "decoded stim/ctrl ratio (no CF)": float(np.median(ratio_obs)),
           "marker corr. (min over pops)": float(min(cors.values())),
           "marker corr. per population": cors}
    if typed_cors:
        out["type-marker corr. (min over pops)"] = float(min(typed_cors.values()))
        out["type-marker corr. per population"] = typed_cors
        out["type-marker genes per population"] = {p: int(len(g)) for p, g in typed.items()}
    return out


# --------------------------------------------------------------------------- runs


def load_set(name: str, args):
    """``(adata, labels, scVI epochs, note)`` of a data set: CellBench (labels: the cell lines) or the
    Kang subsample (labels: marker-named Leiden populations, also in ``obs['population']``)."""
    import dgdcell

    if name == "cellbench":
        adata = dgdcell.datasets.cellbench()
        import scipy.sparse as sp

        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        return adata, labels, 100, f"CellBench, all {adata.n_obs} cells x {adata.n_vars} genes, 5 batches, label cell_type"
    adata = kang_subsample(args.kang_cells)
    labels, _ = kang_populations(adata)
    adata.obs["population"] = labels
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    note = (f"Kang, {adata.n_obs} cells (stratified by condition, seed 0) x {adata.n_vars} genes, condition in "
            f"obs['batch']; populations (Leiden 0.5 on PCA, named by markers): "
            + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return adata, labels, 50, note


DGD_METHOD = "dgdcell DGD(covariate_keys=['batch'])"
#: posterior -> the method name of its row (the first word is the row's key in the verdicts)
DGD_METHODS = {"map": DGD_METHOD, "normal": "dgdcell-normal DGD(covariate_keys=['batch'], posterior='normal')"}


def dgd_row(name: str, adata, labels, batches, args, posterior: str = "map"):
    """``(row, model, fitted copy)``: dgdcell fitted and scored on the set."""
    model, a_dgd, secs, ep = fit_dgd(adata, args.dgd_epochs, posterior)
    s = scib_scores(a_dgd.obsm["X_dgd"], batches, labels)
    log(f"DGD {posterior} ({secs:.0f} s, {ep} epochs): {s}")
    return {"data set": name, "method": DGD_METHODS[posterior], **s, "fit s": secs, "epochs": ep}, model, a_dgd


def kang_genes(adata, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Kang's gene sets, computed once per run: (induced, markers, their log2 fold changes, typed markers)."""
    induced, markers, lfc = induced_and_markers(adata)
    return induced, markers, lfc, type_markers(adata, labels)


def dgd_rows(name: str, adata, labels, batches, args, kang=None) -> list[dict]:
    """The dgdcell rows of a set (one per posterior), with Kang's counterfactual statistics
    (``kang``: :func:`kang_genes`, computed here when not given)."""
    rows = []
    if name == "kang" and kang is None:
        kang = kang_genes(adata, labels)
    for posterior in DGD_METHODS:
        row, model, a_dgd = dgd_row(name, adata, labels, batches, args, posterior)
        if kang is not None:
            induced, markers, _, typed = kang
            row.update(dgd_counterfactual(model, a_dgd, adata, batches == "stim", labels, induced, markers, typed))
            row["induced genes"] = ", ".join(adata.var_names[induced])
            row["marker genes"] = ", ".join(adata.var_names[markers])
            log(f"{row['method']}: CF {row['CF ratio (median, 30 genes)']:.3f}, "
                f"markers {row['marker corr. per population']}")
        rows.append(row)
    return rows


def dgd_counterfactual(model, a_dgd, adata, stim, labels, induced, markers, typed=None) -> dict:
    """The counterfactual statistics of dgdcell's decoding (own class vs ``transform_batch='ctrl'``)."""
    e_self = model.get_normalized_expression(a_dgd).loc[adata.obs_names].to_numpy()
    e_ctrl = model.get_normalized_expression(a_dgd, transform_batch="ctrl").loc[adata.obs_names].to_numpy()
    feat = list(model.features["rna"])
    pos = np.array([feat.index(g) for g in adata.var_names])
    return counterfactual_stats(e_self[:, pos], e_ctrl[:, pos], stim, labels, induced, markers, typed)


def run_set(name: str, args) -> list[dict]:
    t_all = time.perf_counter()
    adata, labels, scvi_epochs, note = load_set(name, args)
    batches = adata.obs["batch"].astype(str).to_numpy()
    log(note)
    rows = []

    t0 = time.perf_counter()
    X_pca = pca_embedding(adata)
    s = scib_scores(X_pca, batches, labels)
    rows.append({"data set": name, "method": "scanpy PCA (no correction)", **s,
                 "fit s": time.perf_counter() - t0, "epochs": None})
    log(f"PCA: {s}")

    kang = kang_genes(adata, labels) if name == "kang" else None
    rows_dgd = dgd_rows(name, adata, labels, batches, args, kang)

    smodel, a_scvi, ssecs, sep = fit_scvi(adata, scvi_epochs)
    s = scib_scores(a_scvi.obsm["X_scVI"], batches, labels)
    row_scvi = {"data set": name, "method": f"scVI batch_key='batch' (max_epochs {scvi_epochs})", **s,
                "fit s": ssecs, "epochs": sep}
    log(f"scVI ({ssecs:.0f} s, {sep} epochs): {s}")

    row_scvi_default = None
    if name == "cellbench" and args.scvi_default_cellbench:
        _, a2, s2, e2 = fit_scvi(adata, None)
        s = scib_scores(a2.obsm["X_scVI"], batches, labels)
        row_scvi_default = {"data set": name, "method": "scVI-default batch_key='batch' (scvi's default epoch cap)",
                            **s, "fit s": s2, "epochs": e2}
        log(f"scVI default ({s2:.0f} s, {e2} epochs): {s}")

    if kang is not None:
        induced, markers, lfc, typed = kang
        stim = batches == "stim"
        genes = adata.var_names[induced].tolist()
        log(f"induced genes: {genes}")
        se = smodel.get_normalized_expression(a_scvi, library_size=1.0).to_numpy()
        sc_ = smodel.get_normalized_expression(a_scvi, library_size=1.0, transform_batch="ctrl").to_numpy()
        row_scvi.update(counterfactual_stats(se, sc_, stim, labels, induced, markers, typed))
        log(f"{row_scvi['method']}: CF {row_scvi['CF ratio (median, 30 genes)']:.3f}, "
            f"obs {row_scvi['decoded stim/ctrl ratio (no CF)']:.3f}, markers {row_scvi['marker corr. per population']}")
        row_scvi["induced genes"] = ", ".join(genes)
        row_scvi["marker genes"] = ", ".join(adata.var_names[markers])
        rows[0]["induced genes"] = ", ".join(f"{g} ({lfc[j]:.1f})" for g, j in zip(genes, induced))
    rows += rows_dgd + [row_scvi] + ([row_scvi_default] if row_scvi_default else [])
    for r in rows:
        r["note"] = note
        r["set s"] = time.perf_counter() - t_all
    return rows


def run_dgd_only(name: str, args, cached: list[dict]) -> list[dict]:
    """``run_set`` for dgdcell alone: the dgdcell rows refitted and scored as in :func:`run_set`, the
    other methods' rows taken from ``cached`` (an earlier run's rows of the same set and settings)."""
    t_all = time.perf_counter()
    adata, labels, _, note = load_set(name, args)
    batches = adata.obs["batch"].astype(str).to_numpy()
    rows = dgd_rows(name, adata, labels, batches, args)
    for row in rows:
        row["note"], row["set s"] = note, time.perf_counter() - t_all
    others = [r for r in cached if r["method"] not in DGD_METHODS.values()]
    pca = [r for r in others if r["method"].startswith("scanpy")]
    return pca + rows + [r for r in others if r not in pca]


MIX = ["iLISI", "kBET", "graph conn.", "30-NN mixing"]
BIO = ["ARI", "NMI", "silhouette label"]
CF = ["CF ratio (median, 30 genes)", "decoded stim/ctrl ratio (no CF)", "marker corr. (min over pops)",
      "type-marker corr. (min over pops)"]


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["data set"], {})[r["method"].split()[0]] = r
    mix_ok_all, bio_ok_all = [], []
    for ds0, m in by.items():
        for key in ("dgdcell", "dgdcell-normal"):
            if key not in m or "scVI" not in m:
                continue
            d, s = m[key], m["scVI"]
            ds = ds0 if key == "dgdcell" else f"{ds0}, posterior='normal'"
            mix = {k: d[k] >= s[k] for k in MIX if not (np.isnan(d[k]) or np.isnan(s[k]))}
            bio = {k: d[k] >= s[k] for k in BIO}
            mix_ok_all.append(all(mix.values()))
            bio_ok_all.append(all(bio.values()))
            out.append(f"- {ds}: mixing >= scVI on " + ", ".join(f"{k} {'yes' if v else 'no'} ({d[k]:.3f} vs {s[k]:.3f})"
                                                               for k, v in mix.items())
                       + f" -> **{'met' if all(mix.values()) else 'not met'}**")
            out.append(f"- {ds}: conservation >= scVI on " + ", ".join(f"{k} {'yes' if v else 'no'} ({d[k]:.3f} vs {s[k]:.3f})"
                                                                     for k, v in bio.items())
                       + f" -> **{'met' if all(bio.values()) else 'not met'}**")
            if "scVI-default" in m:
                s2 = m["scVI-default"]
                out.append(f"- {ds} (reference, not the target): vs scVI with its default epoch cap ({s2['epochs']} epochs): "
                           + ", ".join(f"{k} {d[k]:.3f} vs {s2[k]:.3f}" for k in MIX + BIO))
            if ds0 == "kang" and CF[0] in d:
                cf, scf = d[CF[0]], s[CF[0]]
                ok = cf <= 1.5 and cf <= 0.5 * scf
                out.append(f"- {ds}: counterfactual ratio {cf:.3f} (scVI {scf:.3f}); target <= 1.5 and <= half of scVI's "
                           f"({0.5 * scf:.3f}) -> **{'met' if ok else 'not met'}**"
                           + ("" if cf <= 1.5 else "") )
                mc = d[CF[2]]
                out.append(f"- {ds}: marker stability min correlation {mc:.3f} (scVI {s[CF[2]]:.3f}); target >= 0.9 -> "
                           f"**{'met' if mc >= 0.9 else 'not met'}** (the 50 most variable genes with |log2 FC| < 1)")
                if CF[3] in d and CF[3] in s:
                    tc = d[CF[3]]
                    out.append(f"- {ds}: cell-type marker stability min correlation {tc:.3f} (scVI {s[CF[3]]:.3f}); "
                               f"target >= 0.9 -> **{'met' if tc >= 0.9 else 'not met'}** (each population's markers "
                               "that the stimulation leaves alone there)")
    return out


def write_report(out: Path, header: list[str]) -> str:
    rows = []
    for name in ("cellbench", "kang"):
        p = out / f"integration_{name}.json"
        if p.exists():
            rows += json.loads(p.read_text())
    cols = ["data set", "method"] + MIX + BIO + ["fit s", "epochs"]
    extra = [c for c in CF]
    footer = ["## Target verdicts", ""] + verdicts(rows) + [""]
    for name in ("cellbench", "kang"):
        rs = [r for r in rows if r["data set"] == name]
        if not rs:
            footer.append(f"- {name}: not run")
            continue
        footer += [f"## {name}", "", f"- {rs[0]['note']}; whole set {rs[0]['set s']:.0f} s", ""]
        cc = ["method"] + MIX + BIO + (CF if name == "kang" else []) + ["fit s", "epochs"]
        footer.append(common.markdown_table(rs, columns=cc, floatfmts={"fit s": ".0f", "epochs": ".0f"}))
        footer.append("")
        if name == "kang":
            for r in rs:
                if "marker corr. per population" in r:
                    footer.append(f"- {r['method']}: marker correlation per population: "
                                  + ", ".join(f"{k} {v:.3f}" for k, v in r["marker corr. per population"].items()))
                if "type-marker corr. per population" in r:
                    n_g = r.get("type-marker genes per population", {})
                    footer.append(f"- {r['method']}: cell-type marker correlation per population (genes): "
                                  + ", ".join(f"{k} {v:.3f} ({n_g.get(k, '?')})"
                                              for k, v in r["type-marker corr. per population"].items()))
            footer.append(f"- 30 induced genes (log2 FC): {rs[0].get('induced genes', '')}")
            footer.append(f"- 50 marker genes: {rs[1].get('marker genes', '')}" if len(rs) > 1 else "")
    csv_cols = cols + extra + ["note"]
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
    return common.write_table(flat, out / "integration.md", out / "integration.csv",
                              "Data integration: dgdcell covariate vs scVI vs scanpy PCA",
                              columns=cols, csv_columns=csv_cols, header_lines=header, footer_lines=footer,
                              floatfmts={"fit s": ".0f", "epochs": ".0f"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="cellbench,kang")
    parser.add_argument("--kang-cells", type=int, default=4000)
    parser.add_argument("--dgd-epochs", type=int, default=None, help="epoch cap for dgdcell (default: package's)")
    parser.add_argument("--scvi-default-cellbench", action="store_true",
                        help="also fit scVI on CellBench with scvi-tools' default epoch cap (a reference row)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="refit dgdcell only; the scanpy PCA and scVI rows come from the cached "
                             "integration_<set>.json of an earlier run")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import dgdcell

    log(f"dgdcell from {dgdcell.__file__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    if not args.report_only:
        for name in [s.strip() for s in args.datasets.split(",") if s.strip()]:
            cached = out / f"integration_{name}.json"
            if args.reuse_peers and cached.is_file():
                rows = run_dgd_only(name, args, json.loads(cached.read_text()))
            else:
                rows = run_set(name, args)
            (out / f"integration_{name}.json").write_text(json.dumps(rows, indent=1, default=float))
    header = [f"- machine: {common.machine_description()}",
              f"- command: `PYTHONPATH=. OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python "
              f"benchmarks/integration.py` (one torch thread; both sets in one process), {_dt.date.today()}. "
              f"This file was written by `... integration.py {' '.join(sys.argv[1:])}`; the recorded numbers come "
              f"from the two sets run as two concurrent one-thread processes (`--datasets cellbench "
              f"--scvi-default-cellbench` and `--datasets kang`), then `--report-only`.",
              common.load_average_line(load0),
              "- methods, metrics and definitions: see the docstring of `benchmarks/integration.py`. scib-metrics "
              "individual functions (not `Benchmarker`) on exact sklearn k-NN graphs (90 / 50 / 15 neighbours for "
              "iLISI / kBET / graph connectivity, as Benchmarker uses); silhouette rescaled to [0, 1]; KMeans "
              "NMI/ARI. dgdcell: package defaults (`DGD(covariate_keys=['batch'], seed=0)`, default epoch cap, "
              "early stopping). scVI: default model, max_epochs 100 (CellBench) / 50 (Kang)."]
    print(write_report(out, header))


if __name__ == "__main__":
    main()
