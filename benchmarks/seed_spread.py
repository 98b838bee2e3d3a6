"""How much one data set's cluster ARI moves between seeds.

    python benchmarks/seed_spread.py [--dataset cbmc_rna] [--seeds 0-9] [--out benchmarks/results]

The quality table (``quality.py``) fits each set once, with seed 0. A fit's ARI also depends on
where early stopping ends it, so a change that only alters float32 rounding acts like another
seed. This script fits the default model with every seed and writes the ARI of
``obs['dgd_cluster']`` and the epochs per fit, with their mean and spread. Writes ``<out>/seed_spread.md`` and ``seed_spread.csv``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import dgdcell  # noqa: E402


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cbmc_rna", help=f"one of {','.join(common.LABELLED_SETS)}")
    p.add_argument("--seeds", default="0-9", help="a range 'a-b' or a comma-separated list")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    adata = common.LABELLED_SETS[args.dataset](verbose=False)
    k = adata.obs[common.LABEL_KEY].nunique()
    routes = {"default": None}
    rows = []
    for seed in _seeds(args.seeds):
        row = {"seed": seed}
        for name, on in routes.items():
            data = adata.copy()
            t0 = time.perf_counter()
            model = dgdcell.DGD(n_components=k, seed=seed).fit(data, verbose=False)
            row[f"ARI {name}"] = adjusted_rand_score(data.obs[common.LABEL_KEY], data.obs["dgd_cluster"])
            row[f"epochs {name}"] = len(model.history["epoch"])
            row[f"s {name}"] = time.perf_counter() - t0
        rows.append(row)
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    footer = []
    for name in routes:
        values = [r[f"ARI {name}"] for r in rows]
        footer.append(f"- {name}: mean ARI {statistics.fmean(values):.3f}, sd {statistics.pstdev(values):.3f}, "
                      f"range {min(values):.3f}-{max(values):.3f}")
    if len(routes) == 2 and len(rows) > 1:
        diff = [r["ARI default"] - r["ARI oneDNN"] for r in rows]
        sd = statistics.stdev(diff)
        t = statistics.fmean(diff) / (sd / math.sqrt(len(diff))) if sd > 0 else float("nan")
        wins = sum(d > 0.0005 for d in diff), sum(d < -0.0005 for d in diff)
        footer.append(f"- paired difference default - oneDNN: mean {statistics.fmean(diff):+.3f}, sd {sd:.3f}, "
                      f"t = {t:.2f} over {len(diff)} seeds; default higher on {wins[0]}, oneDNN higher on "
                      f"{wins[1]}, equal (within 0.0005) on {len(diff) - sum(wins)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_table(
        rows, out / "seed_spread.md", out / "seed_spread.csv",
        f"dgdcell: ARI spread over seeds ({args.dataset})",
        header_lines=[f"- machine: {common.machine_description()}",
                      f"- command: `python benchmarks/seed_spread.py --dataset {args.dataset} --seeds {args.seeds}`",
                      f"- `DGD(n_components={k}, seed=s).fit(adata)` on {adata.n_obs} cells x {adata.n_vars} genes; "
                      "ARI of `obs['dgd_cluster']` against the labels; 'oneDNN' and 'default' are the CPU float32 "
                      "matrix-product routes of `dgdcell.train.matmul` (identical code otherwise)"],
        footer_lines=footer, floatfmt=".3f",
    )


if __name__ == "__main__":
    main()
