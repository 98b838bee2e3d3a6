#!/usr/bin/env bash
# The user's side, as on a fresh machine after `pip install -e .`: the README's main command
# (python examples/cellbench.py) and a round trip of the command line (fit -> transform -> info)
# on small files, AnnData and MuData. Fails on any error or missing output. About 1.5 min.
# Run from anywhere: bash .ci/users_side.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export MPLBACKEND=Agg OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS=1

echo "== README main command: python examples/cellbench.py"
start=$SECONDS
python "$repo/examples/cellbench.py" | tee main.log
test -s cellbench_umap.png || { echo "examples/cellbench.py wrote no cellbench_umap.png"; exit 1; }
python - main.log <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"ARI (\d\.\d+)", text)
assert m, "no ARI line in the output of examples/cellbench.py"
ari = float(m.group(1))
assert ari >= 0.9, f"examples/cellbench.py: ARI {ari} (README: 1.000); the main job regressed"
print(f"main job OK: ARI {ari}")
PY
echo "main command: $((SECONDS - start)) s"

echo "== README workflow at a realistic size: 12,000 cells, scanpy neighbours and UMAP on X_dgd"
start=$SECONDS
python - <<'PY'
import numpy as np, scipy.sparse as sp, anndata as ad, scanpy as sc
import dgdcell
rng = np.random.default_rng(0)
n, g, k = 12000, 500, 6
profiles = rng.gamma(0.5, 1.0, (k, g)) + 0.05
profiles /= profiles.sum(1, keepdims=True)
types = rng.integers(0, k, n)
mu = profiles[types] * rng.lognormal(np.log(1500), 0.4, n)[:, None]
adata = ad.AnnData(sp.csr_matrix(rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)))
dgdcell.DGD(n_components=k).fit(adata, max_epochs=3, verbose=False)
sc.pp.neighbors(adata, use_rep="X_dgd")
sc.tl.umap(adata)
assert adata.obsm["X_umap"].shape == (n, 2) and np.isfinite(adata.obsm["X_umap"]).all()
print(f"{n} cells: fit, sc.pp.neighbors(use_rep='X_dgd') and sc.tl.umap OK")
PY
echo "README workflow at 12k cells: $((SECONDS - start)) s"

echo "== command line round trip"
start=$SECONDS
python - <<'PY'
import dgdcell
a = dgdcell.datasets.cellbench()
a[a.obs["batch"].isin(["sc_celseq2", "sc_celseq2_5cl_p1"])].copy().write_h5ad("ref.h5ad")
a[a.obs["batch"] == "sc_dropseq"][:120].copy().write_h5ad("query.h5ad")
m = dgdcell.datasets.cite_cbmc_small()
m[:400].copy().write("cite.h5mu")
m.mod["rna"][400:520].copy().write_h5ad("cite_query_rna.h5ad")
PY
dgdcell --version
dgdcell fit ref.h5ad -o ref_dgd.h5ad --model-dir model --covariate batch --n-components 5 \
    --max-epochs 5 --device cpu --plot fit.png
dgdcell transform model query.h5ad -o query_dgd.h5ad --max-epochs 10 --device cpu
dgdcell info model
dgdcell info model --json > info.json
python -m dgdcell fit cite.h5mu -o cite_dgd.h5mu --model-dir cite_model --n-components 6 --max-epochs 3 --device cpu
dgdcell transform cite_model cite_query_rna.h5ad -o cite_query_dgd.h5ad --max-epochs 5 --device cpu
dgdcell info cite_model
python - <<'PY'
import json
import anndata as ad
import mudata as md
import dgdcell

ref, query = ad.read_h5ad("ref_dgd.h5ad"), ad.read_h5ad("query_dgd.h5ad")
for name, a in (("fit", ref), ("transform", query)):
    assert a.obsm["X_dgd"].shape == (a.n_obs, 20), (name, a.obsm["X_dgd"].shape)
    assert a.obsm["X_dgd_batch"].shape == (a.n_obs, 2), name
    assert a.obsm["X_dgd_cluster_probs"].shape == (a.n_obs, 5), name
    assert a.obs["dgd_cluster"].dtype == "category", name
assert "transform" in query.uns["dgd"]
info = json.load(open("info.json"))
assert info["n_components"] == 5 and info["covariates"]["batch"] == ["sc_celseq2", "sc_celseq2_5cl_p1"], info
assert info["n_epochs"] == 5, info["n_epochs"]
model = dgdcell.DGD.load("model")
assert model.get_latent_representation().shape == (ref.n_obs, 20)

cite = md.read_h5mu("cite_dgd.h5mu")
assert cite.obsm["X_dgd"].shape == (400, 20) and "dgd_cluster" in cite.obs
cite_model = dgdcell.DGD.load("cite_model")
assert sorted(cite_model.features) == ["adt", "rna"], cite_model.features
rna_query = ad.read_h5ad("cite_query_dgd.h5ad")
prot = cite_model.predict_modality(rna_query, "adt", library_size=1e4)
assert prot.shape == (120, 10) and (prot.to_numpy() >= 0).all()
print("command line round trip OK")
PY
test -s fit.png || { echo "dgdcell fit --plot wrote no figure"; exit 1; }
echo "command line: $((SECONDS - start)) s"
