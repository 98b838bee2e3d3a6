"""Property tests: mixture densities against torch.distributions for random parameters,
and results that must not depend on the order of the cells.

(The negative-binomial log-likelihood against scipy is property-tested in test_likelihood.py.)
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score
from torch import distributions as D

from dgdcell import DGD
from dgdcell.latent import GaussianMixture, GaussianMixtureSupervised

from .conftest import make_counts

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def randomise(g: GaussianMixture, seed: int, spread: float, log_sd_range: float, weight_range: float) -> None:
    """Random means (scale ``spread``), log standard deviations (uniform in +-``log_sd_range``
    around the initial value, per component or per component and dimension) and weight logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g.mean.copy_(spread * torch.randn(g.mean.shape, generator=gen, dtype=g.mean.dtype))
        u = 2 * torch.rand(g.neglogvar.shape, generator=gen, dtype=g.neglogvar.dtype) - 1
        g.neglogvar.add_(-2.0 * log_sd_range * u)  # neglogvar = -2 log sd
        g.weight.copy_(weight_range * torch.randn(g.weight.shape, generator=gen, dtype=g.weight.dtype))


def reference(mean: torch.Tensor, sd: torch.Tensor, logits: torch.Tensor) -> D.MixtureSameFamily:
    """The mixture as torch.distributions: MixtureSameFamily of Independent Normals."""
    return D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(mean, sd), 1))


def reference_mvn(mean: torch.Tensor, sd: torch.Tensor, logits: torch.Tensor) -> D.MixtureSameFamily:
    """The same mixture with MultivariateNormal components (diagonal covariance matrices)."""
    return D.MixtureSameFamily(D.Categorical(logits=logits), D.MultivariateNormal(mean, torch.diag_embed(sd**2)))


mixture_cases = dict(
    k=st.integers(1, 6),
    dim=st.integers(1, 5),
    cov=st.sampled_from(["fixed", "isotropic", "diagonal"]),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 10.0),
    log_sd_range=st.floats(0.0, 3.0),
    weight_range=st.floats(0.0, 5.0),
    x_scale=st.floats(0.01, 30.0),
)


@PROPERTY
@given(**mixture_cases)
def test_mixture_log_density_equals_torch_distributions(k, dim, cov, seed, spread, log_sd_range, weight_range, x_scale):
    g = GaussianMixture(k, dim, cov, mean_init=(5.0, 5.0), sd_init=(0.5, 1.0)).double()
    randomise(g, seed, spread, log_sd_range, weight_range)
    x = x_scale * torch.randn(25, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    mean, sd, logits = g.mean.detach(), g.stddev.detach(), g.weight.detach()
    ours = g.log_prob(x)
    for ref in (reference(mean, sd, logits), reference_mvn(mean, sd, logits)):
        torch.testing.assert_close(ours, ref.log_prob(x), rtol=1e-9, atol=1e-8)
    # responsibilities = the posterior over components; clustering is its argmax
    comp = D.Independent(D.Normal(mean, sd), 1).log_prob(x.unsqueeze(1))
    post = torch.softmax(comp + torch.log_softmax(logits, 0), -1)
    torch.testing.assert_close(g.sample_probs(x), post, rtol=1e-9, atol=1e-12)
    assert torch.equal(g.clustering(x), g.sample_probs(x).argmax(-1))


@PROPERTY
@given(**mixture_cases)
def test_mixture_log_density_is_finite_in_float32_far_from_every_component(
    k, dim, cov, seed, spread, log_sd_range, weight_range, x_scale
):
    g = GaussianMixture(k, dim, cov)
    randomise(g, seed, spread, log_sd_range, weight_range)
    x = 1e3 * x_scale * torch.randn(25, dim, generator=torch.Generator().manual_seed(seed + 1))
    lp = g.log_prob(x)
    assert torch.isfinite(lp).all()
    ref = reference(g.mean.detach().double(), g.stddev.detach().double(), g.weight.detach().double())
    torch.testing.assert_close(lp.double(), ref.log_prob(x.double()), rtol=1e-4, atol=1e-2)
    probs = g.sample_probs(x)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(25))


