import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from dgdcell.latent import GaussianMixture
from dgdcell.train.initialisation import (
    graph_clusters,
    harmonise,
    init_mixture,
    init_mixture_from_labels,
    kmeans,
    knn_graph,
    log_normalise,
    medoid_partition,
    pca_scores,
    ward_merge,
)

from .conftest import make_counts


def blobs(n_per=(60, 50, 40, 30), dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(len(n_per), dim))
    truth = np.repeat(np.arange(len(n_per)), n_per)
    return (centres[truth] + rng.normal(0, 0.5, size=(truth.size, dim))).astype(np.float32), truth


def test_log_normalise_keeps_sparsity_and_values():
    X = sp.csr_matrix(np.array([[0, 2, 2], [1, 0, 3]], dtype=np.float32))
    lib = np.asarray(X.sum(1)).ravel()
    out = log_normalise(X, lib, target_sum=10)
    np.testing.assert_allclose(out.toarray(), np.log1p(10 * X.toarray() / lib[:, None]), rtol=1e-6)
    assert out.nnz == X.nnz


def test_pca_scores_separate_groups_and_are_deterministic():
    a = make_counts()
    X = a.X.tocsr()
    lib = np.asarray(X.sum(1)).ravel()
    s1 = pca_scores([X], [lib], 4, generator=torch.Generator().manual_seed(0))
    s2 = pca_scores([X], [lib], 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(s1, s2)
    assert s1.shape == (a.n_obs, 4)
    assert abs(s1[:, 0].std() - 1.0) < 1e-4
    labels = kmeans(torch.from_numpy(s1), 3, generator=torch.Generator().manual_seed(0))
    assign = torch.cdist(torch.from_numpy(s1), labels).argmin(1).numpy()
    assert adjusted_rand_score(a.obs["group"], assign) > 0.95


def test_knn_graph_is_exact():
    z = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    src, tgt = knn_graph(z, 1, chunk=2)
    np.testing.assert_array_equal(src, [0, 1, 2, 3])
    np.testing.assert_array_equal(tgt, [1, 0, 3, 2])


def test_graph_clusters_find_k_blobs():
    z, truth = blobs()
    labels = graph_clusters(z, 4, n_neighbors=10)
    assert labels.shape == truth.shape and set(labels) == {0, 1, 2, 3}
    assert adjusted_rand_score(truth, labels) > 0.95
    # a subsample fit labels every cell
    labels_sub = graph_clusters(z, 4, n_neighbors=10, n_fit=100)
    assert adjusted_rand_score(truth, labels_sub) > 0.95
    np.testing.assert_array_equal(labels, graph_clusters(z, 4, n_neighbors=10))


def test_ward_merge_joins_the_pair_that_raises_the_sum_of_squares_least():
    # 1-D clusters: {0: 10 points at 0}, {1: 10 at 1}, {2: 100 at 1.2}, {3: 10 at 10}
    z = np.concatenate([np.zeros(10), np.ones(10), np.full(100, 1.2), np.full(10, 10.0)])[:, None]
    labels = np.repeat([0, 1, 2, 3], [10, 10, 100, 10])
    # Ward: 0+1 costs 5 * 1^2 = 5, 1+2 costs 9.1 * 0.2^2 = 0.36: the small piece joins the big cluster
    # next to it, not its nearer-in-size neighbour
    np.testing.assert_array_equal(ward_merge(z, labels, 3), np.repeat([0, 1, 1, 2], [10, 10, 100, 10]))
    # brute force: every merge of two clusters, the within-cluster sum of squares after it
    def wss(lab):
        return sum(((z[lab == k] - z[lab == k].mean(0)) ** 2).sum() for k in np.unique(lab))
    best = min(((wss(np.where(labels == b, a, labels)), a, b) for a in range(4) for b in range(a + 1, 4)))
    assert wss(ward_merge(z, labels, 3)) == pytest.approx(best[0])
    assert ward_merge(z, labels, 4).tolist() == labels.tolist() and set(ward_merge(z, labels, 1)) == {0}
    # codes with gaps (an empty cluster) come back as 0..n_clusters-1
    assert set(ward_merge(z, labels * 2, 2)) == {0, 1}


def test_graph_clusters_join_pieces_that_leiden_cannot_merge():
    # three groups; one is cut into two pieces (a batch effect) far enough apart that the 10-NN graph has four
    # connected pieces, so Leiden cannot find K = 3. The smaller piece lies nearer to another group's centre
    # than to its sibling's: dropping it and sending its cells to the nearest kept centre joins it to the
    # wrong group; Ward's criterion joins the two pieces.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [6.5, 3.0], [5.0, -4.0]])
    sizes = [300, 300, 70, 60]
    truth = np.repeat([0, 1, 2, 2], sizes)
    z = (np.repeat(centres, sizes, axis=0) + rng.normal(0, 0.3, size=(sum(sizes), 2))).astype(np.float32)
    labels = graph_clusters(z, 3, n_neighbors=10)
    assert set(labels) == {0, 1, 2}
    assert adjusted_rand_score(truth, labels) == 1.0


def test_medoid_partition_keeps_the_clustering_the_others_agree_with():
    a = np.repeat([0, 1, 2], 20)
    relabelled = np.repeat([2, 0, 1], 20)  # the same partition under other names
    close = a.copy()
    close[:3] = 1  # three points moved
    outlier = np.tile([0, 1, 2], 20)  # unrelated to the others
    # a and its relabelled copy agree with each other and with close: the consensus is one of them, the
    # first in the list
    assert medoid_partition([outlier, close, relabelled, a]) == 2
    assert medoid_partition([close, outlier, a, relabelled]) == 2
    assert medoid_partition([outlier]) == 0


def test_graph_clusters_consensus_is_stable_across_seeds():
    # six overlapping groups asked for K = 4: single Leiden runs merge different pairs with different seeds
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(6), [80, 70, 60, 60, 50, 40])
    z = (rng.normal(0, 2.5, size=(6, 4))[truth] + rng.normal(0, 1.0, size=(truth.size, 4))).astype(np.float32)

    def spread(n_restarts):
        parts = [graph_clusters(z, 4, n_neighbors=10, seed=s, n_restarts=n_restarts) for s in range(8)]
        return np.mean([adjusted_rand_score(parts[i], parts[j]) for i in range(8) for j in range(i + 1, 8)])

    single, consensus = spread(1), spread(10)
    assert single < 0.9  # the single runs do disagree here
    assert consensus > 0.98 and consensus > single
    with pytest.raises(ValueError, match="n_restarts"):
        graph_clusters(z, 4, n_restarts=0)


