import matplotlib

matplotlib.use("Agg")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import dgdcell  # noqa: E402
from dgdcell import DGD, cli  # noqa: E402

from .conftest import make_counts  # noqa: E402

SMALL = ["--latent-dim", "3", "--n-components", "3", "--max-epochs", "3", "--device", "cpu"]


def run_main(argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "in.h5ad"
    make_counts(n_batches=2, batch_effect=0.3).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def fitted_cli(data_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    rc, out, err = run_main(["fit", data_file, "-o", d / "out.h5ad", "--model-dir", d / "model",
                             "--covariate", "batch", "--plot", d / "fig.png", *SMALL])
    assert rc == 0, err
    return d, out, err


def test_fit_writes_outputs_model_and_figure(fitted_cli, data_file):
    d, out, err = fitted_cli
    res = ad.read_h5ad(d / "out.h5ad")
    assert res.obsm["X_dgd"].shape == (180, 3)
    assert res.obsm["X_dgd_batch"].shape == (180, 2)
    assert res.obsm["X_dgd_cluster_probs"].shape == (180, 3)
    assert isinstance(res.obs["dgd_cluster"].dtype, pd.CategoricalDtype)
    assert len(res.uns["dgd"]["history"]["epoch"]) == 3
    src = ad.read_h5ad(data_file)
    assert (res.X != src.X).nnz == 0 and list(res.obs_names) == list(src.obs_names)
    model = DGD.load(d / "model", device="cpu")
    np.testing.assert_array_equal(model.get_latent_representation(), res.obsm["X_dgd"])
    assert model.init_args["covariate_keys"] == ["batch"] and model.fit_settings["n_epochs"] == 3
    assert (d / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert "180 cells x 60 features in 3 epochs" in out and "clusters:" in out
    assert "Traceback" not in err
    assert not list(d.glob(".*partial*"))  # no temporary output left behind


def test_info(fitted_cli):
    d, _, _ = fitted_cli
    rc, out, err = run_main(["info", d / "model"])
    assert rc == 0, err
    assert f"dgdcell {dgdcell.__version__}" in out
    for text in ("latent_dim 3", "3 components", "features: rna 60", "covariate batch: 2 classes (b0, b1)",
                 "epochs: 3 of max 3", "final loss per cell", "training cells: 180"):
        assert text in out, text
    rc, out, _ = run_main(["info", d / "model", "--json"])
    info = json.loads(out)
    assert info["n_epochs"] == 3 and info["features"] == {"rna": 60} and info["covariates"] == {"batch": ["b0", "b1"]}
    assert info["final"]["val_loss"] == pytest.approx(DGD.load(d / "model", device="cpu").history["val_loss"][-1])
    assert len(info["mixture_weights"]) == 3 and sum(info["mixture_weights"]) == pytest.approx(1.0)


def test_quiet_fit_with_layer_and_labels(data_file, tmp_path):
    a = ad.read_h5ad(data_file)
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0  # the counts are only in the layer
    a.write_h5ad(tmp_path / "layer.h5ad")
    rc, out, err = run_main(["fit", tmp_path / "layer.h5ad", "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                             "--layer", "counts", "--label-key", "group", "--key-added", "run1", "--quiet", *SMALL])
    assert rc == 0, err
    assert out == "" and err == ""
    res = ad.read_h5ad(tmp_path / "o.h5ad")
    assert "run1_cluster" in res.obs and "X_run1" in res.obsm
    assert DGD.load(tmp_path / "m", device="cpu").label_categories == ["g0", "g1", "g2"]


def test_refuses_to_overwrite(fitted_cli, data_file):
    d, _, _ = fitted_cli
    rc, out, err = run_main(["fit", data_file, "-o", d / "out.h5ad", "--model-dir", d / "new", *SMALL])
    assert rc == 1 and err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    rc, _, err = run_main(["fit", data_file, "-o", d / "new.h5ad", "--model-dir", d / "model", *SMALL])
    assert rc == 1 and "not empty" in err
    assert not (d / "new.h5ad").exists()


def test_errors_are_one_line_without_traceback(data_file, tmp_path):
    rc, out, err = run_main(["fit", tmp_path / "missing.h5ad", "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m"])
    assert rc == 1 and err == f"error: input file not found: {tmp_path / 'missing.h5ad'}\n" and out == ""
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                           "--covariate", "donor", *SMALL])
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: covariate key 'donor' is not a column")
    rc, _, err = run_main(["info", tmp_path])
    assert rc == 1 and err.startswith("error: ") and "not a saved DGD" in err
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    rc, _, err = run_main(["fit", tmp_path / "bad.h5ad", "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m"])
    assert rc == 1 and "could not read" in err and "Traceback" not in err
    assert not (tmp_path / "o.h5ad").exists() and not (tmp_path / "m").exists()


def test_debug_shows_traceback(data_file, tmp_path):
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                           "--covariate", "donor", "--debug", *SMALL])
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].startswith("error: covariate key 'donor'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_requested_without_cuda(data_file, tmp_path):
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                           "--device", "cuda"])
    assert rc == 1 and "CUDA is not available" in err


