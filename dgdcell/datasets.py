"""Data sets shipped with the package.

Every loader reads a small real data set from the package itself (no download)
and returns a new object on every call, with raw integer counts in ``.X``. The
files, their sources and licences are described in ``data/README.md`` of the
repository.
"""

from __future__ import annotations

import warnings
from importlib import resources

__all__ = ["cellbench", "cite_cbmc_small"]


def cellbench():
    """CellBench lung-adenocarcinoma cell-line mixture (Tian et al. 2019, Nat Methods).

    Real raw UMI counts: 1,021 cells x 3,000 genes (Ensembl IDs), 5 cell lines
    in ``obs['cell_type']`` (H1975, H2228, HCC827, A549, H838), 5 batches in
    ``obs['batch']`` and 2 protocols in ``obs['protocol']`` (CEL-seq2, Drop-seq).
    Source: GEO GSE118767 via github.com/LuyiTian/sc_mixology (MIT licence);
    see ``data/README.md`` in the repository.

    Returns
    -------
    anndata.AnnData
        A new object on every call: CSR float32 counts in ``.X``; ``obs``
        columns ``cell_type``, ``batch``, ``protocol``; ``var_names`` Ensembl
        gene IDs.

    Examples
    --------
    >>> adata = dgdcell.datasets.cellbench()
    >>> adata.shape
    (1021, 3000)
    """
    import anndata as ad

    with resources.as_file(resources.files("dgdcell") / "_data" / "cellbench_lung5cl_3protocols_rna.h5ad") as path:
        return ad.read_h5ad(path)


def cite_cbmc_small():
    """Small CITE-seq data set: RNA and surface proteins (ADT) of the same cells.

    Cord-blood mononuclear cells (CBMC) of Stoeckius et al. 2017 (Nat Methods,
    GEO GSE100866), in the filtered subset used by scMDC (Lin et al. 2022, Nat
    Commun; github.com/xianglin226/scMDC, Apache-2.0). Real raw counts: 1,182
    cells; modality ``'rna'`` with 1,000 genes, modality ``'adt'`` with 10
    antibody-derived tags. ``obs['cell_type']`` holds the 6 published cell
    types as ``type_1`` .. ``type_6`` (69, 99, 7, 571, 223 and 213 cells).

    The source file stores no gene, protein or cell-type names, so
    ``var_names`` are placeholders (``gene_0000`` ..., ``adt_00`` ...) and the
    labels are numbered; the labels themselves are the published ones.

    Returns
    -------
    mudata.MuData
        A new object on every call, with ``mod['rna']`` and ``mod['adt']``
        (CSR float32 counts in ``.X``) and ``obs['cell_type']`` on the MuData
        and in each modality.

    Examples
    --------
    >>> mdata = dgdcell.datasets.cite_cbmc_small()
    >>> sorted(mdata.mod)
    ['adt', 'rna']
    """
    import mudata as md

    with resources.as_file(resources.files("dgdcell") / "_data" / "cite_cbmc_gse100866_scmdc_small.h5mu") as path:
        with warnings.catch_warnings():  # mudata's notice about a future default of .update(), not actionable here
            warnings.simplefilter("ignore", FutureWarning)
            return md.read_h5mu(path)
