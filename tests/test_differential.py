"""Differential expression from the decoder (dgdcell.differential) and its plots."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dgdcell import DGD, pl  # noqa: E402
from dgdcell.differential import differential_expression, fdr_de_prediction  # noqa: E402

from .conftest import nb_anndata  # noqa: E402

SCVI_COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max",
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
    "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
]


def make_de_counts(n_per_group=(120, 120), n_genes=120, n_de=16, lfcs=(1.5, 2.5), n_batches=2,
                   n_batch_genes=12, batch_lfc=2.0, seed=0):
    """NB counts of two groups with known DE genes and a batch effect on known genes.

    Like ``conftest.make_counts`` but with the truth recorded: ``var['de']`` and
    ``var['true_lfc']`` (log2, group g1 over g0; genes at all expression levels,
    up and down), ``var['batch_gene']`` and ``var['batch_lfc']`` (log2, batch b1
    over b0, disjoint from the DE genes). The fold changes hold for the
    fractions too: the total is balanced so that other genes do not shift.
    """
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(n_per_group)), n_per_group)
    n = groups.size
    base = np.exp(rng.normal(0.0, 1.0, size=n_genes))
    genes = rng.permutation(n_genes)
    de, batch_genes = genes[:n_de], genes[n_de:n_de + n_batch_genes]
    true_lfc = np.zeros(n_genes)
    true_lfc[de] = rng.choice(lfcs, n_de) * np.where(np.arange(n_de) % 2 == 0, 1.0, -1.0)
    batch_lfc_g = np.zeros(n_genes)
    batch_lfc_g[batch_genes] = batch_lfc * np.where(np.arange(n_batch_genes) % 2 == 0, 1.0, -1.0)
    for lfc in (true_lfc, batch_lfc_g):  # scale the down genes so that the total is unchanged: the
        up, down = lfc > 0, lfc < 0      # fractions of every other gene stay the same (no compositional shift)
        gain = (base[up] * (2.0 ** lfc[up] - 1)).sum()
        base[down] *= gain / (base[down] * (1 - 2.0 ** lfc[down])).sum()
    batches = rng.integers(0, n_batches, size=n)
    logp = np.log(base)[None, :] + np.log(2.0) * (true_lfc[None, :] * (groups[:, None] == 1)
                                                  + batch_lfc_g[None, :] * (batches[:, None] == 1))
    var = pd.DataFrame({"de": true_lfc != 0, "true_lfc": true_lfc, "batch_gene": batch_lfc_g != 0,
                        "batch_lfc": batch_lfc_g}, index=[f"gene{j}" for j in range(n_genes)])
    return nb_anndata(rng, np.exp(logp), 1500, groups, batches, var)


def average_precision(truth: np.ndarray, ranking_score: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision) of a ranking, numpy only."""
    order = np.argsort(-ranking_score, kind="stable")
    hits = np.asarray(truth, dtype=bool)[order]
    precision = np.cumsum(hits) / (1 + np.arange(hits.size))
    return float(precision[hits].sum() / max(hits.sum(), 1))


@pytest.fixture(scope="module")
def fitted():
    adata = make_de_counts()
    model = DGD(latent_dim=5, n_components=3, covariate_keys=["batch"], n_hidden=(32,), n_hidden_head=(32,),
                seed=0).fit(adata, max_epochs=150, verbose=False)  # ~1.5 s; 30 epochs are too few to learn the DE
    return adata, model


pytestmark = pytest.mark.usefixtures("no_figure_leak")


