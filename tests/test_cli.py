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
    rc, _, err = run_main(["transform", d / "model", data_file, "-o", tmp_path / "t2.h5ad"])
    assert rc == 1 and "no DGD.transform" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(DGD, "transform"), reason="DGD.transform is not implemented yet")
def test_transform_round_trip(fitted_cli, data_file, tmp_path):
    d, _, _ = fitted_cli
    new = ad.read_h5ad(data_file)[:50].copy()
    new.write_h5ad(tmp_path / "new.h5ad")
    rc, out, err = run_main(["transform", d / "model", tmp_path / "new.h5ad", "-o", tmp_path / "t.h5ad",
                             "--max-epochs", "2", "--seed", "1", "--device", "cpu"])
    assert rc == 0, err
    res = ad.read_h5ad(tmp_path / "t.h5ad")
    assert res.obsm["X_dgd"].shape == (50, 3)
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
