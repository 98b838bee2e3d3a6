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