def _snapshot(adata):
    return (adata.obs.copy(), {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
            adata.X.copy(), sorted(adata.uns.keys()), list(adata.layers.keys()), adata.var.copy())


def _assert_unchanged(adata, snap):
    obs, obsm, X, uns, layers, var = snap
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert sorted(adata.obsm.keys()) == sorted(obsm)
    for k, v in obsm.items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    assert (adata.X != X).nnz == 0
    assert sorted(adata.uns.keys()) == uns and list(adata.layers.keys()) == layers


# --------------------------------------------------------------------------- group mode
def test_group_mode_ranks_the_true_de_genes_on_top(fitted):
    adata, model = fitted
    snap = _snapshot(adata)
    de = differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
    _assert_unchanged(adata, snap)
    assert list(de.columns[: len(SCVI_COLUMNS)]) == SCVI_COLUMNS
    assert de.index.is_unique and set(de.index) == set(adata.var_names)
    truth = adata.var["de"].reindex(de.index).to_numpy()
    ap = average_precision(truth, -np.arange(len(de), dtype=float))
    assert ap >= 0.9, ap
    n_de = int(truth.sum())
    assert truth[:n_de].mean() >= 0.8  # precision at the number of true DE genes
    # the LFC estimates follow the truth in sign and size on the true DE genes
    top = de[truth]
    true_lfc = adata.var.loc[top.index, "true_lfc"].to_numpy()
    assert (np.sign(top["lfc_mean"]) == np.sign(true_lfc)).all()
    assert np.corrcoef(top["lfc_mean"], true_lfc)[0, 1] > 0.9
    # the FDR-flagged features first (a prefix), each part by |lfc_shrunk|; the flags are mostly true DE genes
    flags = de["is_de_fdr_0.05"].to_numpy()
    assert flags.sum() >= n_de // 2 and not flags[flags.argmin():].any()
    assert truth[flags].mean() >= 0.8
    size = de["lfc_shrunk"].abs().to_numpy()
    assert (np.diff(size[flags]) <= 1e-12).all() and (np.diff(size[~flags]) <= 1e-12).all()
    assert de.loc[flags, "proba_de"].min() >= de.loc[~flags, "proba_de"].max()
    np.testing.assert_allclose(de["proba_de"] + de["proba_not_de"], 1.0)
    p = de["proba_de"].to_numpy()
    np.testing.assert_allclose(de["bayes_factor"], np.log(p + 1e-8) - np.log(1 - p + 1e-8))
    # scale: the mean decoded fractions of each group (all cells decoded: groups < n_samples)
    expr = model.get_normalized_expression(adata)
    g = adata.obs["group"].to_numpy()
    np.testing.assert_allclose(de["scale1"], expr[g == "g1"].mean(0).reindex(de.index), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(de["scale2"], expr[g == "g0"].mean(0).reindex(de.index), rtol=1e-5, atol=1e-9)
    # lfc_shrunk: the mean over all cell pairs of log2(p1 + eps) - log2(p2 + eps), eps the pseudocount
    eps = float(de["pseudocounts"].iloc[0])
    logs = np.log2(expr.astype(np.float64) + eps)
    np.testing.assert_allclose(de["lfc_shrunk"], (logs[g == "g1"].mean(0) - logs[g == "g0"].mean(0)).reindex(de.index),
                               rtol=1e-4, atol=1e-5)
    # raw statistics from the counts
    X = adata.X.toarray()
    cols = adata.var_names.get_indexer(de.index)
    np.testing.assert_allclose(de["raw_mean1"], X[g == "g1"][:, cols].mean(0), rtol=1e-6)
    np.testing.assert_allclose(de["non_zeros_proportion2"], (X[g == "g0"][:, cols] > 0).mean(0))
    assert (de["comparison"] == "g1 vs g0").all() and (de["n_cells1"] == (g == "g1").sum()).all()
    assert de.attrs["dgdcell_de"]["groupby"] == "group"


def test_rows_rank_by_the_shrunken_fold_change_not_the_raw_one():
    """Two features that differ in every cell pair: A is expressed near the pseudocount (raw LFC ~9, shrunk
    ~2.6), B well above it (LFC ~3.3 either way). B comes first: the ranking uses the fold change the
    pseudocount shrinks, as proba_de does; the reported lfc_mean stays the nearly unshrunk one."""
    from dgdcell._de_statistics import _lfc_statistics, _Sides, _sort

    rng = np.random.default_rng(0)
    a1 = np.column_stack([5e-4 * rng.uniform(0.9, 1.1, 50), 0.04 * rng.uniform(0.9, 1.1, 50)])
    a2 = np.column_stack([1e-6 * rng.uniform(0.9, 1.1, 60), 0.004 * rng.uniform(0.9, 1.1, 60)])
    sides = _Sides(a1, rng.integers(0, 50, 200), a2, rng.integers(0, 60, 200), all_pairs=True)
    stats = _lfc_statistics(sides, 1e-4, 0.25, "change", "three", [])
    frame = pd.DataFrame(stats, index=["A", "B"])
    assert (frame["proba_de"] == 1).all()
    assert frame.loc["A", "lfc_mean"] > 8 > frame.loc["B", "lfc_mean"] > 3
    np.testing.assert_allclose(frame["lfc_shrunk"], np.log2(a1 + 1e-4).mean(0) - np.log2(a2 + 1e-4).mean(0))
    assert list(_sort(frame, "change", np.array([True, True])).index) == ["B", "A"]
    # a flagged feature comes before an unflagged one whatever their fold changes
    assert list(_sort(frame, "change", np.array([True, False])).index) == ["A", "B"]
    # vanilla mode keeps scVI's order: the Bayes factor, then |lfc_mean|
    assert list(_sort(frame, "vanilla").index) == ["A", "B"]


def test_swapping_the_groups_flips_the_lfc(fitted):
    adata, model = fitted
    a = differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
    b = differential_expression(model, adata, groupby="group", group1="g0", group2="g1").reindex(a.index)
    np.testing.assert_allclose(a["scale1"], b["scale2"], rtol=1e-6)
    np.testing.assert_allclose(a["raw_mean1"], b["raw_mean2"])
    assert a["pseudocounts"].iloc[0] == b["pseudocounts"].iloc[0]
    # the MAP path counts all pairs of decoded cells exactly: the swap is exact (up to float rounding)
    np.testing.assert_allclose(a["lfc_mean"], -b["lfc_mean"], atol=1e-9)
    np.testing.assert_allclose(a["lfc_std"], b["lfc_std"], atol=1e-9)
    np.testing.assert_allclose(a["proba_de"], b["proba_de"], atol=1e-9)
    np.testing.assert_allclose(a["lfc_max"], -b["lfc_min"], atol=1e-9)
    # the median comes from sampled pairs: equal up to Monte Carlo error
    np.testing.assert_allclose(a["lfc_median"], -b["lfc_median"], atol=0.15)


def test_default_pseudocount_is_a_tenth_of_a_count_at_the_compared_cells_depth(fitted):
    adata, model = fitted
    de = differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
    cols = adata.var_names.get_indexer(de.index)
    rows = adata.obs["group"].isin(["g0", "g1"]).to_numpy()
    library = np.asarray(adata.X[rows][:, cols].sum(axis=1)).ravel()
    assert de["pseudocounts"].iloc[0] == pytest.approx(0.1 / np.median(library), rel=1e-9)
    # it follows the sequencing depth: the same cells with twice the counts get half the pseudocount
    deeper = adata.copy()
    deeper.X = deeper.X * 2
    de2 = differential_expression(model, deeper, groupby="group", group1="g1", group2="g0")
    assert de2["pseudocounts"].iloc[0] == pytest.approx(de["pseudocounts"].iloc[0] / 2, rel=1e-9)
    # 'quantile': the 0.3 quantile of the features' mean decoded fractions (all cells decoded, both sides pooled)
    q = differential_expression(model, adata, groupby="group", group1="g1", group2="g0", pseudocount="quantile")
    scale = 0.5 * (q["scale1"].to_numpy() + q["scale2"].to_numpy())
    assert q["pseudocounts"].iloc[0] == pytest.approx(np.quantile(scale, 0.3), rel=1e-6)
    # a larger pseudocount shrinks every pair's |LFC|, so no feature's proba_de can rise, and some fall
    big = differential_expression(model, adata, groupby="group", group1="g1", group2="g0",
                                  pseudocount=100 * de["pseudocounts"].iloc[0]).reindex(de.index)
    assert (big["proba_de"] <= de["proba_de"] + 1e-12).all() and (big["proba_de"] < de["proba_de"] - 0.05).any()


def test_deterministic_and_one_vs_rest(fitted):
    adata, model = fitted
    a = differential_expression(model, adata, groupby="group", n_samples=500, seed=3)
    b = differential_expression(model, adata, groupby="group", n_samples=500, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(dict.fromkeys(a["comparison"])) == ["g0 vs Rest", "g1 vs Rest"]
    assert len(a) == 2 * adata.n_vars
    # with two groups, "g1 vs Rest" is "g1 vs g0"
    c = differential_expression(model, adata, groupby="group", group1="g1", group2="g0", n_samples=500, seed=3)
    g1 = a[a["group1"] == "g1"].reindex(c.index)
    np.testing.assert_allclose(g1["scale2"], c["scale2"], rtol=1e-6)
    # a different seed gives different pair samples (for the median; the rest is exact over all pairs)
    d = differential_expression(model, adata, groupby="group", n_samples=500, seed=4)

    def keyed(frame):
        return frame.set_index(["comparison", frame.index]).sort_index()

    a, d = keyed(a), keyed(d)
    assert not np.allclose(d["lfc_median"].to_numpy(), a["lfc_median"].to_numpy())
    np.testing.assert_allclose(d["proba_de"], a["proba_de"])


def test_idx_masks_arrays_and_training_cells(fitted):
    adata, model = fitted
    g = adata.obs["group"].to_numpy()
    ref = differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
    by_mask = differential_expression(model, adata, idx1=g == "g1", idx2=g == "g0").reindex(ref.index)
    np.testing.assert_allclose(by_mask["scale1"], ref["scale1"], rtol=1e-6)
    assert (by_mask["comparison"] == "idx1 vs idx2").all()
    by_names = differential_expression(model, adata, idx1=adata.obs_names[g == "g1"]).reindex(ref.index)
    np.testing.assert_allclose(by_names["scale2"], ref["scale2"], rtol=1e-6)  # rest = g0
    # adata=None: the training cells, labels as an array in model.obs_names order
    labels = adata.obs["group"].reindex(model.obs_names).to_numpy()
    train = differential_expression(model, groupby=labels, group1="g1", group2="g0").reindex(ref.index)
    np.testing.assert_allclose(train["scale1"], ref["scale1"], rtol=1e-5, atol=1e-9)
    assert "raw_mean1" not in train.columns  # no counts without adata
    np.testing.assert_allclose(train["lfc_mean"], ref["lfc_mean"], atol=0.15)
    # a subset of adata: only its cells are used
    sub = adata[adata.obs["batch"] == "b0"]
    part = differential_expression(model, sub, groupby="group", group1="g1", group2="g0")
    assert part["n_cells1"].iloc[0] == int(((g == "g1") & (adata.obs["batch"] == "b0").to_numpy()).sum())


def test_options_vanilla_credible_intervals_transform_batch(fitted):
    adata, model = fitted
    de = differential_expression(model, adata, groupby="group", group1="g1", group2="g0",
                                 cred_interval_lvls=[0.5, 0.9], all_stats=False, pseudocount=1e-4)
    assert "raw_mean1" not in de.columns and (de["pseudocounts"] == 1e-4).all()
    lo9, hi9 = de["lfc_confidence_interval_0.9_min"], de["lfc_confidence_interval_0.9_max"]
    lo5, hi5 = de["lfc_confidence_interval_0.5_min"], de["lfc_confidence_interval_0.5_max"]
    assert ((hi9 - lo9) >= (hi5 - lo5) - 1e-12).all()  # highest-density intervals: the wider level is wider
    assert (de["lfc_min"] <= lo9).all() and (lo9 <= hi9).all() and (hi9 <= de["lfc_max"]).all()
    van = differential_expression(model, adata, groupby="group", group1="g1", group2="g0", mode="vanilla")
    assert {"proba_m1", "proba_m2", "bayes_factor", "lfc_mean"} <= set(van.columns)
    assert not any(c.startswith("is_de_fdr") for c in van.columns)
    assert (np.diff(van["bayes_factor"].to_numpy()) <= 1e-12).all()
    two = differential_expression(model, adata, groupby="group", group1="g1", group2="g0", test_mode="two")
    three = differential_expression(model, adata, groupby="group", group1="g1", group2="g0").reindex(two.index)
    assert (two["proba_de"] >= three["proba_de"] - 1e-12).all()
    # batch-corrected: every cell decoded in b0
    tb = differential_expression(model, adata, groupby="group", group1="g1", group2="g0", transform_batch="b0")
    expr = model.get_normalized_expression(adata, transform_batch="b0")
    g = adata.obs["group"].to_numpy()
    np.testing.assert_allclose(tb["scale1"], expr[g == "g1"].mean(0).reindex(tb.index), rtol=1e-5, atol=1e-9)
    assert tb.attrs["dgdcell_de"]["transform_batch"] == {"batch": "b0"}


def test_subsampling_bounds_the_decoded_cells(fitted):
    adata, model = fitted
    calls = []

    class Spy:
        """Forwards to the model and records how many cells each decoding call gets."""

        features, covariate_categories, obs_names, is_fitted = (model.features, model.covariate_categories,
                                                               model.obs_names, True)

        def get_normalized_expression(self, adata=None, **kw):
            calls.append(adata.n_obs)
            return model.get_normalized_expression(adata, **kw)

    de = differential_expression(Spy(), adata, groupby="group", group1="g1", n_samples=40, batch_size=16)
    assert sum(calls) == 80 and max(calls) <= 16  # 40 cells per side, in batches of 16
    assert len(de) == adata.n_vars


# --------------------------------------------------------------------------- counterfactual mode
def test_counterfactual_is_paired_and_finds_the_batch_genes(fitted):
    adata, model = fitted
    snap = _snapshot(adata)
    de = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0")
    _assert_unchanged(adata, snap)
    assert set(SCVI_COLUMNS) <= set(de.columns)
    assert (de["covariate"] == "batch").all() and (de["population"] == "all").all()
    assert (de["comparison"] == "b1 vs b0").all() and (de["n_cells1"] == adata.n_obs).all()
    # the same cells decoded under each class: scale = mean of get_normalized_expression(transform_batch=...)
    e1 = model.get_normalized_expression(adata, transform_batch={"batch": "b1"})
    e0 = model.get_normalized_expression(adata, transform_batch={"batch": "b0"})
    np.testing.assert_allclose(de["scale1"], e1.mean(0).reindex(de.index), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(de["scale2"], e0.mean(0).reindex(de.index), rtol=1e-5, atol=1e-9)
    # paired: the LFC is taken cell by cell
    eps = 1e-3 * de["pseudocounts"].iloc[0]
    per_cell = np.log2(e1.to_numpy(np.float64) + eps) - np.log2(e0.to_numpy(np.float64) + eps)
    np.testing.assert_allclose(de["lfc_mean"], pd.Series(per_cell.mean(0), index=e1.columns).reindex(de.index),
                               rtol=1e-4, atol=1e-5)
    # raw statistics: the cells observed in each class
    b = adata.obs["batch"].to_numpy()
    cols = adata.var_names.get_indexer(de.index)
    np.testing.assert_allclose(de["raw_mean1"], adata.X.toarray()[b == "b1"][:, cols].mean(0), rtol=1e-6)
    # the genes with a batch effect rank on top, the group DE genes do not
    truth = adata.var["batch_gene"].reindex(de.index).to_numpy()
    assert average_precision(truth, -np.arange(len(de), dtype=float)) >= 0.8
    assert adata.var["de"].reindex(de.index).to_numpy()[: int(truth.sum())].mean() <= 0.2
    # swapping the classes negates the paired LFC exactly (no sampling: all cells decoded)
    sw = differential_expression(model, adata, covariate="batch", group1="b0", group2="b1").reindex(de.index)
    np.testing.assert_allclose(sw["lfc_mean"], -de["lfc_mean"], atol=1e-9)
    np.testing.assert_allclose(sw["proba_de"], de["proba_de"])


def test_counterfactual_within_populations(fitted):
    adata, model = fitted
    de = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0", groupby="group")
    assert list(dict.fromkeys(de["population"])) == ["g0", "g1"]
    assert list(dict.fromkeys(de["comparison"])) == ["b1 vs b0 (g0)", "b1 vs b0 (g1)"]
    one = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0", groupby="group",
                                  restrict_to="g1")
    g1 = de[de["population"] == "g1"].reindex(one.index)
    np.testing.assert_allclose(g1["lfc_mean"], one["lfc_mean"])
    g = adata.obs["group"].to_numpy()
    assert (one["n_cells1"] == (g == "g1").sum()).all()
    e1 = model.get_normalized_expression(adata[g == "g1"], transform_batch="b1")
    np.testing.assert_allclose(one["scale1"], e1.mean(0).reindex(one.index), rtol=1e-5, atol=1e-9)
    assert one.attrs["dgdcell_de"]["mode"] == "counterfactual"


def test_mudata_modalities():
    import dgdcell

    mdata = dgdcell.datasets.cite_cbmc_small()
    model = DGD(latent_dim=3, n_components=3, n_hidden=(16,), n_hidden_head=(16,), seed=0).fit(
        mdata, max_epochs=3, verbose=False)
    group = str(mdata.obs["cell_type"].iloc[0])
    adt = differential_expression(model, mdata, groupby="cell_type", group1=group, modality="adt", n_samples=200)
    assert set(adt.index) == set(model.features["adt"]) and (adt["group2"] == "Rest").all()
    counts = mdata.mod["adt"]
    in_group = (mdata.obs["cell_type"].astype(str) == group).to_numpy()
    X = counts.X.toarray() if sp.issparse(counts.X) else np.asarray(counts.X)
    cols = counts.var_names.get_indexer(adt.index)
    np.testing.assert_allclose(adt["raw_mean1"], X[in_group][:, cols].mean(0), rtol=1e-6)
    rna = differential_expression(model, mdata, groupby="cell_type", group1=group, n_samples=200)
    assert len(rna) == len(model.features["rna"])


# --------------------------------------------------------------------------- sampler hook
def test_sampler_hook_gets_distinct_cells_and_shared_draws(fitted):
    adata, model = fitted
    seen = []
    rng = np.random.default_rng(0)

    def sampler(cells, transform_batches):
        assert cells.obs_names.is_unique and cells.n_obs <= 64
        seen.append((cells.n_obs, len(transform_batches)))
        noise = np.exp(rng.normal(0, 0.01, size=(cells.n_obs, len(model.features["rna"]))))  # one draw per cell
        return [model.get_normalized_expression(cells, transform_batch=tb).to_numpy() * noise
                for tb in transform_batches]

    de = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0", sampler=sampler,
                                 n_samples=300, batch_size=64)
    assert sum(n for n, _ in seen) == 300 and all(k == 2 for _, k in seen)
    ref = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0").reindex(de.index)
    assert np.corrcoef(de["lfc_mean"], ref["lfc_mean"])[0, 1] > 0.99
    assert de.attrs["dgdcell_de"]["posterior"] == "sampler"

    def bad(cells, transform_batches):
        return [np.zeros((cells.n_obs, 3))]

    with pytest.raises(ValueError, match="shape"):
        differential_expression(model, adata, groupby="group", group1="g1", sampler=bad, n_samples=10)
    with pytest.raises(TypeError, match="callable"):
        differential_expression(model, adata, groupby="group", group1="g1", sampler=42)
    with pytest.raises(ValueError, match="adata"):
        differential_expression(model, groupby=np.zeros(adata.n_obs), sampler=sampler)


def test_posterior_models_decode_posterior_draws_by_default():
    """posterior='normal': the default decodes fresh draws of each cell's posterior (scVI's estimates); the draws
    are seeded, 'map' decodes the means, and the draws' spread reaches the statistics."""
    adata = make_de_counts(seed=1)
    model = DGD(latent_dim=5, n_components=3, covariate_keys=["batch"], n_hidden=(32,), n_hidden_head=(32,),
                posterior="normal", seed=0).fit(adata, max_epochs=60, verbose=False)
    assert "X_dgd_std" in adata.obsm
    kw = dict(groupby="group", group1="g1", group2="g0", n_samples=400)
    post = differential_expression(model, adata, **kw)
    assert post.attrs["dgdcell_de"]["posterior"] == "posterior"
    again = differential_expression(model, adata, **kw)
    pd.testing.assert_frame_equal(post, again)
    other = differential_expression(model, adata, seed=3, **kw)
    assert not np.allclose(other["lfc_std"].reindex(post.index), post["lfc_std"])
    point = differential_expression(model, adata, sampler="map", **kw)
    assert point.attrs["dgdcell_de"]["posterior"] == "map (distribution over cells)"
    # the same fold changes on the true DE genes, with the posterior's extra spread in the sampled LFCs
    de = adata.var_names[adata.var["de"].to_numpy()]
    assert np.corrcoef(post.loc[de, "lfc_mean"], point.loc[de, "lfc_mean"])[0, 1] > 0.95
    assert post.loc[de, "lfc_std"].median() > point.loc[de, "lfc_std"].median()
    # the draws themselves: one per cell, around the stored means with the stored spread
    cells = adata[:50]
    draws = model.posterior_sampler(seed=0)(cells, [None, None])
    assert len(draws) == 2 and np.array_equal(draws[0], draws[1])  # one draw, shared by the settings
    mean = model.get_normalized_expression(cells).to_numpy()
    assert not np.allclose(draws[0], mean) and np.allclose(draws[0].sum(1), 1.0, atol=1e-4)
    # counterfactual: both decodings replace the batch representation, so the cells need not store it
    bare = adata.copy()
    del bare.obsm["X_dgd_batch"]
    cf = differential_expression(model, bare, covariate="batch", group1="b1", group2="b0", n_samples=200)
    assert cf.attrs["dgdcell_de"]["posterior"] == "posterior" and np.isfinite(cf["lfc_mean"]).all()
    with pytest.raises(ValueError, match="posterior='normal'"):
        differential_expression(_map_model(), adata, sampler="posterior", **kw)
    with pytest.raises(TypeError, match="'posterior', 'map' or a callable"):
        differential_expression(model, adata, sampler="normal", **kw)


def _map_model():
    adata = make_de_counts(seed=2)
    return DGD(latent_dim=3, n_components=2, n_hidden=(8,), n_hidden_head=(8,), seed=0).fit(
        adata, max_epochs=2, verbose=False)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(groupby="nope"), KeyError, "groupby 'nope'"),
        (dict(groupby="group", group1="g7"), KeyError, "group1 'g7'"),
        (dict(groupby="group", group1="g1", group2="g9"), KeyError, "group2 'g9'"),
        (dict(groupby="group", group1="g1", group2="g1"), ValueError, "same group"),
        (dict(groupby="group", group1=[]), ValueError, "empty list"),
        (dict(groupby="group", delta=0), ValueError, "delta"),
        (dict(groupby="group", delta=-1.0), ValueError, "delta"),
        (dict(groupby="group", delta=float("nan")), ValueError, "delta"),
        (dict(groupby="group", fdr_target=1.5), ValueError, "fdr_target"),
        (dict(groupby="group", n_samples=1), ValueError, "n_samples"),
        (dict(groupby="group", batch_size=0), ValueError, "batch_size"),
        (dict(groupby="group", mode="bayes"), ValueError, "mode"),
        (dict(groupby="group", test_mode="one"), ValueError, "test_mode"),
        (dict(groupby="group", pseudocount=-1), ValueError, "pseudocount"),
        (dict(groupby="group", pseudocount="big"), ValueError, "pseudocount"),
        (dict(groupby="group", cred_interval_lvls=[1.2]), ValueError, "cred_interval_lvls"),
        (dict(groupby="group", modality="adt"), KeyError, "modality 'adt'"),
        (dict(groupby="group", transform_batch="b5"), KeyError, "transform_batch"),
        (dict(groupby="group", transform_batch={"donor": "d1"}), KeyError, "covariate"),
        (dict(groupby="group", layer="counts"), KeyError, "layer 'counts'"),
        (dict(groupby="group", restrict_to="g1"), ValueError, "restrict_to"),
        (dict(groupby="group", idx1=[0, 1]), ValueError, "not both"),
        (dict(), ValueError, "groupby"),
        (dict(group1="g1"), ValueError, "groupby"),
        (dict(idx1=np.zeros(240, dtype=bool)), ValueError, "idx1 selects no cells"),
        (dict(idx1=np.ones(5, dtype=bool)), ValueError, "one value per cell"),
        (dict(idx1=["cell0", "nocell"]), KeyError, "idx1"),
        (dict(idx1=np.arange(240)), ValueError, "rest"),
        (dict(idx1=[0, 999]), ValueError, "positions"),
        (dict(groupby=np.array(["a"] * 10)), ValueError, "one label per cell"),
        (dict(covariate="donor", group1="a", group2="b"), KeyError, "covariate 'donor'"),
        (dict(covariate="batch", group1="b1", group2="b9"), KeyError, "group2 'b9'"),
        (dict(covariate="batch", group1="b1"), ValueError, "group2"),
        (dict(covariate="batch", group1="b1", group2="b1"), ValueError, "same class"),
        (dict(covariate="batch", group1=["b1"], group2="b0"), ValueError, "one class name"),
        (dict(covariate="batch", group1="b1", group2="b0", transform_batch="b1"), ValueError, "transform_batch"),
        (dict(covariate="batch", group1="b1", group2="b0", idx1=[0]), ValueError, "idx1"),
        (dict(covariate="batch", group1="b1", group2="b0", restrict_to="g1"), ValueError, "restrict_to needs groupby"),
        (dict(covariate="batch", group1="b1", group2="b0", groupby="group", restrict_to="g5"), KeyError, "restrict_to 'g5'"),
    ],
)
def test_invalid_arguments_name_the_fix(fitted, kwargs, exc, match):
    adata, model = fitted
    snap = _snapshot(adata)
    with pytest.raises(exc, match=match):
        differential_expression(model, adata, **kwargs)
    _assert_unchanged(adata, snap)


