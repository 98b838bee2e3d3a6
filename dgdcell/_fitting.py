"""How :meth:`DGD.fit <dgdcell.DGD.fit>` trains: the split into training and validation
cells, the start (PCA, Harmony, graph clustering, mixture), the cell sets on the
device and the call of :func:`dgdcell.train.train`.

:class:`FittingMixin` holds the DGD methods that do it; ``fit`` itself (its
settings, their checks and what it writes) stays in :mod:`dgdcell.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._persistence import CONFIG_FILE, discard_shard, shard_names, write_shard
from .data import CountData
from .data.backed import BackedCounts
from .latent import NormalRepresentation, RepresentationLayer
from .module import COVARIATE_DIM
from .train import CellSet, DeviceCounts, TrainConfig, init_mixture, pca_scores, train
from .train.distributed import Comm
from .train.initialisation import graph_clusters, harmonise, init_mixture_from_labels, pool_variances
from .train.streaming import DEFAULT_BLOCK_CELLS, StreamedCounts

#: starting log standard deviation of every cell's Normal posterior (sd 0.1)
LOG_STD_INIT = float(np.log(0.1))


class FittingMixin:
    """The training half of :class:`dgdcell.DGD` (see the module docstring)."""

    def _fit_run(self, run: "_FitRun"):
        """Build (unless warm-starting), set the data's features and classes, train; returns
        ``_fit_data``'s (history, representations, covariate representations)."""
        data = run.data
        if run.order is None:
            self._build({m: c.shape[1] for m, c in data.counts.items()},
                        {key: cat.n_classes for key, cat in data.covariates.items()}, run.n_classes)
        self.features = data.feature_names
        self.covariate_categories = {key: cat.categories for key, cat in data.covariates.items()}
        self.label_categories = data.labels.categories if data.labels is not None else None
        self.obs_names = data.obs_names
        if run.order is None:  # a warm start keeps the model's standardisation
            self.continuous_stats = {k: [float(v.mean()), float(v.std())] for k, v in data.continuous.items()}
        self.continuous_input = self._continuous_input(data.continuous)
        checkpoint = None
        if run.checkpoint_dir is not None:
            def checkpoint(z, cov, std, history, rows=None):
                merged = _continue_history(run.previous, history)
                fit = {**run.settings, "n_epochs": len(merged["epoch"])}
                if rows is None:
                    self._write_model(run.checkpoint_dir, z, cov, merged, fit, representation_std=std)
                    return
                # data-parallel: each rank writes its shard, then rank 0 the module and config.json naming them
                comm, names = run.comm, shard_names(len(merged["epoch"]), run.comm.world_size)
                try:
                    comm.agree("writing its checkpoint shard",
                               lambda: write_shard(run.checkpoint_dir, names[comm.rank], rows, z, cov))
                    comm.agree("writing the checkpoint's module and config.json",
                               (lambda: self._write_model(run.checkpoint_dir, None, {}, merged, fit, shards=names))
                               if comm.rank == 0 else None)
                except BaseException:  # the folder keeps the last complete checkpoint, nothing of this one
                    discard_shard(run.checkpoint_dir, names[comm.rank])
                    raise
        return self._fit_data(run, torch.Generator().manual_seed(self.init_args["seed"]), checkpoint)

    def _warm_start_order(self, data: CountData) -> np.ndarray:
        """Rows of the model's stored representations for the cells of ``data``
        (n,), after checking that the data match the model."""
        if data.feature_names != self.features:
            raise ValueError(
                "warm_start needs the features the model was fitted on (modalities "
                f"{ {m: len(f) for m, f in self.features.items()} }, got { {m: len(f) for m, f in data.feature_names.items()} })."
            )
        cats = {key: cat.categories for key, cat in data.covariates.items()}
        labels = data.labels.categories if data.labels is not None else None
        if cats != self.covariate_categories or labels != self.label_categories:
            raise ValueError("warm_start needs the covariate and label classes the model was fitted with.")
        position = pd.Index(self.obs_names)
        if not position.is_unique:
            raise ValueError("warm_start matches cells by obs name, but the model's obs names are not unique.")
        order = position.get_indexer(pd.Index(data.obs_names))
        if (order < 0).any():
            raise ValueError(
                f"warm_start continues a fit on the same cells; {int((order < 0).sum())} cells (e.g. "
                f"{data.obs_names[int(np.flatnonzero(order < 0)[0])]!r}) are not in the model. "
                "Use transform() to embed new cells."
            )
        return order

    def _fit_data(self, run: "_FitRun", generator: torch.Generator, checkpoint=None):
        """Split, start and train; returns (history, (n, L) representations,
        covariate key -> (n, 2), (n, L) posterior stds or None). ``run.order`` (warm
        start): rows of the stored representations to start from.
        ``checkpoint(z, cov, std, history)`` is called every ``run.checkpoint_every`` epochs.

        Data-parallel (``run.comm``): rank 0 computes the start (PCA, Leiden,
        mixture) and broadcasts it with the module's initial state and the
        generator's state (so that every rank draws one process's minibatch
        permutations, see :func:`dgdcell.train.loop.train`); each rank
        then trains its shard of the training and of the validation cells
        (contiguous blocks of each), holds only their counts on its device,
        and all ranks gather the representations at the end."""
        data, config, train_size, order, checkpoint_every = (run.data, run.config, run.train_size, run.order,
                                                             run.checkpoint_every)
        comm = run.comm
        a = self.init_args
        n = data.n_obs
        val_idx, train_idx = _split(n, train_size, generator)
        n_val = len(val_idx)
        if comm is not None and 0 < n_val < comm.world_size:
            raise ValueError(f"train_size={train_size} leaves {n_val} validation cells for {comm.world_size} "
                             "processes, each of which needs one; use a smaller train_size (or 1.0: no validation).")
        if comm is not None and n - n_val < comm.world_size:
            raise ValueError(f"{n - n_val} training cells cannot be shared by {comm.world_size} processes; use fewer "
                             "processes.")

        labels = torch.as_tensor(data.labels.codes) if data.labels is not None else None
        guide = None
        s0 = None
        leiden = (order is None and a["init"] == "pca" and labels is None
                  and a.get("init_clustering", "leiden") in ("leiden", "balanced"))
        if order is not None:
            rows = torch.as_tensor(order)
            z0 = self.representation[rows].clone()
            if self.variational and self.representation_std is not None:
                s0 = self.representation_std[rows].clone().log()
            cov_init = {k: self.cov_representation[k][rows].clone() for k in data.covariates}
        elif comm is not None and comm.rank != 0:  # rank 0's start arrives below
            z0, guide = torch.empty(n, a["latent_dim"]), torch.empty(n, dtype=torch.long) if leiden else None
        else:
            z0 = self._start(data, generator)
            if leiden:
                groups = (_joint_codes([cat.codes for cat in data.covariates.values()], n)
                          if a.get("init_clustering") == "balanced" else None)
                guide = torch.as_tensor(graph_clusters(z0.numpy(), self.gmm.n_mix_comp, seed=a["seed"], groups=groups))
                init_mixture_from_labels(self.gmm, z0[train_idx].to(self.device), guide[train_idx])
            elif a["init"] == "pca":
                init_mixture(self.gmm, z0[train_idx].to(self.device),
                             None if labels is None else labels[train_idx].to(self.device), generator=None)
        if comm is not None:  # one start, one module and one generator state on every rank: rank 0's
            state = generator.get_state()
            comm.broadcast([z0, *([] if guide is None else [guide]), state, *self.module.state_dict().values()])
            generator.set_state(state)
        if order is None:
            cov_init = {key: self.cov_gmms[key].mean.detach().cpu()[torch.as_tensor(cat.codes)]
                        for key, cat in data.covariates.items()}

        # 'pooled': one fixed variance shared by the components (learned ones collapse under MAP)
        learned = a.get("component_variance", "learned") == "learned"
        if not learned and order is None:
            pool_variances(self.gmm)
        self.gmm.neglogvar.requires_grad_(a["covariance_type"] != "fixed" and learned)
        weights = self._cell_weights(data)
        if comm is None:
            # one copy of the counts on the device; the training and validation sets are row views of it
            all_counts = {m: StreamedCounts(c, data.library[m], self.device, config.block_size or DEFAULT_BLOCK_CELLS)
                          if isinstance(c, BackedCounts) else DeviceCounts(c, data.library[m], self.device)
                          for m, c in data.counts.items()}
        else:  # this rank's cells only: its training shard, then its validation shard
            if data.backed:
                raise ValueError("a data-parallel fit reads its counts into memory: pass an in-memory AnnData "
                                 "(streaming a backed file on several processes is not supported yet).")
            train_idx, val_idx = comm.shard(train_idx), comm.shard(val_idx)
            local = np.concatenate([train_idx, val_idx])
            all_counts = {m: DeviceCounts(c[local], data.library[m][local], self.device) for m, c in data.counts.items()}

        def cell_set(rows: np.ndarray, count_rows: np.ndarray) -> CellSet:
            """The cells ``rows`` of the data, whose counts are rows ``count_rows`` of ``all_counts``."""
            rows_t = torch.as_tensor(rows)
            if self.variational:
                rep = NormalRepresentation(a["latent_dim"], len(rows), z0[rows_t],
                                           LOG_STD_INIT if s0 is None else s0[rows_t])
            else:
                rep = RepresentationLayer(a["latent_dim"], len(rows), z0[rows_t])
            return CellSet(
                rep=rep.to(self.device),
                cov_reps={k: RepresentationLayer(COVARIATE_DIM, len(rows), v[rows_t]).to(self.device) for k, v in cov_init.items()},
                counts={m: c.subset(count_rows) for m, c in all_counts.items()},
                cov_codes={k: torch.as_tensor(cat.codes[rows], device=self.device) for k, cat in data.covariates.items()},
                labels=None if labels is None else labels[rows_t].to(self.device),
                guide=None if guide is None else guide[rows_t].to(self.device),
                weight={m: w[rows] for m, w in weights.items()},
                continuous=None if self.continuous_input is None else self.continuous_input[rows_t].to(self.device),
            )

        n_local = None if comm is None else len(train_idx)  # rows of all_counts: the data's, or this rank's
        train_cells = cell_set(train_idx, train_idx if comm is None else np.arange(n_local))
        val_cells = cell_set(val_idx, val_idx if comm is None else n_local + np.arange(len(val_idx))) if n_val > 0 else None
        z0 = cov_init = None  # the sets hold their own copies: one (n, L) array less during training

        def local() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            """This rank's cells, their representations and covariate representations (on the host)."""
            sets = [c for c in (train_cells, val_cells) if c is not None]
            return (torch.as_tensor(np.concatenate([train_idx, val_idx])),
                    torch.cat([c.rep.z.detach().cpu() for c in sets]),
                    {k: torch.cat([c.cov_reps[k].z.detach().cpu() for c in sets]) for k in data.covariates})

        def gather() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
            if comm is not None:  # (posterior='normal' is refused data-parallel: no stds here)
                rows, z, cov = local()
                return comm.gather_rows(n, rows, z), {k: comm.gather_rows(n, rows, v) for k, v in cov.items()}, None
            z_all = torch.empty(n, a["latent_dim"])
            std_all = torch.empty(n, a["latent_dim"]) if self.variational else None
            cov_all = {k: torch.empty(n, COVARIATE_DIM) for k in data.covariates}
            for idx, cells in ((train_idx, train_cells), (val_idx, val_cells)):
                if cells is None:
                    continue
                z_all[torch.as_tensor(idx)] = cells.rep.z.detach().cpu()
                if std_all is not None:
                    std_all[torch.as_tensor(idx)] = cells.rep.std.detach().cpu()
                for k in cov_all:
                    cov_all[k][torch.as_tensor(idx)] = cells.cov_reps[k].z.detach().cpu()
            return z_all, cov_all, std_all

        def on_epoch_end(epoch: int, history: dict[str, list]) -> None:
            if epoch % checkpoint_every == 0:
                counts = {"n_train": [n - int(n_val)], "n_val": [int(n_val)]}
                if comm is None:
                    checkpoint(*gather(), {**history, **counts})
                else:
                    rows, z, cov = local()
                    checkpoint(z, cov, None, {**history, **counts}, rows=rows)

        history = train(self.module, train_cells, val_cells, config, generator,
                        on_epoch_end=None if checkpoint is None else on_epoch_end, comm=comm)
        history["n_train"] = [n - int(n_val)]
        history["n_val"] = [int(n_val)]
        return (history, *gather())

    def _continuous_input(self, values: dict[str, np.ndarray]) -> torch.Tensor | None:
        """(n, C) float32 standardised continuous covariates (the model's order and
        training mean / sd) from key -> (n,) values; None when the model has none."""
        keys = self.init_args.get("continuous_covariate_keys") or []
        if not keys:
            return None
        cols = [(values[k] - self.continuous_stats[k][0]) / self.continuous_stats[k][1] for k in keys]
        return torch.as_tensor(np.stack(cols, 1), dtype=torch.float32)

    def _cell_weights(self, data: CountData) -> dict[str, torch.Tensor]:
        """modality -> (n,) weight of each cell's log-likelihood: the modality's
        weight where the cell was measured, 0 elsewhere (only modalities where
        some weight differs from 1)."""
        spec = self.init_args.get("modality_weights") or {}
        out = {}
        for m in data.modalities:
            w = float(spec.get(m, 1.0))
            mask = data.observed_mask(m)
            if w != 1.0 or not mask.all():
                out[m] = torch.as_tensor(mask * w, dtype=torch.float32, device=self.device)
        return out

    def _start(self, data: CountData, generator: torch.Generator) -> torch.Tensor:
        """Starting representations (n, L): scaled PCA scores of the
        log-normalised counts of all modalities (centred within covariate
        classes), or zeros with ``init='zero'``."""
        a = self.init_args
        if a["init"] != "pca":
            return torch.zeros(data.n_obs, a["latent_dim"])
        groups = _joint_codes([cat.codes for cat in data.covariates.values()], data.n_obs)
        z = pca_scores(
            list(data.counts.values()),
            list(data.library.values()),
            a["latent_dim"],
            generator=generator,
            groups=groups,
            observed=[data.observed.get(m) for m in data.counts],
        )
        if data.covariates and a.get("start_correction", "centre") == "harmony":
            z = harmonise(z, groups, generator=generator)
        return torch.from_numpy(z)

    # ------------------------------------------------------------------ outputs