@PROPERTY
@given(
    n_class=st.integers(1, 4),
    per_class=st.integers(1, 3),
    dim=st.integers(1, 4),
    cov=st.sampled_from(["fixed", "isotropic", "diagonal"]),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 10.0),
    log_sd_range=st.floats(0.0, 3.0),
    weight_range=st.floats(0.0, 5.0),
)
def test_supervised_density_is_the_class_mixture_with_renormalised_weights(
    n_class, per_class, dim, cov, seed, spread, log_sd_range, weight_range
):
    """A labelled cell's density is the mixture of its class's components with the
    within-class weights renormalised (``sum_{k in c} w_k N(x|k) / sum_{k in c} w_k``);
    an unlabelled cell (-1) and ``label=None`` use the full mixture."""
    g = GaussianMixtureSupervised(n_class, per_class, dim, cov).double()
    randomise(g, seed, spread, log_sd_range, weight_range)
    gen = torch.Generator().manual_seed(seed + 1)
    n = 30
    x = 3.0 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    label = torch.randint(-1, n_class, (n,), generator=gen)
    mean, sd, logits = g.mean.detach(), g.stddev.detach(), g.weight.detach()
    expected = torch.empty(n, dtype=torch.float64)
    for i, c in enumerate(label.tolist()):
        ks = slice(None) if c < 0 else slice(c * per_class, (c + 1) * per_class)
        expected[i] = reference(mean[ks], sd[ks], logits[ks]).log_prob(x[i])  # Categorical renormalises
    torch.testing.assert_close(g.log_prob(x, label), expected, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(g.log_prob(x), reference(mean, sd, logits).log_prob(x), rtol=1e-9, atol=1e-8)
    # Bayes: p(x | c) = p(x) P(c | x) / P(c), with P(c) the class's total weight
    w = torch.softmax(logits, 0).reshape(n_class, per_class).sum(1)
    post_class = g.sample_probs(x).reshape(n, n_class, per_class).sum(-1)
    lab = label >= 0
    rows = lab & (post_class[torch.arange(n), label.clamp_min(0)] > 1e-100)  # log P(c | x) representable
    bayes = g.log_prob(x)[rows] + torch.log(post_class[rows, label[rows]]) - torch.log(w[label[rows]])
    torch.testing.assert_close(g.log_prob(x, label)[rows], bayes, rtol=1e-7, atol=1e-6)
    # responsibilities stay inside the class and sum to one
    probs = g.sample_probs(x, label)
    outside = (torch.arange(g.n_mix_comp) // per_class).unsqueeze(0) != label.unsqueeze(1)
    assert (probs[lab][outside[lab]] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(n, dtype=torch.float64))
    assert (g.clustering(x, label)[lab] // per_class == label[lab]).all()


@PROPERTY
@given(
    k=st.integers(1, 6),
    dim=st.integers(1, 5),
    cov=st.sampled_from(["fixed", "isotropic", "diagonal"]),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 60),
)
def test_mixture_outputs_follow_the_rows_when_they_are_permuted(k, dim, cov, seed, n):
    g = GaussianMixtureSupervised(k, 1, dim, cov) if k > 1 else GaussianMixture(1, dim, cov)
    randomise(g, seed, 3.0, 1.0, 2.0)
    gen = torch.Generator().manual_seed(seed + 1)
    x = 3.0 * torch.randn(n, dim, generator=gen)
    perm = torch.randperm(n, generator=gen)
    assert torch.equal(g.log_prob(x)[perm], g.log_prob(x[perm]))
    assert torch.equal(g.sample_probs(x)[perm], g.sample_probs(x[perm]))
    assert torch.equal(g.clustering(x)[perm], g.clustering(x[perm]))
    if isinstance(g, GaussianMixtureSupervised):
        label = torch.randint(-1, k, (n,), generator=gen)
        assert torch.equal(g.log_prob(x, label)[perm], g.log_prob(x[perm], label[perm]))


@pytest.fixture(scope="module")
def fitted_pair():
    """The same cells fitted in their order and in a shuffled order."""
    adata = make_counts(n_per_group=(70, 70, 60), n_genes=50)
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = adata[perm].copy()
    model = DGD(latent_dim=3, n_components=3, seed=0).fit(adata, max_epochs=30, verbose=False)
    DGD(latent_dim=3, n_components=3, seed=0).fit(shuffled, max_epochs=30, verbose=False)
    return model, adata, shuffled, perm


def test_fit_clusters_do_not_depend_on_cell_order(fitted_pair):
    _, adata, shuffled, perm = fitted_pair
    in_order = adata.obs["dgd_cluster"].to_numpy()[perm]
    assert adjusted_rand_score(in_order, shuffled.obs["dgd_cluster"]) == 1.0
    assert adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"]) == 1.0


def test_transform_does_not_depend_on_cell_order(fitted_pair):
    model = fitted_pair[0]
    new = make_counts(n_per_group=(20, 20, 20), n_genes=50, seed=5)
    perm = np.random.default_rng(2).permutation(new.n_obs)
    shuffled = new[perm].copy()
    model.transform(new, max_epochs=20, verbose=False)
    model.transform(shuffled, max_epochs=20, verbose=False)
    np.testing.assert_allclose(new.obsm["X_dgd"][perm], shuffled.obsm["X_dgd"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(new.obs["dgd_cluster"].to_numpy()[perm], shuffled.obs["dgd_cluster"].to_numpy())
