"""Differential expression from the decoder against scanpy's Wilcoxon test.

Four parts, every DGD fitted with package defaults (seed 0):

(a) **Generated counts with known DE genes.** Two groups of cells, NB counts with
    per-cell library sizes, a continuous within-group cell state acting on other
    genes, and 10% DE genes with |log2 fold change| 0.5, 1 or 2 (up and down) at
    every expression level (the down genes' baselines are scaled so that the
    total is unchanged: the other genes' fractions do not shift). Scenarios differ
    in sequencing depth. Ranking of the genes for group g1 vs g0:
    ``differential_expression(groupby="group", group1="g1", group2="g0")`` in its
    order (the features flagged ``is_de_fdr_0.05`` first, each part by ``|lfc_shrunk|``) against
    ``sc.tl.rank_genes_groups(method="wilcoxon", reference="g0")`` by ``|score|``
    (normalize_total 1e4 + log1p). Metric: average precision (AUPRC) of the true
    DE genes, overall, per effect size (DE genes of that size against all non-DE
    genes) and per expression tercile (genes of that tercile only).
(n) **Part (a) with per-cell posteriors**: the same scenarios fitted with
    ``DGD(posterior="normal")``; ``differential_expression`` decodes posterior draws
    by default, and ``sampler="map"`` the posterior means (the statistics over cells).
(b) **CellBench** (``dgdcell.datasets.cellbench()``, 5 cell lines, ``covariate_keys=["batch"]``):
    markers of each cell line against the rest. dgdcell: the first 50 features
    with ``lfc_mean > 0`` of ``differential_expression(groupby="cell_type")``;
    scanpy: the first 50 of ``rank_genes_groups(groupby="cell_type", method="wilcoxon")``.
    Metric: overlap / 50 per cell line and its mean.
(c) **Kang 2018 PBMC, IFN-beta stimulated vs control** (``kang2018_pbmc_ifnb_ctrl_stim_rna.h5ad``,
    condition in ``obs['batch']``, ``covariate_keys=["batch"]``). The file has no
    cell-type labels; CD14 monocytes are the Leiden clusters (scanpy standard:
    normalize_total 1e4, log1p, PCA 30, 15-NN, Leiden resolution 0.5, seed 0) whose mean
    log expression of S100A8, S100A9, FCN1, CD14 exceeds 1 and exceeds that of
    FCGR3A, MS4A7 (CD16 monocytes and dendritic cells fail this). Group mode:
    stimulated vs control CD14 monocytes; counterfactual mode: all CD14
    monocytes decoded as ``stim`` and as ``ctrl``
    (``covariate="batch", groupby="cell_type", restrict_to="CD14 Mono"``); scanpy:
    Wilcoxon stimulated vs control CD14 monocytes. Metric: how many of the top 20
    (two-sided, and up-regulated only) are known interferon-stimulated genes
    (ISG reference: MSigDB Hallmark IFN-alpha and IFN-gamma response, plus IFI6 and
    older symbols DDX58, WARS, MARCH1, FAM46A); the top 20 are listed.

Usage (from the repository root)::

    python benchmarks/differential.py [--threads 1] [--kang-cells N] [--out benchmarks/results]

Writes ``<out>/differential.md`` and ``<out>/differential.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
    sys.path.insert(1, str(REPO))  # use the checkout's dgdcell even if it is not installed

import common  # noqa: E402

SEED = 0
#: torch threads for every fit (set by ``--threads``). scanpy's Wilcoxon test resets torch's thread count to the
#: machine's (measured: 1 -> 2 after ``rank_genes_groups``), so each fit sets it again
THREADS = 1


def fit_dgd(dgdcell, adata, **kw):
    import torch

    torch.set_num_threads(THREADS)
    return dgdcell.DGD(seed=SEED, **kw).fit(adata, verbose=False)
KANG_FILE = "kang2018_pbmc_ifnb_ctrl_stim_rna.h5ad"

#: generated-data scenarios: (name, library size, seed)
SCENARIOS = [
    ("shallow (library 800)", 800, 1),
    ("shallow (library 800)", 800, 2),
    ("medium (library 2000)", 2000, 3),
    ("medium (library 2000)", 2000, 4),
    ("deep (library 5000)", 5000, 5),
    ("deep (library 5000)", 5000, 6),
]
EFFECTS = (0.5, 1.0, 2.0)

# MSigDB Hallmark gene sets (Liberzon et al. 2015), current symbols.
HALLMARK_IFN_ALPHA = """ADAR B2M BATF2 BST2 C1S CASP1 CASP8 CCRL2 CD47 CD74 CMPK2 CMTR1 CNP CSF1 CXCL10 CXCL11
DDX60 DHX58 EIF2AK2 ELF1 EPSTI1 GBP2 GBP4 GMPR HELZ2 HERC6 HLA-C IFI27 IFI30 IFI35 IFI44 IFI44L IFIH1 IFIT2 IFIT3
IFITM1 IFITM2 IFITM3 IL15 IL4R IL7 IRF1 IRF2 IRF7 IRF9 ISG15 ISG20 LAMP3 LAP3 LGALS3BP LPAR6 LY6E MOV10 MVB12A MX1
NCOA7 NMI NUB1 OAS1 OASL OGFR PARP12 PARP14 PARP9 PLSCR1 PNPT1 PROCR PSMA3 PSMB8 PSMB9 PSME1 PSME2 RIPK2 RNF31
RSAD2 RTP4 SAMD9 SAMD9L SELL SLC25A28 SP110 STAT1 STAT2 TAP1 TDRD7 TENT5A TMEM140 TRAFD1 TRIM14 TRIM21 TRIM25
TRIM26 TRIM5 TXNIP UBA7 UBE2L6 USP18 WARS1""".split()
HALLMARK_IFN_GAMMA = """ADAR APOL6 ARID5B ARL4A AUTS2 B2M BANK1 BATF2 BPGM BST2 BTG1 C1R C1S CASP1 CASP3 CASP4
CASP7 CASP8 CCL2 CCL5 CCL7 CD274 CD38 CD40 CD69 CD74 CD86 CDKN1A CFB CFH CIITA CMKLR1 CMPK2 CSF2RB CXCL10 CXCL11
CXCL9 RIGI DDX60 DHX58 EIF2AK2 EIF4E3 EPSTI1 FAS FCGR1A FGL2 FPR1 CMTR1 GBP4 GBP6 GCH1 GPR18 GZMA HERC6 HIF1A
HLA-A HLA-B HLA-DMA HLA-DQA1 HLA-DRB1 HLA-G ICAM1 IDO1 IFI27 IFI30 IFI35 IFI44 IFI44L IFIH1 IFIT1 IFIT2 IFIT3
IFITM2 IFITM3 IFNAR2 IL10RA IL15 IL15RA IL18BP IL2RB IL4R IL6 IL7 IRF1 IRF2 IRF4 IRF5 IRF7 IRF8 IRF9 ISG15
ISG20 ISOC1 ITGB7 JAK2 KLRK1 LAP3 LATS2 LCP2 LGALS3BP LY6E LYSMD2 MARCHF1 METTL7B MT2A MTHFD2 MVP MX1 MX2
MYD88 NAMPT NCOA3 NFKB1 NFKBIA NLRC5 NMI NOD1 NUP93 OAS2 OAS3 OASL OGFR P2RY14 PARP12 PARP14 PDE4B PELI1 PFKP
PIM1 PLA2G4A PLSCR1 PML PNP PNPT1 HELZ2 PSMA2 PSMA3 PSMB10 PSMB2 PSMB8 PSMB9 PSME1 PSME2 PTGS2 PTPN1 PTPN2
PTPN6 RAPGEF6 RBCK1 RIPK1 RIPK2 RNF213 RNF31 RSAD2 RTP4 SAMD9L SAMHD1 SECTM1 SELP SERPING1 SLAMF7 SLC25A28
SOCS1 SOCS3 SOD2 SP110 SPPL2A SRI SSPN ST3GAL5 ST8SIA4 STAT1 STAT2 STAT3 STAT4 TAP1 TAPBP TDRD7 TNFAIP2 TNFAIP3
TNFAIP6 TNFSF10 TOR1B TRAFD1 TRIM14 TRIM21 TRIM25 TRIM26 TXNIP UBE2L6 UPP1 USP18 VAMP5 VAMP8 VCAM1 WARS1 XAF1
XCL1 ZBP1 ZNFX1""".split()
ISG_EXTRA = ["IFI6", "IFIT1", "OAS1", "ISG15", "ISG20", "MX1", "IFIT3", "DDX58", "WARS", "MARCH1", "FAM46A"]
KNOWN_ISGS = frozenset(HALLMARK_IFN_ALPHA) | frozenset(HALLMARK_IFN_GAMMA) | frozenset(ISG_EXTRA)

MONO_MARKERS = ["S100A8", "S100A9", "FCN1", "CD14"]
CD16_MARKERS = ["FCGR3A", "MS4A7"]

COLUMNS = ["part", "data", "setting", "pseudocount", "dgdcell", "scanpy wilcoxon", "difference", "detail"]
DEFAULT_PC = "default"
#: the pseudocount settings compared besides the default: label -> (kind, value)
ALTERNATIVES = {"scvi": ("scvi", None), "quantile": ("quantile", None), "1 count": ("counts", 1.0)}


def pseudocount_value(kind, value, adata, rows=None):
    """The ``pseudocount=`` argument for a setting: 'scvi', 'quantile', or ``value`` counts at the median library size."""
    if kind in ("scvi", "quantile"):
        return kind
    totals = np.asarray(adata.X[rows].sum(axis=1) if rows is not None else adata.X.sum(axis=1)).ravel()
    return float(value) / float(np.median(totals))


# --------------------------------------------------------------------------- data
def make_de_counts(n_per_group=(300, 300), n_genes=1000, de_share=0.1, effects=EFFECTS, library=2000,
                   dispersion=5.0, state_share=0.2, seed=0):
    """Two groups of NB counts with known DE genes; the truth in ``var`` (``de``, ``true_lfc``, ``base_mean``).

    Baseline log fractions ~ N(0, 1.5^2) over genes (mean counts per cell from ~0.01 to ~100 at
    library 2000); per-cell library sizes lognormal (sd 0.4); a standard-normal cell state multiplies
    ``state_share`` of the non-DE genes by ``exp(state * N(0, 1) loading)`` in both groups (within-group
    heterogeneity); group g1 multiplies the DE genes by ``2 ** true_lfc``. The down genes' baselines are
    scaled so that the group effect leaves the total unchanged (no compositional shift of other genes).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(n_per_group)), n_per_group)
    n = groups.size
    base = np.exp(rng.normal(0.0, 1.5, size=n_genes))
    n_de = int(round(de_share * n_genes))
    genes = rng.permutation(n_genes)
    de, others = genes[:n_de], genes[n_de:]
    true_lfc = np.zeros(n_genes)
    true_lfc[de] = rng.choice(effects, n_de) * rng.choice([-1.0, 1.0], n_de)
    up, down = true_lfc > 0, true_lfc < 0
    base[down] *= (base[up] * (2.0 ** true_lfc[up] - 1)).sum() / (base[down] * (1 - 2.0 ** true_lfc[down])).sum()
    state_genes = rng.choice(others, int(state_share * n_genes), replace=False)
    load = np.zeros(n_genes)
    load[state_genes] = rng.normal(0.0, 1.0, state_genes.size)
    state = rng.normal(0.0, 1.0, n)
    logp = np.log(base)[None, :] + state[:, None] * load[None, :] + np.log(2.0) * true_lfc[None, :] * (groups == 1)[:, None]
    frac = np.exp(logp - logp.max(axis=1, keepdims=True))
    frac /= frac.sum(axis=1, keepdims=True)
    lib = rng.lognormal(np.log(library), 0.4, size=n)
    mu = frac * lib[:, None]
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    keep = counts.sum(axis=1) > 0
    obs = pd.DataFrame({"group": pd.Categorical([f"g{g}" for g in groups])}, index=[f"cell{i}" for i in range(n)])
    base_frac = base / base.sum()
    var = pd.DataFrame({"de": true_lfc != 0, "true_lfc": true_lfc, "base_mean": base_frac * library},
                       index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts[keep]), obs=obs[keep], var=var)


