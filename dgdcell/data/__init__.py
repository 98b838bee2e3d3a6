"""Reading AnnData / MuData into count matrices, library sizes and category codes; input checks.

Knows nothing of torch modules.
"""

from .aligning import FeatureAlignment, NewCellData, align_features, read_covariates, read_new_anndata, read_new_data
from .checks import check_cell_totals, check_counts, check_obs_column
from .reading import DEFAULT_MODALITY, Categories, CountData, binarise, encode_categories, get_matrix, is_mudata, read_anndata, read_continuous, read_data, to_csr

__all__ = [
    "read_continuous",
    "binarise",
    "FeatureAlignment",
    "NewCellData",
    "align_features",
    "read_covariates",
    "read_new_anndata",
    "read_new_data",
    "DEFAULT_MODALITY",
    "Categories",
    "CountData",
    "check_cell_totals",
    "check_counts",
    "check_obs_column",
    "encode_categories",
    "get_matrix",
    "is_mudata",
    "read_anndata",
    "read_data",
    "to_csr",
]