@pytest.mark.parametrize(
    "argv, code",
    [([], 2), (["fit"], 2), (["frobnicate"], 2), (["fit", "a.h5ad", "-o", "b.h5ad", "--model-dir", "m",
                                                  "--max-epochs", "0"], 2),
     (["--version"], 0), (["info", "--help"], 0)],
)
def test_usage_exit_codes(argv, code):
    rc, out, err = run_main(argv)
    assert rc == code
    if code == 2:
        assert "usage:" in err


def test_logging_and_progress_settings(monkeypatch):
    lib = logging.getLogger("dgdcell")
    before = (list(lib.handlers), lib.level, lib.propagate)
    run_main(["info", "/nonexistent/model"])
    assert (list(lib.handlers), lib.level, lib.propagate) == before  # main() leaves logging as it found it

    class FakeStderr(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    args = cli.build_parser().parse_args(["info", "x"])
    monkeypatch.setattr(sys, "stderr", FakeStderr(True))
    assert cli._progress(args) is True
    args.quiet = True
    assert cli._progress(args) is False
    args.quiet = False
    monkeypatch.setattr(sys, "stderr", FakeStderr(False))
    assert cli._progress(args) is False


def test_transform_with_a_stand_in_method(fitted_cli, data_file, tmp_path, monkeypatch):
    """The CLI's side of the contract, independent of DGD.transform's implementation."""
    d, _, _ = fitted_cli
    calls = []

    def transform(self, adata_new, init="mean", n_samples=1, max_epochs=None, layer=None, key_added="dgd",
                  verbose=True):
        calls.append(dict(init=init, max_epochs=max_epochs, layer=layer, key_added=key_added, verbose=verbose))
        adata_new.obsm[f"X_{key_added}"] = np.zeros((adata_new.n_obs, self.latent_dim), dtype=np.float32)
        adata_new.obs[f"{key_added}_cluster"] = pd.Categorical(["0"] * adata_new.n_obs, categories=["0", "1", "2"])
        return self

    monkeypatch.setattr(DGD, "transform", transform, raising=False)
    rc, out, err = run_main(["transform", d / "model", data_file, "-o", tmp_path / "t.h5ad", "--max-epochs", "2",
                             "--init", "sample", "--device", "cpu"])
    assert rc == 0, err
    assert calls == [dict(init="sample", max_epochs=2, layer=None, key_added="dgd", verbose=False)]
    assert ad.read_h5ad(tmp_path / "t.h5ad").obsm["X_dgd"].shape == (180, 3)
    assert "embedded 180 cells" in out

    rc, _, err = run_main(["transform", d / "model", data_file, "-o", tmp_path / "t2.h5ad", "--seed", "3"])
    assert rc == 1 and "does not take ['seed']" in err  # an option the method cannot take is an error

    monkeypatch.delattr(DGD, "transform")
    for base in DGD.__mro__[1:]:  # the method itself lives on a base class (a mixin)
        if "transform" in vars(base):
            monkeypatch.delattr(base, "transform")
    rc, _, err = run_main(["transform", d / "model", data_file, "-o", tmp_path / "t2.h5ad"])
    assert rc == 1 and "no DGD.transform" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(DGD, "transform"), reason="DGD.transform is not implemented yet")