def lognorm(adata):
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def average_precision(truth, score) -> float:
    from sklearn.metrics import average_precision_score

    truth = np.asarray(truth, dtype=bool)
    return float(average_precision_score(truth, score)) if truth.any() else float("nan")


def wilcoxon_g1_scores(adata) -> np.ndarray:
    """|score| of scanpy's Wilcoxon test, g1 against g0 on log-normalised counts, in ``adata.var`` order."""
    import scanpy as sc

    b = lognorm(adata)
    sc.tl.rank_genes_groups(b, "group", groups=["g1"], reference="g0", method="wilcoxon")
    scores = sc.get.rank_genes_groups_df(b, "g1").set_index("names")["scores"].abs()
    return scores.reindex(adata.var.index).to_numpy()


def frame_score(de) -> "pd.Series":
    """A score per feature that reproduces the DE frame's order (first = highest)."""
    import pandas as pd

    return pd.Series(-np.arange(len(de), dtype=float), index=de.index)


# --------------------------------------------------------------------------- parts
def part_generated(dgdcell, rows: list, details: list, sensitivity: list) -> None:
    for name, library, seed in SCENARIOS:
        adata = make_de_counts(library=library, seed=seed)
        t0 = time.perf_counter()
        model = fit_dgd(dgdcell, adata)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        de = dgdcell.differential.differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
        de_s = time.perf_counter() - t0
        var = adata.var
        ours = frame_score(de).reindex(var.index).to_numpy()
        theirs = wilcoxon_g1_scores(adata)
        truth = var["de"].to_numpy()
        tercile = np.digitize(var["base_mean"], np.quantile(var["base_mean"], [1 / 3, 2 / 3]))
        strata = [("all genes", np.ones(len(var), dtype=bool))]
        strata += [(f"|LFC| = {e:g} vs non-DE", (np.abs(var["true_lfc"]) == e) | ~truth) for e in EFFECTS]
        strata += [(f"expression tercile {k + 1} ({lo:.2g}-{hi:.2g} counts/cell)", tercile == k)
                   for k, (lo, hi) in enumerate(zip([var["base_mean"].min(), *np.quantile(var["base_mean"], [1 / 3, 2 / 3])],
                                                     [*np.quantile(var["base_mean"], [1 / 3, 2 / 3]), var["base_mean"].max()]))]
        for label, sel in strata:
            a_ours, a_theirs = average_precision(truth[sel], ours[sel]), average_precision(truth[sel], theirs[sel])
            rows.append(dict(part="a", data=f"generated, {name}, seed {seed}", setting=f"AUPRC, {label}",
                             pseudocount=DEFAULT_PC, dgdcell=a_ours,
                             **{"scanpy wilcoxon": a_theirs, "difference": a_ours - a_theirs},
                             detail=f"{int(truth[sel].sum())} DE of {int(sel.sum())} genes" if label == "all genes" else ""))
        for alt, (kind, value) in ALTERNATIVES.items():
            other = dgdcell.differential.differential_expression(
                model, adata, groupby="group", group1="g1", group2="g0",
                pseudocount=pseudocount_value(kind, value, adata))
            a_alt = average_precision(truth, frame_score(other).reindex(var.index).to_numpy())
            sensitivity.append(dict(part="a", data=f"generated, {name}, seed {seed}", setting="AUPRC, all genes",
                                    pseudocount=alt, dgdcell=a_alt,
                                    **{"scanpy wilcoxon": average_precision(truth, theirs),
                                       "difference": a_alt - average_precision(truth, theirs)},
                                    detail=f"pseudocount {other['pseudocounts'].iloc[0]:.2e}"))
        details.append(f"- generated {name}, seed {seed}: {adata.n_obs} cells x {adata.n_vars} genes, "
                       f"{int(truth.sum())} DE; fit {fit_s:.0f} s ({len(model.history['epoch'])} epochs), "
                       f"differential_expression {de_s:.1f} s; pseudocount {de['pseudocounts'].iloc[0]:.2e}")
        print(rows[-len(strata)], flush=True)


