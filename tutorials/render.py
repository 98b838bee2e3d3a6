"""Render the tutorials: run each jupytext script as a notebook and save it executed.

    pip install jupytext nbclient ipykernel     # rendering only; not needed to run the scripts
    python tutorials/render.py                  # all tutorials, full mode
    python tutorials/render.py 02 04            # the tutorials whose file names start with these

Each ``tutorials/NN_name.py`` (jupytext percent format) becomes ``tutorials/NN_name.ipynb``
with its outputs. The notebook runs in a temporary folder (nothing is written into the
repository but the notebook) with one thread per library and matplotlib's inline backend.
Tutorial 3 reads the CITE-seq file named by ``DGDCELL_CITE_H5MU`` when that variable is set;
``--cite PATH`` sets it (default: ``cite_pbmc10k_scmdc.h5mu`` in the benchmarks' data folder,
``$DGDCELL_DATA`` or ``../shared/data``, when it exists; else the data set shipped with the
package). Timestamps and kernel details are stripped from the notebooks so
that re-rendering changes only what the code printed or drew.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the benchmarks' data folder: $DGDCELL_DATA or <repo>/../shared/data
DATA_DIR = Path(os.environ.get("DGDCELL_DATA", HERE.parents[1] / "shared" / "data"))
DEFAULT_CITE = DATA_DIR / "cite_pbmc10k_scmdc.h5mu"


def tutorials(prefixes: list[str]) -> list[Path]:
    scripts = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    if prefixes:
        scripts = [p for p in scripts if any(p.name.startswith(x) for x in prefixes)]
    return scripts


def clean(nb) -> None:
    """Drop execution timestamps and the kernel's version details (noise in diffs)."""
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.get("name") == "stderr" and _is_noise(o.get("text", "")))]


def _is_noise(text: str) -> bool:
    """Progress bars, and tqdm's notice that the rendering kernel has no ipywidgets."""
    progress = "\r" in text and ("it/s" in text or "epoch" in text)
    return progress or "TqdmWarning: IProgress not found" in text


def render(script: Path, timeout: int) -> float:
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(script)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
        seconds = time.perf_counter() - t0
    clean(nb)
    out = script.with_suffix(".ipynb")
    nbformat.write(nb, out)
    print(f"{script.name}: {seconds:.0f} s -> {out.relative_to(HERE.parent)} ({out.stat().st_size / 1e3:.0f} kB)")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="*", help="render only tutorials whose file names start with these")
    parser.add_argument("--cite", default=None, help="CITE-seq .h5mu for tutorial 3 (sets DGDCELL_CITE_H5MU)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = parser.parse_args(argv)

    os.environ.pop("DGDCELL_TUTORIAL_FAST", None)  # render the full tutorials
    os.environ.pop("MPLBACKEND", None)  # the kernel picks the inline backend
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    cite = args.cite or os.environ.get("DGDCELL_CITE_H5MU") or (str(DEFAULT_CITE) if DEFAULT_CITE.exists() else "")
    if cite:
        os.environ["DGDCELL_CITE_H5MU"] = str(Path(cite).resolve())

    scripts = tutorials(args.prefixes)
    if not scripts:
        print(f"no tutorial matches {args.prefixes}", file=sys.stderr)
        return 2
    for script in scripts:
        render(script, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
