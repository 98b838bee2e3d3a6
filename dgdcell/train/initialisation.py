"""Data-driven starts: PCA scores for representations, k-means + EM for mixtures.

Starting the representations at scaled PCA scores of the log-normalised counts
(rather than at zero) and the mixture at a Gaussian-mixture fit of those
scores avoids the classic collapse of the mixture onto a few components and
cuts the number of epochs several-fold (see benchmarks/results/).
"""

from __future__ import annotations

import math

import random
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.extmath import randomized_svd

from ..data.backed import row_source
from ..data.reading import row_blocks
from ..latent import GaussianMixture, GaussianMixtureSupervised


#: row blocks of about this many non-zeros bound the temporaries of the start's passes over the counts
_BLOCK_NNZ = 1 << 22


def log_normalise(csr: sp.csr_matrix, library: np.ndarray, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(target_sum * x / library)`` as CSR float32 (zeros stay zeros).

    Only the values are new: the result shares ``csr``'s index arrays
    (neither is written), and they are computed in row blocks, so the extra
    memory is one float32 per non-zero."""
    data = np.empty(csr.nnz, dtype=np.float32)
    scale = (target_sum / np.asarray(library, dtype=np.float64)).astype(np.float32)
    for a, b, lo, hi in row_blocks(csr, _BLOCK_NNZ):
        np.multiply(csr.data[lo:hi], np.repeat(scale[a:b], np.diff(csr.indptr[a : b + 1])), out=data[lo:hi])
        np.log1p(data[lo:hi], out=data[lo:hi])
    return sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape, copy=False)


def _column_sums_of_squares(csr: sp.csr_matrix) -> np.ndarray:
    """``sum_i x_ij^2`` per column, (G,) float64, in row blocks (no copy of the matrix)."""
    out = np.zeros(csr.shape[1], dtype=np.float64)
    for _, _, lo, hi in row_blocks(csr, _BLOCK_NNZ):
        vals = csr.data[lo:hi].astype(np.float64)
        out += np.bincount(csr.indices[lo:hi], weights=vals * vals, minlength=csr.shape[1])
    return out


def pca_scores(
    matrices: list,
    libraries: list[np.ndarray],
    n_components: int,
    n_fit: int = 10000,
    generator: torch.Generator | None = None,
    groups: np.ndarray | None = None,
    observed: list[np.ndarray | None] | None = None,
) -> np.ndarray:
    """PCA scores (n_cells, n_components) of the scaled log-normalised counts.

    Each modality is log-normalised and every feature scaled to unit variance
    (modalities are then weighted equally by dividing by sqrt(n_features)).
    With ``groups`` ((n_cells,) int codes, e.g. batches) every feature is
    centred within each group instead of globally (and scaled by its pooled
    within-group spread), which removes additive group effects from the start.
    The axes are fitted on at most ``n_fit`` cells and all cells are projected
    with sparse products, so memory grows with the non-zeros.
    The scores are divided by the standard deviation of the first axis.
    ``observed`` ((n_cells,) bool per modality, None: all) marks the cells
    measured in each modality; statistics use those cells only and an
    unobserved cell sits at its group's mean in that modality (so missing
    measurements do not separate cells).

    ``matrices`` are in-memory CSR or counts read from disk
    (:class:`~dgdcell.data.backed.BackedCounts`); both are passed over in the
    same row blocks (two passes: the features' statistics, then the
    projection) and only the ``n_fit`` sampled rows are read besides, so the
    log-normalised counts never exist whole and the results are the same.
    """
    n = matrices[0].shape[0]
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    _, groups = np.unique(np.asarray(groups), return_inverse=True)
    groups = groups.reshape(n)
    n_groups = int(groups.max()) + 1
    sources = [row_source(m) for m in matrices]
    stats = []
    for i, (src, lib) in enumerate(zip(sources, libraries)):
        mask = np.ones(n, dtype=bool) if observed is None or observed[i] is None else np.asarray(observed[i], bool)
        size = np.maximum(np.bincount(groups, weights=mask, minlength=n_groups), 1.0)
        sums, sq = np.zeros((n_groups, src.shape[1])), np.zeros(src.shape[1])
        for a, b in src.blocks(_BLOCK_NNZ):  # unobserved rows are empty
            ln = log_normalise(src.read(a, b), lib[a:b])
            ind = sp.csr_matrix((mask[a:b].astype(np.float32), (groups[a:b], np.arange(b - a))), shape=(n_groups, b - a))
            sums += (ind @ ln).toarray()
            sq += _column_sums_of_squares(ln)
        mean = sums / size[:, None]  # (n_groups, G) group means over observed cells
        within = (sq - (size[:, None] * mean**2).sum(0)) / max(int(mask.sum()), 1)
        sd = np.sqrt(np.maximum(within, 0.0))
        scale = np.where(sd > 0, 1.0 / np.maximum(sd, 1e-8), 0.0) / math.sqrt(src.shape[1])
        stats.append((mean, scale.astype(np.float32), mask))
    sub = torch.randperm(n, generator=generator)[: min(n, n_fit)].sort().values.numpy()
    dense = torch.from_numpy(
        np.hstack([((log_normalise(src.take(sub), lib[sub]).toarray() - mean[groups[sub]]) * scale * mask[sub, None])
                   .astype(np.float32) for src, lib, (mean, scale, mask) in zip(sources, libraries, stats)])
    )
    k = max(1, min(n_components, min(dense.shape) - 1))
    # randomized SVD (Halko et al.; scikit-learn), seeded from ``generator`` through its own random state
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    _, _, vt = randomized_svd(dense.numpy(), k, n_oversamples=10, n_iter=6, random_state=np.random.RandomState(seed))
    del dense
    v = vt.T[:, :k].astype(np.float64)  # (G_total, k)
    # float32 scores: (n, k) float64 would be the largest array of a start on millions of cells
    scores = np.zeros((n, k), dtype=np.float32)
    start = 0
    for src, lib, (mean, scale, mask) in zip(sources, libraries, stats):
        g = src.shape[1]
        vb = v[start : start + g] * scale[:, None]
        centre = mean @ vb
        for a, b in src.blocks(_BLOCK_NNZ):
            ln = log_normalise(src.read(a, b), lib[a:b])
            scores[a:b] += ((ln @ vb - centre[groups[a:b]]) * mask[a:b, None]).astype(np.float32)
        start += g
    scores /= np.float32(max(float(scores[:, 0].std(dtype=np.float64)), 1e-8))
    if k < n_components:
        scores = np.hstack([scores, np.zeros((n, n_components - k), dtype=np.float32)])
    return scores


#: Harmony's diversity penalty for the start of a fit with covariates. harmonypy's default (2) merged two of
#: CellBench's five cell lines in the start (Leiden ARI 1.000 -> 0.953); 1 keeps them apart and mixes the
#: classes nearly as well (``docs/mixture.md``)
HARMONY_THETA = 1.0
#: the start is harmonised on at most this many cells (a seeded sample); the other cells are shifted by
#: their soft clusters' mean correction within their class
HARMONY_MAX_CELLS = 50_000
#: Harmony's soft-clustering bandwidth (harmonypy's default), used to place the cells outside the sample
_HARMONY_SIGMA = 0.1


def harmonise(z: np.ndarray, groups: np.ndarray, generator: torch.Generator | None = None,
              theta: float = HARMONY_THETA, max_cells: int = HARMONY_MAX_CELLS, chunk: int = 16384) -> np.ndarray:
    """Start scores ``z`` (n, d) with the covariate classes ``groups`` ((n,) int codes) removed by Harmony.

    Harmony (Korsunsky et al. 2019, through ``harmonypy``) soft-clusters the
    scores with a penalty on clusters dominated by one class and removes each
    class's shift within each cluster, so the start, and the mixture guided by
    it, no longer separate a population by class. Returns float32 (n, d),
    rescaled to the input's mean per-axis spread; ``z`` is not changed.

    At most ``max_cells`` cells (a sample drawn from ``generator``) are
    harmonised; every other cell is shifted by ``sum_k R_ik s_k,c(i)``, where
    ``R_i`` are its soft clusters (Harmony's cosine kernel on the sample's
    centroids) and ``s_k,c`` is the sample's mean shift of class ``c`` in
    cluster ``k``: Harmony's own correction is a per-cluster, per-class shift,
    so the rest of the cells get the one the sample learnt.
    """
    import harmonypy

    z = np.asarray(z, dtype=np.float32)
    n = z.shape[0]
    _, codes = np.unique(np.asarray(groups).reshape(n), return_inverse=True)
    n_classes = int(codes.max()) + 1 if n else 0
    if n_classes < 2:
        return z.copy()
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    sub = (np.arange(n) if n <= max_cells
           else torch.randperm(n, generator=generator)[:max_cells].sort().values.numpy())
    h = harmonypy.run_harmony(z[sub].astype(np.float64), {"class": codes[sub].astype(str)}, ["class"], theta=theta,
                              verbose=False, random_state=seed)
    corrected = np.asarray(h.Z_corr, dtype=np.float64).reshape(len(sub), -1)
    if len(sub) == n:
        before, after = float(z.std(0).mean()), float(corrected.std(0).mean())
        return (corrected * (before / max(after, 1e-12))).astype(np.float32)
    else:  # float32 from here: the other cells' scores are the largest array
        shift = corrected - z[sub]  # (m, d)
        centroids = np.asarray(h.Y, dtype=np.float64)  # (d, K), unit columns
        r = np.asarray(h.R, dtype=np.float64).reshape(len(sub), -1)  # (m, K)
        mass = np.zeros((r.shape[1], n_classes))
        sums = np.zeros((r.shape[1], n_classes, z.shape[1]))
        for c in range(n_classes):
            rows = codes[sub] == c
            mass[:, c] = r[rows].sum(0)
            sums[:, c] = r[rows].T @ shift[rows]
        mean_shift = (sums / np.maximum(mass, 1e-12)[..., None]).astype(np.float32)  # (K, C, d)
        centroids = centroids.astype(np.float32)
        out = z.copy()
        rest = np.setdiff1d(np.arange(n), sub)
        for a in range(0, len(rest), chunk):
            rows = rest[a : a + chunk]
            zc = out[rows] / np.maximum(np.linalg.norm(out[rows], axis=1, keepdims=True), 1e-12)
            logits = (zc @ centroids - 1.0) * np.float32(2.0 / _HARMONY_SIGMA)
            resp = np.exp(logits - logits.max(1, keepdims=True))
            resp /= resp.sum(1, keepdims=True)  # (b, K)
            for c in np.unique(codes[rows]):  # (b_c, K) @ (K, d): no (b, K, d) temporary
                mine = codes[rows] == c
                out[rows[mine]] += resp[mine] @ mean_shift[:, c]
        out[sub] = corrected.astype(np.float32)
    before, after = float(z.std(0, dtype=np.float64).mean()), float(out.std(0, dtype=np.float64).mean())
    out *= np.float32(before / max(after, 1e-12))
    return out


def kmeans(x: torch.Tensor, k: int, n_iter: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; returns centres (k, dim)."""
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=generator)]
    d2 = torch.cdist(x, centres).square().squeeze(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        nxt = x[torch.multinomial(probs, 1, generator=generator)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).square().squeeze(-1))
    for _ in range(n_iter):
        assign = torch.cdist(x, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1).to(x.dtype)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