def part_generated_normal(dgdcell, rows: list, details: list) -> None:
    """Part (a) with ``DGD(posterior="normal")``: ``differential_expression``'s default decodes posterior draws
    (scVI's Monte Carlo estimates); ``sampler="map"`` decodes the same model's posterior means (over cells)."""
    for name, library, seed in SCENARIOS:
        adata = make_de_counts(library=library, seed=seed)
        t0 = time.perf_counter()
        model = fit_dgd(dgdcell, adata, posterior="normal")
        fit_s = time.perf_counter() - t0
        wil = average_precision(adata.var["de"].to_numpy(), wilcoxon_g1_scores(adata))
        truth = adata.var["de"].to_numpy()
        for label, sampler in (("posterior draws (default)", None), ("posterior means (sampler='map')", "map")):
            t0 = time.perf_counter()
            de = dgdcell.differential.differential_expression(model, adata, groupby="group", group1="g1",
                                                              group2="g0", sampler=sampler)
            de_s = time.perf_counter() - t0
            ours = average_precision(truth, frame_score(de).reindex(adata.var.index).to_numpy())
            rows.append(dict(part="a (normal)", data=f"generated, {name}, seed {seed}",
                             setting=f"AUPRC, all genes, posterior='normal', {label}", pseudocount=DEFAULT_PC,
                             dgdcell=ours, **{"scanpy wilcoxon": wil, "difference": ours - wil},
                             detail=f"{de.attrs['dgdcell_de']['posterior']}; {de_s:.1f} s"))
        details.append(f"- generated {name}, seed {seed}, posterior='normal': fit {fit_s:.0f} s "
                       f"({len(model.history['epoch'])} epochs)")
        print(rows[-2:], flush=True)