def test_transform_round_trip(fitted_cli, data_file, tmp_path):
    d, _, _ = fitted_cli
    new = ad.read_h5ad(data_file)[:50].copy()
    new.write_h5ad(tmp_path / "new.h5ad")
    rc, out, err = run_main(["transform", d / "model", tmp_path / "new.h5ad", "-o", tmp_path / "t.h5ad",
                             "--max-epochs", "2", "--seed", "1", "--device", "cpu", "--n-reference", "7"])
    assert rc == 0, err
    res = ad.read_h5ad(tmp_path / "t.h5ad")
    assert res.obsm["X_dgd"].shape == (50, 3)
    assert res.uns["dgd"]["transform"]["n_reference"] == 7 and 1 <= len(res.uns["dgd"]["transform"]["reference_rows"]) <= 7
    rc, _, err = run_main(["transform", d / "model", tmp_path / "new.h5ad", "-o", tmp_path / "t3.h5ad",
                           "--n-reference", "-1"])
    assert rc == 2 and "expected an integer >= 0" in err
    assert isinstance(res.obs["dgd_cluster"].dtype, pd.CategoricalDtype)
    assert list(res.obs_names) == list(new.obs_names)


def _console_script() -> str | None:
    exe = Path(sys.executable).parent / ("dgdcell.exe" if os.name == "nt" else "dgdcell")
    return str(exe) if exe.exists() else shutil.which("dgdcell")