def test_invalid_inputs_beyond_arguments(fitted):
    adata, model = fitted
    with pytest.raises(ValueError, match="not fitted"):
        differential_expression(DGD(latent_dim=3), adata, groupby="group")
    with pytest.raises(TypeError, match="DGD"):
        differential_expression(object(), adata, groupby="group")
    with pytest.raises(KeyError, match="X_other"):
        differential_expression(model, adata, groupby="group", key="other")
    with pytest.raises(ValueError, match="pass adata"):
        differential_expression(model, groupby="group")
    empty = adata.copy()
    empty.obs["group"] = empty.obs["group"].cat.add_categories(["unused"])
    with pytest.raises(ValueError, match="no cells"):
        differential_expression(model, empty, groupby="group", group1="unused")
    one = adata.copy()
    one.obs["one"] = pd.Categorical(["x"] * one.n_obs)
    with pytest.raises(ValueError, match="single group"):
        differential_expression(model, one, groupby="one")
    with pytest.raises(ValueError, match="single group"):
        differential_expression(model, one, groupby="one", group1="x")


def test_fdr_procedure():
    p = pd.Series([0.99, 0.2, 0.97, 0.9, 0.5], index=list("abcde"))
    # sorted: a .99, c .97, d .9, e .5, b .2 -> mean(1-p) .01, .02, .0467, .16, .288
    np.testing.assert_array_equal(fdr_de_prediction(p, fdr=0.05).to_numpy(), [True, False, True, True, False])
    np.testing.assert_array_equal(fdr_de_prediction(p, fdr=0.015).to_numpy(), [True, False, False, False, False])
    assert not fdr_de_prediction(np.array([0.1, 0.2]), fdr=0.05).any()


