"""What the ``dgdcell`` commands (:mod:`dgdcell.cli`) share: logging and progress,
the checks of input and output paths, the all-or-nothing writing of outputs
(:class:`_Outputs`), reading and writing h5ad files, option values and summaries."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("dgdcell.cli")


class CLIError(Exception):
    """An error with a message meant for the user (no traceback needed); exit status 1."""


class UsageError(CLIError):
    """Arguments that are wrong whatever the files (a wrong extension, two options naming the
    same path): printed argparse-style after the command's usage line; exit status 2."""


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _logging(quiet: bool, debug: bool):
    """Route the library's log records to stderr for the duration of a command,
    then restore the ``dgdcell`` logger exactly as it was (main() may run
    in-process, e.g. in tests)."""
    lib = logging.getLogger("dgdcell")
    saved = (lib.level, lib.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(levelname)s: %(message)s"))
    lib.addHandler(handler)
    lib.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    lib.propagate = False
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(saved[0])
        lib.propagate = saved[1]


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 when run alone; torch is not imported then)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return 0
    from .train.distributed import process_rank

    return process_rank()


def _progress(args) -> bool:
    """Progress bar only on an interactive stderr and without --quiet."""
    isatty = getattr(sys.stderr, "isatty", None)
    return (not args.quiet) and bool(isatty and isatty())


def _say(args, text: str = "") -> None:
    if not args.quiet:
        print(text, flush=True)


_DATA_KINDS = {".h5ad": "AnnData", ".h5mu": "MuData"}
_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


# usage checks: the arguments themselves, whatever the files (exit status 2)
def _suffixed(path: str, allowed, expected: str) -> Path:
    """``path`` as a Path if its suffix (any case) is one of ``allowed``, else a UsageError:
    "<expected>, got <file name>"."""
    p = Path(path)
    if p.suffix.lower() not in allowed:
        raise UsageError(f"{expected}, got {p.name}")
    return p


def _input_path(path: str) -> Path:
    return _suffixed(path, _DATA_KINDS, "input must be an .h5ad (AnnData) or .h5mu (MuData) file")


def _output_path(path: str, src: Path) -> Path:
    """``-o``: an .h5ad for an AnnData input, an .h5mu for a MuData (the object read is the one written)."""
    p = _suffixed(path, _DATA_KINDS, "-o/--output must end in .h5ad or .h5mu")
    suffix, want = p.suffix.lower(), src.suffix.lower()
    if suffix != want:
        kind = "a MuData" if want == ".h5mu" else "an AnnData"
        raise UsageError(f"-o/--output {p.name}: the input {src.name} is {kind}, written as {want}; "
                         f"name the output {p.stem}{want}")
    return p


def _plot_path(path: str) -> Path:
    return _suffixed(path, _PLOT_SUFFIXES, "--plot must end in .png, .pdf or .svg")


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()  # resolve() also takes paths that do not exist yet


# file-system checks, before anything is read or fitted (exit status 1)
def _check_input_file(p: Path) -> None:
    if not p.exists():
        raise CLIError(f"input file not found: {p}")
    if p.is_dir():
        raise CLIError(f"input is a directory, expected an .h5ad or .h5mu file: {p}")


def _check_writable(folder: Path, option: str) -> None:
    """Refuse a folder this process cannot create files in. Tried with a real file: os.access
    misses read-only file systems and says yes to root."""
    if not folder.is_dir():
        raise CLIError(f"{option}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dgdcell-write-check-", dir=folder)
    except OSError as err:
        raise CLIError(f"{option}: cannot write in the folder {folder} ({err.strerror or err}); "
                       "choose a folder you can write in") from None
    os.close(fd)
    os.unlink(probe)


def _check_output_file(p: Path, overwrite: bool, option: str) -> None:
    if p.is_dir():
        raise CLIError(f"{option} {p} is a directory")
    if p.exists() and not overwrite:
        raise CLIError(f"{option} {p} exists; pass --overwrite to replace it")
    if not p.parent.exists():
        raise CLIError(f"{option}: the folder {p.parent} does not exist; create it first")
    _check_writable(p.parent, option)


def _check_model_dir(p: Path, overwrite: bool) -> None:
    """``--model-dir``: a new folder (missing parents are created), an empty one, or with
    ``--overwrite`` a non-empty one (``DGD.save(overwrite=True)`` replaces the model in it)."""
    if p.exists() and not p.is_dir():
        raise CLIError(f"--model-dir {p} exists and is not a directory")
    if p.is_dir():
        if any(p.iterdir()) and not overwrite:
            raise CLIError(f"--model-dir {p} exists and is not empty; pass --overwrite to replace the model in it "
                           "or choose another folder")
        _check_writable(p, "--model-dir")
        return
    ancestor = next(a for a in p.absolute().parents if a.exists())
    _check_writable(ancestor, "--model-dir")


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda was requested but CUDA is not available (use --device cpu or auto)")


