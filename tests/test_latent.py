import math

import pytest
import torch
from torch import distributions as D

from dgdcell.latent import (
    DirichletPrior,
    GaussianMixture,
    GaussianMixtureSupervised,
    GaussianPrior,
    RepresentationLayer,
    Softball,
)


def reference_mixture(g: GaussianMixture) -> D.MixtureSameFamily:
    comps = D.Independent(D.Normal(g.mean.detach(), g.stddev.detach()), 1)
    return D.MixtureSameFamily(D.Categorical(logits=g.weight.detach()), comps)


@pytest.mark.parametrize("cov", ["fixed", "isotropic", "diagonal"])
def test_mixture_density_matches_torch_distributions(cov):
    torch.manual_seed(1)
    g = GaussianMixture(5, 4, cov, mean_init=(3.0, 4.0), sd_init=(0.7, 1.0))
    with torch.no_grad():
        g.neglogvar.add_(0.5 * torch.randn_like(g.neglogvar))
        g.weight.copy_(torch.randn(5))
    x = 2.0 * torch.randn(50, 4)
    ref = reference_mixture(g)
    torch.testing.assert_close(g.log_prob(x), ref.log_prob(x), rtol=1e-5, atol=1e-4)
    # per-component densities and responsibilities
    comp = D.Independent(D.Normal(g.mean.detach(), g.stddev.detach()), 1).log_prob(x.unsqueeze(1))
    torch.testing.assert_close(g.component_log_prob(x), comp, rtol=1e-5, atol=1e-4)
    post = torch.softmax(comp + torch.log_softmax(g.weight.detach(), 0), -1)
    torch.testing.assert_close(g.sample_probs(x), post, rtol=1e-5, atol=1e-6)
    assert torch.equal(g.clustering(x), post.argmax(-1))
    assert g.covariance.shape == (5, 4) and g.stddev.shape == (5, 4)
    torch.testing.assert_close(g.mixture_probs().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("cov", ["fixed", "isotropic", "diagonal"])
def test_fused_mixture_density_gradients_match_autograd(cov):
    """The mixture log density's hand-written backward against autograd through the plain
    formula: full weights, per-row class weights (with -inf) and one component per row."""
    torch.manual_seed(3)
    g = GaussianMixtureSupervised(3, 2, 4, cov, mean_init=(3.0, 4.0), sd_init=(0.7, 1.0)).double()
    with torch.no_grad():
        g.neglogvar.add_(0.5 * torch.randn_like(g.neglogvar))
        g.weight.copy_(torch.randn(6))
    x = (2.0 * torch.randn(40, 4, dtype=torch.float64)).requires_grad_(True)
    label = torch.randint(-1, 3, (40,))
    comp = torch.randint(0, 6, (40,))
    w = torch.rand(40, dtype=torch.float64)
    params = [x] + [p for p in g.parameters() if p.requires_grad]
    cases = [
        (lambda: g.log_prob(x), lambda: torch.logsumexp(g.component_log_prob(x) + g.log_mixture_probs(), -1)),
        (lambda: g.log_prob(x, label),
         lambda: torch.logsumexp(g.component_log_prob(x) + g._log_label_weights(label), -1)),
        (lambda: g.component_log_prob_of(x, comp), lambda: g.component_log_prob(x).gather(1, comp[:, None])[:, 0]),
    ]
    for fused, plain in cases:
        a, b = fused(), plain()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
        ga = torch.autograd.grad((a * w).sum(), params, allow_unused=True)
        gb = torch.autograd.grad((b * w).sum(), params, allow_unused=True)
        for u, v in zip(ga, gb):
            if v is None:
                assert u is None or torch.count_nonzero(u) == 0
            else:
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cov", ["fixed", "isotropic", "diagonal"])
def test_forward_adds_scaled_parameter_prior(cov):
    torch.manual_seed(0)
    g = GaussianMixture(3, 2, cov)
    x = torch.randn(10, 2)
    expected = -g.log_prob(x).sum() - 0.25 * g.prior_log_prob()
    torch.testing.assert_close(g(x, prior_scale=0.25).sum(), expected)
    # the prior: softball on means + gaussian on neglogvar (unless fixed) + dirichlet on weights
    lp = g.mean_prior.log_prob(g.mean).sum() + g.weight_prior.log_prob(g.weight)
    if cov != "fixed":
        lp = lp + D.Normal(g.neglogvar_prior.mean, g.neglogvar_prior.stddev).log_prob(g.neglogvar).sum()
    torch.testing.assert_close(g.prior_log_prob(), lp)
    assert g.neglogvar.requires_grad == (cov != "fixed")


@pytest.mark.parametrize("cov", ["fixed", "isotropic", "diagonal"])
def test_fused_parameter_prior_gradients_match_autograd(cov):
    """The parameter priors' hand-written backward against autograd through the prior
    classes, with means inside and outside the softball, at the origin, and a Dirichlet
    alpha != 1 (so the weights get a gradient)."""
    torch.manual_seed(4)
    g = GaussianMixture(5, 3, cov, mean_init=(3.0, 4.0), sd_init=(0.7, 1.0), weight_alpha=2.5).double()
    with torch.no_grad():
        g.mean.copy_(torch.randn(5, 3, dtype=torch.float64) * 3.0)
        g.mean[0].zero_()
        g.neglogvar.add_(0.5 * torch.randn_like(g.neglogvar))
        g.weight.copy_(torch.randn(5, dtype=torch.float64))
    params = [p for p in g.parameters() if p.requires_grad]
    fused = g.prior_log_prob()
    plain = g.mean_prior.log_prob(g.mean).sum() + g.weight_prior.log_prob(g.weight)
    if cov != "fixed":
        plain = plain + g.neglogvar_prior.log_prob(g.neglogvar).sum()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-10)
    ga = torch.autograd.grad(2.5 * fused, params)
    gb = torch.autograd.grad(2.5 * plain, params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(ga[0][0]) == 0  # a mean at the origin: no direction, no gradient


def test_softball_rejects_degenerate_radius():
    with pytest.raises(ValueError, match="radius"):
        Softball(3, 0.0, 1.0)
    with pytest.raises(ValueError, match="radius"):
        GaussianMixture(3, 2, mean_init=(0.0, 1.0))


def test_softball_is_a_density_and_samples_lie_inside():
    sb = Softball(2, radius=2.0, sharpness=50.0)
    grid = torch.linspace(-4, 4, 801)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx, yy], -1).reshape(-1, 2)
    integral = sb.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(integral.item() - 1.0) < 0.03
    s = sb.sample(1000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (1000, 2)
    assert torch.linalg.vector_norm(s, dim=-1).max() <= 2.0 + 1e-5
    # uniform in the ball: a quarter of the points within half the radius (2-D)
    frac = (torch.linalg.vector_norm(s, dim=-1) < 1.0).float().mean().item()
    assert 0.2 < frac < 0.3


def test_gaussian_and_dirichlet_priors_match_torch():
    gp = GaussianPrior(3, 1.5, 0.7)
    x = torch.randn(4, 3)
    torch.testing.assert_close(gp.log_prob(x), D.Normal(1.5, 0.7).log_prob(x).sum(-1))
    dp = DirichletPrior(4, alpha=2.5)
    logits = torch.randn(4)
    ref = D.Dirichlet(torch.full((4,), 2.5)).log_prob(torch.softmax(logits, 0))
    torch.testing.assert_close(dp.log_prob(logits), ref, rtol=1e-5, atol=1e-5)
    assert dp.sample(3).shape == (3, 4)


def test_sampling_shapes_and_moments():
    torch.manual_seed(0)
    g = GaussianMixture(3, 2, "diagonal")
    gen = torch.Generator().manual_seed(0)
    assert g.sample(7, generator=gen).shape == (7, 2)
    cs = g.component_sample(4000, generator=gen)
    assert cs.shape == (4000, 3, 2)
    torch.testing.assert_close(cs.mean(0), g.mean.detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(cs.std(0), g.stddev.detach(), atol=0.03, rtol=0)
    assert g.sample_new_points("mean").shape == (3, 2)
    pts = g.sample_new_points("sample", n_new_samples=5, generator=gen)
    assert pts.shape == (15, 2)
    # grouped by component: the first 5 lie near component 0
    assert (g.clustering(pts[:5]) == 0).float().mean() >= 0.6
    with pytest.raises(ValueError):
        g.sample_new_points("bogus")


def test_supervised_density_is_logsumexp_over_class_components():
    torch.manual_seed(3)
    g = GaussianMixtureSupervised(3, 2, 2, "diagonal")
    with torch.no_grad():
        g.weight.copy_(torch.randn(6))
    x = torch.randn(8, 2)
    label = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])
    comp = g.component_log_prob(x)
    logw = torch.log_softmax(g.weight.detach(), 0)
    expected = []
    for i, c in enumerate(label.tolist()):
        ks = list(range(6)) if c < 0 else [2 * c, 2 * c + 1]
        w = logw[ks] - torch.logsumexp(logw[ks], 0)
        expected.append(torch.logsumexp(comp[i, ks] + w, 0))
    torch.testing.assert_close(g.log_prob(x, label), torch.stack(expected))
    torch.testing.assert_close(g.log_prob(x), GaussianMixture.log_prob(g, x))
    probs = g.label_mixture_probs(label)
    assert torch.allclose(probs.sum(-1), torch.ones(8))
    assert probs[0, 2:].abs().sum() == 0
    # gradients stay finite with masked components
    x.requires_grad_(True)
    g(x, label).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(g.weight.grad).all()
    with pytest.raises(ValueError):
        g.log_prob(x, torch.full((8,), 3))