# --------------------------------------------------------------------------- plots
def test_volcano(fitted, tmp_path):
    adata, model = fitted
    de = differential_expression(model, adata, groupby="group", group1="g1", group2="g0")
    fig = pl.volcano(de, n_labels=5, save=tmp_path / "v.png")
    assert isinstance(fig, Figure) and (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == list(de.index[:5])
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == len(de)
    fig = pl.volcano(de, y="proba_de", labels=["gene0", "gene1"])
    assert {t.get_text() for t in fig.axes[0].texts} == {"gene0", "gene1"}
    both = differential_expression(model, adata, groupby="group", n_samples=300)
    with pytest.raises(ValueError, match="comparison="):
        pl.volcano(both)
    assert isinstance(pl.volcano(both, comparison="g0 vs Rest"), Figure)
    with pytest.raises(KeyError, match="comparison"):
        pl.volcano(both, comparison="x vs y")
    with pytest.raises(KeyError, match="nope"):
        pl.volcano(de, y="nope")
    fig, ax = plt.subplots()
    assert pl.volcano(de, ax=ax) is fig
    plt.close(fig)


def test_de_heatmap(fitted, tmp_path):
    adata, model = fitted
    de = differential_expression(model, adata, groupby="group", n_samples=500)
    fig = pl.de_heatmap(model, adata, de, n_top=4, save=tmp_path / "h.png")
    assert isinstance(fig, Figure) and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (2, 8)  # groups x (4 features per group)
    np.testing.assert_allclose(np.asarray(image).mean(axis=0), 0.0, atol=1e-9)  # z-scored per feature
    shown = [t.get_text() for t in ax.get_xticklabels()]
    up0 = de[(de["group1"] == "g0") & (de["lfc_mean"] > 0)].index[:4].tolist()
    assert shown[:4] == up0
    # each group's markers are highest in that group
    assert (np.asarray(image)[0, :4] > 0).all() and (np.asarray(image)[1, 4:] > 0).all()
    fig = pl.de_heatmap(model, adata, groupby="group", n_top=3, cells_per_group=20, direction="both")
    assert fig.axes[0].images[0].get_array().shape == (40, 6)
    with pytest.raises(ValueError, match="direction"):
        pl.de_heatmap(model, adata, de, direction="sideways")
    cf = differential_expression(model, adata, covariate="batch", group1="b1", group2="b0")
    with pytest.raises(ValueError, match="counterfactual"):
        pl.de_heatmap(model, adata, cf)
    with pytest.raises(ValueError, match="groupby"):
        pl.de_heatmap(model, adata, de.drop(columns=[]).set_axis(de.index).copy().pipe(
            lambda d: (d.attrs.clear(), d)[1]))
