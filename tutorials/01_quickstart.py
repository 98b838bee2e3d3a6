# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Quick start: representations, clusters and a UMAP
#
# dgdcell learns a low-dimensional **representation** of every cell with a *deep generative
# decoder* (DGD). There is no encoder: each cell owns a learnable vector `z` (20 numbers by
# default), and a neural network, the **decoder**, maps `z` to the expected count of every gene.
# The counts are modelled with a negative-binomial distribution, so the model works on **raw
# counts** (no log-normalisation, no scaling). A **Gaussian mixture** over the representations
# acts as a prior: it keeps the latent space tidy and, at the same time, **clusters** the cells
# (one mixture component per cluster).
#
# In this tutorial we:
#
# 1. load a small real data set that ships with the package,
# 2. fit a DGD that also models the batch of each cell (a *covariate*),
# 3. look at the training curves,
# 4. compare the mixture clusters with the known cell identities,
# 5. draw a UMAP of the representation, as in any scanpy workflow,
# 6. decode denoised (and batch-corrected) expression, and save the model.
#
# Running time: about a minute on a laptop CPU.

# %%
import os
import warnings
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import dgdcell

# The test suite runs every tutorial in a fast mode (few epochs) so that they never go stale.
# Leave it unset to run the tutorial for real.
FAST = os.environ.get("DGDCELL_TUTORIAL_FAST", "") not in ("", "0")
MAX_EPOCHS = 5 if FAST else None  # None: the default cap; early stopping usually ends sooner

plt.rcParams["figure.dpi"] = 72
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of dependencies
sc.settings.verbosity = 0
print(f"dgdcell {dgdcell.__version__}, fast mode: {FAST}")

# %% [markdown]
# ## The data
#
# `dgdcell.datasets.cellbench()` returns the CellBench lung-adenocarcinoma mixture (Tian et al.
# 2019): 1,021 cells of **5 cell lines**, sequenced in **5 batches** with two protocols (CEL-seq2
# and Drop-seq), 3,000 variable genes. The matrix holds raw UMI counts (sparse). Because we know
# which cell line every cell comes from (`obs["cell_type"]`, from SNP demultiplexing), we can
# check whether the clusters are right.

# %%
adata = dgdcell.datasets.cellbench()
adata

# %%
pd.crosstab(adata.obs["cell_type"], adata.obs["batch"])

# %% [markdown]
# The batches differ a lot in sequencing depth, which is exactly what a batch covariate is for:

# %%
adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
adata.obs.groupby("batch", observed=True)["total_counts"].median().round()

# %% [markdown]
# ## Fitting
#
# `DGD(...)` sets up the model; `fit` trains it. The main choices:
#
# - `latent_dim`: size of each cell's representation (20 is a good default);
# - `n_components`: number of mixture components, i.e. clusters (here we know there are 5 cell
#   lines; tutorial 4 shows how to choose it when you do not);
# - `covariate_keys`: `obs` columns whose effect the model should explain separately. Each batch
#   gets its own small 2-D representation that is fed to the decoder next to `z`, so `z` is free
#   to describe biology rather than the batch.
#
# `fit` holds out 10% of the cells as a validation set and stops when their loss stops
# improving (early stopping). With `verbose=True` (the default) a progress bar shows the losses.

# %%
dgd = dgdcell.DGD(latent_dim=20, n_components=5, covariate_keys=["batch"], seed=0)
dgd.fit(adata, max_epochs=MAX_EPOCHS, verbose=False)
dgd

# %% [markdown]
# The results are written into the AnnData, in scanpy style, and nothing else in it is changed:
#
# | key | content |
# |---|---|
# | `obsm["X_dgd"]` | (cells, 20) representations |
# | `obsm["X_dgd_batch"]` | (cells, 2) representation of each cell's batch |
# | `obs["dgd_cluster"]` | most probable mixture component (categorical) |
# | `obsm["X_dgd_cluster_probs"]` | (cells, 5) component probabilities |
# | `uns["dgd"]` | settings, training history, library version |

# %%
print(adata.obsm["X_dgd"].shape, adata.obsm["X_dgd_batch"].shape, adata.obsm["X_dgd_cluster_probs"].shape)
print(sorted(adata.uns["dgd"].keys()))
adata.obs["dgd_cluster"].value_counts().sort_index()

# %% [markdown]
# ## Training curves
#
# `dgdcell.pl.history` plots the loss per cell (in nats) for the training and validation cells.
# The *total* loss includes the prior terms; the *reconstruction* loss is the negative-binomial
# negative log-likelihood of the counts alone. The dotted line marks the epoch with the lowest
# validation loss: that is the state the model keeps. Tutorial 4 reads these curves in detail.

