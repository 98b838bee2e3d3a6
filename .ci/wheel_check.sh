#!/usr/bin/env bash
# The package as users install it: build the wheel, check its contents, install it (not editable)
# with its dependencies into a fresh virtual environment and run a fit from that installation.
# Run from anywhere: bash .ci/wheel_check.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== wheel: build, contents, fresh virtual environment, fit"
start=$SECONDS
python -m pip wheel -q --no-deps -w "$tmp/dist" "$repo"
wheel="$(ls "$tmp"/dist/dgdcell-*.whl)"
python - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for data in ("dgdcell/_data/cellbench_lung5cl_3protocols_rna.h5ad", "dgdcell/_data/cite_cbmc_gse100866_scmdc_small.h5mu"):
    assert data in names, f"the wheel lacks {data}"
for module in ("dgdcell/module.py", "dgdcell/model.py", "dgdcell/nn/likelihoods.py", "dgdcell/train/loop.py"):
    assert module in names, f"the wheel lacks {module}"
compiled = [n for n in names if n.endswith((".c", ".so", ".dll", ".dylib"))]
assert not compiled, f"the wheel carries compiled or C files: {compiled}"
print(f"wheel contents OK ({len(names)} files)")
PY
python -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q torch==2.13.0
"$tmp/venv/bin/python" -m pip install -q "$wheel"
cd "$tmp"
MPLBACKEND=Agg "$tmp/venv/bin/python" - <<'PY'
import sys
import dgdcell
from pathlib import Path
assert Path(dgdcell.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), dgdcell.__file__
from sklearn.metrics import adjusted_rand_score
a = dgdcell.datasets.cellbench()
model = dgdcell.DGD(n_components=5, covariate_keys=["batch"], seed=0).fit(a, max_epochs=40, verbose=False)
ari = adjusted_rand_score(a.obs["cell_type"], a.obs["dgd_cluster"])
model.save("model")
again = dgdcell.DGD.load("model")
again.transform(a[:50].copy(), verbose=False)
print(f"fit from the installed wheel ({dgdcell.__file__}): ARI {ari:.3f}")
assert ari > 0.9, ari
PY
echo "wheel check: $((SECONDS - start)) s"
