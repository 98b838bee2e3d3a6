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
# # 2. Mapping a new data set onto a trained model
#
# A trained DGD is a reusable **reference**: its decoder and its Gaussian mixture describe the
# cell states it has seen. New cells (a **query**: another sample, another lab, another
# protocol) are embedded with `dgd.transform(query)`. Because the DGD has no encoder, this
# means *fitting* a fresh representation for every new cell against the **frozen** decoder and
# mixture: the reference model is never changed, so reference and query end up in the same
# coordinates and the query cells get a cluster of the reference mixture.
#
# Here we train on four of CellBench's five batches (all CEL-seq2) and map the fifth, a
# **Drop-seq** batch the model has never seen, with a different protocol and about 4x fewer
# reads per cell. Then we transfer the cell-line labels from the reference to the query and
# check them against the truth.

# %%
import os
import warnings
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import dgdcell

FAST = os.environ.get("DGDCELL_TUTORIAL_FAST", "") not in ("", "0")  # set by the test suite
MAX_EPOCHS = 5 if FAST else None

plt.rcParams["figure.dpi"] = 72
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of dependencies
sc.settings.verbosity = 0

# %% [markdown]
# ## Reference and query

# %%
adata = dgdcell.datasets.cellbench()
query_batch = "sc_dropseq"
reference = adata[adata.obs["batch"] != query_batch].copy()
query = adata[adata.obs["batch"] == query_batch].copy()
reference.obs["batch"] = reference.obs["batch"].cat.remove_unused_categories()
print(f"reference: {reference.n_obs} cells in batches {list(reference.obs['batch'].cat.categories)}")
print(f"query:     {query.n_obs} cells of batch {query_batch!r}")
query.obs["cell_type"].value_counts()

# %% [markdown]
# The query holds only three of the five cell lines: a realistic situation where a new sample
# covers part of the reference.
#
# ## Train the reference model
#
# Same settings as in tutorial 1: five components and the batch as a covariate.

# %%
dgd = dgdcell.DGD(latent_dim=20, n_components=5, covariate_keys=["batch"], seed=0)
dgd.fit(reference, max_epochs=MAX_EPOCHS, verbose=False)
print(f"{len(dgd.history['epoch'])} epochs")
print("reference ARI:", round(dgdcell.pl.adjusted_rand_index(reference.obs["cell_type"], reference.obs["dgd_cluster"]), 3))

# %% [markdown]
# In practice the reference is usually trained once and shared as a folder (`dgd.save`), and the
# person mapping new data loads it with `DGD.load`. Nothing but the model folder is needed.

# %%
model_dir = os.path.join(tempfile.mkdtemp(), "cellbench_reference")
dgd.save(model_dir)
ref_model = dgdcell.DGD.load(model_dir)

# %% [markdown]
# ## Map the query with `transform`
#
# What `transform` does, in short:
#
# 1. **Features are matched by name.** Reference genes missing from the query are left out of
#    the likelihood, extra query genes are ignored (fewer than half of the reference genes
#    present is an error).
# 2. **Starts.** Every cell is scored at every mixture component's mean (and, with covariates,
#    at every known batch), in one vectorised pass; each cell starts from its best candidates.
# 3. **Fit.** Only the new representations are optimised; decoder and mixtures stay frozen.
#
# The query's batch, `sc_dropseq`, is unknown to the model. That needs no special handling:
# such cells get the full batch mixture as their prior and find the known batch they resemble
# most. The same keys as `fit` are written: `obsm["X_dgd"]`, `obs["dgd_cluster"]`, ...

# %%
ref_model.transform(query, verbose=False)
info = query.uns["dgd"]["transform"]
print("feature overlap:", info["features"])
print("unseen batches:", info["unseen_classes"])
print(f"{info['n_epochs']} epochs, {info['seconds']:.1f} s")
query.obsm["X_dgd"].shape

