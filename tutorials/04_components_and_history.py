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
# # 4. Reading the training history and choosing the number of components
#
# Two questions come up in every analysis:
#
# 1. **Did the fit work?** The training history (loss per epoch for the training cells and for
#    a held-out validation set) tells whether the model converged, when early stopping ended
#    it, and whether the decoder overfits.
# 2. **How many mixture components?** The number of components `n_components` is the number
#    of clusters the mixture can form. It is a modelling choice, like the resolution of Leiden
#    clustering. We fit a range of values and compare a few diagnostics that need no labels.
#
# We use CellBench again, where the truth (5 cell lines) is known, so we can see which
# diagnostics point to the right answer.

# %%
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_score  # scikit-learn comes with scanpy

import dgdcell

FAST = os.environ.get("DGDCELL_TUTORIAL_FAST", "") not in ("", "0")  # set by the test suite
MAX_EPOCHS = 5 if FAST else None
K_VALUES = [3, 5] if FAST else [3, 4, 5, 6, 8]
SEEDS = [0, 1]

plt.rcParams["figure.dpi"] = 72
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of dependencies

adata = dgdcell.datasets.cellbench()

# %% [markdown]
# ## Part 1: the training history
#
# We fit one model with the defaults (and the batch covariate, as in tutorial 1).

# %%
dgd = dgdcell.DGD(n_components=5, covariate_keys=["batch"], seed=0)
dgd.fit(adata, max_epochs=MAX_EPOCHS, verbose=False)

# %% [markdown]
# `dgd.history` is a dict of lists with one value per epoch (also stored in the AnnData as
# `adata.uns["dgd"]["history"]`, so it is saved with it). All losses are **per cell, in nats**:
#
# - `train_reconstruction` / `val_reconstruction`: the negative log-likelihood of the counts
#   (negative binomial), summed over genes;
# - `train_loss` / `val_loss`: the same plus the prior terms (the mixture density of each
#   cell's representation, the batch representation's prior, and the priors on the mixture's
#   parameters);
# - `seconds`: time since the start of the fit.
#
# The validation cells (10% by default, `train_size=0.9`) never update the decoder: their
# representations are fitted against it, so their loss measures how well the model describes
# cells it has not learned from.

# %%
per_epoch = ["epoch", "train_loss", "val_loss", "train_reconstruction", "val_reconstruction", "seconds"]
history = pd.DataFrame({k: dgd.history[k] for k in per_epoch}).set_index("epoch")
settings = dgd.fit_settings  # what fit was called with (max_epochs, guide_epochs, patience, ...)
history.round(1).tail()

# %%
dgdcell.pl.history(dgd)

# %% [markdown]
# How to read it:
#
# - **Most of the loss is reconstruction.** The two panels look alike because the counts of
#   3,000 genes weigh far more than the 20-dimensional prior terms. The prior part is plotted
#   separately below.
# - **The first 20 epochs are the guided phase** (`guide_epochs=20` in `fit`): the mixture
#   starts from Leiden clusters of a PCA of the counts, and during this phase each cell's prior
#   is the component of its initial cluster. When the mixture is released, each cell's prior
#   becomes the full mixture and the prior term steps (by about a nat per cell).
# - **Early stopping** starts after the guided phase: the fit ends when the validation loss has
#   not improved (by a relative `min_delta`) for `patience` epochs (10) and its trend over the
#   last 20 epochs is flat (a slow, noisy fall keeps the fit going), and the state of the
#   best epoch (dotted line) is restored. If a fit ends at `max_epochs` with the curves still
#   falling, give it more epochs.
# - **The gap between training and validation reconstruction** shows how much better the
#   decoder describes the cells it was trained on. A gap that widens while the validation loss
#   rises would mean overfitting; early stopping guards against it.

# %%
best = int(np.argmin(dgd.history["val_loss"]))
n_epochs = len(dgd.history["epoch"])
print(f"{n_epochs} epochs of at most {settings['max_epochs']} "
      f"({'early stopping' if n_epochs < settings['max_epochs'] else 'reached max_epochs'}); "
      f"best validation epoch {dgd.history['epoch'][best]} with loss {dgd.history['val_loss'][best]:.1f}")
gap = dgd.history["val_reconstruction"][best] - dgd.history["train_reconstruction"][best]
print(f"validation - training reconstruction at the best epoch: {gap:.1f} nats per cell "
      f"({100 * gap / dgd.history['train_reconstruction'][best]:.2f}%)")
print(f"{dgd.history['seconds'][-1]:.1f} s, {dgd.history['seconds'][-1] / n_epochs:.2f} s per epoch")

# %% [markdown]
# When a fit uses all of `max_epochs` (the default cap depends on the number of cells: 300
# here) with the validation loss still creeping down, as in this run, more epochs
# (`fit(adata, max_epochs=500)`) would refine the representations a little further; the
# clusters already match the cell lines.
#
# The prior part of the loss (total minus reconstruction: minus the log density of the cells'
# representations under the mixture and of the batch representations, plus the parameter
# priors), with the end of the guided phase marked:

# %%
prior = history["train_loss"] - history["train_reconstruction"]
val_prior = history["val_loss"] - history["val_reconstruction"]
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
ax.plot(history.index, prior, label="train")
ax.plot(history.index, val_prior, label="validation")
ax.axvline(settings["guide_epochs"] + 0.5, color="0.5", linestyle=":", label="end of the guided phase")
ax.set_xlabel("epoch")
ax.set_ylabel("nats per cell")
ax.set_title("prior terms of the loss")
ax.legend(frameon=False, fontsize="small");

