"""The tutorials run (fast mode) and their rendered notebooks match their scripts.

Every ``tutorials/NN_*.py`` is run as ``__main__`` with ``DGDCELL_TUTORIAL_FAST=1``
(few epochs) in a temporary working directory, in two subprocesses of two or
three tutorials each (running side by side; sharing a process saves the imports and
numba's compilation of UMAP). The rendered ``tutorials/NN_*.ipynb`` must hold the same code as the
script: after editing a tutorial, re-render it with ``python tutorials/render.py NN``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TIMEOUT = 600

# what each tutorial must print (besides exiting with status 0)
EXPECTED = {
    "01_quickstart.py": [r"ARI of dgd_cluster against the cell lines: \d\.\d{3}", r"\['config\.json', 'weights\.pt'\]"],
    "02_mapping_new_data.py": [r"unseen batches: \{'batch': \['sc_dropseq'\]\}", r"label transfer accuracy: by component"],
    "03_cite_seq.py": [r"ARI of dgd_cluster vs cell type: joint RNA \+ protein", r"mean correlation:"],
    "04_components_and_history.py": [r"best validation epoch \d+", r"s per epoch"],
    "05_differential_expression.py": [r"H838: top-50 overlap with scanpy's Wilcoxon markers \d\.\d\d",
                                      r"features called DE at FDR 5%: \d+ of 3000",
                                      r"Spearman correlation of the protocol's fold changes"],
}


def test_every_tutorial_is_listed():
    names = [p.name for p in SCRIPTS]
    assert names == sorted(EXPECTED), names


# Runs scripts one after the other in one Python process, each with its own working directory and
# stdout file, and prints {script: [exit status, seconds]} as JSON. Sharing a process shares the
# imports and numba's compilation of UMAP / pynndescent (about 15 s per process).
RUNNER = r"""
import contextlib, json, os, runpy, sys, time, traceback
import matplotlib.pyplot as plt
import torch
results = {}
for script, workdir, out in json.loads(sys.argv[1]):
    os.chdir(workdir)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        try:
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc(file=f)
            status = 1
    plt.close("all")
    results[script] = [status, time.perf_counter() - t0]
print(json.dumps(results))
"""

# two processes (the machine has two cores)
GROUPS = [["01_quickstart.py", "04_components_and_history.py", "05_differential_expression.py"],
          ["02_mapping_new_data.py", "03_cite_seq.py"]]


def _run_group(names: list[str], root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        DGDCELL_TUTORIAL_FAST="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
        # numba's parallel UMAP would otherwise raise the OpenMP thread count that torch then uses
        NUMBA_NUM_THREADS="1",
    )
    env.pop("DGDCELL_CITE_H5MU", None)  # fast mode uses the data shipped with the package
    jobs = []
    for name in names:
        workdir = root / Path(name).stem
        workdir.mkdir(parents=True)
        jobs.append([str(TUTORIALS / name), str(workdir), str(root / f"{Path(name).stem}.out")])
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=root, env=env, capture_output=True, text=True,
        timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"tutorial runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        name: {"status": status[job[0]][0], "seconds": status[job[0]][1], "stdout": Path(job[2]).read_text(),
               "stderr": proc.stderr, "workdir": Path(job[1])}
        for name, job in zip(names, jobs)
    }


def test_groups_cover_every_tutorial():
    assert sorted(n for g in GROUPS for n in g) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run all tutorials once in fast mode (the tests below only read the results)."""
    root = tmp_path_factory.mktemp("tutorials")
    with ThreadPoolExecutor(max_workers=len(GROUPS)) as pool:
        futures = [pool.submit(_run_group, group, root) for group in GROUPS]
        results = {}
        for f in futures:
            results.update(f.result())
    return results


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tutorial_runs_in_fast_mode(runs, name):
    run = runs[name]
    tail = f"\n--- stdout ---\n{run['stdout'][-4000:]}\n--- stderr (process) ---\n{run['stderr'][-2000:]}"
    assert run["status"] == 0, f"{name} exited with {run['status']}{tail}"
    for pattern in EXPECTED[name]:
        assert re.search(pattern, run["stdout"]), f"{name} did not print {pattern!r}{tail}"
    leftovers = sorted(p.name for p in run["workdir"].iterdir())
    assert leftovers == [], f"{name} left files in its working directory: {leftovers}"


def _script_code_cells(path: Path) -> list[str]:
    """Code cells of a jupytext percent script (the header and markdown cells dropped)."""
    cells, current, kind = [], [], None
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            if kind == "code":
                cells.append("\n".join(current).strip())
            kind = "markdown" if "[markdown]" in line else "code"
            current = []
        elif kind is not None:
            current.append(line)
    if kind == "code":
        cells.append("\n".join(current).strip())
    return cells


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_rendered_notebook_matches_script(script):
    notebook = script.with_suffix(".ipynb")
    assert notebook.is_file(), f"{notebook.name} is missing: run python tutorials/render.py {script.name[:2]}"
    nb = json.loads(notebook.read_text())
    code = [("".join(c["source"]) if isinstance(c["source"], list) else c["source"]).strip()
            for c in nb["cells"] if c["cell_type"] == "code"]
    assert code == _script_code_cells(script), (
        f"{notebook.name} is out of date with {script.name}: run python tutorials/render.py {script.name[:2]}"
    )
    executed = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in executed), f"{notebook.name} has cells that were not executed"
    errors = [o for c in executed for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{notebook.name} has error outputs"
    size = notebook.stat().st_size
    assert size < 1_500_000, f"{notebook.name} is {size / 1e6:.1f} MB; keep figures small (dpi 72)"