# %% [markdown]
# ## Transfer labels from the reference
#
# Every query cell now has a component of the *reference* mixture. Naming each component after
# the majority cell line of its reference cells transfers the labels. (With real data you would
# use the reference's annotation, e.g. cell types, in place of the cell lines.) A second,
# component-free way is a k-nearest-neighbour vote in `X_dgd`.

# %%
table = pd.crosstab(reference.obs["dgd_cluster"], reference.obs["cell_type"])
component_label = table.idxmax(axis=1)
component_label.index = component_label.index.astype(str)
query.obs["predicted_line"] = query.obs["dgd_cluster"].astype(str).map(component_label.astype(str))

from sklearn.neighbors import KNeighborsClassifier  # scikit-learn comes with scanpy

knn = KNeighborsClassifier(n_neighbors=15).fit(reference.obsm["X_dgd"], reference.obs["cell_type"].astype(str))
query.obs["predicted_line_knn"] = knn.predict(query.obsm["X_dgd"])

truth = query.obs["cell_type"].astype(str)
acc_component = (query.obs["predicted_line"] == truth).mean()
acc_knn = (query.obs["predicted_line_knn"] == truth).mean()
ari_query = dgdcell.pl.adjusted_rand_index(truth, query.obs["dgd_cluster"])
print(f"query: ARI of dgd_cluster vs cell line {ari_query:.3f}; "
      f"label transfer accuracy: by component {acc_component:.3f}, by 15-NN {acc_knn:.3f}")
pd.crosstab(truth, query.obs["predicted_line"])

# %% [markdown]
# ## Reference and query together
#
# Concatenating the two AnnData objects keeps `obsm["X_dgd"]`, so one UMAP shows both. Query
# cells should fall onto the reference cells of the same line, not form islands of their own.

# %%
both = sc.concat({"reference": reference, "query": query}, label="dataset", index_unique=None)
sc.pp.neighbors(both, use_rep="X_dgd", random_state=0)
sc.tl.umap(both, random_state=0)
sc.pl.umap(both, color=["cell_type", "dataset", "dgd_cluster"], wspace=0.35)

# %% [markdown]
# The same in the model's own latent space (first two principal axes, with the mixture
# components of the reference):

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
dgdcell.pl.latent(reference, model=ref_model, color="cell_type", ax=axes[0], title="reference")
dgdcell.pl.latent(query, model=ref_model, color="cell_type", ax=axes[1], title="query (Drop-seq, mapped)");

# %% [markdown]
# ## Missing genes
#
# A query panel rarely has exactly the reference genes. Here we drop a random 30% of the genes
# from the query: the mapping still works, on the genes that remain.

# %%
rng = np.random.default_rng(0)
keep = np.sort(rng.choice(query.n_vars, size=int(0.7 * query.n_vars), replace=False))
partial = query[:, keep].copy()
ref_model.transform(partial, verbose=False)
print("feature overlap:", partial.uns["dgd"]["transform"]["features"])
same = (partial.obs["dgd_cluster"].to_numpy() == query.obs["dgd_cluster"].to_numpy()).mean()
print(f"cells in the same component as with all genes: {same:.3f}")

# %% [markdown]
# ## Expression of the query, batch-corrected
#
# `get_normalized_expression(query, ...)` decodes the query's representations. With
# `transform_batch` the cells are decoded as if measured in a reference batch, which puts
# Drop-seq cells on the CEL-seq2 scale.

# %%
denoised = ref_model.get_normalized_expression(query, library_size=1e4, transform_batch="sc_celseq2")
print(denoised.shape)
denoised.iloc[:3, :5]

# %% [markdown]
# ## Summary
#
# - `DGD.load(folder).transform(query)` embeds new cells against a frozen reference; the
#   reference is not retrained and not changed.
# - Unseen batches and missing genes need no special handling.
# - The query gets reference clusters (`dgd_cluster`), so labels transfer by component or by
#   nearest neighbours in `X_dgd`.
#
# Command-line equivalent: `dgdcell fit reference.h5ad -o ref_out.h5ad --model-dir model
# --covariate batch` and then `dgdcell transform model query.h5ad -o query_out.h5ad`.