@torch.no_grad()
def init_mixture(
    gmm: GaussianMixture,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    n_em: int = 30,
    generator: torch.Generator | None = None,
) -> None:
    """Set ``gmm``'s means, variances and weights by k-means + EM on points ``z`` (n, dim).

    For a :class:`GaussianMixtureSupervised`, labelled points only update their
    class's components. Variances respect the covariance type (a 'fixed' one is
    left as is) and are floored at 1e-3 of the overall variance.
    """
    z = z.detach().to(gmm.mean.device)
    k = gmm.n_mix_comp
    floor = 1e-3 * z.var(0, correction=0).mean().clamp_min(1e-8)
    if isinstance(gmm, GaussianMixtureSupervised) and labels is not None and (labels >= 0).any():
        centres = []
        for c in range(gmm.Nclass):
            pts = z[labels == c]
            if pts.shape[0] >= gmm.Ncompperclass:
                centres.append(kmeans(pts, gmm.Ncompperclass, generator=generator))
            else:
                centres.append(kmeans(z, gmm.Ncompperclass, n_iter=0, generator=generator))
        gmm.mean.copy_(torch.cat(centres))
    else:
        labels = None
        gmm.mean.copy_(kmeans(z, k, generator=generator))
    gmm.weight.zero_()
    if gmm.covariance_type != "fixed":
        gmm.neglogvar.fill_(-torch.log(z.var(0, correction=0).mean() / k ** (2.0 / gmm.dim)).item())
    for _ in range(n_em):
        _m_step(gmm, *_em_sums(gmm, z, labels), floor)


