import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dgdcell
from dgdcell.data import read_anndata

from .conftest import make_counts


def snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return X.copy(), adata.obs.copy(), set(adata.obsm.keys()), set(adata.uns.keys()), set(adata.layers.keys())


def assert_unchanged(adata, snap):
    X, obs, obsm, uns, layers = snap
    X2 = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    np.testing.assert_array_equal(X, X2)
    pd.testing.assert_frame_equal(obs, adata.obs)
    assert set(adata.obsm.keys()) == obsm and set(adata.uns.keys()) == uns and set(adata.layers.keys()) == layers


def test_dense_sparse_and_integer_inputs_read_identically(synthetic):
    a = read_anndata(synthetic)
    dense = synthetic.copy()
    dense.X = synthetic.X.toarray().astype(np.int64)
    b = read_anndata(dense)
    assert (a.counts["rna"] != b.counts["rna"]).nnz == 0
    np.testing.assert_array_equal(a.library["rna"], np.asarray(synthetic.X.sum(1)).ravel())
    assert a.counts["rna"].dtype == np.float32
    assert a.feature_names["rna"] == list(synthetic.var_names)


def test_layer_and_codes(synthetic):
    synthetic.layers["counts"] = synthetic.X.copy()
    synthetic.obs.loc[synthetic.obs_names[:5], "group"] = np.nan
    d = read_anndata(synthetic, layer="counts", label_key="group")
    assert d.labels.categories == ["g0", "g1", "g2"]
    assert (d.labels.codes[:5] == -1).all() and (d.labels.codes[5:] >= 0).all()


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a: setattr(a, "X", a.X.multiply(0.5).tocsr()), ValueError, "non-integer"),
        (lambda a: setattr(a, "X", sp.csr_matrix(-a.X.toarray())), ValueError, "negative"),
        (lambda a: a.X.data.__setitem__(0, np.nan), ValueError, "NaN"),
        (lambda a: a.X.data.__setitem__(0, np.inf), ValueError, "infinite"),
    ],
)
def test_bad_values_raise_and_leave_adata_unchanged(synthetic, mutate, err, match):
    mutate(synthetic)
    snap = snapshot(synthetic)
    with pytest.raises(err, match=match):
        dgdcell.DGD(n_components=3).fit(synthetic, max_epochs=2, verbose=False)
    assert_unchanged(synthetic, snap)


def test_lognormalised_hint_names_layers(synthetic):
    synthetic.layers["counts"] = synthetic.X.copy()
    synthetic.X = synthetic.X.log1p()
    with pytest.raises(ValueError, match="counts"):
        read_anndata(synthetic)


def test_empty_cells_and_missing_keys(synthetic):
    X = synthetic.X.toarray()
    X[3] = 0
    empty = synthetic.copy()
    empty.X = sp.csr_matrix(X)
    snap = snapshot(empty)
    with pytest.raises(ValueError, match="no counts.*filter_cells"):
        dgdcell.DGD(n_components=3).fit(empty, verbose=False)
    assert_unchanged(empty, snap)
    with pytest.raises(KeyError, match="layer 'counts'"):
        read_anndata(synthetic, layer="counts")
    with pytest.raises(KeyError, match="donor"):
        read_anndata(synthetic, covariate_keys=["donor"])
    with pytest.raises(KeyError, match="celltype"):
        read_anndata(synthetic, label_key="celltype")
    with pytest.raises(ValueError, match="single class"):
        synthetic.obs["one"] = "x"
        read_anndata(synthetic, covariate_keys=["one"])
    with pytest.raises(ValueError, match="no cells"):
        read_anndata(synthetic[:0].copy())
    with pytest.raises(TypeError):
        bad = ad.AnnData(np.array([["a", "b"]], dtype=object))
        read_anndata(bad)


def test_n_components_bounds(synthetic):
    with pytest.raises(ValueError, match="n_components"):
        dgdcell.DGD(n_components=0)
    with pytest.raises(ValueError, match="exceeds"):
        dgdcell.DGD(n_components=10_000).fit(synthetic, verbose=False)


def test_features_with_no_counts_are_fine():
    a = make_counts(n_per_group=(30, 30), n_genes=20)
    X = a.X.toarray()
    X[:, 5] = 0
    a.X = sp.csr_matrix(X)
    d = read_anndata(a)
    assert d.counts["rna"].shape == (60, 20)
