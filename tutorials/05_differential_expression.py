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
# # 5. Differential expression: markers, pairs of groups and the effect of a covariate
#
# A fitted DGD decodes every cell into denoised expression (`get_normalized_expression`).
# `differential_expression` compares decoded expression in two ways:
#
# 1. **Group mode**: two groups of cells (or each group against the rest), each cell decoded
#    at its own representation, like scVI's `differential_expression`;
# 2. **Counterfactual mode**: the **same cells** decoded under two classes of a covariate, for
#    example the same cells as if sequenced with Drop-seq and with CEL-seq2. The difference is
#    the effect of the covariate alone, with the cells held fixed.
#
# The output has scvi-tools' columns: `lfc_mean` (log2 fold change), `proba_de` (the share of
# cell pairs whose fold change exceeds `delta`, 0.25 by default), `bayes_factor`, the mean
# decoded fractions `scale1` / `scale2`, an `is_de_fdr_0.05` flag, and raw-count statistics.
# We use CellBench again (5 lung cancer cell lines, 5 batches from two protocols).

# %%
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import dgdcell

FAST = os.environ.get("DGDCELL_TUTORIAL_FAST", "") not in ("", "0")  # set by the test suite
MAX_EPOCHS = 5 if FAST else None

plt.rcParams["figure.dpi"] = 72
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of dependencies

adata = dgdcell.datasets.cellbench()
dgd = dgdcell.DGD(n_components=5, covariate_keys=["batch"], seed=0)
dgd.fit(adata, max_epochs=MAX_EPOCHS, verbose=False)

# %% [markdown]
# ## Markers of each cell line
#
# With `group2=None` every group is compared with all other cells ("rest"). Rows are sorted
# within each comparison: the features called DE at a 5% false discovery rate first, each
# part by the size of its fold change after the pseudocount's shrinkage (`lfc_shrunk`), so
# that a lowly expressed feature does not outrank a well expressed one on a fold change its
# counts cannot support. Keep the up-regulated features (`lfc_mean > 0`) for markers.

# %%
markers = dgd.differential_expression(adata, groupby="cell_type")
print(markers["comparison"].unique())
cols = ["comparison", "lfc_mean", "proba_de", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2"]
up = markers[markers["lfc_mean"] > 0]
up.groupby("comparison").head(3)[cols].round(4)

# %% [markdown]
# `dgdcell.pl.de_heatmap` shows the decoded expression of each group's top features (z-scored
# per feature): a clean block diagonal means the markers are specific.

# %%
dgdcell.pl.de_heatmap(dgd, adata, de=markers, groupby="cell_type", n_top=5)

# %% [markdown]
# ### Against scanpy's Wilcoxon test
#
# The usual scanpy markers come from a Wilcoxon rank-sum test on log-normalised counts. The
# two rankings agree on about half of the top 50 and differ by design: the test ranks by
# significance, which grows with a gene's expression level, while the decoder's ranking is by
# the size of the (shrunken) change, and the batch covariate takes out what a protocol
# changes in every cell line (H838 and A549 were only sequenced in the CEL-seq2 plates of
# five lines).

# %%
lognorm = adata.copy()
sc.pp.normalize_total(lognorm, target_sum=1e4)
sc.pp.log1p(lognorm)
sc.tl.rank_genes_groups(lognorm, "cell_type", method="wilcoxon")
for line in adata.obs["cell_type"].cat.categories:
    theirs = set(sc.get.rank_genes_groups_df(lognorm, line)["names"][:50])
    ours = set(up[up["group1"] == line].index[:50])
    print(f"{line}: top-50 overlap with scanpy's Wilcoxon markers {len(ours & theirs) / 50:.2f}")

# %% [markdown]
# ## Two groups
#
# `group1` and `group2` compare two groups directly. `dgdcell.pl.volcano` draws the fold change
# against the Bayes factor and labels the strongest features; the colour marks the features
# called DE at a 5% false discovery rate (`is_de_fdr_0.05`).

# %%
pair = dgd.differential_expression(adata, groupby="cell_type", group1="H1975", group2="HCC827")
print(f"features called DE at FDR 5%: {int(pair['is_de_fdr_0.05'].sum())} of {len(pair)}")
dgdcell.pl.volcano(pair, n_labels=8)

# %% [markdown]
# ## The effect of the protocol on the same cells (counterfactual)
#
# Each cell has its own batch representation, which the decoder reads next to `z`. Decoding
# the H1975 cells once with the Drop-seq batch and once with a CEL-seq2 batch gives, for every
# cell, two profiles that differ only in the batch. `covariate="batch"` selects this mode;
# `groupby` / `restrict_to` choose the cells. The pairs are the cells themselves, so the
# comparison is paired.

# %%
protocol = dgd.differential_expression(adata, groupby="cell_type", covariate="batch", group1="sc_dropseq",
                                       group2="sc_celseq2", restrict_to="H1975")
print(protocol["comparison"].iloc[0])
protocol.head(8)[["lfc_mean", "lfc_std", "proba_de", "scale1", "scale2"]].round(4)

# %% [markdown]
# The same comparison for another cell line should find much the same genes if the model
# has put the protocol's effect into the batch representation rather than into `z`:

# %%
other = dgd.differential_expression(adata, groupby="cell_type", covariate="batch", group1="sc_dropseq",
                                    group2="sc_celseq2", restrict_to="HCC827").reindex(protocol.index)
rho = pd.Series(protocol["lfc_mean"]).corr(pd.Series(other["lfc_mean"]), method="spearman")
print(f"Spearman correlation of the protocol's fold changes, H1975 vs HCC827 cells: {rho:.2f}")

# %% [markdown]
# ## Settings worth knowing
#
# - `delta`: the smallest |log2 fold change| that counts as a change (default 0.25).
# - `pseudocount`: added to the decoded fractions before the log. The default is a tenth of a
#   count at the compared cells' median library size, so fold changes of features expressed
#   below what the cells' counts resolve shrink towards 0; pass a number to set it, or
#   `"scvi"` for scvi-tools' estimate. The value used is in the `pseudocounts` column.
# - `transform_batch`: in group mode, decode every cell as if measured in one batch
#   (a batch-corrected comparison).
# - `mode="vanilla"`: scVI's older test (`proba_m1`, `proba_m2`) instead of the change test.
#
# A MAP-fitted model has no posterior per cell, so `proba_de` is a share of cell pairs rather
# than a posterior probability (see the docstring of
# `dgdcell.differential.differential_expression`); a model fitted with
# `DGD(posterior="normal")` decodes draws of each cell's posterior by default, which makes
# `proba_de` scVI's Monte Carlo estimate (`sampler="map"` compares the posterior means).

# %%
print(f"pseudocount used: {markers['pseudocounts'].iloc[0]:.2e}")