# %% [markdown]
# The step at the end of the guided phase is small. What stands out is that the prior term
# keeps falling for the whole fit: as the decoder improves, the cells gather more tightly
# around their component means and the components' variances shrink, so part of the slow
# late decrease of the total loss is the clusters sharpening.
#
# A log scale makes the late epochs readable:

# %%
dgdcell.pl.history(adata, log=True)  # read from adata.uns["dgd"]["history"]

# %% [markdown]
# ## Part 2: choosing the number of components
#
# We fit the same model for several values of `n_components`, each with two seeds. For each fit
# we record:
#
# - **validation loss** at the best epoch. The seed decides which cells are held out, so only
#   fits with the same seed are comparable; we report the mean over the two seeds;
# - **smallest component weight**: a component that holds only a sliver of the cells is a sign
#   of too many components;
# - **silhouette** of the clusters in `X_dgd` (how well separated they are, from -1 to 1);
# - **stability**: the ARI between the clusterings of the two seeds (different validation
#   cells, different starts). A number of components that the data really supports gives the
#   same clusters whatever the seed;
# - the **ARI against the cell lines**, which we can compute only because the truth is known
#   here.

# %%
rows, clusterings = [], {}
for k in K_VALUES:
    for seed in SEEDS:
        fitted = adata.copy()
        model = dgdcell.DGD(n_components=k, covariate_keys=["batch"], seed=seed)
        model.fit(fitted, max_epochs=MAX_EPOCHS, verbose=False)
        h = model.history
        i = int(np.argmin(h["val_loss"]))
        clusters = fitted.obs["dgd_cluster"].astype(str).to_numpy()
        clusterings[k, seed] = clusters
        rows.append({
            "n_components": k,
            "seed": seed,
            "epochs": len(h["epoch"]),
            "val_loss": h["val_loss"][i],
            "min_weight": float(model.gmm.mixture_probs().detach().min()),
            "silhouette": silhouette_score(fitted.obsm["X_dgd"], clusters) if len(set(clusters)) > 1 else np.nan,
            "ARI_vs_truth": dgdcell.pl.adjusted_rand_index(fitted.obs["cell_type"], clusters),
        })
fits = pd.DataFrame(rows)
fits.round(3)

# %%
summary = fits.groupby("n_components").agg(
    val_loss=("val_loss", "mean"), min_weight=("min_weight", "min"),
    silhouette=("silhouette", "mean"), ARI_vs_truth=("ARI_vs_truth", "mean"),
)
summary["stability"] = [dgdcell.pl.adjusted_rand_index(clusterings[k, SEEDS[0]], clusterings[k, SEEDS[1]])
                        for k in summary.index]
summary.round(3)

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 3.2), layout="constrained")
for ax, col, title in zip(axes, ["val_loss", "silhouette", "stability", "ARI_vs_truth"],
                          ["validation loss (nats/cell)", "silhouette in X_dgd", "stability (ARI seed 0 vs 1)",
                           "ARI vs cell lines (truth)"]):
    ax.plot(summary.index, summary[col], marker="o")
    ax.set_xlabel("n_components")
    ax.set_title(title)
    ax.set_xticks(summary.index)

# %% [markdown]
# How to read the table:
#
# - The **validation loss** hardly changes with the number of components (it drifts down
#   slowly as components are added): it is dominated by the reconstruction of 3,000 genes, and
#   an extra component can always be placed somewhere. It is a weak guide on its own.
# - The **silhouette** is highest where each component holds one population: with too few
#   components distinct populations share one, with too many a population is cut in two and
#   the halves touch.
# - The **smallest component weight** drops sharply once a real population is split (here the
#   smallest cell line is 14% of the cells).
# - **Stability** across seeds flags some over-splitting, but the data-driven start (Leiden
#   clusters of a PCA) makes fits similar across seeds, so high stability alone does not prove
#   that a number of components is right.
# - With real data, also look at the clusters themselves: marker genes of each component, and
#   `dgdcell.pl.components_vs_labels` against any annotation you have.
#
# The heatmap of one fit per number of components shows what "too few" and "too many" look like:

# %%
ks = [K_VALUES[0], 5, K_VALUES[-1]] if not FAST else K_VALUES
fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 3.8), layout="constrained")
for ax, k in zip(np.atleast_1d(axes), ks):
    view = adata.copy()
    view.obs["dgd_cluster"] = pd.Categorical(clusterings[k, SEEDS[0]])
    dgdcell.pl.components_vs_labels(view, "cell_type", ax=ax)
    ax.set_title(f"n_components={k}")

# %% [markdown]
# ## Summary
#
# - `dgd.history` / `adata.uns["dgd"]["history"]` and `dgdcell.pl.history` show convergence, the
#   guided phase, the early-stopping epoch and the train/validation gap.
# - Choose `n_components` by fitting a range and comparing **cluster separation** (silhouette),
#   the **smallest component weight** and **stability across seeds**, then check the clusters
#   biologically. The validation loss alone hardly discriminates.
# - If you know the cell types of part of the cells, `DGD(label_key=...)` makes the mixture
#   semi-supervised, with one component (or several) per known type.
