"""The ``dgdcell`` command line (also ``python -m dgdcell``).

Subcommands::

    dgdcell fit IN.h5ad -o OUT.h5ad --model-dir DIR [options]   fit a DGD, write outputs and the model
    dgdcell transform MODEL_DIR IN.h5ad -o OUT.h5ad [options]     embed new cells with a saved model
    dgdcell info MODEL_DIR [--json]                               describe a saved model

Exit status: 0 on success; 2 on a usage error (argparse's own, and arguments that are
wrong whatever the files: a file name with the wrong extension, ``-o`` naming the other
data kind than the input, ``-o`` or ``--plot`` equal to ``--model-dir``; printed with the
command's usage line); 130 when interrupted (Ctrl-C); 1 on any other error (printed as
``error: <message>`` on stderr; ``--debug`` adds the traceback).

Every output path (``-o``, ``--model-dir``, ``--plot``) is checked before any data is
read or fitted: an existing output without ``--overwrite``, a missing or unwritable
folder are errors (exit 1) that name the option. The outputs are then written
all-or-nothing: each under a temporary name next to its final path, moved into place
only when all are written; after an error or an interrupt nothing this call created is
left behind (nothing that existed before is removed).

The progress bar is shown only when stderr is a terminal; ``--quiet`` silences it, the
summary and informational log messages.

Under ``torchrun`` (``torchrun --nproc-per-node N -m dgdcell fit ...``) ``fit`` and
``transform`` run data-parallel (see ``docs/distributed.md``): every process reads the
input and fits its shard of the cells; only rank 0 reports and writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from ._cli_support import (
    CLIError,
    UsageError,
    _Outputs,
    _check_device,
    _check_input_file,
    _check_model_dir,
    _check_output_file,
    _cluster_summary,
    _covariates,
    _fmt,
    _input_path,
    _library_stdout,
    _likelihoods,
    _logging,
    _output_path,
    _plot_path,
    _progress,
    _rank,
    _read_h5ad,
    _same_path,
    _say,
    _write_h5ad,
)
from ._version import __version__

logger = logging.getLogger("dgdcell.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------- parser
def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def build_parser() -> argparse.ArgumentParser:
    """The ``dgdcell`` argument parser with the subcommands ``fit``, ``transform`` and ``info``
    (each subcommand's parser sets ``func`` to its ``cmd_*`` function)."""
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output and logging")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or info messages")
    out.add_argument("--debug", action="store_true", help="debug logging; show the traceback of errors")

    parser = argparse.ArgumentParser(
        prog="dgdcell",
        description="Deep generative decoder (DGD) representations and clusters for single-cell counts.",
        epilog="Run 'dgdcell <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"dgdcell {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    fit = sub.add_parser(
        "fit", parents=[common], help="fit a DGD to an .h5ad file",
        description="Fit a DGD to the raw counts of IN.h5ad; write OUT.h5ad (IN plus obsm['X_dgd'], "
        "obs['dgd_cluster'], obsm['X_dgd_cluster_probs'], obsm['X_dgd_<covariate>'], uns['dgd']) "
        "and save the model to --model-dir.",
    )
    fit.add_argument("input", metavar="IN.h5ad", help="AnnData (.h5ad) or MuData (.h5mu) with raw counts in .X or --layer")
    fit.add_argument("-o", "--output", metavar="OUT.h5ad", required=True, help="where to write the AnnData with the results")
    fit.add_argument("--model-dir", metavar="DIR", required=True, help="where to save the fitted model (see 'dgdcell info')")
    fit.add_argument("--covariate", metavar="KEY", action="append", default=[],
                     help="obs column modelled as a covariate (batch, donor, ...); repeat or comma-separate for several")
    fit.add_argument("--continuous-covariate", metavar="KEY", action="append", default=[],
                     help="numeric obs column entering the decoder as a value (percent mitochondrial counts, "
                          "cell-cycle scores, ...); repeat or comma-separate for several")
    fit.add_argument("--likelihood", metavar="MOD=KIND", action="append", default=[],
                     help="likelihood of a modality of a MuData input: nb (default) or bernoulli; repeatable")
    fit.add_argument("--label-key", metavar="KEY", help="obs column of known labels (semi-supervised mixture)")
    fit.add_argument("--n-components", metavar="K", type=_positive_int,
                     help="mixture components / clusters (default 10, or the number of label classes)")
    fit.add_argument("--latent-dim", metavar="L", type=_positive_int, default=20, help="representation dimension (default 20)")
    fit.add_argument("--layer", metavar="NAME", help="read counts from adata.layers[NAME] instead of .X")
    fit.add_argument("--max-epochs", metavar="N", type=_positive_int,
                     help="epoch cap (default: by data size; early stopping usually ends sooner)")
    fit.add_argument("--batch-size", metavar="B", type=_positive_int, default=256, help="minibatch size (default 256)")
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: CUDA when available")
    fit.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (default 0)")
    fit.add_argument("--key-added", metavar="KEY", default="dgd", help="prefix of the keys written (default dgd)")
    fit.add_argument("--plot", metavar="FILE",
                     help="write a summary figure (losses, latent PCA, components vs labels); .png, .pdf or .svg")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an existing OUT.h5ad and --plot file, and the model in a non-empty --model-dir")
    fit.set_defaults(func=cmd_fit, parser=fit)

    tr = sub.add_parser(
        "transform", parents=[common], help="embed new cells with a saved model",
        description="Fit representations of the cells of IN.h5ad against the frozen decoder and mixture of "
        "the model saved in MODEL_DIR; write OUT.h5ad with the same keys as 'fit'.",
    )
    tr.add_argument("model_dir", metavar="MODEL_DIR", help="a model saved by 'dgdcell fit' or DGD.save")
    tr.add_argument("input", metavar="IN.h5ad", help="AnnData (.h5ad) or MuData (.h5mu) with raw counts of the new cells")
    tr.add_argument("-o", "--output", metavar="OUT.h5ad", required=True, help="where to write the AnnData with the results")
    tr.add_argument("--layer", metavar="NAME", help="read counts from adata.layers[NAME] instead of .X")
    tr.add_argument("--max-epochs", metavar="N", type=_positive_int, help="epoch cap (default: the library's)")
    tr.add_argument("--init", choices=("mean", "sample"),
                    help="candidate starts: component means or samples (default: the library's)")
    tr.add_argument("--seed", metavar="S", type=int, help="random seed of the candidate starts (default: the library's)")
    tr.add_argument("--n-reference", metavar="N", type=_non_negative_int,
                    help="training cells whose representations join the candidate starts (default: the library's; "
                         "0: component means or samples only)")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: CUDA when available")
    tr.add_argument("--key-added", metavar="KEY", default="dgd", help="prefix of the keys written (default dgd)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")
    tr.set_defaults(func=cmd_transform, parser=tr)

    info = sub.add_parser("info", parents=[common], help="describe a saved model",
                          description="Print the version, settings, features, covariates and training summary of a saved model.")
    info.add_argument("model_dir", metavar="MODEL_DIR", help="a model saved by 'dgdcell fit' or DGD.save")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(func=cmd_info, parser=info)
    return parser


# --------------------------------------------------------------------------- commands
def cmd_fit(args) -> int:
    """``dgdcell fit``: read ``args.input`` (.h5ad / .h5mu), fit a DGD, write ``args.output`` (the
    input plus the keys :meth:`dgdcell.DGD.fit` writes), save the model to ``args.model_dir`` and,
    with ``--plot``, a summary figure. Every output path is checked first; the outputs are written
    all-or-nothing (see :class:`_Outputs`). Returns the exit status (0)."""
    from .model import DGD

    src = _input_path(args.input)
    dst = _output_path(args.output, src)
    model_dir = Path(args.model_dir)
    plot = _plot_path(args.plot) if args.plot else None
    if _same_path(dst, model_dir):
        raise UsageError(f"-o/--output and --model-dir are the same path ({dst}): the output is a file and the "
                         "model a folder; give them different names")
    if plot is not None and _same_path(plot, model_dir):
        raise UsageError(f"--plot and --model-dir are the same path ({plot}); give them different names")
    _check_input_file(src)
    _check_output_file(dst, args.overwrite, "-o/--output")
    _check_model_dir(model_dir, args.overwrite)
    if plot is not None:
        _check_output_file(plot, args.overwrite, "--plot")
    _check_device(args.device)
    adata = _read_h5ad(src)
    covariates = _covariates(args.covariate)
    logger.info("read %s: %d cells x %d features", src, adata.n_obs, adata.n_vars)

    model = DGD(
        latent_dim=args.latent_dim,
        n_components=args.n_components,
        covariate_keys=covariates,
        continuous_covariate_keys=_covariates(args.continuous_covariate),
        label_key=args.label_key,
        seed=args.seed,
        likelihood=_likelihoods(args.likelihood),
        device=args.device,
    )
    logger.info(
        "fitting: latent_dim %d, n_components %s, covariates %s, label_key %s, device %s",
        args.latent_dim, args.n_components or "default", covariates or "none", args.label_key or "none", model.device,
    )
    t0 = time.perf_counter()
    with _library_stdout(args):
        model.fit(
            adata,
            max_epochs=args.max_epochs,
            batch_size=args.batch_size,
            layer=args.layer,
            key_added=args.key_added,
            verbose=_progress(args),
        )
    seconds = time.perf_counter() - t0
    if _rank() != 0:  # under torchrun every process fitted its shard; rank 0 (holding the whole model) writes
        return EXIT_OK

    with _Outputs() as out:
        tmp_model = None
        if not model_dir.is_dir():
            tmp_model = out.temp_dir(model_dir)
            model.save(tmp_model)
        tmp_dst = out.temp_file(dst)
        _write_h5ad(adata, tmp_dst)
        if plot is not None:
            tmp_plot = out.temp_file(plot)
            _plot_summary(adata, model, args.label_key, args.key_added, tmp_plot)
        if tmp_model is None:  # an existing folder (empty, or its model replaced under --overwrite)
            out.save_model_into(model, model_dir)
        else:
            out.move(tmp_model, model_dir)
        out.move(tmp_dst, dst)
        if plot is not None:
            out.move(tmp_plot, plot)
        out.commit()
    args.written = True
    if plot is not None:
        logging.getLogger("dgdcell.pl").info("saved figure to %s", plot)

    hist = model.history
    n_epochs = len(hist.get("epoch", []))
    _say(args, f"dgdcell {__version__}: fitted {adata.n_obs} cells x {adata.n_vars} features "
               f"in {n_epochs} epochs ({seconds:.1f} s on {model.device})")
    if n_epochs:
        _say(args, f"  final loss per cell: train {_fmt(hist['train_loss'][-1], 2)}, "
                   f"validation {_fmt(hist['val_loss'][-1], 2)}")
    _say(args, f"  clusters: {_cluster_summary(adata, args.key_added)}")
    if args.label_key:
        from .pl import adjusted_rand_index

        obs = adata.obs
        known = obs[args.label_key].notna().to_numpy()
        if known.any():
            ari = adjusted_rand_index(obs[args.label_key][known].astype(str), obs[f"{args.key_added}_cluster"][known])
            _say(args, f"  ARI of clusters vs {args.label_key} (the labels the fit was given): {ari:.3f}")
    _say(args, f"  wrote {dst}; model saved to {model_dir}" + (f"; figure {args.plot}" if args.plot else ""))
    return EXIT_OK


class _NoSavedFigureRecord(logging.Filter):
    """Drops dgdcell.pl's 'saved figure to <temporary name>'; the CLI logs the final name instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("saved figure to ")


def _plot_summary(adata, model, label_key, key, path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # the CLI never shows figures
    from . import pl

    pl_logger, dropped = logging.getLogger("dgdcell.pl"), _NoSavedFigureRecord()
    pl_logger.addFilter(dropped)
    try:
        pl.summary(adata, model=model, label_key=label_key, key=key, save=path)
    finally:
        pl_logger.removeFilter(dropped)


def cmd_transform(args) -> int:
    """``dgdcell transform``: load the model in ``args.model_dir``, embed the cells of
    ``args.input`` with :meth:`dgdcell.DGD.transform` and write ``args.output`` (the input plus
    the keys it writes). The output path is checked first and the file written under a
    temporary name, then renamed. Returns the exit status (0)."""
    from .model import DGD

    if not hasattr(DGD, "transform"):
        raise CLIError(f"this dgdcell ({__version__}) has no DGD.transform; 'dgdcell transform' needs a newer version")
    src = _input_path(args.input)
    dst = _output_path(args.output, src)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise CLIError(f"model directory not found: {model_dir}")
    _check_input_file(src)
    _check_output_file(dst, args.overwrite, "-o/--output")
    _check_device(args.device)
    model = DGD.load(model_dir, device=args.device)
    adata = _read_h5ad(src)
    logger.info("read %s: %d cells x %d features", src, adata.n_obs, adata.n_vars)

    wanted = {"layer": args.layer, "max_epochs": args.max_epochs, "init": args.init, "seed": args.seed,
              "n_reference": args.n_reference}
    kwargs = {k: v for k, v in wanted.items() if v is not None}
    kwargs.update(key_added=args.key_added, verbose=_progress(args))
    params = inspect.signature(model.transform).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unsupported = [k for k in kwargs if k not in params]
        explicit = [k for k in unsupported if k in wanted]
        if explicit:
            raise CLIError(f"DGD.transform of this dgdcell does not take {explicit}")
        for k in unsupported:
            kwargs.pop(k)
    t0 = time.perf_counter()
    with _library_stdout(args):
        model.transform(adata, **kwargs)
    if _rank() != 0:  # under torchrun every process embedded its shard; rank 0 (holding all cells) writes
        return EXIT_OK
    seconds = time.perf_counter() - t0
    with _Outputs() as out:
        tmp_dst = out.temp_file(dst)
        _write_h5ad(adata, tmp_dst)
        out.move(tmp_dst, dst)
        out.commit()
    args.written = True
    _say(args, f"dgdcell {__version__}: embedded {adata.n_obs} cells with the model in {model_dir} ({seconds:.1f} s)")
    _say(args, f"  clusters: {_cluster_summary(adata, args.key_added)}")
    _say(args, f"  wrote {dst}")
    return EXIT_OK


def describe_model(model_dir: str | Path) -> dict[str, Any]:
    """A JSON-serialisable description of a saved model (what ``dgdcell info`` prints).

    Parameters
    ----------
    model_dir
        A folder written by :meth:`dgdcell.DGD.save` or ``dgdcell fit --model-dir``.

    Returns
    -------
    dict
        Versions, settings (``settings``, ``fit_settings``), mixture size and weights, features
        per modality, covariate classes, labels, cell counts, epochs, final and best losses.
    """
    from .model import CONFIG_FILE, DGD

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CLIError(f"model directory not found: {model_dir}")
    model = DGD.load(model_dir, device="cpu")
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    hist = model.history or {}
    n_epochs = len(hist.get("epoch", []))
    final = {k: float(hist[k][-1]) for k in ("train_loss", "train_reconstruction", "val_loss", "val_reconstruction")
             if n_epochs and k in hist}
    best = None
    if n_epochs and "val_loss" in hist:
        vals = [float(v) for v in hist["val_loss"]]
        i = min(range(len(vals)), key=lambda j: vals[j])
        best = {"epoch": int(hist["epoch"][i]), "val_loss": vals[i]}
    weights = model.gmm.mixture_probs().detach().cpu().numpy().tolist()
    return {
        "model_dir": str(model_dir),
        "dgdcell_version": __version__,
        "saved_with_version": config.get("dgdcell_version"),
        "format_version": config.get("format_version"),
        "settings": model.init_args,
        "fit_settings": model.fit_settings,
        "n_components": len(weights),
        "mixture_weights": weights,
        "features": {m: len(f) for m, f in model.features.items()},
        "n_features": sum(len(f) for f in model.features.values()),
        "covariates": model.covariate_categories,
        "label_categories": model.label_categories,
        "n_cells": len(model.obs_names),
        "n_train": int(hist["n_train"][0]) if hist.get("n_train") else None,
        "n_val": int(hist["n_val"][0]) if hist.get("n_val") else None,
        "n_epochs": n_epochs,
        "seconds": float(hist["seconds"][-1]) if n_epochs and hist.get("seconds") else None,
        "final": final,
        "best": best,
    }


def cmd_info(args) -> int:
    """``dgdcell info``: print :func:`describe_model` of ``args.model_dir`` as text, or as JSON
    with ``--json``. Returns the exit status (0)."""
    d = describe_model(args.model_dir)
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK
    s, f = d["settings"], d["fit_settings"]
    lines = [
        f"DGD model in {d['model_dir']}",
        f"  dgdcell {d['dgdcell_version']} (saved with {d['saved_with_version']}, format {d['format_version']})",
        f"  latent_dim {s['latent_dim']}, {d['n_components']} components ({s['covariance_type']} covariance), "
        f"init {s['init']}, seed {s['seed']}",
        f"  decoder: trunk {s['n_hidden']}, heads {s['n_hidden_head']}",
        "  features: " + ", ".join(f"{m} {n}" for m, n in d["features"].items()) + f" ({d['n_features']} in all)",
    ]
    if d["covariates"]:
        for key, cats in d["covariates"].items():
            shown = ", ".join(cats[:8]) + (", ..." if len(cats) > 8 else "")
            lines.append(f"  covariate {key}: {len(cats)} classes ({shown})")
    else:
        lines.append("  covariates: none")
    if d["label_categories"] is not None:
        cats = d["label_categories"]
        shown = ", ".join(cats[:8]) + (", ..." if len(cats) > 8 else "")
        lines.append(f"  labels ({s['label_key']}): {len(cats)} classes ({shown})")
    lines.append("  mixture weights: " + " ".join(f"{w:.3f}" for w in d["mixture_weights"]))
    split = f" (train {d['n_train']}, validation {d['n_val']})" if d["n_train"] is not None else ""
    lines.append(f"  training cells: {d['n_cells']}{split}")
    if d["n_epochs"]:
        stop = f", early stopping (patience {f.get('patience')})" if f.get("early_stopping") else ""
        secs = f"; {d['seconds']:.1f} s" if d["seconds"] is not None else ""
        lines.append(f"  epochs: {d['n_epochs']} of max {f.get('max_epochs')}{stop}{secs}")
        lines.append(f"  fit: batch size {f.get('batch_size')}, layer {f.get('layer') or 'X'}, learning rates decoder "
                     f"{f.get('lr_decoder')}, representations {f.get('lr_representation')}, mixture {f.get('lr_mixture')}")
        fin = d["final"]
        lines.append(f"  final loss per cell: train {_fmt(fin.get('train_loss'), 2)} "
                     f"(reconstruction {_fmt(fin.get('train_reconstruction'), 2)}), validation "
                     f"{_fmt(fin.get('val_loss'), 2)} (reconstruction {_fmt(fin.get('val_reconstruction'), 2)})")
        if d["best"]:
            lines.append(f"  best validation loss: {_fmt(d['best']['val_loss'], 2)} at epoch {d['best']['epoch']}")
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the ``dgdcell`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # under torchrun only rank 0 reports progress (warnings and errors come from every rank)
    with _logging(args.quiet or _rank() != 0, args.debug), warnings.catch_warnings():
        # mudata announces a future change of MuData.update() on every read and subset; not the user's concern here
        warnings.filterwarnings("ignore", message=r"From 0\.4 \.update\(\) will not pull", category=FutureWarning)
        try:
            return args.func(args)
        except KeyboardInterrupt:  # outputs are written all-or-nothing: none unless the command got that far
            print("interrupted" if getattr(args, "written", False) else "interrupted; nothing written",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except UsageError as err:  # argparse-style: the command's usage line, then the message
            command = getattr(args, "parser", parser)
            command.print_usage(sys.stderr)
            print(f"{command.prog}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:  # e.g. `dgdcell info DIR | head`: stop quietly
            with contextlib.suppress(Exception):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except Exception as err:  # noqa: BLE001 - every error becomes a message and exit status 1
            if args.debug:
                traceback.print_exc()
            print(f"error: {_message(err)}", file=sys.stderr)
            return EXIT_ERROR


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) would add quotes
    else:
        text = str(err)
    if not isinstance(err, CLIError) and not text:
        text = type(err).__name__
    elif not isinstance(err, (CLIError, KeyError, ValueError, FileNotFoundError, FileExistsError, TypeError)):
        text = f"{type(err).__name__}: {text}"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