def test_supervised_sampling_stays_in_class():
    torch.manual_seed(0)
    g = GaussianMixtureSupervised(4, 1, 2, mean_init=(5.0, 5.0), sd_init=(0.05, 1.0))
    label = torch.tensor([0, 1, 2, 3, 3])
    origin = g.supervised_sampling(label, "origin")
    torch.testing.assert_close(origin, g.mean.detach()[label])
    rnd = g.supervised_sampling(label, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(g.clustering(rnd), label)


def test_representation_layer():
    assert torch.equal(RepresentationLayer(3, 5).z, torch.zeros(5, 3))
    init = torch.arange(15.0).reshape(5, 3)
    rep = RepresentationLayer(3, 5, init)
    assert torch.equal(rep(torch.tensor([4, 0])), init[[4, 0]])
    assert rep().shape == (5, 3) and len(rep) == 5
    assert RepresentationLayer(2, 1000, 0.5).z.std().item() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError):
        RepresentationLayer(3, 5, torch.zeros(4, 3))


def test_mixture_recovers_separated_clusters_by_gradient_ascent():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    truth = torch.arange(3).repeat_interleave(100)
    x = centres[truth] + 0.3 * torch.randn(300, 2)
    g = GaussianMixture(3, 2, "diagonal", mean_init=(6.0, 5.0))
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        g(x).sum().backward()
        opt.step()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, g.clustering(x)) > 0.95
    assert math.isclose(g.mixture_probs().max().item(), 1 / 3, abs_tol=0.05)