def test_console_script_and_python_m(data_file, tmp_path):
    script = _console_script()
    if script is None:
        pytest.skip("the dgdcell console script is not installed (pip install -e .)")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [script, "fit", str(data_file), "-o", str(tmp_path / "o.h5ad"), "--model-dir", str(tmp_path / "m"), *SMALL],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "180 cells" in proc.stdout
    assert "epoch/s" not in proc.stderr and "s/epoch" not in proc.stderr  # no progress bar off a terminal
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "o.h5ad").is_file()
    proc = subprocess.run([sys.executable, "-m", "dgdcell", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- output paths, interrupts, failures
def _entries(folder: Path) -> set[str]:
    """Every path under ``folder``, relative, hidden temporaries included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def no_fit(monkeypatch):
    """DGD.fit / DGD.load replaced by stand-ins that record the call: the checks must come first."""
    calls = []

    def fit(self, *a, **k):
        calls.append("fit")
        raise AssertionError("fit was called")

    def load(cls, *a, **k):
        calls.append("load")
        raise AssertionError("load was called")

    monkeypatch.setattr(DGD, "fit", fit)
    monkeypatch.setattr(DGD, "load", classmethod(load))
    return calls


def _unwritable(folder: Path, monkeypatch) -> None:
    """Make ``folder`` refuse new files: chmod, and for root (whom chmod does not stop) a
    stand-in for the file creation that the CLI's write check tries."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(
    "case, code, words",
    [
        ("output folder is a file", 1, ["-o/--output", "is not a folder"]),
        ("output folder unwritable", 1, ["-o/--output", "cannot write in the folder"]),
        ("output folder missing", 1, ["-o/--output", "does not exist"]),
        ("model-dir equals output", 2, ["--model-dir", "-o/--output", "same path"]),
        ("h5mu output for AnnData input", 2, ["-o/--output", "o.h5mu", "name the output o.h5ad"]),
        ("h5ad output for MuData input", 2, ["-o/--output", "o.h5ad", "name the output o.h5mu"]),
        ("model-dir not empty", 1, ["--model-dir", "not empty", "--overwrite"]),
        ("model-dir under a file", 1, ["--model-dir", "is not a folder"]),
        ("model-dir unwritable", 1, ["--model-dir", "cannot write in the folder"]),
        ("plot folder unwritable", 1, ["--plot", "cannot write in the folder"]),
        ("plot folder missing", 1, ["--plot", "does not exist"]),
        ("plot exists", 1, ["--plot", "exists", "--overwrite"]),
        ("plot extension", 2, ["--plot", ".png"]),
    ],
)
def test_fit_checks_output_paths_before_reading_or_fitting(case, code, words, data_file, tmp_path, no_fit,
                                                           monkeypatch):
    src, out, model, plot = data_file, tmp_path / "o.h5ad", tmp_path / "m", None
    if case == "output folder is a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o.h5ad"
    elif case == "output folder unwritable":
        _unwritable(tmp_path / "ro", monkeypatch)
        out = tmp_path / "ro" / "o.h5ad"
    elif case == "output folder missing":
        out = tmp_path / "nope" / "o.h5ad"
    elif case == "model-dir equals output":
        model = out
    elif case == "h5mu output for AnnData input":
        out = tmp_path / "o.h5mu"
    elif case == "h5ad output for MuData input":
        src = tmp_path / "in.h5mu"
        src.write_text("not read: the names are wrong already")
    elif case == "model-dir not empty":
        model.mkdir()
        (model / "keep.txt").write_text("x")
    elif case == "model-dir under a file":
        (tmp_path / "f").write_text("x")
        model = tmp_path / "f" / "m"
    elif case == "model-dir unwritable":
        _unwritable(tmp_path / "ro", monkeypatch)
        model = tmp_path / "ro" / "m"
    elif case == "plot folder unwritable":
        _unwritable(tmp_path / "ro", monkeypatch)
        plot = tmp_path / "ro" / "fig.png"
    elif case == "plot folder missing":
        plot = tmp_path / "nope" / "fig.png"
    elif case == "plot exists":
        plot = tmp_path / "fig.png"
        plot.write_bytes(b"old")
    elif case == "plot extension":
        plot = tmp_path / "fig.jpg"
    before = _entries(tmp_path)
    try:
        rc, stdout, err = run_main(["fit", src, "-o", out, "--model-dir", model, *(["--plot", plot] if plot else []),
                                    *SMALL])
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    assert no_fit == []  # refused before the data were read and fitted
    assert rc == code, err
    for w in words:
        assert w in err, (w, err)
    if code == 2:
        assert err.startswith("usage: dgdcell fit") and "dgdcell fit: error: " in err
    else:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and stdout == ""
    assert _entries(tmp_path) == before  # nothing created, the write check's probe file included


@pytest.mark.parametrize(
    "case, code, words",
    [
        ("h5mu output for AnnData input", 2, ["-o/--output", "name the output t.h5ad"]),
        ("output folder unwritable", 1, ["-o/--output", "cannot write in the folder"]),
        ("output folder is a file", 1, ["-o/--output", "is not a folder"]),
        ("output exists", 1, ["-o/--output", "exists", "--overwrite"]),
    ],
)
def test_transform_checks_output_path_before_loading(case, code, words, data_file, tmp_path, no_fit, monkeypatch):
    monkeypatch.setattr(DGD, "transform", lambda self, *a, **k: self, raising=False)
    (tmp_path / "model").mkdir()
    out = tmp_path / "t.h5ad"
    if case == "h5mu output for AnnData input":
        out = tmp_path / "t.h5mu"
    elif case == "output folder unwritable":
        _unwritable(tmp_path / "ro", monkeypatch)
        out = tmp_path / "ro" / "t.h5ad"
    elif case == "output folder is a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "t.h5ad"
    elif case == "output exists":
        out.write_bytes(b"old")
    before = _entries(tmp_path)
    try:
        rc, _, err = run_main(["transform", tmp_path / "model", data_file, "-o", out, "--device", "cpu"])
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    assert no_fit == [] and rc == code, err
    for w in words:
        assert w in err, (w, err)
    if code == 2:
        assert err.startswith("usage: dgdcell transform")
    assert _entries(tmp_path) == before


def test_interrupt_during_fit_writes_nothing(data_file, tmp_path, monkeypatch):
    def fit(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(DGD, "fit", fit)
    rc, out, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                             "--plot", tmp_path / "fig.png", *SMALL])
    assert rc == 130
    assert err.splitlines()[-1] == "interrupted; nothing written" and "Traceback" not in err and out == ""
    assert _entries(tmp_path) == set()