# --------------------------------------------------------------------------- writing outputs
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class _Outputs:
    """All-or-nothing writing of a command's outputs (``with _Outputs() as out: ...``).

    Each output is written under a temporary name in the folder of its final path
    (:meth:`temp_file`, :meth:`temp_dir`) and then put in place by :meth:`move` (a rename) or, for
    an existing model folder, :meth:`save_model_into`; :meth:`commit` marks the end. Leaving the
    block before :meth:`commit` (an error, an interrupt) removes the temporaries and undoes the
    steps already run: an output that did not exist before is removed again, so are the files a
    save added to an existing folder and the folders this call created. Nothing that existed
    before the call is removed (a file already replaced under ``--overwrite`` stays replaced).
    """

    def __init__(self) -> None:
        self._temps: list[Path] = []
        self._made: list[Path] = []  # folders this call created, outermost first
        self._undo: list[Callable[[], None]] = []
        self.committed = False

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, *exc) -> bool:
        if not self.committed:
            for undo in reversed(self._undo):
                with contextlib.suppress(Exception):
                    undo()
        for tmp in self._temps:
            with contextlib.suppress(Exception):
                _remove(tmp)
        if not self.committed:
            for folder in reversed(self._made):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
        return False

    def _temp_name(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.stem}.partial-{uuid.uuid4().hex[:8]}{final.suffix}")
        self._temps.append(tmp)
        return tmp

    def temp_file(self, final: Path) -> Path:
        return self._temp_name(final)

    def temp_dir(self, final: Path) -> Path:
        """An empty folder next to ``final`` (whose missing parent folders are created)."""
        missing = []
        folder = final.absolute().parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._made.append(folder)
        tmp = self._temp_name(final)
        tmp.mkdir()  # not tempfile.mkdtemp: its mode 0o700 would become the model folder's
        return tmp

    def move(self, tmp: Path, final: Path) -> None:
        existed = final.exists() or final.is_symlink()
        os.replace(tmp, final)
        if not existed:
            self._undo.append(lambda: _remove(final))

    def save_model_into(self, model, folder: Path) -> None:
        """``model.save(folder, overwrite=True)`` into an existing folder: the library's own save,
        which keeps the folder's config and weights a complete pair at any moment."""
        before = set(os.listdir(folder))

        def undo() -> None:
            for name in set(os.listdir(folder)) - before:
                _remove(folder / name)

        self._undo.append(undo)  # registered first: also cleans up after a save that fails half-way
        model.save(folder, overwrite=True)

    def commit(self) -> None:
        self.committed = True


@contextlib.contextmanager
def _library_stdout(args):
    """Keep prints of the library (e.g. a summary at the end of a fit) off the command's stdout,
    which carries the command's own summary only; ``--debug`` lets them through."""
    if args.debug:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _read_h5ad(path: Path):
    """An AnnData (.h5ad) or a MuData (.h5mu)."""
    import anndata as ad

    mudata = path.suffix.lower() == ".h5mu"
    try:
        if mudata:
            import mudata as md

            return md.read_h5mu(path)
        return ad.read_h5ad(path)
    except Exception as err:
        raise CLIError(f"could not read {path} as {'MuData' if mudata else 'AnnData'}: {err}") from err


def _write_h5ad(adata, path: Path) -> None:
    """Write an AnnData or MuData (by the object's type) to ``path`` (a temporary name from
    :class:`_Outputs`, with the final name's extension)."""
    mudata = hasattr(adata, "mod")
    if mudata != (path.suffix.lower() == ".h5mu"):
        raise CLIError(f"output {path.name}: a {'MuData' if mudata else 'AnnData'} is written as "
                       f"{'.h5mu' if mudata else '.h5ad'}")
    if mudata:
        adata.write_h5mu(path)
    else:
        adata.write_h5ad(path)


def _likelihoods(values: list[str]) -> dict[str, str]:
    """``['atac=bernoulli', ...]`` -> ``{'atac': 'bernoulli'}``."""
    out = {}
    for v in values:
        mod, sep, kind = v.partition("=")
        if not sep or not mod.strip() or not kind.strip():
            raise CLIError(f"--likelihood takes MODALITY=KIND (e.g. atac=bernoulli), got {v!r}")
        out[mod.strip()] = kind.strip()
    return out


def _covariates(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return list(dict.fromkeys(out))


def _cluster_summary(adata, key: str) -> str:
    col = f"{key}_cluster"
    if col not in adata.obs:
        return ""
    counts = adata.obs[col].value_counts(sort=False)
    occupied = int((counts > 0).sum())
    sizes = ", ".join(f"{k}:{v}" for k, v in counts.items() if v > 0)
    return f"{occupied} of {len(counts)} components occupied ({sizes})"


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)
