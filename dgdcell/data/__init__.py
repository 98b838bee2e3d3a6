"""Reading AnnData into count matrices, library sizes and category codes; input checks.

Knows nothing of torch modules.
"""

from .aligning import FeatureAlignment, NewCellData, align_features, read_covariates, read_new_anndata
from .checks import check_cell_totals, check_counts, check_obs_column
from .reading import DEFAULT_MODALITY, Categories, CountData, encode_categories, get_matrix, read_anndata, to_csr

__all__ = [
    "FeatureAlignment",
    "NewCellData",
    "align_features",
    "read_covariates",
    "read_new_anndata",
    "DEFAULT_MODALITY",
    "Categories",
    "CountData",
    "check_cell_totals",
    "check_counts",
    "check_obs_column",
    "encode_categories",
    "get_matrix",
    "read_anndata",
    "to_csr",
]
