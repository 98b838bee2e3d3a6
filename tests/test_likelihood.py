import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dgdcell.nn import Decoder, NegativeBinomial, nb_log_prob_sparse

from .reference import nb_log_prob

COUNTS = np.array([0, 1, 2, 7, 30, 1000, 12345, 1e6])
MEANS = np.array([1e-4, 0.3, 1.0, 20.0, 1e3, 1e6])
DISPERSIONS = np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1e4])


def scipy_nb(x, mu, r):
    return stats.nbinom.logpmf(x, r, r / (r + mu))


def test_nb_matches_scipy_over_extreme_grid_float64():
    x, mu, r = np.meshgrid(COUNTS, MEANS, DISPERSIONS, indexing="ij")
    ours = nb_log_prob(torch.tensor(x), torch.tensor(np.log(mu)), torch.tensor(np.log(r))).numpy()
    ref = scipy_nb(x, mu, r)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-7)


def test_nb_float32_is_finite_and_close_over_extreme_grid():
    x, mu, r = np.meshgrid(COUNTS, MEANS, DISPERSIONS, indexing="ij")
    ours = nb_log_prob(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(np.log(mu), dtype=torch.float32),
        torch.tensor(np.log(r), dtype=torch.float32),
    ).numpy()
    ref = scipy_nb(x, mu, r)
    assert np.isfinite(ours).all()
    # float32 rounding of terms up to ~1e7 nats: relative to the largest term
    scale = np.maximum(1.0, np.abs(ref)) + 1e-6 * np.maximum(x, mu * 0 + 1) * np.log1p(x)
    assert np.all(np.abs(ours - ref) / scale < 1e-3)


@settings(max_examples=60, deadline=None)
@given(
    x=st.integers(0, 10**6),
    log_mu=st.floats(np.log(1e-4), np.log(1e6)),
    log_r=st.floats(np.log(1e-3), np.log(1e4)),
)
def test_nb_property_matches_scipy(x, log_mu, log_r):
    ours = nb_log_prob(torch.tensor(float(x), dtype=torch.float64), torch.tensor(log_mu, dtype=torch.float64),
                       torch.tensor(log_r, dtype=torch.float64)).item()
    ref = scipy_nb(x, np.exp(log_mu), np.exp(log_r))
    assert np.isfinite(ours)
    assert abs(ours - ref) <= 1e-8 * max(1.0, abs(ref)) + 1e-6


def test_sparse_equals_dense_sum_and_gradients():
    torch.manual_seed(0)
    n, g = 6, 40
    x = torch.poisson(torch.rand(n, g) * 4) * (torch.rand(n, g) < 0.4)
    log_mu = (torch.randn(n, g) + 1).double().requires_grad_(True)
    log_r = torch.randn(g).double().requires_grad_(True)
    rows, cols = x.nonzero(as_tuple=True)
    sparse = nb_log_prob_sparse(log_mu, log_r, rows * g + cols, rows, x[rows, cols].double())
    dense = nb_log_prob(x.double(), log_mu, log_r).sum(-1)
    torch.testing.assert_close(sparse, dense)
    gs = torch.autograd.grad(sparse.sum(), [log_mu, log_r])
    gd = torch.autograd.grad(dense.sum(), [log_mu, log_r])
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b)
    # a precomputed log-factorial constant gives the same value
    lf = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, torch.lgamma(x[rows, cols].double() + 1))
    torch.testing.assert_close(
        nb_log_prob_sparse(log_mu, log_r, rows * g + cols, rows, x[rows, cols].double(), lf), dense
    )


def test_all_zero_rows_need_no_lgamma():
    log_mu = torch.zeros(3, 5)
    log_r = torch.zeros(5)
    empty = torch.zeros(0, dtype=torch.long)
    out = nb_log_prob_sparse(log_mu, log_r, empty, empty, torch.zeros(0))
    torch.testing.assert_close(out, nb_log_prob(torch.zeros(3, 5), log_mu, log_r).sum(-1))


def test_decoder_fractions_and_library_scaling():
    torch.manual_seed(0)
    dec = Decoder(6, {"rna": 30, "adt": 4}, (16,), (8, 8))
    z = torch.randn(5, 6)
    log_p = dec(z)
    assert set(log_p) == {"rna", "adt"}
    torch.testing.assert_close(log_p["rna"].exp().sum(-1), torch.ones(5))
    lib = {"rna": torch.log(torch.full((5,), 1000.0)), "adt": torch.log(torch.full((5,), 50.0))}
    log_mu = dec.log_mean(z, lib)
    torch.testing.assert_close(log_mu["rna"].exp().sum(-1), torch.full((5,), 1000.0))
    torch.testing.assert_close(log_mu["adt"], log_p["adt"] + lib["adt"].unsqueeze(-1))
    # a feature subset renormalises the softmax over the subset
    sub = {"rna": torch.tensor([0, 3, 7]), "adt": None}
    torch.testing.assert_close(dec(z, sub)["rna"].exp().sum(-1), torch.ones(5))
    assert isinstance(dec.likelihoods["rna"], NegativeBinomial)
    assert dec.likelihoods["rna"].dispersion.shape == (30,)
    with pytest.raises(ValueError, match="likelihood"):
        Decoder(6, {"rna": 3}, likelihood={"rna": "poissonish"})
