"""Where graph connectivity is lost: the pieces of each population in the k-NN graph of an embedding.

scib-metrics' graph connectivity is, per label, the share of the label's cells in the largest
strongly connected component of the 15-NN graph restricted to them, averaged over labels. This
script fits the integration benchmark's Kang model (the same subsample, populations and settings
as ``benchmarks/integration.py``: ``DGD(covariate_keys=["batch"], seed=0)``, one thread) and,
for ``X_dgd`` and the uncorrected PCA, lists per population: cells, share in the largest
component, number of components, the median library size inside and outside the largest
component, the stimulated share of each, and, for the largest other pieces, their top genes
against the main piece (scanpy Wilcoxon on log-normalised counts) with their sizes.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/connectivity.py [--kang-cells 4000] [--out benchmarks/results]

Writes ``<out>/connectivity.md`` and ``<out>/connectivity.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))

import common  # noqa: E402
import integration  # noqa: E402

K = 15
#: the other pieces of a population described by their genes (largest first, at least MIN_PIECE cells)
N_PIECES = 2
MIN_PIECE = 20


def pieces(X: np.ndarray, labels: np.ndarray, label: str, idx: np.ndarray) -> np.ndarray:
    """Strongly connected component of each cell of ``label`` in the K-NN graph restricted to the label."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    cells = np.flatnonzero(labels == label)
    pos = np.full(len(labels), -1)
    pos[cells] = np.arange(len(cells))
    nb = pos[idx[cells]]
    rows = np.repeat(np.arange(len(cells)), nb.shape[1])
    keep = nb.ravel() >= 0
    graph = sp.csr_matrix((np.ones(keep.sum()), (rows[keep], nb.ravel()[keep])), shape=(len(cells), len(cells)))
    return connected_components(graph, connection="strong")[1]


def describe(name: str, X, adata, labels, lognorm) -> list[dict]:
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=K).fit(X).kneighbors(X)[1]  # self included, as in scib
    lib = np.asarray(adata.X.sum(axis=1)).ravel()
    stim = adata.obs["batch"].astype(str).to_numpy() == "stim"
    rows = []
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        comp = pieces(X, labels, label, idx)
        sizes = np.bincount(comp)
        main = comp == sizes.argmax()
        genes = []
        for piece in np.argsort(-sizes)[1:1 + N_PIECES]:
            if sizes[piece] < MIN_PIECE:
                break
            sub = lognorm[cells].copy()
            sub.obs["piece"] = np.where(comp == piece, "piece", np.where(main, "main", "other"))
            sc.tl.rank_genes_groups(sub, "piece", groups=["piece"], reference="main", method="wilcoxon")
            top = sc.get.rank_genes_groups_df(sub, "piece")["names"][:8]
            genes.append(f"{sizes[piece]} cells: " + ", ".join(top))
        rows.append({"embedding": name, "population": label, "cells": len(cells),
                     "largest share": float(main.mean()), "components": int(sizes.size),
                     "median library in / out": f"{np.median(lib[cells][main]):.0f} / "
                                                f"{np.median(lib[cells][~main]) if (~main).any() else float('nan'):.0f}",
                     "stim share in / out": f"{stim[cells][main].mean():.2f} / "
                                            f"{stim[cells][~main].mean() if (~main).any() else float('nan'):.2f}",
                     "largest other pieces (top genes vs the main piece)": "; ".join(genes)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kang-cells", type=int, default=4000)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    adata, labels, _, note = integration.load_set("kang", types.SimpleNamespace(kang_cells=args.kang_cells))
    _, fitted, secs, epochs = integration.fit_dgd(adata, None)
    lognorm = integration.lognorm(adata)
    rows = describe("X_dgd", fitted.obsm["X_dgd"], adata, labels, lognorm)
    rows += describe("PCA (no correction)", integration.pca_embedding(adata), adata, labels, lognorm)
    for r in rows:
        print(r, flush=True)
    means = {e: np.mean([r["largest share"] for r in rows if r["embedding"] == e]) for e in ("X_dgd", "PCA (no correction)")}
    header = [f"- machine: {common.machine_description()}",
              f"- command: `OMP_NUM_THREADS=1 python benchmarks/connectivity.py --kang-cells {args.kang_cells}`, "
              f"{time.perf_counter() - t0:.0f} s in all (fit {secs:.0f} s, {epochs} epochs)",
              f"- {note}",
              f"- graph connectivity (mean of 'largest share' over populations): X_dgd {means['X_dgd']:.3f}, "
              f"PCA {means['PCA (no correction)']:.3f}", ""]
    text = common.write_table(rows, Path(args.out) / "connectivity.md", Path(args.out) / "connectivity.csv",
                              "Graph connectivity on Kang: the pieces of each population", header_lines=header)
    print(text)


if __name__ == "__main__":
    main()
