"""Saving and loading a DGD: a directory with ``config.json`` and a tensors-only ``weights.pt``."""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._checks import resolve_device
from ._version import __version__

if TYPE_CHECKING:
    from .model import DGD

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
WEIGHTS_FILE_ALT = "weights.1.pt"  # every other write of a checkpoint directory (see PersistenceMixin._write_model)
#: folder of a data-parallel checkpoint's representation shards (one file per rank, see :func:`write_shard`)
SHARDS_DIR = "shards"


class PersistenceMixin:
    """:meth:`~dgdcell.DGD.save` and :meth:`~dgdcell.DGD.load`; the weights are the
    module's ``state_dict`` (plus the training cells' representations)."""

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save to directory ``path``: ``config.json`` (settings, features,
        classes, history, library version) and ``weights.pt`` (a flat dict of
        tensors, loadable with ``torch.load(weights_only=True)``). Each file is
        written to a temporary name and then renamed, so a crash never leaves a
        half-written file.

        Parameters
        ----------
        path
            Directory (created if missing).
        overwrite
            Replace the contents of a non-empty ``path``; otherwise that is a FileExistsError.
        """
        self._check_fitted()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it.")
        self._write_model(path, self.representation, self.cov_representation, self.history, self.fit_settings,
                          representation_std=self.representation_std)

    def _write_model(
        self, path: Path, representation: torch.Tensor | None, cov_representation: dict[str, torch.Tensor],
        history: dict[str, list], fit_settings: dict[str, Any], shards: list[str] | None = None,
        representation_std: torch.Tensor | None = None,
    ) -> None:
        """Write the model with the given training-cell representations (n, L),
        covariate representations and (``posterior='normal'``) posterior
        standard deviations (n, L) to ``path`` (see :meth:`save`).

        A data-parallel checkpoint passes ``shards`` instead of the
        representations: the names (in ``path / SHARDS_DIR``) of the files the
        ranks wrote with :func:`write_shard`; ``config.json`` then lists them and
        :meth:`load` assembles them. Shard files that the new ``config.json``
        does not list are removed after it is in place."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the model folder {path}: {err}") from err
        # the module's parameters under its state_dict names, the covariate mixtures as cov_gmm.<key>.*
        tensors = {_saved_name(k): v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        if representation is not None:
            tensors["representation"] = representation.detach().cpu().clone()
        if representation_std is not None:
            tensors["representation_std"] = representation_std.detach().cpu().clone()
        for key, c in cov_representation.items():
            tensors[f"cov_representation.{key}"] = c.detach().cpu().clone()
        if self.continuous_input is not None:
            tensors["continuous_input"] = self.continuous_input.detach().cpu().clone()
        config = {
            "format_version": FORMAT_VERSION,
            "dgdcell_version": __version__,
            "init_args": self.init_args,
            "fit_settings": fit_settings,
            "features": self.features,
            "covariate_categories": self.covariate_categories,
            "label_categories": self.label_categories,
            "obs_names": self.obs_names,
            "history": history,
            "continuous_stats": self.continuous_stats,
        }
        # the weights alternate between two names and config.json names the current one, so that
        # at any moment config.json and the weights it names are a complete pair of one state
        if shards is not None:
            config["shards"] = list(shards)
        current = _weights_file(path)
        weights = WEIGHTS_FILE_ALT if current == WEIGHTS_FILE and (path / WEIGHTS_FILE).is_file() else WEIGHTS_FILE
        config["weights_file"] = weights
        tmp_weights, tmp_config = path / f".{weights}.tmp", path / f".{CONFIG_FILE}.tmp"
        try:
            torch.save(tensors, tmp_weights)
            tmp_config.write_text(json.dumps(config))
        except (OSError, RuntimeError) as err:  # torch reports an unwritable folder as a RuntimeError
            for tmp in (tmp_weights, tmp_config):
                tmp.unlink(missing_ok=True)
            raise OSError(f"cannot write the model into {path} (is the folder writable, is the disk full?): "
                          f"{err}") from err
        os.replace(tmp_weights, path / weights)
        os.replace(tmp_config, path / CONFIG_FILE)
        stale = path / (WEIGHTS_FILE_ALT if weights == WEIGHTS_FILE else WEIGHTS_FILE)
        if stale.is_file():
            stale.unlink()
        _remove_stale_shards(path, shards or [])

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "DGD":
        """Load a model saved by :meth:`save` (or a ``checkpoint_dir`` of :meth:`fit`). Needs no training data.

        Tensors are read with ``torch.load(weights_only=True)``: no arbitrary
        object is ever unpickled. Raises FileNotFoundError when ``path`` holds
        no saved model, ValueError when a file is corrupted, truncated or from
        another model, or the format version is not this library's; a model
        saved by another dgdcell version loads with a warning.

        Parameters
        ----------
        path
            Directory written by :meth:`save` or ``fit(checkpoint_dir=...)``.
        device
            Where the model runs (``'auto'``: CUDA when available).
        """
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved DGD (expected {CONFIG_FILE} and {WEIGHTS_FILE}).")
        resolve_device(device)  # a bad device is the caller's mistake, not the files'
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path / CONFIG_FILE} is corrupted: {err}") from err
        if not isinstance(config, dict):
            raise ValueError(f"{path / CONFIG_FILE} is corrupted: expected a JSON object, got {type(config).__name__}.")
        weights = path / _weights_file(path)
        if not weights.is_file():
            raise FileNotFoundError(f"{path} is not a saved DGD (expected {CONFIG_FILE} and {weights.name}).")
        fmt = config.get("format_version")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"{path} has model format {fmt}; this dgdcell ({__version__}) reads format {FORMAT_VERSION}.")
        saved_version = config.get("dgdcell_version")
        if saved_version != __version__:
            logger.warning("model saved by dgdcell %s, loading with %s", saved_version, __version__)
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated / corrupted file, or a pickle of arbitrary objects
            raise ValueError(f"{weights} could not be read (corrupted or truncated?): {err}") from err
        if config.get("shards") is not None and isinstance(tensors, dict):
            tensors.update(read_shards(path, config["shards"], len(config.get("obs_names") or [])))
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
        unknown = sorted(set(config.get("init_args") or {}) - known)
        if unknown:
            raise ValueError(
                f"{path} holds settings this dgdcell ({__version__}) does not know: {unknown} (saved by dgdcell "
                f"{saved_version}). Upgrade dgdcell to load it."
            )
        _check_config(config, path / CONFIG_FILE)
        try:
            return cls._from_saved(config, tensors, device)
        except (KeyError, TypeError, RuntimeError, AttributeError, ValueError, OverflowError) as err:
            raise ValueError(
                f"{path} does not hold a consistent saved DGD ({type(err).__name__}: {err}); "
                f"were {CONFIG_FILE} and the weights written by the same model?"
            ) from err

    @classmethod
    def _from_saved(cls, config: dict, tensors: dict[str, torch.Tensor], device: str) -> "DGD":
        """A model from a parsed ``config.json`` and its tensors (KeyError / RuntimeError when they do not match)."""
        if not isinstance(tensors, dict):
            raise TypeError(f"the weights file holds a {type(tensors).__name__}, not a dict of tensors")
        # models saved before component_variance existed learned their variances; before posterior: 'map';
        # before start_correction: per-class centring only
        model = cls(device=device, **{"component_variance": "learned", "start_correction": "centre",
                                      **config["init_args"]})
        model.fit_settings = config["fit_settings"]  # before building: n_components='auto' reads the chosen K there
        labels = config["label_categories"]
        model._build(
            {m: len(f) for m, f in config["features"].items()},
            {k: len(c) for k, c in config["covariate_categories"].items()},
            None if labels is None else len(labels),
        )
        names = {_saved_name(k): k for k in model.module.state_dict()}
        model.module.load_state_dict({names[k]: v for k, v in tensors.items() if k in names})
        if not isinstance(tensors.get("representation"), torch.Tensor) or not tensors["representation"].is_floating_point():
            raise ValueError("the weights file's representation is missing or not a float tensor")
        model.representation = tensors["representation"].float()
        if model.variational:
            std = tensors.get("representation_std")
            if not isinstance(std, torch.Tensor) or tuple(std.shape) != tuple(model.representation.shape):
                raise ValueError("a posterior='normal' model needs representation_std of the representation's shape")
            model.representation_std = std.float()
        model.cov_representation = {k: tensors[f"cov_representation.{k}"].float() for k in config["covariate_categories"]}
        model.continuous_stats = {k: [float(v) for v in s] for k, s in (config.get("continuous_stats") or {}).items()}
        keys = config["init_args"].get("continuous_covariate_keys") or []
        if sorted(keys) != sorted(model.continuous_stats):
            raise ValueError(f"continuous_stats {list(model.continuous_stats)} do not match continuous_covariate_keys {keys}")
        model.continuous_input = tensors["continuous_input"].float() if keys else None
        if model.representation.shape != (len(config["obs_names"]), model.latent_dim):
            raise ValueError(f"representation has shape {tuple(model.representation.shape)}, expected "
                             f"({len(config['obs_names'])}, {model.latent_dim})")
        model.features = config["features"]
        model.covariate_categories = config["covariate_categories"]
        model.label_categories = labels
        model.obs_names = config["obs_names"]
        model.history = config["history"]
        model.fit_settings = config["fit_settings"]
        return model