def part_cellbench(dgdcell, rows: list, details: list, sensitivity: list) -> None:
    import scanpy as sc

    adata = dgdcell.datasets.cellbench()
    t0 = time.perf_counter()
    model = fit_dgd(dgdcell, adata, covariate_keys=["batch"])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    de = dgdcell.differential.differential_expression(model, adata, groupby="cell_type")
    de_s = time.perf_counter() - t0
    b = lognorm(adata)
    sc.tl.rank_genes_groups(b, "cell_type", method="wilcoxon")
    reference = {g: list(sc.get.rank_genes_groups_df(b, g)["names"][:50]) for g in adata.obs["cell_type"].cat.categories}

    def overlaps(frame):
        out = {}
        for g, theirs in reference.items():
            part = frame[(frame["group1"] == g) & (frame["lfc_mean"] > 0)]
            out[g] = (len(set(part.index[:50]) & set(theirs)) / 50, int(part["proba_de"].ge(0.999).sum()))
        return out

    for g, (ov, n_sat) in overlaps(de).items():
        rows.append(dict(part="b", data="CellBench", setting=f"top-50 marker overlap, {g} vs rest",
                         pseudocount=DEFAULT_PC, dgdcell=ov,
                         detail=f"{int((adata.obs['cell_type'] == g).sum())} cells; {n_sat} up features with "
                                "proba_de >= 0.999"))
    rows.append(dict(part="b", data="CellBench", setting="top-50 marker overlap, mean over cell lines",
                     pseudocount=DEFAULT_PC, dgdcell=float(np.mean([v for v, _ in overlaps(de).values()])),
                     detail=f"target >= 0.5; pseudocounts {de['pseudocounts'].min():.2e}-{de['pseudocounts'].max():.2e}"))
    for alt, (kind, value) in ALTERNATIVES.items():
        other = dgdcell.differential.differential_expression(model, adata, groupby="cell_type",
                                                             pseudocount=pseudocount_value(kind, value, adata))
        sensitivity.append(dict(part="b", data="CellBench", setting="top-50 marker overlap, mean over cell lines",
                                pseudocount=alt, dgdcell=float(np.mean([v for v, _ in overlaps(other).values()])),
                                detail=f"pseudocount {other['pseudocounts'].iloc[0]:.2e}"))
    details.append(f"- CellBench: {adata.n_obs} cells x {adata.n_vars} genes; fit {fit_s:.0f} s "
                   f"({len(model.history['epoch'])} epochs), differential_expression (5 comparisons) {de_s:.1f} s")
    print(rows[-1], flush=True)


