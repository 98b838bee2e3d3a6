"""Shared fixtures: small generated count data with known structure."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_counts(n_per_group=(80, 60, 40), n_genes=60, n_batches=1, seed=0, batch_effect=0.0):
    """NB counts from distinct per-group expression profiles.

    Returns an AnnData with CSR float32 counts, ``obs['group']`` (the truth)
    and ``obs['batch']``. Each group over-expresses its own block of genes.
    """
    rng = np.random.default_rng(seed)
    k = len(n_per_group)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    profiles = np.tile(base, (k, 1))
    block = n_genes // k
    for g in range(k):
        profiles[g, g * block : (g + 1) * block] *= 8.0
    groups = np.repeat(np.arange(k), n_per_group)
    n = groups.size
    batches = rng.integers(0, n_batches, size=n)
    batch_profiles = np.exp(rng.normal(0, batch_effect, size=(n_batches, n_genes)))
    return nb_anndata(rng, profiles[groups] * batch_profiles[batches], 800, groups, batches)


def nb_anndata(rng, frac, library, groups, batches, var=None) -> ad.AnnData:
    """NB counts (dispersion 5) of cells with expression ``frac`` (n, G; normalised here) at log-normal
    library sizes around ``library`` (sd 0.3 in log space), as CSR float32 with ``obs['group']`` and
    ``obs['batch']`` from the codes ``groups`` / ``batches`` and ``var`` (default: gene names only)."""
    frac = frac / frac.sum(1, keepdims=True)
    n, n_genes = frac.shape
    mu = frac * rng.lognormal(np.log(library), 0.3, size=n)[:, None]
    r = 5.0
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)
    obs = pd.DataFrame(
        {"group": pd.Categorical([f"g{g}" for g in groups]), "batch": pd.Categorical([f"b{b}" for b in batches])},
        index=[f"cell{i}" for i in range(n)],
    )
    if var is None:
        var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def no_figure_leak():
    """Fails a test whose plotting left a figure open in pyplot (use with ``pytest.mark.usefixtures``)."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield
    leaked = set(plt.get_fignums()) - before
    plt.close("all")
    assert not leaked, "a pl function left a figure open in pyplot"


@pytest.fixture
def synthetic():
    return make_counts()


@pytest.fixture
def synthetic_batches():
    return make_counts(n_per_group=(70, 60, 50), n_batches=2, batch_effect=0.5, seed=1)