def _check_config(config: dict, where: Path) -> None:
    """Raise one ValueError naming the field when a parsed ``config.json`` has a wrong type."""
    def names(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    checks = {
        "init_args": lambda v: isinstance(v, dict),
        "fit_settings": lambda v: isinstance(v, dict),
        "features": lambda v: isinstance(v, dict) and bool(v) and all(isinstance(k, str) and names(f) and f
                                                                      for k, f in v.items()),
        "covariate_categories": lambda v: isinstance(v, dict) and all(names(c) and c for c in v.values()),
        "label_categories": lambda v: v is None or names(v),
        "obs_names": names,
        "history": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, list)
                                                         for k, h in v.items()),
    }
    for field, ok in checks.items():
        if field not in config:
            raise ValueError(f"{where} is incomplete: it has no {field!r}; save the model again.")
        if not ok(config[field]):
            raise ValueError(f"{where}: field {field!r} has the wrong type or is empty ({str(config[field])[:80]}); "
                             "the file was edited or corrupted: save the model again.")
    covs = config["init_args"].get("covariate_keys") or []
    if sorted(covs) != sorted(config["covariate_categories"]):
        raise ValueError(f"{where}: init_args.covariate_keys {covs} do not match covariate_categories "
                         f"{list(config['covariate_categories'])}.")


