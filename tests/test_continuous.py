"""Continuous covariates: values that enter the decoder directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgdcell import DGD

from .conftest import make_counts

FIT = dict(max_epochs=30, verbose=False)


def _with_mito(seed=0):
    a = make_counts(n_per_group=(60, 60, 60), n_genes=40, seed=seed)
    rng = np.random.default_rng(seed)
    mito = rng.uniform(0, 10, a.n_obs)
    X = a.X.toarray()
    X[:, :5] = rng.poisson(mito[:, None] * 3)  # five "mitochondrial" genes follow the covariate
    a.X = type(a.X)(X.astype(np.float32))
    a.obs["pct_mito"] = mito
    return a


def test_continuous_covariate_enters_the_decoder_and_is_saved(tmp_path):
    a = _with_mito()
    model = DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["pct_mito"], seed=0).fit(a, **FIT)
    assert model.decoder.n_input == 3 + 1
    mean, sd = model.continuous_stats["pct_mito"]
    assert mean == pytest.approx(a.obs["pct_mito"].mean()) and sd == pytest.approx(a.obs["pct_mito"].std(ddof=0))
    # decoding the same cells with a higher value raises the genes that follow it
    low, high = a.copy(), a.copy()
    low.obs["pct_mito"], high.obs["pct_mito"] = 1.0, 9.0
    e_low, e_high = model.get_normalized_expression(low), model.get_normalized_expression(high)
    ratio = e_high.mean() / e_low.mean()
    assert (ratio.iloc[:5] > 1.0).all() and ratio.iloc[:5].mean() > 1.1
    assert ratio.iloc[5:].mean() < ratio.iloc[:5].mean()  # the other genes move less
    np.testing.assert_allclose(model.get_normalized_expression(a).to_numpy(),
                               model.get_normalized_expression().to_numpy(), rtol=1e-5, atol=1e-7)
    model.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m")
    assert loaded.continuous_stats == model.continuous_stats
    torch.testing.assert_close(loaded.continuous_input, model.continuous_input)
    np.testing.assert_array_equal(loaded.get_normalized_expression(high).to_numpy(), e_high.to_numpy())
    q = a[:40].copy()
    loaded.transform(q, verbose=False, max_epochs=5)
    assert q.obsm["X_dgd"].shape == (40, 3)


def test_continuous_covariate_errors():
    a = _with_mito()
    with pytest.raises(KeyError, match="continuous covariate key 'nope'"):
        DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["nope"]).fit(a, **FIT)
    a.obs["label"] = a.obs["group"]
    with pytest.raises(ValueError, match="must be numeric"):
        DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["label"]).fit(a, **FIT)
    b = a.copy()
    b.obs.loc[b.obs_names[0], "pct_mito"] = np.nan
    with pytest.raises(ValueError, match="1 missing or infinite"):
        DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["pct_mito"]).fit(b, **FIT)
    b.obs["pct_mito"] = 2.0
    with pytest.raises(ValueError, match="same value in every cell"):
        DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["pct_mito"]).fit(b, **FIT)
    with pytest.raises(ValueError, match="both categorical and continuous"):
        DGD(covariate_keys=["pct_mito"], continuous_covariate_keys=["pct_mito"])
    with pytest.raises(ValueError, match="same setting"):
        DGD(covariate_keys=["batch"], categorical_covariate_keys=["group"])
    assert DGD(categorical_covariate_keys=["batch"]).init_args["covariate_keys"] == ["batch"]
    model = DGD(latent_dim=3, n_components=3, continuous_covariate_keys=["pct_mito"]).fit(a, max_epochs=2,
                                                                                        verbose=False)
    q = a[:10].copy()
    del q.obs["pct_mito"]
    with pytest.raises(KeyError, match="pct_mito"):
        model.transform(q, verbose=False)