def _m_step(gmm: GaussianMixture, nk: torch.Tensor, sum_z: torch.Tensor, sum_z2: torch.Tensor, floor) -> None:
    """Set ``gmm``'s weights, means and (unless 'fixed') variances from the
    responsibility sums ``nk`` (K,), ``sum_z`` and ``sum_z2`` (K, dim); variances
    are floored at ``floor`` and averaged over the dimensions for 'isotropic'."""
    nk = nk + 1e-6
    mean = sum_z / nk.unsqueeze(-1)
    gmm.mean.copy_(mean)
    gmm.weight.copy_(torch.log(nk / nk.sum()))
    if gmm.covariance_type == "fixed":
        return
    var = (sum_z2 / nk.unsqueeze(-1) - mean.square()).clamp_min(floor)  # (K, dim)
    if gmm.covariance_type == "isotropic":
        var = var.mean(-1, keepdim=True)
    gmm.neglogvar.copy_(-torch.log(var))


#: points per chunk of the EM responsibilities (the (chunk, K, dim) temporaries stay small)
EM_CHUNK = 65536


def _em_sums(gmm: GaussianMixture, z: torch.Tensor, labels: torch.Tensor | None):
    """EM's sufficient statistics of points ``z`` (n, dim) under the
    responsibilities of ``gmm`` (labels as in :func:`init_mixture`), summed
    over row chunks of :data:`EM_CHUNK`: ``sum_i r_ik`` (K,), ``sum_i r_ik z_i``
    and ``sum_i r_ik z_i^2`` (K, dim)."""
    k, d = gmm.n_mix_comp, z.shape[1]
    nk = z.new_zeros(k)
    sum_z, sum_z2 = z.new_zeros(k, d), z.new_zeros(k, d)
    for s in range(0, z.shape[0], EM_CHUNK):
        part = z[s : s + EM_CHUNK]
        if isinstance(gmm, GaussianMixtureSupervised):
            resp = gmm.sample_probs(part, None if labels is None else labels[s : s + EM_CHUNK])
        else:
            resp = gmm.sample_probs(part)
        nk += resp.sum(0)
        sum_z += resp.T @ part
        sum_z2 += resp.T @ part.square()
    return nk, sum_z, sum_z2