def kang_cd14(adata, seed: int = SEED):
    """Labels 'CD14 Mono' / 'other' from Leiden clusters of the scanpy standard pipeline (see the module doc)."""
    import pandas as pd
    import scanpy as sc

    b = lognorm(adata)
    sc.pp.pca(b, n_comps=30, random_state=seed)
    sc.pp.neighbors(b, n_neighbors=15, random_state=seed, transformer="sklearn")
    sc.tl.leiden(b, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    genes = MONO_MARKERS + CD16_MARKERS
    expr = pd.DataFrame(b[:, genes].X.toarray(), columns=genes)
    expr["cluster"] = b.obs["leiden"].to_numpy()
    means = expr.groupby("cluster", observed=True).mean()
    mono, cd16 = means[MONO_MARKERS].mean(axis=1), means[CD16_MARKERS].mean(axis=1)
    chosen = list(means.index[(mono > 1) & (mono > cd16)])
    labels = np.where(b.obs["leiden"].isin(chosen), "CD14 Mono", "other")
    return labels, chosen, b


def part_kang(dgdcell, rows: list, details: list, sensitivity: list, n_cells: int | None) -> None:
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(common.DATA_DIR / KANG_FILE)
    note = "all cells"
    if n_cells is not None and n_cells < adata.n_obs:
        rng = np.random.default_rng(SEED)
        adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))].copy()
        note = f"a random subsample of {n_cells} cells (seed {SEED})"
    labels, clusters, b = kang_cd14(adata)
    adata.obs["cell_type"] = labels
    adata.obs["type_condition"] = [f"{t} {c}" for t, c in zip(labels, adata.obs["batch"].astype(str))]
    counts = {k: int(v) for k, v in adata.obs["type_condition"].value_counts().items()}
    t0 = time.perf_counter()
    model = fit_dgd(dgdcell, adata, covariate_keys=["batch"])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    group = dgdcell.differential.differential_expression(
        model, adata, groupby="type_condition", group1="CD14 Mono stim", group2="CD14 Mono ctrl")
    t1 = time.perf_counter()
    cf = dgdcell.differential.differential_expression(
        model, adata, covariate="batch", group1="stim", group2="ctrl", groupby="cell_type", restrict_to="CD14 Mono")
    t2 = time.perf_counter()
    b.obs["type_condition"] = adata.obs["type_condition"].to_numpy()
    sc.tl.rank_genes_groups(b, "type_condition", groups=["CD14 Mono stim"], reference="CD14 Mono ctrl",
                            method="wilcoxon")
    wil = sc.get.rank_genes_groups_df(b, "CD14 Mono stim")
    wil = wil.iloc[np.argsort(-wil["scores"].abs().to_numpy(), kind="stable")]
    wil_two = list(wil["names"][:20])
    wil_up = list(wil[wil["scores"] > 0]["names"][:20])

    def top(frame, up: bool):
        return list((frame[frame["lfc_mean"] > 0] if up else frame).index[:20])

    def isgs(genes):
        return sum(g in KNOWN_ISGS for g in genes)

    for setting, frame in (("group mode: stim vs ctrl CD14 monocytes", group),
                           ("counterfactual mode: CD14 monocytes decoded as stim vs ctrl", cf)):
        for up in (False, True):
            ours, theirs = top(frame, up), (wil_up if up else wil_two)
            rows.append(dict(part="c", data="Kang 2018 IFN-beta", setting=f"{setting}: known ISGs in top 20 "
                             + ("up-regulated" if up else "(two-sided)"), pseudocount=DEFAULT_PC, dgdcell=isgs(ours),
                             **{"scanpy wilcoxon": isgs(theirs), "difference": isgs(ours) - isgs(theirs)},
                             detail=", ".join(f"{g}{'*' if g in KNOWN_ISGS else ''}" for g in ours)))
    mono = np.flatnonzero(adata.obs["cell_type"].to_numpy() == "CD14 Mono")
    for alt, (kind, value) in ALTERNATIVES.items():
        pc = pseudocount_value(kind, value, adata, mono)
        for setting, frame in (
            ("group mode", dgdcell.differential.differential_expression(
                model, adata, groupby="type_condition", group1="CD14 Mono stim", group2="CD14 Mono ctrl",
                pseudocount=pc)),
            ("counterfactual mode", dgdcell.differential.differential_expression(
                model, adata, covariate="batch", group1="stim", group2="ctrl", groupby="cell_type",
                restrict_to="CD14 Mono", pseudocount=pc)),
        ):
            for up in (False, True):
                ours = top(frame, up)
                sensitivity.append(dict(part="c", data="Kang 2018 IFN-beta",
                                        setting=f"{setting}: known ISGs in top 20 " + ("up-regulated" if up else "(two-sided)"),
                                        pseudocount=alt, dgdcell=isgs(ours),
                                        **{"scanpy wilcoxon": isgs(wil_up if up else wil_two),
                                           "difference": isgs(ours) - isgs(wil_up if up else wil_two)},
                                        detail=", ".join(f"{g}{'*' if g in KNOWN_ISGS else ''}" for g in ours)))
    rows.append(dict(part="c", data="Kang 2018 IFN-beta", setting="scanpy wilcoxon top 20 (two-sided, |score|)",
                     detail=", ".join(f"{g}{'*' if g in KNOWN_ISGS else ''}" for g in wil_two)))
    rows.append(dict(part="c", data="Kang 2018 IFN-beta", setting="scanpy wilcoxon top 20 up-regulated",
                     detail=", ".join(f"{g}{'*' if g in KNOWN_ISGS else ''}" for g in wil_up)))
    present = sorted(KNOWN_ISGS & set(adata.var_names))
    details.append(f"- Kang: {note}, {adata.n_obs} cells x {adata.n_vars} genes; CD14 monocytes = Leiden clusters "
                   f"{clusters}; cells per group {counts}; {len(present)} of the {len(KNOWN_ISGS)} reference ISGs are "
                   f"among the genes; fit {fit_s:.0f} s ({len(model.history['epoch'])} epochs); "
                   f"differential_expression group {t1 - t0:.1f} s, counterfactual {t2 - t1:.1f} s; "
                   f"pseudocount group {group['pseudocounts'].iloc[0]:.2e}, counterfactual {cf['pseudocounts'].iloc[0]:.2e}")
    print(rows[-3:], flush=True)


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--kang-cells", type=int, default=None,
                        help="subsample Kang to this many cells (default: all 10,000)")
    parser.add_argument("--parts", default="a,n,b,c", help="which parts to run (comma-separated a, n, b, c)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    import dgdcell
    import dgdcell.differential  # noqa: F401

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows: list[dict] = []
    details: list[str] = []
    sensitivity: list[dict] = []
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if "a" in parts:
        part_generated(dgdcell, rows, details, sensitivity)
    if "n" in parts:
        part_generated_normal(dgdcell, rows, details)
    if "b" in parts:
        part_cellbench(dgdcell, rows, details, sensitivity)
    if "c" in parts:
        part_kang(dgdcell, rows, details, sensitivity, args.kang_cells)
    total = time.perf_counter() - t0
    out = Path(args.out)
    summary = _summary(rows)
    sensitivity_lines = ["## Pseudocount sensitivity", "",
                         "The same fits, `differential_expression` with another `pseudocount`: `scvi` (scvi-tools' "
                         "estimate from the not-expressed features), `quantile` (the 0.3 quantile of the features' "
                         "mean decoded fractions, the default until this version) and `1 count` (1 divided by the "
                         "median library size of the compared cells, passed as a number; the default is 0.1 of a count). "
                         "Rows as above.", "",
                         common.markdown_table(sensitivity, columns=COLUMNS)] if sensitivity else []
    command = "python benchmarks/differential.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = common.write_table(
        rows, out / "differential.md", out / "differential.csv", "Differential expression from the decoder",
        columns=COLUMNS,
        header_lines=[f"{_dt.date.today()}, {common.machine_description()}, torch threads {args.threads}; "
                      f"`{command}`; {total:.0f} s in all.", common.load_average_line(load_before), "",
                      "Method and data: see the docstring of `benchmarks/differential.py`. Defaults everywhere "
                      "(`DGD(seed=0)`, `covariate_keys=['batch']` for CellBench and Kang; "
                      "`differential_expression` defaults: change mode, delta 0.25, pseudocount = 0.1 count at the "
                      "median library size of the compared cells). `*` marks a known ISG.", "", "## Summary", ""] + summary
                     + ["", "## All numbers", ""],
        footer_lines=sensitivity_lines + ["", "Runs:", ""] + details,
    )
    print(text)