# %%
dgdcell.pl.history(dgd)

# %% [markdown]
# ## Clusters against the known cell lines
#
# The adjusted Rand index (ARI) is 1 for a perfect match and about 0 for a random one.
# `dgdcell.pl.components_vs_labels` shows, for each mixture component (row), which cell lines
# its cells come from.

# %%
ari = dgdcell.pl.adjusted_rand_index(adata.obs["cell_type"], adata.obs["dgd_cluster"])
print(f"ARI of dgd_cluster against the cell lines: {ari:.3f}")
pd.crosstab(adata.obs["cell_type"], adata.obs["dgd_cluster"])

# %%
dgdcell.pl.components_vs_labels(adata, "cell_type")

# %% [markdown]
# ## UMAP of the representation
#
# `obsm["X_dgd"]` is used like a PCA: build the neighbour graph on it and run UMAP (or Leiden,
# PAGA, ...). Colour by cell line, by DGD cluster and by batch: cells of one line should group
# together whatever batch they come from.

# %%
sc.pp.neighbors(adata, use_rep="X_dgd", random_state=0)
sc.tl.umap(adata, random_state=0)
sc.pl.umap(adata, color=["cell_type", "dgd_cluster", "batch"], wspace=0.35)

# %% [markdown]
# For comparison, the standard scanpy pipeline on log-normalised counts (no batch correction)
# separates the cells by batch as well as by cell line:

# %%
ref = adata.copy()
sc.pp.normalize_total(ref, target_sum=1e4)
sc.pp.log1p(ref)
sc.pp.pca(ref, n_comps=20, random_state=0)
sc.pp.neighbors(ref, random_state=0)
sc.tl.umap(ref, random_state=0)
sc.pl.umap(ref, color=["cell_type", "batch"], wspace=0.35)

# %% [markdown]
# ## The latent space and the mixture
#
# `dgdcell.pl.latent` shows the first two principal axes of the representation together with
# the mixture components (crosses: means; dashed ellipses: 2-sigma contours). It also accepts
# `basis="umap"`. The batch representations `obsm["X_dgd_batch"]` show what the model attributes
# to the batch: one small cloud per batch.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
dgdcell.pl.latent(adata, model=dgd, color="cell_type", ax=axes[0])
xy = adata.obsm["X_dgd_batch"]
for batch in adata.obs["batch"].cat.categories:
    sel = (adata.obs["batch"] == batch).to_numpy()
    axes[1].scatter(xy[sel, 0], xy[sel, 1], s=6, label=batch)
axes[1].legend(frameon=False, fontsize="small")
axes[1].set_title("batch representation obsm['X_dgd_batch']");

# %% [markdown]
# ## Denoised and batch-corrected expression
#
# The decoder turns a representation back into expression. `get_normalized_expression` returns
# a cells x genes DataFrame: fractions by default, or expected counts at a chosen library size.
# With `transform_batch` every cell is decoded as if it had been measured in that batch, which
# removes the batch effect from the expression values too.

# %%
expr = dgd.get_normalized_expression(library_size=1e4)
expr_celseq = dgd.get_normalized_expression(library_size=1e4, transform_batch="sc_celseq2")
print(expr.shape)
# the five genes with the largest spread of denoised expression between the cell lines
line_means = expr.groupby(adata.obs["cell_type"].to_numpy(), observed=True).mean()
top = np.log1p(line_means).std().sort_values(ascending=False).index[:5]
line_means[top].round(1)

# %% [markdown]
# ## Saving and loading
#
# `save` writes a folder with a JSON configuration and the tensors; `DGD.load` needs no training
# data. A loaded model can embed new cells (tutorial 2) or decode expression.

# %%
with tempfile.TemporaryDirectory() as tmp:
    dgd.save(f"{tmp}/cellbench_model")
    print(sorted(os.listdir(f"{tmp}/cellbench_model")))
    loaded = dgdcell.DGD.load(f"{tmp}/cellbench_model")
assert np.allclose(loaded.get_latent_representation(), adata.obsm["X_dgd"])
loaded

# %% [markdown]
# ## Summary
#
# - `DGD(...).fit(adata)` on raw counts writes `X_dgd`, `dgd_cluster` and friends into `adata`.
# - With the batch as a covariate, the five mixture components recover the five cell lines
#   across all batches and both protocols.
# - `X_dgd` plugs into scanpy (`use_rep="X_dgd"`) like any embedding.
#
# Next: tutorial 2 maps new cells onto a trained model with `transform`.