def shard_names(generation: int, world_size: int) -> list[str]:
    """File names (in ``SHARDS_DIR``) of the ``world_size`` shards of checkpoint number ``generation``
    (the epochs so far: a new checkpoint never writes over the files ``config.json`` names)."""
    return [f"representation.{int(generation)}.{rank}-of-{world_size}.pt" for rank in range(world_size)]


def write_shard(path: Path, name: str, rows: torch.Tensor, representation: torch.Tensor,
                cov_representation: dict[str, torch.Tensor]) -> None:
    """Write one rank's part of a checkpoint to ``path / SHARDS_DIR / name``
    (to a temporary name, then renamed): its cells' positions ``rows`` (n_r,)
    in the data, their (n_r, L) representations and (n_r, 2) covariate
    representations."""
    folder = path / SHARDS_DIR
    tensors = {"rows": torch.as_tensor(rows).long().cpu(), "representation": representation.detach().cpu()}
    tensors.update({f"cov_representation.{k}": v.detach().cpu() for k, v in cov_representation.items()})
    tmp = folder / f".{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, tmp)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write the checkpoint shard {folder / name} (is the folder writable, is the disk "
                      f"full?): {err}") from err
    os.replace(tmp, folder / name)


def read_shards(path: Path, names: list[str], n_obs: int) -> dict[str, torch.Tensor]:
    """The ``representation`` and ``cov_representation.*`` tensors (n_obs rows,
    in the data's order) assembled from the shards ``names`` of a data-parallel
    checkpoint in ``path``; a ValueError when they are missing, unreadable or
    do not cover each cell exactly once."""
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names) or not names:
        raise ValueError(f"{path / CONFIG_FILE}: field 'shards' must be a list of file names, got {names!r}.")
    parts = []
    for name in names:
        file = path / SHARDS_DIR / name
        try:
            parts.append(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:
            raise ValueError(f"the checkpoint shard {file} could not be read (missing, corrupted or truncated?): "
                             f"{err}") from err
    try:
        rows = torch.cat([p["rows"] for p in parts])
        if rows.shape != (n_obs,) or not torch.equal(torch.sort(rows).values, torch.arange(n_obs)):
            raise ValueError(f"they hold {rows.numel()} rows, not each of the {n_obs} cells once")
        out = {}
        for key in (k for k in parts[0] if k != "rows"):
            values = torch.cat([p[key] for p in parts])
            out[key] = values.new_empty(values.shape)
            out[key][rows] = values
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ValueError(f"the checkpoint shards {names} in {path / SHARDS_DIR} do not fit together ({err}); "
                         "were they written by one checkpoint?") from err
    return out


def discard_shard(path: Path, name: str) -> None:
    """After a failed data-parallel checkpoint: remove this rank's shard ``name``
    unless ``path / config.json`` lists it (then it belongs to a complete checkpoint)."""
    try:
        listed = json.loads((path / CONFIG_FILE).read_text()).get("shards") or []
    except (OSError, ValueError, AttributeError):
        listed = []
    if name not in listed:
        (path / SHARDS_DIR / name).unlink(missing_ok=True)
        folder = path / SHARDS_DIR
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _remove_stale_shards(path: Path, keep: list[str]) -> None:
    """Remove the shard files (and then the folder, when empty) that ``keep`` does not name."""
    folder = path / SHARDS_DIR
    if not folder.is_dir():
        return
    for file in folder.iterdir():
        if file.name not in keep and file.name.startswith("representation.") and file.suffix == ".pt":
            file.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _weights_file(path: Path) -> str:
    """The weights file that ``path/config.json`` names (``weights.pt`` when it names none or is unreadable)."""
    try:
        name = json.loads((path / CONFIG_FILE).read_text()).get("weights_file", WEIGHTS_FILE)
    except (OSError, ValueError, AttributeError):
        return WEIGHTS_FILE
    return name if name in (WEIGHTS_FILE, WEIGHTS_FILE_ALT) else WEIGHTS_FILE


def _saved_name(key: str) -> str:
    """The name in ``weights.pt`` of the module's state_dict entry ``key`` (format 1:
    ``decoder.*``, ``gmm.*``, and ``cov_gmm.<covariate>.*`` for ``cov_gmms.<covariate>.*``)."""
    return "cov_gmm." + key[len("cov_gmms."):] if key.startswith("cov_gmms.") else key