def _summary(rows: list[dict]) -> list[str]:
    lines = []
    gen = [r for r in rows if r["part"] == "a" and r["setting"] == "AUPRC, all genes"]  # default pseudocount only
    if gen:
        wins = sum(r["difference"] >= 0 for r in gen)
        lines.append(f"- (a) generated data: mean AUPRC dgdcell {np.mean([r['dgdcell'] for r in gen]):.3f} vs scanpy "
                     f"Wilcoxon {np.mean([r['scanpy wilcoxon'] for r in gen]):.3f}; dgdcell >= Wilcoxon in {wins} of "
                     f"{len(gen)} scenarios (target: at least Wilcoxon's): "
                     + ("met on average" if np.mean([r["difference"] for r in gen]) >= 0 else "**missed** on average")
                     + ("" if wins == len(gen) else f", **missed** in {len(gen) - wins} scenario(s)") + ".")
    for label in ("posterior draws (default)", "posterior means (sampler='map')"):
        nrm = [r for r in rows if r["part"] == "a (normal)" and r["setting"].endswith(label)]
        if nrm:
            lines.append(f"- (a) generated data, `posterior='normal'`, {label}: mean AUPRC "
                         f"{np.mean([r['dgdcell'] for r in nrm]):.3f} vs Wilcoxon "
                         f"{np.mean([r['scanpy wilcoxon'] for r in nrm]):.3f}; >= Wilcoxon in "
                         f"{sum(r['difference'] >= 0 for r in nrm)} of {len(nrm)} scenarios.")
    cb = [r for r in rows if r["part"] == "b" and "mean" in r["setting"]]
    if cb:
        v = cb[0]["dgdcell"]
        lines.append(f"- (b) CellBench: mean top-50 overlap with scanpy's Wilcoxon markers {v:.3f} (target >= 0.5): "
                     + ("met." if v >= 0.5 else "**missed**."))
    kang = [r for r in rows if r["part"] == "c" and "known ISGs" in r["setting"]]
    for r in kang:
        lines.append(f"- (c) Kang, {r['setting']}: {r['dgdcell']} (scanpy Wilcoxon {r['scanpy wilcoxon']}); target: "
                     "ISGs fill the top 20: " + ("met." if r["dgdcell"] >= 18 else "**not met** (fewer than 18 of 20)."))
    return lines


if __name__ == "__main__":
    main()