@pytest.mark.parametrize("where", ["writing the output", "saving the model"])
def test_interrupt_while_writing_leaves_nothing(where, data_file, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    if where == "writing the output":
        monkeypatch.setattr(ad.AnnData, "write_h5ad", interrupt)
    else:
        real_save = DGD.save

        def save(self, path, overwrite=False):
            real_save(self, path, overwrite=overwrite)
            (Path(path) / ".weights.pt.tmp").write_bytes(b"half")  # as if cut off during the next file
            raise KeyboardInterrupt

        monkeypatch.setattr(DGD, "save", save)
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m", *SMALL])
    assert rc == 130 and err.splitlines()[-1] == "interrupted; nothing written"
    assert _entries(tmp_path) == set()


@pytest.mark.parametrize("model_dir", ["new", "new with missing parents", "existing empty", "existing, --overwrite"])
@pytest.mark.parametrize("failing", ["output write", "plot", "output move"])
def test_failure_after_fit_leaves_nothing_new(model_dir, failing, data_file, tmp_path, monkeypatch):
    out, plot, model = tmp_path / "o.h5ad", tmp_path / "fig.png", tmp_path / "m"
    extra = []
    if model_dir == "new with missing parents":
        model = tmp_path / "a" / "b" / "m"
    elif model_dir == "existing empty":
        model.mkdir()
    elif model_dir == "existing, --overwrite":
        model.mkdir()
        (model / "notes.txt").write_text("mine")
        out.write_bytes(b"old output")
        plot.write_bytes(b"old figure")
        extra = ["--overwrite"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before_entries = _entries(tmp_path)

    if failing == "output write":
        def write(self, *a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ad.AnnData, "write_h5ad", write)
    elif failing == "plot":
        def summary(*a, **k):
            raise RuntimeError("plotting failed")

        monkeypatch.setattr(dgdcell.pl, "summary", summary)
    else:  # the model is already in place when moving the output fails
        real_move = cli._Outputs.move

        def move(self, tmp, final):
            if final == out:
                raise OSError(5, "Input/output error")
            real_move(self, tmp, final)

        monkeypatch.setattr(cli._Outputs, "move", move)
    rc, stdout, err = run_main(["fit", data_file, "-o", out, "--model-dir", model, "--plot", plot, *extra, *SMALL])
    assert rc == 1 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    assert {"output write": "No space left", "plot": "plotting failed", "output move": "Input/output"}[failing] in err
    assert stdout == ""
    assert _entries(tmp_path) == before_entries  # no model folder, output, figure or temporary left
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing that was there is lost


def test_fit_into_existing_model_dirs(data_file, tmp_path):
    """An existing empty --model-dir, and with --overwrite a non-empty one, take the model."""
    (tmp_path / "m").mkdir()
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m", *SMALL])
    assert rc == 0, err
    (tmp_path / "m" / "notes.txt").write_text("mine")
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m",
                           "--plot", tmp_path / "f.png", "--overwrite", "--seed", "1", *SMALL])
    assert rc == 0, err
    assert DGD.load(tmp_path / "m", device="cpu").init_args["seed"] == 1
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.rglob(".*") if "partial" in p.name or "write-check" in p.name]
    mode = (tmp_path / "m").stat().st_mode & 0o777
    new = tmp_path / "new"
    rc, _, err = run_main(["fit", data_file, "-o", tmp_path / "o2.h5ad", "--model-dir", new, *SMALL])
    assert rc == 0, err
    assert new.stat().st_mode & 0o777 == mode  # the new model folder gets the usual permissions


def test_library_prints_stay_off_stdout(data_file, tmp_path, monkeypatch):
    real_fit = DGD.fit

    def fit(self, *a, **k):
        result = real_fit(self, *a, **k)
        print("library fit summary")
        return result

    monkeypatch.setattr(DGD, "fit", fit)
    rc, out, err = run_main(["fit", data_file, "-o", tmp_path / "o.h5ad", "--model-dir", tmp_path / "m", *SMALL])
    assert rc == 0, err
    assert "library fit summary" not in out and out.startswith(f"dgdcell {dgdcell.__version__}: fitted 180 cells")
