"""Helpers shared by the benchmark scripts.

This module deliberately does not import ``dgdcell``: it holds the data loaders, the
scanpy-standard baseline and the metrics, so that baselines can be produced (and
checked) independently of the model.

Data live in ``DATA_DIR`` (``$DGDCELL_DATA`` or ``<repo>/../shared/data``); the README
there describes every file.
"""

from __future__ import annotations

import csv
import os
import platform
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

DATA_DIR = Path(
    os.environ.get("DGDCELL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

LABEL_KEY = "cell_type"


# --------------------------------------------------------------------------- loaders


def _finish(adata, name: str, verbose: bool = True):
    """Common post-processing for every labelled set.

    * ``.X`` becomes CSR float32 raw counts,
    * ``obs["cell_type"]`` is checked (present, no missing values) and made categorical,
    * cells with zero total counts are dropped (the model rejects them); the number is
      stored in ``adata.uns["benchmark_n_dropped_zero_counts"]`` and printed.
    """
    if LABEL_KEY not in adata.obs:
        raise KeyError(f"{name}: obs has no {LABEL_KEY!r} column (has {list(adata.obs.columns)})")
    labels = adata.obs[LABEL_KEY]
    if labels.isna().any():
        raise ValueError(f"{name}: {int(labels.isna().sum())} cells have no {LABEL_KEY}")

    X = adata.X
    if X is None:
        raise ValueError(f"{name}: .X is empty")
    X = sp.csr_matrix(X, dtype=np.float32) if not (sp.issparse(X) and X.format == "csr") else X
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    adata.X = X

    totals = np.asarray(X.sum(axis=1)).ravel()
    keep = totals > 0
    n_drop = int((~keep).sum())
    if n_drop:
        adata = adata[keep].copy()
    adata.obs[LABEL_KEY] = adata.obs[LABEL_KEY].astype(str).astype("category")
    adata.obs_names_make_unique()
    adata.uns["benchmark_name"] = name
    adata.uns["benchmark_n_dropped_zero_counts"] = n_drop
    if verbose:
        print(
            f"[data] {name}: {adata.n_obs} cells x {adata.n_vars} genes, "
            f"{adata.obs[LABEL_KEY].nunique()} labels, dropped {n_drop} zero-count cells",
            flush=True,
        )
    return adata


def _read_h5ad(filename: str, name: str, verbose: bool = True):
    import anndata as ad

    return _finish(ad.read_h5ad(DATA_DIR / filename), name, verbose)


def _read_mudata_modality(filename: str, modality: str, name: str, verbose: bool = True):
    import mudata as md

    with warnings.catch_warnings():
        # mudata warns about its future obs/var update behaviour on every read
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.read_h5mu(DATA_DIR / filename)
    adata = mdata[modality].copy()
    if LABEL_KEY not in adata.obs:
        adata.obs[LABEL_KEY] = mdata.obs.loc[adata.obs_names, LABEL_KEY].values
    return _finish(adata, name, verbose)


def load_mouse_bladder(verbose: bool = True):
    return _read_h5ad("mouse_bladder_mca_rna_scdcc.h5ad", "mouse_bladder", verbose)


def load_cbmc_rna(verbose: bool = True):
    return _read_h5ad("cbmc_gse100866_rna_scdcc.h5ad", "cbmc_rna", verbose)


def load_pbmc4k(verbose: bool = True):
    return _read_h5ad("pbmc4k_10x_rna_scdcc.h5ad", "pbmc4k", verbose)


def load_cellbench(verbose: bool = True):
    return _read_h5ad("cellbench_lung5cl_3protocols_rna.h5ad", "cellbench", verbose)


def load_cite_pbmc_rna(verbose: bool = True):
    return _read_mudata_modality("cite_pbmc10k_scmdc.h5mu", "rna", "cite_pbmc_rna", verbose)


def load_worm_neuron(verbose: bool = True):
    return _read_h5ad("worm_neuron_scirnaseq_rna_scdcc.h5ad", "worm_neuron", verbose)


def load_scicar_kidney_rna(verbose: bool = True):
    """sci-CAR mouse kidney, RNA modality only (4,753 cells x 5,000 genes, 14 published cell types)."""
    return _read_mudata_modality("scicar_mouse_kidney_gse117089_rna_atac.h5mu", "rna", "scicar_kidney_rna", verbose)


#: name -> loader (``loader(verbose=True) -> AnnData`` with raw counts in ``.X`` and
#: ``obs["cell_type"]``), in the order results are reported.
LABELLED_SETS: "OrderedDict[str, Callable]" = OrderedDict(
    [
        ("mouse_bladder", load_mouse_bladder),
        ("cbmc_rna", load_cbmc_rna),
        ("pbmc4k", load_pbmc4k),
        ("cellbench", load_cellbench),
        ("cite_pbmc_rna", load_cite_pbmc_rna),
        ("worm_neuron", load_worm_neuron),
        ("scicar_kidney_rna", load_scicar_kidney_rna),
    ]
)


# --------------------------------------------------------------------------- clustering


def leiden_tuned(
    adata,
    n_clusters: int,
    use_rep: str,
    seed: int = 0,
    key: str = "leiden_tuned",
    res_min: float = 0.01,
    res_max: float = 5.0,
    n_steps: int = 20,
):
    """Leiden clustering with the resolution bisected to give ``n_clusters`` clusters.

    Builds an exact 15-NN graph (scanpy, ``transformer="sklearn"``) on ``adata.obsm[use_rep]`` (or ``adata.X`` for ``use_rep="X"``)
    on a light-weight scratch AnnData, so ``adata`` itself is not modified. Bisects the
    resolution in ``[res_min, res_max]`` for at most ``n_steps`` Leiden runs (igraph
    flavour, 2 iterations, undirected, seeded) and stops early on an exact hit.

    Returns ``(labels, resolution, n_found)``: ``labels`` is a numpy array of strings for
    the run whose cluster count is closest to ``n_clusters`` (ties: the first such run).
    ``key`` is only the obs key used on the scratch object.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    if use_rep == "X":
        rep = adata.X
        rep = rep.toarray() if sp.issparse(rep) else np.asarray(rep)
    else:
        rep = np.asarray(adata.obsm[use_rep])
    scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    scratch.obsm["rep"] = np.ascontiguousarray(rep, dtype=np.float32)
    # transformer="sklearn": exact kNN for every size. scanpy's default switches to
    # pynndescent above 4096 cells, which (pynndescent returning csr_array, scipy 1.17
    # without csr_array.getnnz) crashes in scanpy 1.11.5; exact kNN is also deterministic.
    sc.pp.neighbors(scratch, n_neighbors=15, use_rep="rep", random_state=seed, transformer="sklearn")

    def run(res: float):
        sc.tl.leiden(
            scratch,
            resolution=res,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added=key,
        )
        labels = scratch.obs[key].astype(str).to_numpy()
        return labels, len(np.unique(labels))

    lo, hi = float(res_min), float(res_max)
    best = None  # (distance, resolution, labels, n)
    for _ in range(n_steps):
        res = 0.5 * (lo + hi)
        labels, n = run(res)
        dist = abs(n - n_clusters)
        if best is None or dist < best[0]:
            best = (dist, res, labels, n)
        if n == n_clusters:
            break
        if n < n_clusters:
            lo = res
        else:
            hi = res
    _, res, labels, n = best
    return labels, float(res), int(n)


# --------------------------------------------------------------------------- kNN metrics


def _majority_vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Row-wise majority vote over integer codes; ties go to the smallest code."""
    counts = np.zeros((neighbour_labels.shape[0], n_classes), dtype=np.int64)
    rows = np.repeat(np.arange(neighbour_labels.shape[0]), neighbour_labels.shape[1])
    np.add.at(counts, (rows, neighbour_labels.ravel()), 1)
    return counts.argmax(axis=1)


def knn_accuracy(X, labels, k: int = 15) -> float:
    """Leave-one-out ``k``-NN majority-vote accuracy (Euclidean; the cell itself excluded)."""
    from sklearn.neighbors import NearestNeighbors

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    n = X.shape[0]
    nn = NearestNeighbors(n_neighbors=min(k + 1, n)).fit(X)
    idx = nn.kneighbors(X, return_distance=False)
    # remove the query cell itself; with exact duplicates it need not be in column 0
    is_self = idx == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True  # self not among the k+1: drop the farthest instead
    idx = idx[~is_self].reshape(n, -1)
    pred = _majority_vote(codes[idx], len(classes))
    return float((pred == codes).mean())


def knn_transfer_accuracy(X_train, y_train, X_test, y_test, k: int = 15) -> float:
    """Accuracy of ``k``-NN majority vote from a reference (train) set onto a query (test) set."""
    from sklearn.neighbors import NearestNeighbors

    X_train = X_train.toarray() if sp.issparse(X_train) else np.asarray(X_train)
    X_test = X_test.toarray() if sp.issparse(X_test) else np.asarray(X_test)
    y_train = np.asarray(y_train).astype(str)
    y_test = np.asarray(y_test).astype(str)
    classes, train_codes = np.unique(y_train, return_inverse=True)
    nn = NearestNeighbors(n_neighbors=min(k, X_train.shape[0])).fit(X_train)
    idx = nn.kneighbors(X_test, return_distance=False)
    pred = classes[_majority_vote(train_codes[idx], len(classes))]
    return float((pred == y_test).mean())


# --------------------------------------------------------------------------- baseline


def scanpy_standard(
    adata, n_clusters: int, seed: int = 0, label_key: str = LABEL_KEY, blas_threads: int | None = 1
) -> dict:
    """Scanpy-standard baseline on raw counts.

    normalize_total(target_sum=1e4, as in the scanpy tutorials) -> log1p -> scale(max_value=10) -> PCA(50) ->
    ``leiden_tuned`` on ``X_pca`` with ``n_clusters`` clusters. ``adata`` is not modified.

    Returns ``dict(ari, nmi, leiden_resolution, n_clusters_found, knn_acc, seconds)``; the
    kNN accuracy is leave-one-out 15-NN on the 50 PCs, ``seconds`` covers the whole pipeline
    (not the metrics).

    ``blas_threads`` caps the BLAS thread pools (threadpoolctl) while the pipeline runs;
    ``None`` leaves them alone. The default 1 is deliberate: numpy and scipy each load their
    own OpenBLAS (plus torch's libgomp), and on a 2-core machine their spinning threads
    oversubscribe the CPU, making the PCA 5-50x slower and its timing erratic.
    """
    import contextlib

    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if blas_threads is None:
        limiter = contextlib.nullcontext()
    else:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(blas_threads, user_api="blas")
    with limiter:
        t0 = time.perf_counter()
        a = adata.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.pp.scale(a, max_value=10)
        n_comps = min(50, a.n_obs - 1, a.n_vars - 1)
        sc.pp.pca(a, n_comps=n_comps, random_state=seed)
        labels, res, n_found = leiden_tuned(a, n_clusters, use_rep="X_pca", seed=seed)
        seconds = time.perf_counter() - t0

    truth = adata.obs[label_key].astype(str).to_numpy()
    return dict(
        ari=float(adjusted_rand_score(truth, labels)),
        nmi=float(normalized_mutual_info_score(truth, labels)),
        leiden_resolution=res,
        n_clusters_found=n_found,
        knn_acc=knn_accuracy(a.obsm["X_pca"], truth, k=15),
        seconds=float(seconds),
        labels=np.asarray(labels).astype(str),
    )


def warmup(seed: int = 0) -> None:
    """Run the baseline once on a tiny random count matrix.

    The first scanpy neighbours/Leiden call compiles numba kernels (~8 s), which would
    otherwise be charged to the first data set's timing.
    """
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(200, 60)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    a = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(
        {LABEL_KEY: pd.Categorical(rng.integers(0, 3, 200).astype(str))},
        index=[f"c{i}" for i in range(200)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scanpy_standard(a, 3, seed=seed)


# --------------------------------------------------------------------------- output


def _fmt(value, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if np.isnan(value):
            return ""
        return format(value, floatfmt)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f",
                   floatfmts: dict | None = None) -> str:
    """A GitHub markdown table; ``None``/NaN print as empty cells.

    ``floatfmts`` overrides ``floatfmt`` per column.
    """
    rows = list(rows)
    if columns is None:
        columns = list(OrderedDict((k, None) for r in rows for k in r))
    floatfmts = floatfmts or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [_fmt(r.get(c), floatfmts.get(c, floatfmt)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(
    rows: Sequence[dict],
    path_md,
    path_csv,
    title: str,
    columns: Sequence[str] | None = None,
    csv_columns: Sequence[str] | None = None,
    header_lines: Sequence[str] = (),
    footer_lines: Sequence[str] = (),
    floatfmt: str = ".3f",
    floatfmts: dict | None = None,
) -> str:
    """Write ``rows`` (list of dicts) as a markdown file and as a csv (via pandas).

    The markdown file is ``# title``, then ``header_lines``, the table (``columns``, default
    all keys in first-seen order), then ``footer_lines``. The csv holds ``csv_columns``
    (default: the same columns), so it can carry extra detail. Returns the markdown text.
    """
    import pandas as pd

    rows = list(rows)
    path_md, path_csv = Path(path_md), Path(path_csv)
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_csv.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=list(columns) if columns is not None else None)
    df_csv = df if csv_columns is None else pd.DataFrame(rows, columns=list(csv_columns))
    df_csv = df_csv.copy()
    for c in df_csv.columns:  # keep integer columns integer despite empty cells
        vals = [v for v in (r.get(c) for r in rows) if v is not None]
        if vals and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            df_csv[c] = df_csv[c].astype("Int64")
    df_csv.to_csv(path_csv, index=False, quoting=csv.QUOTE_MINIMAL)

    parts = [f"# {title}", ""]
    if header_lines:
        parts += list(header_lines) + [""]
    parts.append(markdown_table(rows, columns=df.columns.tolist(), floatfmt=floatfmt, floatfmts=floatfmts))
    if footer_lines:
        parts += [""] + list(footer_lines)
    text = "\n".join(parts) + "\n"
    path_md.write_text(text)
    return text


def load_average_line(before: tuple[float, ...]) -> str:
    """``- load average (1, 5, 15 min) before: ...; after: ...`` (after = now), for result headers."""
    def fmt(values):
        return ", ".join(f"{v:.2f}" for v in values)

    return f"- load average (1, 5, 15 min) before: {fmt(before)}; after: {fmt(os.getloadavg())}"


def machine_description() -> str:
    """One line: CPU model, logical cores, Python/torch versions, CUDA device if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"CPU: {cpu}", f"{os.cpu_count()} logical cores", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        parts.append("pure PyTorch (no compiled kernels)")
        if torch.cuda.is_available():
            parts.append(f"CUDA device: {torch.cuda.get_device_name(0)}")
        else:
            parts.append("no CUDA device")
    except ImportError:
        parts.append("torch not installed")
    try:
        from importlib.metadata import version

        parts.append(f"scanpy {version('scanpy')}")
    except Exception:
        pass
    return "; ".join(parts)


def select_datasets(parser, text: str | None) -> list[str]:
    """Names in a comma-separated ``--datasets`` value (every labelled set when empty);
    an unknown name is a usage error of ``parser``."""
    if not text:
        return list(LABELLED_SETS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in LABELLED_SETS]
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; choose from {list(LABELLED_SETS)}")
    return names
