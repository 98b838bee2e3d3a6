import logging

import numpy as np
import pytest
import torch

import dgdcell
import dgdcell.train.loop as loop
from dgdcell import DGD

from .test_data import assert_unchanged, snapshot


def test_keyboard_interrupt_keeps_best_state_and_writes_results(synthetic, monkeypatch, caplog):
    real = loop.representation_epoch
    calls = {"n": 0}

    def interrupt_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "representation_epoch", interrupt_on_fifth)
    with caplog.at_level(logging.WARNING, logger="dgdcell"):
        model = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=50, guide_epochs=0, verbose=False)
    assert "interrupted after 4 epochs" in caplog.text
    lengths = {k: len(v) for k, v in model.history.items() if k not in ("n_train", "n_val")}
    assert set(lengths.values()) == {4}
    assert np.isfinite(synthetic.obsm["X_dgd"]).all() and "dgd_cluster" in synthetic.obs


def test_nan_loss_raises_clearly_and_leaves_adata_unchanged(synthetic, monkeypatch):
    from .reference import nan_reconstruction_after

    nan_reconstruction_after(6, monkeypatch)
    snap = snapshot(synthetic)
    with pytest.raises(FloatingPointError, match="best state so far was restored"):
        DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=20, guide_epochs=0, verbose=False)
    assert_unchanged(synthetic, snap)


def test_clustering_does_not_depend_on_cell_order(synthetic):
    model = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=5, verbose=False)
    z = torch.as_tensor(synthetic.obsm["X_dgd"])
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(model.cluster_probabilities(z)[perm.numpy()], model.cluster_probabilities(z[perm]))
    assert dgdcell.__version__ == synthetic.uns["dgd"]["version"]


def test_theil_sen_slope_ignores_an_outlying_epoch():
    y = 100.0 - 0.5 * np.arange(20)
    y[7] += 40.0  # one spike: a least-squares slope would be pulled far from -0.5
    assert loop.theil_sen_slope(list(y)) == pytest.approx(-0.5)
    assert abs(np.polyfit(np.arange(20), y, 1)[0] + 0.5) > 0.1


def test_still_improving_tells_a_falling_noisy_loss_from_a_flat_or_rising_one():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 2.0, 20)
    e = np.arange(20)
    falling, rising = list(1000 - 0.5 * e + noise), list(1000 + 0.2 * e + noise)
    flat = list(1000 + np.where(e % 2 == 0, 2.0, -2.0))
    assert loop.still_improving(falling, patience=10, min_delta=1e-4, best=990.0)
    assert not loop.still_improving(rising, patience=10, min_delta=1e-4, best=995.0)
    assert not loop.still_improving(flat, patience=10, min_delta=1e-4, best=998.0)
    assert loop.still_improving(flat[:19], patience=10, min_delta=1e-4, best=998.0)  # too few epochs to tell
    # the gain asked for is min_delta of the best's magnitude per patience epochs: 5 nats here
    assert not loop.still_improving(falling, patience=10, min_delta=6e-3, best=990.0)


def _scripted_validation(monkeypatch, losses):
    """Make every epoch's validation loss the next of ``losses``."""
    it = iter(losses)

    def scripted(*args, **kwargs):
        value = float(next(it))
        return value, value

    monkeypatch.setattr(loop, "representation_epoch", scripted)


def test_early_stopping_waits_while_the_validation_loss_keeps_falling(synthetic, monkeypatch):
    # a lucky low point at epoch 5, then a steady fall that passes it only 40 epochs later, then a plateau:
    # 'no new best for 10 epochs' alone would stop at epoch 15; the trend keeps the fit going until the plateau
    e = np.arange(200)
    losses = np.where(e < 80, 1000.0 - 0.5 * e, 960.0) + np.where(e % 2 == 0, 1.0, -1.0)
    losses[4] = 978.0
    _scripted_validation(monkeypatch, losses)
    m = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=200, guide_epochs=0, patience=10, verbose=False)
    h = m.history
    assert m.fit_settings["stopped"] == "early_stopping"
    assert 80 < len(h["epoch"]) <= 100
    assert m.fit_settings["best_epoch"] <= 82 and h["val_loss"][m.fit_settings["best_epoch"] - 1] == min(h["val_loss"])


def test_early_stopping_ends_a_flat_validation_loss_after_two_patience_windows(synthetic, monkeypatch):
    losses = 500.0 + np.where(np.arange(100) % 2 == 0, 0.5, -0.5)
    _scripted_validation(monkeypatch, losses)
    m = DGD(latent_dim=3, n_components=3).fit(synthetic, max_epochs=100, guide_epochs=0, patience=5, verbose=False)
    assert m.fit_settings["stopped"] == "early_stopping" and len(m.history["epoch"]) == 10