@dataclass
class _FitRun:
    """What one call of :meth:`DGD.fit` works on: the data read, the checked
    settings, and (warm start) where the stored representations are."""

    data: CountData
    config: TrainConfig
    train_size: float
    n_classes: int | None
    order: np.ndarray | None = None
    previous: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 10
    comm: Comm | None = None



def _split(n: int, train_size: float, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of ``n`` cells, each sorted: the first draw of ``generator``."""
    perm = torch.randperm(n, generator=generator).numpy()
    n_val = _n_validation(n, train_size)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def _n_validation(n: int, train_size: float) -> int:
    """Validation cells of ``n`` for ``train_size``: the rest, rounded, at most ``n - 1``."""
    return min(int(round((1.0 - train_size) * n)) if train_size < 1.0 else 0, n - 1)


def _check_train_size(train_size) -> float:
    """``train_size`` as a float in (0, 1], or a ValueError naming it."""
    if isinstance(train_size, bool) or not isinstance(train_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"train_size must be a number in (0, 1] (e.g. 0.9), got {train_size!r}.")
    if not 0.0 < float(train_size) <= 1.0:
        raise ValueError(f"train_size must be in (0, 1] (the share of cells trained on), got {train_size}.")
    return float(train_size)


def _check_checkpoint_dir(path: Path, warm_start: bool) -> None:
    """A checkpoint folder must be new, empty, or (continuing a fit with
    ``warm_start=True``) a saved model's: fit never writes over anything else."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint_dir {path} is a file; pass a folder (it is created if missing).")
    if path.is_dir() and any(path.iterdir()):
        if not warm_start or not (path / CONFIG_FILE).is_file():
            raise FileExistsError(
                f"checkpoint_dir {path} is not empty; pass a new or empty folder (or, to continue the fit saved "
                f"there, load it and fit with warm_start=True)."
            )


def _continue_history(previous: dict[str, list], new: dict[str, list]) -> dict[str, list]:
    """``new`` appended to ``previous`` (a warm start's earlier history), with
    epochs and cumulative seconds continuing; per-fit keys (``n_train``,
    ``n_val``) are taken from ``new``."""
    if not previous or not previous.get("epoch"):
        return {k: list(v) for k, v in new.items()}
    out = {}
    for key, values in new.items():
        if key == "epoch":
            out[key] = list(previous[key]) + [e + previous[key][-1] for e in values]
        elif key == "seconds":
            out[key] = list(previous[key]) + [t + previous[key][-1] for t in values]
        elif key in previous and len(previous[key]) == len(previous["epoch"]):
            out[key] = list(previous[key]) + list(values)
        else:
            out[key] = list(values)
    return out


def _joint_codes(codes: list[np.ndarray], n: int) -> np.ndarray | None:
    """One code per combination of covariate classes, (n,), or None without covariates."""
    if not codes:
        return None
    return np.unique(np.stack(codes, 1), axis=0, return_inverse=True)[1].reshape(n)
