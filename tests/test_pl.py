import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace  # noqa: E402

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

import dgdcell  # noqa: E402
from dgdcell import DGD, pl  # noqa: E402
from dgdcell.latent import GaussianMixture  # noqa: E402

from .conftest import make_counts  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    adata = make_counts(n_batches=2, batch_effect=0.3)
    model = DGD(latent_dim=3, n_components=3, covariate_keys=["batch"], seed=0).fit(adata, max_epochs=3, verbose=False)
    return adata, model


pytestmark = pytest.mark.usefixtures("no_figure_leak")


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_from_model_adata_and_h5ad(fitted, tmp_path):
    adata, model = fitted
    fig = pl.history(model)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    train_line = fig.axes[0].lines[0]
    np.testing.assert_allclose(train_line.get_ydata(), model.history["train_loss"])
    np.testing.assert_array_equal(train_line.get_xdata(), [1, 2, 3])
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} >= {"train", "validation"}

    fig = pl.history(adata, log=True, save=tmp_path / "h.png")
    assert isinstance(fig, Figure) and _is_png(tmp_path / "h.png")
    assert fig.axes[0].get_yscale() in ("log", "symlog")

    adata.write_h5ad(tmp_path / "a.h5ad")  # the history comes back as arrays
    fig = pl.history(ad.read_h5ad(tmp_path / "a.h5ad"), save=str(tmp_path / "sub" / "h.pdf"))
    assert (tmp_path / "sub" / "h.pdf").read_bytes()[:4] == b"%PDF"


def test_history_errors(fitted):
    adata, _ = fitted
    with pytest.raises(KeyError, match="nope"):
        pl.history(adata, key="nope")
    with pytest.raises(KeyError, match="val_loss"):
        pl.history({"epoch": [1], "train_loss": [1.0], "train_reconstruction": [1.0], "val_reconstruction": [1.0]})
    with pytest.raises(ValueError, match="fit"):
        pl.history(DGD(latent_dim=3))
    with pytest.raises(TypeError):
        pl.history(42)


def test_latent_pca_projects_components(fitted, tmp_path):
    from sklearn.decomposition import PCA

    adata, model = fitted
    fig = pl.latent(adata, model=model, save=tmp_path / "latent.png")
    assert isinstance(fig, Figure) and _is_png(tmp_path / "latent.png")
    ax = fig.axes[0]
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    assert len(ellipses) == 3
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]

    # Independent reference: sklearn's PCA of X_dgd (axis signs may differ).
    z = adata.obsm["X_dgd"].astype(float)
    pca = PCA(2).fit(z)
    cells = np.vstack([c.get_offsets() for c in ax.collections if len(c.get_offsets()) > 3])
    ref = pca.transform(z)
    np.testing.assert_allclose(np.sort(np.abs(cells), 0), np.sort(np.abs(ref), 0), atol=1e-4)
    mean = model.gmm.mean.detach().numpy()
    var = model.gmm.stddev.detach().numpy() ** 2
    v = pca.components_.T
    for k, e in enumerate(ellipses):  # drawn in component order
        np.testing.assert_allclose(np.abs(e.center), np.abs((mean[k] - z.mean(0)) @ v), atol=1e-4)
        evals = np.linalg.eigvalsh(v.T @ np.diag(var[k]) @ v)
        np.testing.assert_allclose(sorted([e.width, e.height]), sorted(4 * np.sqrt(evals)), rtol=1e-5)
    assert "PC1" in ax.get_xlabel()


