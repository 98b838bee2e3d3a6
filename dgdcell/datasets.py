"""Data sets shipped with the package."""

from __future__ import annotations

from importlib import resources


def cellbench():
    """CellBench lung-adenocarcinoma cell-line mixture (Tian et al. 2019, Nat Methods).

    Real raw UMI counts: 1,021 cells x 3,000 genes (Ensembl IDs), 5 cell lines
    in ``obs['cell_type']`` (H1975, H2228, HCC827, A549, H838), 5 batches in
    ``obs['batch']`` and 2 protocols in ``obs['protocol']`` (CEL-seq2, Drop-seq).
    Source: GEO GSE118767 via github.com/LuyiTian/sc_mixology (MIT licence);
    see ``data/README.md`` in the repository.

    Returns a new AnnData (CSR float32 counts in ``.X``) on every call.
    """
    import anndata as ad

    with resources.as_file(resources.files("dgdcell") / "_data" / "cellbench_lung5cl_3protocols_rna.h5ad") as path:
        return ad.read_h5ad(path)