def knn_graph(z, n_neighbors: int, chunk: int = 4096, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest-neighbour edges of points ``z`` ((n, dim) array or tensor;
    self excluded; scikit-learn, queried in chunks of ``chunk`` rows):
    ``(sources, targets)``.

    With ``groups`` ((n,) codes, e.g. batches) the neighbours are balanced
    across the groups (as BBKNN does): each point gets its
    ``ceil(n_neighbors / n_groups)`` nearest points of every group, so a
    neighbourhood cannot consist of one batch only."""
    z = np.ascontiguousarray(np.asarray(z, dtype=np.float32))
    n = z.shape[0]
    if groups is not None and np.unique(groups).size > 1:
        groups = np.asarray(groups)
        levels = np.unique(groups)
        per = -(-int(n_neighbors) // levels.size)
        src, tgt = [], []
        for g in levels:
            members = np.flatnonzero(groups == g)
            s_g, t_g = _neighbours_in(z, members, per, chunk)
            src.append(s_g)
            tgt.append(t_g)
        return np.concatenate(src), np.concatenate(tgt)
    return _neighbours_in(z, np.arange(n), n_neighbors, chunk)


def _neighbours_in(z: np.ndarray, members: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """For every point of ``z`` (n, dim) its ``k`` nearest points among rows
    ``members`` (itself excluded): ``(sources, targets)``, each (n * k',) with
    ``k' = min(k, len(members) - 1)``."""
    n = z.shape[0]
    k = min(int(k), members.size - 1)
    nn_ = NearestNeighbors(n_neighbors=k + 1).fit(z[members])
    idx = members[np.concatenate([nn_.kneighbors(z[s : s + chunk], return_distance=False)
                                  for s in range(0, n, chunk)])]
    # drop each point itself (the first neighbour, or wherever a duplicate point put it); a point of
    # another group has no self entry: drop its farthest neighbour
    own = idx == np.arange(n)[:, None]
    own[~own.any(1), -1] = True
    tgt = idx[~own].reshape(n, k).reshape(-1)
    return np.repeat(np.arange(n), k), tgt


@contextmanager
def _igraph_seeded(seed: int):
    """igraph draws from the generator it is given (by default Python's
    ``random`` module): a private ``random.Random(seed)`` during the context,
    the default again after it, so Python's global random state is never touched."""
    import igraph

    igraph.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        igraph.set_random_number_generator(random)


#: Leiden runs (random seeds) that :func:`graph_clusters` draws before it keeps their consensus
LEIDEN_RESTARTS = 10


def graph_clusters(
    z: np.ndarray,
    n_clusters: int,
    n_neighbors: int = 15,
    n_fit: int = 10000,
    seed: int = 0,
    n_steps: int = 20,
    groups: np.ndarray | None = None,
    n_restarts: int = LEIDEN_RESTARTS,
) -> np.ndarray:
    """Leiden clusters of points ``z`` (n, dim), resolution tuned to ``n_clusters``.

    Builds the symmetrised exact k-nearest-neighbour graph (scikit-learn) of at
    most ``n_fit`` cells (a seeded subsample) with shared-neighbour (Jaccard)
    edge weights and bisects the resolution of igraph's Leiden (modularity)
    until it finds ``n_clusters`` clusters (or the closest count, preferring
    more). Where Leiden cannot come down to ``n_clusters`` (typically a graph
    that falls into pieces: populations cut by a batch effect), its clusters
    are joined whole by Ward's criterion (:func:`ward_merge`). Cells outside
    the subsample take the label of the nearest cluster centre (and with too
    few clusters, the points farthest from every centre start the missing
    ones). Returns (n,) int64 labels in ``0..n_clusters-1``. With ``groups``
    ((n,) codes of the covariate classes) the neighbours are balanced across the classes (see
    :func:`knn_graph`), so that clusters follow what the classes share rather
    than split by class.

    Leiden's result depends on its random seed: at a resolution tuned to K,
    runs with different seeds can split a population in one and merge two in
    another. ``n_restarts`` tuned runs (Leiden seeds ``seed * n_restarts + r``) are
    drawn on the same graph and their consensus is kept: the run that agrees
    best with the others (largest summed adjusted Rand index,
    :func:`medoid_partition`). No labels are involved; ``n_restarts=1`` is a
    single run.
    """
    n_restarts = int(n_restarts)
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1 (Leiden runs to draw), got {n_restarts}.")
    n = z.shape[0]
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.permutation(n)[: min(n, n_fit)])
    zs = np.ascontiguousarray(z[sub], dtype=np.float32)
    graph = _snn_graph(zs, n_neighbors, None if groups is None else np.asarray(groups)[sub])
    runs = [_tuned_leiden(graph, n_clusters, seed * n_restarts + r, n_steps) for r in range(n_restarts)]
    best_labels = ward_merge(zs, runs[medoid_partition(runs)], n_clusters)  # at most n_clusters
    sizes = np.bincount(best_labels)
    order = np.argsort(-sizes, kind="stable")  # clusters numbered by size, largest first
    centres = np.stack([zs[best_labels == k].mean(0) for k in order])
    if order.size < n_clusters:  # too few clusters: add the points farthest from every centre
        far = np.argsort(-(((zs[:, None] - centres[None]) ** 2).sum(-1)).min(1))[: n_clusters - order.size]
        centres = np.vstack([centres, zs[far]])
    zt, ct = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)), torch.from_numpy(centres)
    out = torch.cat([torch.cdist(zt[s : s + 65536], ct).argmin(1) for s in range(0, n, 65536)]).numpy()
    rank = np.empty(sizes.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    out[sub] = rank[best_labels]
    return out.astype(np.int64)


def ward_merge(z: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Join the clusters ``labels`` ((n,) codes ``0..m-1``) of points ``z`` (n, dim)
    until ``n_clusters`` are left, each time the pair whose union raises the
    within-cluster sum of squares least (Ward's criterion,
    ``n_a n_b / (n_a + n_b) * |c_a - c_b|^2``). Clusters move whole, so a
    population that a batch effect cut into pieces is put back together
    before it is joined to another one. Returns (n,) int64 codes
    ``0..min(m, n_clusters)-1``, numbered in order of their smallest old code
    (so labels without gaps and with at most ``n_clusters`` clusters come back
    unchanged)."""
    labels = np.asarray(labels, dtype=np.int64)
    m = int(labels.max()) + 1
    z = np.asarray(z, dtype=np.float64)
    size = np.bincount(labels, minlength=m).astype(np.float64)
    sums = np.zeros((m, z.shape[1]))
    np.add.at(sums, labels, z)
    alive = size > 0
    owner = np.arange(m)  # old code -> the cluster it now belongs to
    while int(alive.sum()) > max(int(n_clusters), 1):
        ids = np.flatnonzero(alive)
        c = sums[ids] / size[ids, None]
        n = size[ids]
        cost = (n[:, None] * n[None] / (n[:, None] + n[None])) * ((c[:, None] - c[None]) ** 2).sum(-1)
        np.fill_diagonal(cost, np.inf)
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        a, b = ids[min(i, j)], ids[max(i, j)]
        sums[a] += sums[b]
        size[a] += size[b]
        alive[b] = False
        owner[owner == b] = a
    _, codes = np.unique(owner[labels], return_inverse=True)
    return codes.reshape(labels.shape).astype(np.int64)


def medoid_partition(partitions: list[np.ndarray]) -> int:
    """Index of the partition (each (n,) labels of the same points) with the
    largest summed adjusted Rand index to the others: the consensus of a set of
    clusterings (the first among equals; 0 for a single partition)."""
    r = len(partitions)
    agreement = np.zeros((r, r))
    for i in range(r):
        for j in range(i + 1, r):
            agreement[i, j] = agreement[j, i] = adjusted_rand_score(partitions[i], partitions[j])
    return int(np.argmax(agreement.sum(1)))


def _snn_graph(zs: np.ndarray, n_neighbors: int, groups: np.ndarray | None):
    """igraph Graph of the points ``zs``: the symmetrised kNN graph with
    shared-nearest-neighbour (Jaccard) edge weights."""
    import igraph

    src, tgt = knn_graph(zs, n_neighbors, groups=groups)
    m = zs.shape[0]
    knn = sp.csr_matrix((np.ones(src.size, dtype=np.float32), (src, tgt)), shape=(m, m))
    knn = knn + sp.identity(m, dtype=np.float32, format="csr")
    adj = ((knn + knn.T) > 0).astype(np.float32).tocoo()
    keep_e = adj.row < adj.col
    rows, cols = adj.row[keep_e], adj.col[keep_e]
    shared = np.asarray(knn[rows].multiply(knn[cols]).sum(1)).ravel()
    kk = knn.getnnz(axis=1) if hasattr(knn, "getnnz") else np.diff(knn.indptr)
    weight = shared / np.maximum(kk[rows] + kk[cols] - shared, 1)
    ok = weight > 0
    graph = igraph.Graph(n=m, edges=np.stack([rows[ok], cols[ok]], 1).tolist(), directed=False)
    graph.es["weight"] = weight[ok].tolist()
    return graph


def _tuned_leiden(graph, n_clusters: int, seed: int, n_steps: int) -> np.ndarray:
    """Leiden (modularity) labels of ``graph``'s nodes at the resolution, bisected
    over at most ``n_steps`` runs, that gives ``n_clusters`` clusters (or the
    closest count found, preferring more to fewer)."""
    lo, hi = 1e-3, 10.0
    best_labels, best_gap = None, None
    with _igraph_seeded(seed):
        for _ in range(n_steps):
            res = (lo * hi) ** 0.5
            part = graph.community_leiden(
                objective_function="modularity", weights="weight", resolution=res, n_iterations=2
            )
            labels = np.asarray(part.membership, dtype=np.int64)
            found = int(labels.max()) + 1
            gap = abs(found - n_clusters) + (0.5 if found < n_clusters else 0.0)
            if best_gap is None or gap < best_gap:
                best_labels, best_gap = labels, gap
            if found == n_clusters:
                break
            if found < n_clusters:
                lo = res
            else:
                hi = res
    return best_labels


@torch.no_grad()
def init_mixture_from_labels(gmm: GaussianMixture, z: torch.Tensor, labels: torch.Tensor) -> None:
    """Set ``gmm``'s means, variances (per covariance type) and weights from a hard
    partition ``labels`` (n,) in ``0..K-1`` of the points ``z`` (n, dim)."""
    z = z.detach().to(gmm.mean.device)
    k = gmm.n_mix_comp
    resp = torch.zeros(z.shape[0], k, device=z.device)
    resp[torch.arange(z.shape[0], device=z.device), labels.to(z.device)] = 1.0
    floor = 1e-3 * z.var(0, correction=0).mean().clamp_min(1e-8)
    _m_step(gmm, resp.sum(0), resp.T @ z, resp.T @ z.square(), floor)


@torch.no_grad()
def pool_variances(gmm: GaussianMixture) -> None:
    """Give every component of ``gmm`` the same variances: the average of the
    components' variances weighted by the mixture weights (for a start from a
    hard partition: the pooled within-cluster variance)."""
    w = gmm.mixture_probs().unsqueeze(-1)  # (K, 1)
    pooled = (w * torch.exp(-gmm.neglogvar)).sum(0, keepdim=True) / w.sum()
    gmm.neglogvar.copy_(-torch.log(pooled).expand_as(gmm.neglogvar))