def test_latent_colours_bases_and_ax(fitted):
    adata, model = fitted
    fig = pl.latent(adata, color="batch", components=False)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["b0", "b1"]
    assert not fig.axes[0].patches
    fig = pl.latent(adata, color="gene3")  # a feature: continuous, with a colour bar
    assert len(fig.axes) == 2
    fig = pl.latent(adata, color="")
    assert fig.axes[0].get_legend() is None

    b = adata.copy()
    b.obsm["X_umap"] = np.random.default_rng(0).normal(size=(b.n_obs, 2))
    b.obs["score"] = np.linspace(0, 1, b.n_obs)
    fig = pl.latent(b, basis="umap", color="score", model=model)  # components are skipped off PCA
    assert "UMAP1" == fig.axes[0].get_xlabel() and not fig.axes[0].patches

    own, axes = plt.subplots(1, 2)
    out = pl.latent(adata, model=model, ax=axes[1])
    assert out is own and plt.fignum_exists(own.number)  # the caller's figure is left open
    plt.close(own)


def test_latent_errors(fitted):
    adata, _ = fitted
    with pytest.raises(KeyError, match="X_umap"):
        pl.latent(adata, basis="umap")
    with pytest.raises(KeyError, match="not_a_column"):
        pl.latent(adata, color="not_a_column")
    with pytest.raises(KeyError, match="X_other"):
        pl.latent(adata, key="other")
    wrong = SimpleNamespace(gmm=GaussianMixture(2, 5))  # a mixture of another dimension
    with pytest.raises(ValueError, match="dimension"):
        pl.latent(adata, model=wrong)


def test_latent_one_dimensional():
    a = ad.AnnData(np.zeros((30, 2), dtype=np.float32))
    a.obsm["X_dgd"] = np.random.default_rng(0).normal(size=(30, 1))
    a.obs["dgd_cluster"] = pd.Categorical(np.repeat(["0", "1"], 15))
    assert isinstance(pl.latent(a), Figure)


def test_components_vs_labels(fitted, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    adata, _ = fitted
    ari = adjusted_rand_score(adata.obs["group"], adata.obs["dgd_cluster"])
    fig = pl.components_vs_labels(adata, "group", save=tmp_path / "c.png")
    assert _is_png(tmp_path / "c.png")
    ax = fig.axes[0]
    assert f"ARI = {ari:.3f}" in ax.get_title()
    values = ax.images[0].get_array()
    assert values.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(values).sum(1)[np.asarray(values).sum(1) > 0], 1.0)

    fig = pl.components_vs_labels(adata, "group", normalize=None)
    counts = np.asarray(fig.axes[0].images[0].get_array())
    assert counts.sum() == adata.n_obs
    assert sum(int(t.get_text()) for t in fig.axes[0].texts) == adata.n_obs

    b = adata.copy()
    b.obs["group"] = b.obs["group"].astype(object)
    b.obs.iloc[:5, b.obs.columns.get_loc("group")] = np.nan
    fig = pl.components_vs_labels(b, "group", normalize="column")
    assert "5 cells" in fig.axes[0].get_title()


def test_components_vs_labels_errors(fitted):
    adata, _ = fitted
    with pytest.raises(KeyError, match="celltype"):
        pl.components_vs_labels(adata, "celltype")
    with pytest.raises(KeyError, match="run1_cluster"):
        pl.components_vs_labels(adata, "group", cluster_key="run1_cluster")
    with pytest.raises(ValueError, match="normalize"):
        pl.components_vs_labels(adata, "group", normalize="all")


def test_adjusted_rand_index_matches_sklearn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
        assert pl.adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    a = rng.integers(0, 3, 40)
    assert pl.adjusted_rand_index(a, [f"x{v}" for v in a]) == pytest.approx(1.0)
    for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [0, 1, 2]), ([0, 0, 1, 1], [0, 1, 2, 3]), ([0], [0])]:
        assert pl.adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b))


def test_summary(fitted, tmp_path):
    adata, model = fitted
    fig = pl.summary(adata, model=model, label_key="group", save=tmp_path / "s.pdf")
    assert isinstance(fig, Figure) and (tmp_path / "s.pdf").stat().st_size > 0
    titles = [a.get_title() for a in fig.axes]
    assert any("ARI" in t for t in titles) and any("total loss" in t for t in titles)
    assert isinstance(pl.summary(adata), Figure)  # history from adata.uns, no components


def test_pl_is_exposed():
    assert dgdcell.pl is pl
