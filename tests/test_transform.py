"""DGD.transform (new cells against the frozen model) and get_normalized_expression."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from dgdcell import DGD
from dgdcell.data import align_features, read_new_anndata
from dgdcell.train import candidate_scores, candidate_starts, frozen, top_candidates

from .conftest import make_counts

FAST = dict(max_epochs=40, verbose=False)
QUIET = dict(verbose=False)


def _split(adata, frac_new, seed=0):
    rng = np.random.default_rng(seed)
    new = np.zeros(adata.n_obs, dtype=bool)
    new[rng.choice(adata.n_obs, int(frac_new * adata.n_obs), replace=False)] = True
    return adata[~new].copy(), adata[new].copy()


@pytest.fixture(scope="module")
def trained():
    """A model fitted on 75% of generated cells, and the other 25% as new cells."""
    train, new = _split(make_counts(n_per_group=(100, 80, 60), seed=3), 0.25)
    model = DGD(latent_dim=5, n_components=3, seed=0).fit(train, **FAST)
    return model, train, new


@pytest.fixture(scope="module")
def trained_batches():
    train = make_counts(n_per_group=(70, 60, 50), n_batches=2, batch_effect=0.5, seed=1)
    model = DGD(latent_dim=4, n_components=3, covariate_keys=["batch"], seed=0).fit(train, **FAST)
    return model, train


def _snapshot(adata):
    return (adata.X.copy(), adata.obs.copy(), {k: np.array(v) for k, v in adata.obsm.items()},
            set(adata.uns.keys()), set(adata.layers.keys()), adata.var_names.copy())


def _assert_unchanged(adata, snap):
    X, obs, obsm, uns, layers, var_names = snap
    assert (adata.X != X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm.keys()) == set(obsm) and all(np.array_equal(adata.obsm[k], v) for k, v in obsm.items())
    assert set(adata.uns.keys()) == uns and set(adata.layers.keys()) == layers
    assert list(adata.var_names) == list(var_names)


# ----------------------------------------------------------------- alignment


def test_align_features_orders_subsets_and_rejects_low_overlap():
    a = align_features(["g2", "x", "g0", "g3"], ["g0", "g1", "g2", "g3"])
    np.testing.assert_array_equal(a.feature_index, [0, 2, 3])  # training order
    np.testing.assert_array_equal(a.columns, [2, 0, 3])  # where they sit in the new data
    assert (a.n_shared, a.n_missing, a.n_extra, a.complete) == (3, 1, 1, False)
    with pytest.raises(ValueError, match=r"only 1 of the model's 4 rna features"):
        align_features(["g0", "x", "y"], ["g0", "g1", "g2", "g3"])
    with pytest.raises(ValueError, match="more than once"):
        align_features(["g0", "g0", "g1"], ["g0", "g1"])


# ----------------------------------------------------------------- transform quality


def test_training_cells_land_near_their_training_representations(trained):
    model, train, _ = trained
    again = train.copy()
    model.transform(again, **QUIET)
    z0, z1 = train.obsm["X_dgd"], again.obsm["X_dgd"]
    spread = np.median(np.linalg.norm(z0 - z0.mean(0), axis=1))
    assert np.median(np.linalg.norm(z1 - z0, axis=1)) < 0.1 * spread
    assert (again.obs["dgd_cluster"].to_numpy() == train.obs["dgd_cluster"].to_numpy()).mean() > 0.95


def test_new_cells_cluster_like_the_truth_and_outputs_match_fit(trained):
    model, train, new = trained
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    gmm_before = {k: v.clone() for k, v in model.gmm.state_dict().items()}
    rep_before = model.representation.clone()
    flags = [p.requires_grad for p in model.gmm.parameters()]
    assert model.transform(new, **QUIET) is model
    assert adjusted_rand_score(new.obs["group"], new.obs["dgd_cluster"]) > 0.9
    # same keys as fit
    assert new.obsm["X_dgd"].shape == (new.n_obs, 5) and new.obsm["X_dgd"].dtype == np.float32
    probs = new.obsm["X_dgd_cluster_probs"]
    assert probs.shape == (new.n_obs, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert isinstance(new.obs["dgd_cluster"].dtype, pd.CategoricalDtype)
    assert list(new.obs["dgd_cluster"].cat.categories) == ["0", "1", "2"]
    rec = new.uns["dgd"]["transform"]
    assert rec["n_obs"] == new.n_obs and rec["features"]["rna"]["n_missing"] == 0 and rec["n_epochs"] >= 1
    # the model is untouched
    for k, v in model.decoder.state_dict().items():
        torch.testing.assert_close(v, decoder_before[k], rtol=0, atol=0)
    for k, v in model.gmm.state_dict().items():
        torch.testing.assert_close(v, gmm_before[k], rtol=0, atol=0)
    torch.testing.assert_close(model.representation, rep_before, rtol=0, atol=0)
    assert [p.requires_grad for p in model.gmm.parameters()] == flags
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_writes_only_the_documented_keys_and_round_trips_h5ad(trained, tmp_path):
    model, _, new = trained
    new = new.copy()
    before = (set(new.obs.columns), set(new.obsm), set(new.uns), set(new.layers))
    model.transform(new, key_added="q", **QUIET)
    assert set(new.obs.columns) - before[0] == {"q_cluster"}
    assert set(new.obsm) - before[1] == {"X_q", "X_q_cluster_probs"}
    assert set(new.uns) - before[2] == {"q"} and set(new.layers) == before[3]
    new.write_h5ad(tmp_path / "new.h5ad")
    back = ad.read_h5ad(tmp_path / "new.h5ad")
    np.testing.assert_array_equal(back.obsm["X_q"], new.obsm["X_q"])
    assert back.uns["q"]["transform"]["n_obs"] == new.n_obs


@pytest.mark.parametrize("init", ["mean", "sample"])
def test_repeated_calls_are_identical(trained, init):
    model, _, new = trained
    a, b = new.copy(), new.copy()
    model.transform(a, init=init, seed=3, **QUIET)
    model.transform(b, init=init, seed=3, **QUIET)
    np.testing.assert_array_equal(a.obsm["X_dgd"], b.obsm["X_dgd"])
    np.testing.assert_array_equal(a.obs["dgd_cluster"], b.obs["dgd_cluster"])


def test_shuffled_feature_order_gives_the_same_result(trained):
    model, _, new = trained
    a = new.copy()
    perm = np.random.default_rng(0).permutation(new.n_vars)
    b = new[:, perm].copy()
    model.transform(a, **QUIET)
    model.transform(b, **QUIET)
    np.testing.assert_allclose(a.obsm["X_dgd"], b.obsm["X_dgd"], rtol=0, atol=1e-6)


def test_missing_features_still_work_and_extra_features_are_ignored(trained):
    model, _, new = trained
    full = new.copy()
    model.transform(full, **QUIET)
    keep = np.sort(np.random.default_rng(1).choice(new.n_vars, int(0.7 * new.n_vars), replace=False))
    part = new[:, keep].copy()
    extra = ad.AnnData(sp.random(part.n_obs, 5, density=0.5, format="csr", random_state=0, dtype=np.float32),
                       obs=part.obs.copy(), var=pd.DataFrame(index=[f"extra{i}" for i in range(5)]))
    extra.X.data = np.ceil(extra.X.data * 10)
    part = ad.concat([part, extra], axis=1, merge="first")
    model.transform(part, **QUIET)
    rec = part.uns["dgd"]["transform"]["features"]["rna"]
    assert (rec["n_shared"], rec["n_missing"], rec["n_extra"]) == (len(keep), new.n_vars - len(keep), 5)
    assert adjusted_rand_score(part.obs["group"], part.obs["dgd_cluster"]) > 0.9
    assert adjusted_rand_score(full.obs["dgd_cluster"], part.obs["dgd_cluster"]) > 0.9


def test_low_overlap_and_bad_input_fail_and_leave_adata_unchanged(trained):
    model, _, new = trained
    low = new[:, : int(0.4 * new.n_vars)].copy()
    snap = _snapshot(low)
    with pytest.raises(ValueError, match=r"only 24 of the model.s 60 rna features \(40.00%\).*at least 50% \(30\)"):
        model.transform(low, **QUIET)
    _assert_unchanged(low, snap)
    # a cell with counts only in features the model lacks: empty after alignment
    odd = new.copy()
    odd.var_names = [f"new{i}" if i >= 40 else v for i, v in enumerate(odd.var_names)]
    X = odd.X.toarray()
    X[0, :40] = 0
    X[0, 45] = 3
    odd.X = sp.csr_matrix(X)
    snap = _snapshot(odd)
    with pytest.raises(ValueError, match="1 cells have no counts in the 40 rna features shared"):
        model.transform(odd, **QUIET)
    _assert_unchanged(odd, snap)
    half = new.copy()
    half.X = half.X * 0.5
    snap = _snapshot(half)
    with pytest.raises(ValueError, match="non-integer"):
        model.transform(half, **QUIET)
    _assert_unchanged(half, snap)
    with pytest.raises(ValueError, match="init"):
        model.transform(new.copy(), init="median", **QUIET)


def test_failure_during_optimisation_leaves_adata_and_model_unchanged(trained, monkeypatch):
    model, _, new = trained
    new = new.copy()
    snap = _snapshot(new)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("dgdcell.train.new_cells.optimise_starts", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.transform(new, **QUIET)
    _assert_unchanged(new, snap)
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_frozen_restores_flags_on_error():
    lin = torch.nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    with pytest.raises(KeyError):
        with frozen(lin):
            assert not lin.weight.requires_grad
            raise KeyError("x")
    assert lin.weight.requires_grad and not lin.bias.requires_grad


# ----------------------------------------------------------------- covariates


def test_known_unseen_and_missing_batches(trained_batches):
    model, train = trained_batches
    new = make_counts(n_per_group=(30, 30, 30), n_batches=2, batch_effect=0.5, seed=1)
    new.obs_names = [f"new{i}" for i in range(new.n_obs)]
    known = new.copy()
    model.transform(known, **QUIET)
    assert known.obsm["X_dgd_batch"].shape == (known.n_obs, 2)
    # a known class starts at (and stays near) its own component
    cls = model.cov_gmms["batch"].clustering(torch.as_tensor(known.obsm["X_dgd_batch"])).numpy()
    assert (cls == known.obs["batch"].cat.codes.to_numpy()).all()
    assert adjusted_rand_score(known.obs["group"], known.obs["dgd_cluster"]) > 0.9

    unseen = new.copy()
    unseen.obs["batch"] = pd.Categorical(np.where(new.obs["batch"] == "b0", "b_new", "b1"))
    model.transform(unseen, **QUIET)
    assert unseen.uns["dgd"]["transform"]["unseen_classes"] == {"batch": ["b_new"]}
    assert adjusted_rand_score(unseen.obs["group"], unseen.obs["dgd_cluster"]) > 0.9

    missing = new.copy()
    del missing.obs["batch"]
    model.transform(missing, **QUIET)
    assert list(missing.uns["dgd"]["transform"]["missing_covariates"]) == ["batch"]
    assert adjusted_rand_score(missing.obs["group"], missing.obs["dgd_cluster"]) > 0.9
    assert model.covariate_categories == {"batch": ["b0", "b1"]}


# ----------------------------------------------------------------- candidate scoring


def _cells(model, adata):
    from dgdcell._query import _new_cell_set

    return _new_cell_set(model, read_new_anndata(adata, model.features, covariate_categories=model.covariate_categories))


def test_candidate_scores_equal_the_training_objective(trained_batches):
    model, train = trained_batches
    new = train[:50].copy()
    new.obs["batch"] = new.obs["batch"].astype(str)
    new.obs.loc[new.obs_names[:10], "batch"] = "unseen"
    cells = _cells(model, new)
    covs = dict(model.cov_gmms)
    cand = candidate_starts(model.gmm, covs, "sample", 2, torch.Generator().manual_seed(0))
    assert cand.n == 3 * 2 * 2
    with frozen(model.module), torch.no_grad():
        exact = candidate_scores(model.module, cells, cand, n_grid=None)
        grid = candidate_scores(model.module, cells, cand, n_grid=8)  # 50 cells > 2 x 8
        for c in range(cand.n):
            cells.rep.z.copy_(cand.z[c].expand_as(cells.rep.z))
            cells.cov_reps["batch"].z.copy_(cand.cov["batch"][c].expand_as(cells.cov_reps["batch"].z))
            per_cell = model.module.loss(cells.minibatch(torch.arange(cells.n)), 0.0).per_cell
            ok = torch.isfinite(exact[:, c])
            torch.testing.assert_close(exact[ok, c], per_cell[ok], rtol=1e-5, atol=1e-2)
    codes = cells.cov_codes["batch"]
    cand_class = model.cov_gmms["batch"].component_class[cand.cov_component["batch"]]
    admissible = (codes.unsqueeze(1) < 0) | (codes.unsqueeze(1) == cand_class)
    assert torch.equal(torch.isfinite(exact), admissible)  # known classes only see their own component
    torch.testing.assert_close(grid[admissible], exact[admissible], rtol=1e-5, atol=1e-2)


def test_chunking_gives_the_same_candidates(trained):
    model, _, new = trained
    cells = _cells(model, new)
    cand = candidate_starts(model.gmm, {}, "sample", 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        big_idx, big_score = top_candidates(model.module, cells, cand, k=2)
        small_idx, small_score = top_candidates(model.module, cells, cand, k=2, max_elements=100)
        full = candidate_scores(model.module, cells, cand)
    torch.testing.assert_close(small_idx, big_idx, rtol=0, atol=0)
    torch.testing.assert_close(small_score, big_score, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(big_idx, torch.sort(full, dim=1, stable=True).indices[:, :2], rtol=0, atol=0)


# ----------------------------------------------------------------- normalized expression


def test_normalized_expression(trained, trained_batches):
    model, train, new = trained
    frac = model.get_normalized_expression()
    assert frac.shape == (train.n_obs, train.n_vars) and list(frac.columns) == list(train.var_names)
    assert list(frac.index) == list(train.obs_names)
    np.testing.assert_allclose(frac.sum(1), 1.0, rtol=1e-5)
    new = new.copy()
    model.transform(new, **QUIET)
    counts = model.get_normalized_expression(new, library_size=1e4, batch_size=7)
    np.testing.assert_allclose(counts.sum(1), 1e4, rtol=1e-4)
    own = model.get_normalized_expression(new, library_size="latent")
    np.testing.assert_allclose(own.sum(1), np.asarray(new.X.sum(1)).ravel(), rtol=1e-4)
    with pytest.raises(KeyError, match="X_other"):
        model.get_normalized_expression(new, key="other")
    with pytest.raises(ValueError, match="latent"):
        model.get_normalized_expression(library_size="latent")

    bmodel, btrain = trained_batches
    e0 = bmodel.get_normalized_expression(btrain, transform_batch="b0")
    e1 = bmodel.get_normalized_expression(btrain, transform_batch={"batch": "b1"})
    np.testing.assert_allclose(e0.sum(1), 1.0, rtol=1e-5)
    assert not np.allclose(e0.to_numpy(), e1.to_numpy())
    with pytest.raises(KeyError, match="b7"):
        bmodel.get_normalized_expression(btrain, transform_batch="b7")


def test_loaded_model_transforms_identically(trained, tmp_path):
    model, _, new = trained
    model.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m", device="cpu")
    a, b = new.copy(), new.copy()
    model.transform(a, **QUIET)
    loaded.transform(b, **QUIET)
    np.testing.assert_array_equal(a.obsm["X_dgd"], b.obsm["X_dgd"])


def test_semi_supervised_model_treats_new_cells_as_unlabelled():
    train, new = _split(make_counts(seed=4), 0.25)
    train.obs["label"] = train.obs["group"].astype(object)
    train.obs.loc[train.obs_names[::2], "label"] = np.nan
    model = DGD(latent_dim=4, label_key="label", seed=0).fit(train, max_epochs=20, verbose=False)
    model.transform(new, **QUIET)  # new has no "label" column: not needed
    truth = new.obs["group"].cat.codes.to_numpy()
    assert (new.obs["dgd_cluster"].cat.codes.to_numpy() == truth).mean() > 0.9


def test_nb_mu_terms_plus_constant_is_the_sparse_log_likelihood():
    # the NB's terms (shared by the likelihood and the candidate scoring) add up to the sparse log-likelihood
    import torch.nn.functional as F

    from dgdcell.nn import nb_log_prob_sparse
    from dgdcell.nn.likelihoods import nb_count_term, nb_zero_term

    def nb_log_prob_sparse_mu_terms(log_mu, log_r, flat, rows, vals):
        a = log_mu - log_r
        return nb_zero_term(F.softplus(a), log_r.exp()).index_add(0, rows, nb_count_term(a.reshape(-1)[flat], vals))

    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(6, 9, generator=g) * 5, generator=g)
    log_mu, log_r = torch.randn(6, 9, generator=g), torch.randn(9, generator=g)
    rows, cols = x.nonzero(as_tuple=True)
    flat, vals = rows * 9 + cols, x[rows, cols]
    r = log_r.exp()[cols].double()
    const = torch.zeros(6, dtype=torch.float64).index_add_(
        0, rows, torch.lgamma(vals.double() + r) - torch.lgamma(r) - torch.lgamma(vals.double() + 1))
    full = nb_log_prob_sparse(log_mu, log_r, flat, rows, vals)
    torch.testing.assert_close(nb_log_prob_sparse_mu_terms(log_mu, log_r, flat, rows, vals) + const.float(), full)


def test_reference_starts_join_the_candidates_with_their_components(trained):
    model, train, _ = trained
    ref = model.representation[:7]
    cand = candidate_starts(model.gmm, {}, "mean", 1, reference=ref)
    k = model.gmm.n_mix_comp
    assert cand.n == k + 7
    torch.testing.assert_close(cand.z[k:], ref)
    torch.testing.assert_close(cand.component[k:], model.gmm.clustering(ref))


def test_transform_starts_from_training_cells_and_finds_lower_losses(trained):
    model, train, new = trained
    with_ref, without = new.copy(), new.copy()
    model.transform(with_ref, **QUIET)
    model.transform(without, n_reference=0, **QUIET)
    rec, rec0 = with_ref.uns["dgd"]["transform"], without.uns["dgd"]["transform"]
    k = model.gmm.n_mix_comp
    assert rec0["n_candidates"] == k and rec0["n_reference"] == 0
    n_ref = min(model.representation.shape[0], 500)
    assert rec["n_candidates"] == k + n_ref and len(rec["reference_rows"]) == n_ref
    assert len(rec0["reference_rows"]) == 0
    # more starts, each cell keeps its best: the loss found is no worse
    assert rec["history"]["loss"][-1] <= rec0["history"]["loss"][-1] + 1e-3
    # re-embedded training cells keep fit's clusters at least as often
    again, again0 = train.copy(), train.copy()
    model.transform(again, **QUIET)
    model.transform(again0, n_reference=0, **QUIET)
    fitted = train.obs["dgd_cluster"].to_numpy()
    agree = (again.obs["dgd_cluster"].to_numpy() == fitted).mean()
    assert agree >= (again0.obs["dgd_cluster"].to_numpy() == fitted).mean() and agree > 0.9
    with pytest.raises(ValueError, match="n_reference"):
        model.transform(new.copy(), n_reference=-1, **QUIET)


def test_reference_starts_are_shared_among_covariate_classes(trained_batches):
    model, train = trained_batches
    query = train[:40].copy()
    model.transform(query, n_reference=30, **QUIET)
    combos = int(np.prod([g.n_mix_comp for g in model.cov_gmms.values()]))
    n_ref = max(1, 30 // combos)
    assert query.uns["dgd"]["transform"]["n_candidates"] == (model.gmm.n_mix_comp + n_ref) * combos