def test_init_mixture_from_labels_and_em():
    z, truth = blobs()
    zt = torch.from_numpy(z)
    for cov in ["diagonal", "isotropic", "fixed"]:
        g = GaussianMixture(4, 5, cov)
        init_mixture_from_labels(g, zt, torch.from_numpy(truth))
        for k in range(4):
            torch.testing.assert_close(g.mean[k], zt[truth == k].mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.mixture_probs(), torch.tensor([60, 50, 40, 30]) / 180.0, rtol=1e-4, atol=1e-5)
        assert adjusted_rand_score(truth, g.clustering(zt).numpy()) > 0.99
        g2 = GaussianMixture(4, 5, cov)
        init_mixture(g2, zt, generator=torch.Generator().manual_seed(0))
        assert adjusted_rand_score(truth, g2.clustering(zt).numpy()) > 0.95


def test_knn_graph_balanced_across_groups():
    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(20, 1, (30, 3))]).astype(np.float32)
    groups = np.repeat([0, 1], [40, 30])
    src, tgt = knn_graph(z, 6)
    assert (groups[src] == groups[tgt]).all()  # the plain graph never crosses the gap between the groups
    src, tgt = knn_graph(z, 6, groups=groups)
    assert (src != tgt).all()
    for g in (0, 1):  # every point has ceil(6 / 2) = 3 neighbours in each group
        np.testing.assert_array_equal(np.bincount(src[groups[tgt] == g], minlength=70), np.full(70, 3))


def test_graph_clusters_with_groups_follow_what_the_groups_share():
    # two cell types (apart along axis 0) measured in two batches (apart further, along axis 1)
    rng = np.random.default_rng(1)
    kind = np.repeat([0, 1, 0, 1], 50)
    batch = np.repeat([0, 0, 1, 1], 50)
    z = np.stack([6.0 * kind, 10.0 * batch], 1) + rng.normal(0, 0.5, (200, 2))
    labels = graph_clusters(z.astype(np.float32), 2, n_neighbors=10, groups=batch)
    assert adjusted_rand_score(kind, labels) > 0.95


def _types_in_classes(seed=2, n=120):
    """Two cell types measured in two classes whose shift differs by type (the stimulation of one type):
    per-class centring cannot remove it."""
    rng = np.random.default_rng(seed)
    kind = np.repeat([0, 1, 0, 1], n)
    cls = np.repeat([0, 0, 1, 1], n)
    z = np.zeros((4 * n, 4))
    z[:, 0] = 6.0 * kind
    z[:, 1] = 4.0 * cls * kind  # only type 1 responds to class 1
    z[:, 2] = -1.5 * cls
    z += rng.normal(0, 0.5, z.shape)
    return z.astype(np.float32), kind, cls


def _class_gap(z, kind, cls):
    """Largest distance between the two classes' means within a type, in units of the within-type sd."""
    out = []
    for k in (0, 1):
        a, b = z[(kind == k) & (cls == 0)], z[(kind == k) & (cls == 1)]
        out.append(np.linalg.norm(a.mean(0) - b.mean(0)) / z[kind == k].std(0).mean())
    return max(out)


def test_harmonise_removes_class_shifts_within_types_and_keeps_the_types():
    z, kind, cls = _types_in_classes()
    before = z.copy()
    out = harmonise(z, cls, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(z, before)  # the input is not changed
    assert out.dtype == np.float32 and out.shape == z.shape
    assert _class_gap(z, kind, cls) > 3.0
    assert _class_gap(out, kind, cls) < 0.5 * _class_gap(z, kind, cls)
    assert adjusted_rand_score(kind, graph_clusters(out, 2, n_neighbors=10)) > 0.95
    np.testing.assert_allclose(out.std(0).mean(), z.std(0).mean(), rtol=1e-4)  # the start's scale is kept
    again = harmonise(z, cls, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out, again)  # a seed gives the same start


def test_harmonise_is_the_identity_for_one_class():
    z, _, _ = _types_in_classes(n=20)
    np.testing.assert_array_equal(harmonise(z, np.zeros(len(z), dtype=int)), z)


def test_harmonise_on_a_sample_shifts_the_other_cells_like_the_sample():
    z, kind, cls = _types_in_classes(seed=3, n=200)
    gen = torch.Generator().manual_seed(1)
    out = harmonise(z, cls, generator=gen, max_cells=300)
    # the cells outside the sample lose their class gap too, and stay with their type
    assert _class_gap(out, kind, cls) < 0.5 * _class_gap(z, kind, cls)
    assert adjusted_rand_score(kind, graph_clusters(out, 2, n_neighbors=10)) > 0.95
    full = harmonise(z, cls, generator=torch.Generator().manual_seed(1))
    assert np.abs(out - full).mean() < 0.5 * np.abs(full - z).mean()
