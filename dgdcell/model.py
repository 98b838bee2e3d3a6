"""DGD: the user-facing model. Wires data reading, latent priors, decoder and training."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from ._version import __version__
from .data import CountData, read_data
from .latent import COVARIANCE_TYPES, GaussianMixture, GaussianMixtureSupervised, RepresentationLayer
from .nn import LIKELIHOODS, Decoder
from .train import CellSet, DeviceCounts, TrainConfig, init_mixture, pca_scores, train
from .train.matmul import onednn_float32_matmul
from .train.initialisation import graph_clusters, init_mixture_from_labels

logger = logging.getLogger(__name__)

#: cells per chunk of :meth:`DGD.cluster_probabilities`
PROBABILITY_CHUNK = 65536

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
WEIGHTS_FILE_ALT = "weights.1.pt"  # every other write of a checkpoint directory (see DGD._write_model)
COVARIATE_DIM = 2


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; anything else as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_max_epochs(n_cells: int) -> int:
    """Epoch cap for a default fit: 300 for small data, fewer for large (early stopping usually ends sooner)."""
    return int(min(300, max(30, round(300 * (20000 / max(n_cells, 1)) ** 0.5))))


class DGD:
    """Deep generative decoder with a Gaussian-mixture prior (no encoder).

    Parameters
    ----------
    latent_dim
        Dimension L of each cell's representation ``z``.
    n_components
        Number of mixture components K (clusters). Default: 10, or the number
        of label classes when ``label_key`` is given (K must then be a multiple
        of it).
    covariance_type
        ``'diagonal'`` (default), ``'isotropic'`` or ``'fixed'``.
    covariate_keys
        ``adata.obs`` columns (batch, donor, ...) each modelled by its own 2-D
        representation with a supervised mixture prior (one component per class).
    label_key
        ``adata.obs`` column of known cell types making the mixture
        semi-supervised (missing values: unlabelled cells use the full mixture).
    seed
        Seed for every random choice; a fit on CPU is bit-for-bit reproducible.
    n_hidden, n_hidden_head
        Widths of the decoder's shared trunk and of each modality head.
    mean_init
        ``(radius, sharpness)`` of the softball prior on mixture means.
        Default (5, 5): PCA-initialised representations have unit spread along
        their first axis, so the means sit well inside the ball.
    sd_init
        ``(sd, prior_sd)`` of the Gaussian prior on component negative log
        variances (see :class:`dgdcell.latent.GaussianMixture`).
    weight_alpha
        Dirichlet concentration on mixture weights.
    init
        ``'pca'`` (default: representations start at scaled PCA scores of the
        log-normalised counts and the mixture at a GMM fit of them) or
        ``'zero'`` (classic: representations at 0, random means).
    init_clustering
        With ``init='pca'`` and no ``label_key``: how the mixture starts.
        ``'leiden'`` (default): Leiden clusters of the PCA start (kNN graph,
        resolution tuned to K clusters) give each component its cells; during
        the first ``guide_epochs`` epochs of ``fit`` each cell's prior is its
        cluster's component, so the latent forms one Gaussian blob per cluster
        before the mixture runs free. ``'kmeans'``: k-means + EM, no guide.
    dispersion_init
        Initial negative-binomial dispersion.
    likelihood
        Likelihood of every modality (``'nb'``, negative binomial, the
        default; ``'bernoulli'`` for binarised features such as ATAC peaks:
        counts > 0 count as 1), or a dict modality -> likelihood with NB for
        the modalities not named, e.g. ``{"atac": "bernoulli"}``.
    modality_key
        For an AnnData holding several modalities: the ``.var`` column naming
        each feature's modality (each gets its own decoder head, library size
        and likelihood). Not needed for a MuData (one modality per ``.mod``) or
        a single-modality AnnData.
    modality_weights
        Optional dict modality -> weight (> 0, default 1) multiplying that
        modality's log-likelihood in the objective (a tempered likelihood).
        A modality with many features dominates the representation; a weight
        below 1 lets the others shape it more, above 1 less.
    device
        ``'auto'`` (CUDA when present), ``'cpu'``, ``'cuda'``, ...
    """

    def __init__(
        self,
        latent_dim: int = 20,
        n_components: int | None = None,
        covariance_type: str = "diagonal",
        covariate_keys: list[str] | None = None,
        label_key: str | None = None,
        seed: int = 0,
        n_hidden: tuple[int, ...] = (100, 100),
        n_hidden_head: tuple[int, ...] = (100, 100),
        mean_init: tuple[float, float] = (5.0, 5.0),
        sd_init: tuple[float, float] = (0.5, 1.0),
        weight_alpha: float = 1.0,
        init: str = "pca",
        init_clustering: str = "leiden",
        dispersion_init: float = 2.0,
        likelihood: str | dict[str, str] = "nb",
        modality_key: str | None = None,
        modality_weights: dict[str, float] | None = None,
        device: str = "auto",
    ):
        if int(latent_dim) < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}.")
        if n_components is not None and int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
        if init not in ("pca", "zero"):
            raise ValueError(f"init must be 'pca' or 'zero', got {init!r}.")
        if init_clustering not in ("leiden", "kmeans"):
            raise ValueError(f"init_clustering must be 'leiden' or 'kmeans', got {init_clustering!r}.")
        if isinstance(covariate_keys, str):
            covariate_keys = [covariate_keys]
        for mod, w in (modality_weights or {}).items():
            if not (math.isfinite(float(w)) and float(w) > 0):
                raise ValueError(f"modality_weights[{mod!r}] must be a positive number, got {w}.")
        for kind in [likelihood] if isinstance(likelihood, str) else list(dict(likelihood).values()):
            if kind not in LIKELIHOODS:
                raise ValueError(f"unknown likelihood {kind!r}; choose from {sorted(LIKELIHOODS)}.")
        if mean_init[0] <= 0:
            raise ValueError(f"mean_init radius must be > 0, got {mean_init[0]} (a radius of 0 is degenerate).")
        self.init_args: dict[str, Any] = dict(
            latent_dim=int(latent_dim),
            n_components=None if n_components is None else int(n_components),
            covariance_type=covariance_type,
            covariate_keys=list(covariate_keys or []),
            label_key=label_key,
            seed=int(seed),
            n_hidden=[int(h) for h in n_hidden],
            n_hidden_head=[int(h) for h in n_hidden_head],
            mean_init=[float(v) for v in mean_init],
            sd_init=[float(v) for v in sd_init],
            weight_alpha=float(weight_alpha),
            init=init,
            init_clustering=init_clustering,
            dispersion_init=float(dispersion_init),
            likelihood=likelihood if isinstance(likelihood, str) else {str(k): str(v) for k, v in likelihood.items()},
            modality_key=modality_key,
            modality_weights={str(k): float(v) for k, v in (modality_weights or {}).items()},
        )
        self.device = resolve_device(device)
        self.decoder: Decoder | None = None
        self.gmm: GaussianMixture | None = None
        self.cov_gmms = nn.ModuleDict()
        self.representation: torch.Tensor | None = None  # (n_obs, L) for the training cells, in their order
        self.cov_representation: dict[str, torch.Tensor] = {}
        self.features: dict[str, list[str]] = {}
        self.covariate_categories: dict[str, list[str]] = {}
        self.label_categories: list[str] | None = None
        self.obs_names: list[str] = []
        self.history: dict[str, list] = {}
        self.fit_settings: dict[str, Any] = {}

    # ------------------------------------------------------------------ building
    @property
    def latent_dim(self) -> int:
        """Dimension L of the representations."""
        return self.init_args["latent_dim"]

    @property
    def is_fitted(self) -> bool:
        """True after :meth:`fit` or :meth:`load`."""
        return self.representation is not None

    def _n_components(self, n_classes: int | None) -> tuple[int, int]:
        """(K, components per class) given the number of label classes."""
        k = self.init_args["n_components"]
        if n_classes is None:
            return (10 if k is None else k), 1
        k = n_classes if k is None else k
        if k % n_classes:
            raise ValueError(
                f"n_components={k} must be a multiple of the {n_classes} classes of label_key "
                f"{self.init_args['label_key']!r}."
            )
        return k, k // n_classes

    def _likelihoods(self, modalities: list[str]) -> dict[str, str]:
        """modality -> likelihood name for the data's modalities."""
        spec = self.init_args.get("likelihood", "nb")
        if isinstance(spec, str):
            return {m: spec for m in modalities}
        unknown = sorted(set(spec) - set(modalities))
        if unknown:
            raise ValueError(f"likelihood names modalities {unknown} that the data lack (modalities: {modalities}).")
        return {m: spec.get(m, "nb") for m in modalities}

    def _build(self, n_features: dict[str, int], cov_classes: dict[str, int], n_classes: int | None) -> None:
        a = self.init_args
        k, per_class = self._n_components(n_classes)
        self.decoder = Decoder(
            a["latent_dim"] + COVARIATE_DIM * len(cov_classes),
            n_features,
            a["n_hidden"],
            a["n_hidden_head"],
            likelihood=self._likelihoods(list(n_features)),
            dispersion_init=a["dispersion_init"],
        ).to(self.device)
        gmm_kw = dict(covariance_type=a["covariance_type"], mean_init=tuple(a["mean_init"]), sd_init=tuple(a["sd_init"]))
        if n_classes is None:
            self.gmm = GaussianMixture(k, a["latent_dim"], weight_alpha=a["weight_alpha"], **gmm_kw)
        else:
            self.gmm = GaussianMixtureSupervised(n_classes, per_class, a["latent_dim"], alpha=a["weight_alpha"], **gmm_kw)
        self.gmm.to(self.device)
        self.cov_gmms = nn.ModuleDict(
            {
                key: _covariate_mixture(n).to(self.device)
                for key, n in cov_classes.items()
            }
        )

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        adata,
        max_epochs: int | None = None,
        batch_size: int = 256,
        layer: str | dict[str, str] | None = None,
        train_size: float = 0.9,
        early_stopping: bool = True,
        patience: int = 10,
        min_delta: float = 1e-4,
        warmup_epochs: int = 0,
        guide_epochs: int = 20,
        lr_decoder: float = 1e-3,
        lr_representation: float = 1e-2,
        lr_mixture: float = 1e-2,
        betas: tuple[float, float] = (0.5, 0.7),
        key_added: str = "dgd",
        verbose: bool = True,
        modalities: list[str] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        warm_start: bool = False,
    ) -> "DGD":
        """Fit the model to the raw counts of ``adata`` and write the results into it.

        ``adata`` is an AnnData (one modality, or several told apart by
        ``.var[modality_key]``) or a MuData (every modality in ``.mod``, or
        those named in ``modalities``). Reads ``.X`` (or ``.layers[layer]``;
        for a MuData ``layer`` may be a dict modality -> layer; dense or
        sparse, any numeric dtype, non-negative integer values) and the obs
        columns named by ``covariate_keys`` and ``label_key`` (for a MuData
        from ``mdata.obs`` or, failing that, a modality's obs). Each modality
        has its own decoder head, library size and likelihood. With several
        modalities, a cell absent from a modality or without counts in it is
        unobserved there and contributes only the modalities it has (mosaic
        data); a cell needs counts in at least one.

        A random ``1 - train_size`` share of the cells (default 10%) is held
        out: their representations are fitted against the current decoder
        without changing it, and their loss drives early stopping
        (``patience`` epochs without a relative improvement of ``min_delta``).
        The best state is kept.

        Counts stay sparse throughout; canonical float32 CSR counts (what
        AnnData files usually hold) are used in place, without a copy, and
        are never modified. On the CPU, float32 matrix products go through
        oneDNN during the call when that is exact here (see
        :mod:`dgdcell.train.matmul`; faster than MKL on AMD processors).

        Writes (and nothing else; for a MuData into ``mdata.obsm`` /
        ``mdata.obs`` / ``mdata.uns``), with ``key = key_added``:

        - ``obsm[f"X_{key}"]``: (n_obs, latent_dim) representations;
        - ``obsm[f"X_{key}_{covariate}"]``: (n_obs, 2) per covariate;
        - ``obs[f"{key}_cluster"]``: most probable mixture component (categorical);
        - ``obsm[f"X_{key}_cluster_probs"]``: (n_obs, K) component probabilities;
        - ``uns[key]``: settings, history and library version.

        Schedule: with the default start (``init='pca'``,
        ``init_clustering='leiden'``) the first ``guide_epochs`` epochs pull
        each cell towards the mixture component of its initial Leiden cluster;
        early stopping is only checked after them. ``warmup_epochs`` keeps the
        representations fixed for the first epochs while the decoder learns
        (default 0).

        Learning rates: Adam step sizes for the decoder, the representations
        and the mixtures (the classic multiDGD values are 1e-4, 1e-2, 1e-2 with
        betas (0.5, 0.7); the decoder default here is 1e-3, which reaches a
        better optimum in fewer epochs on the benchmark sets).

        Checkpoints and resuming: with ``checkpoint_dir`` the current state is
        saved there (the :meth:`save` format, each file replaced atomically)
        every ``checkpoint_every`` epochs. ``warm_start=True`` on a fitted
        model (e.g. ``DGD.load(checkpoint_dir)``) continues from its decoder,
        mixtures and representations instead of starting afresh: the data must
        be the same cells (matched by obs name) and features; no guided
        phase; the history continues the saved one. Adam's moments restart.

        Parameters
        ----------
        adata
            AnnData or MuData with raw counts (see above).
        max_epochs
            Epoch cap (default: :func:`default_max_epochs`, 300 for up to 20k
            cells, fewer for more); early stopping usually ends sooner.
        batch_size
            Cells per minibatch (decoder and mixture step once per minibatch).
        layer
            Layer with the raw counts (None: ``.X``); a dict modality -> layer for a MuData.
        train_size
            Share of cells trained on; the rest is the validation set.
        early_stopping, patience, min_delta
            Stop after ``patience`` epochs without a relative validation-loss
            improvement of ``min_delta`` (after the guided and warm-up phases).
        warmup_epochs, guide_epochs
            Epochs with fixed representations / with each cell's prior its
            initial cluster's component (see "Schedule").
        lr_decoder, lr_representation, lr_mixture, betas
            Adam step sizes of decoder, representations and mixtures, and Adam's betas.
        key_added
            Prefix of the keys written.
        verbose
            tqdm progress bar over epochs (the losses in its postfix).
        modalities
            Modalities of a MuData or var-keyed AnnData to use (default: all).
        checkpoint_dir, checkpoint_every, warm_start
            Checkpoints and resuming (see above).

        Returns
        -------
        ``self``.
        """
        a = self.init_args
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_epochs is not None and int(max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
        if warm_start and not self.is_fitted:
            raise ValueError("warm_start=True continues a fitted model; fit first or load one with DGD.load(dir).")
        data = read_data(adata, layer, a["covariate_keys"], a["label_key"], a.get("modality_key"), modalities)
        likelihoods = self._likelihoods(data.modalities)
        _binarise(data, [m for m, kind in likelihoods.items() if LIKELIHOODS[kind].binary])
        n = data.n_obs
        n_classes = data.labels.n_classes if data.labels is not None else None
        if data.labels is not None and n_classes == 0:
            raise ValueError(f"label_key {a['label_key']!r} has no non-missing values.")
        k, _ = self._n_components(n_classes)
        if k > n:
            raise ValueError(f"n_components={k} exceeds the number of cells ({n}); choose fewer components.")
        order = self._warm_start_order(data) if warm_start else None
        if data.mosaic:
            for m in data.modalities:
                missing = int((~data.observed_mask(m)).sum())
                if missing:
                    logger.info("%d of %d cells lack modality %r: fitted on their other modalities", missing, n, m)
        max_epochs = default_max_epochs(n) if max_epochs is None else int(max_epochs)
        config = TrainConfig(
            max_epochs=max_epochs,
            batch_size=int(batch_size),
            lr_decoder=lr_decoder,
            lr_representation=lr_representation,
            lr_mixture=lr_mixture,
            betas=tuple(betas),
            early_stopping=early_stopping,
            patience=int(patience),
            min_delta=float(min_delta),
            warmup_epochs=int(warmup_epochs),
            guide_epochs=0 if warm_start else int(guide_epochs),
            verbose=verbose,
        )
        settings = dict(
            max_epochs=max_epochs,
            batch_size=int(batch_size),
            layer=layer,
            modalities=list(data.modalities),
            train_size=float(train_size),
            early_stopping=bool(early_stopping),
            patience=int(patience),
            min_delta=float(min_delta),
            warmup_epochs=int(warmup_epochs),
            guide_epochs=int(guide_epochs),
            lr_decoder=float(lr_decoder),
            lr_representation=float(lr_representation),
            lr_mixture=float(lr_mixture),
            betas=[float(b) for b in betas],
            warm_start=bool(warm_start),
        )
        previous = {k: list(v) for k, v in self.history.items()} if warm_start else {}
        backup = self._state(copy_modules=warm_start)
        try:
            history, z_all, cov_all = self._fit_fresh_or_warm(
                data, config, train_size, settings, previous, n_classes, order, checkpoint_dir, int(checkpoint_every)
            )
            self.representation = z_all
            self.cov_representation = cov_all
            self.history = _continue_history(previous, history)
            self.fit_settings = {**settings, "n_epochs": len(self.history["epoch"])}
            if checkpoint_dir is not None:
                self._write_model(Path(checkpoint_dir), z_all, cov_all, self.history, self.fit_settings)
            self._write_outputs(adata, z_all, cov_all, key_added)
        except Exception:
            self._restore_state(backup)  # a failed fit leaves an already fitted model as it was
            raise
        return self

    #: attributes that make up a fitted model
    _STATE_ATTRS = ("decoder", "gmm", "cov_gmms", "representation", "cov_representation", "features",
                    "covariate_categories", "label_categories", "obs_names", "history", "fit_settings")

    def _state(self, copy_modules: bool) -> dict[str, Any]:
        """The fitted state's attributes (modules deep-copied with ``copy_modules``,
        needed when training will change them in place)."""
        return {name: (copy.deepcopy(getattr(self, name)) if copy_modules else getattr(self, name))
                for name in self._STATE_ATTRS}

    def _restore_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _fit_fresh_or_warm(self, data, config, train_size, settings, previous, n_classes, order, checkpoint_dir,
                           checkpoint_every):
        """Build (unless warm-starting), set the data's features and classes, train; returns
        ``_fit_data``'s (history, representations, covariate representations)."""
        a = self.init_args
        generator = torch.Generator().manual_seed(a["seed"])
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), onednn_float32_matmul(self.device):
            torch.manual_seed(a["seed"])
            if order is None:
                self._build(
                    {m: c.shape[1] for m, c in data.counts.items()},
                    {key: cat.n_classes for key, cat in data.covariates.items()},
                    n_classes,
                )
            self.features = data.feature_names
            self.covariate_categories = {key: cat.categories for key, cat in data.covariates.items()}
            self.label_categories = data.labels.categories if data.labels is not None else None
            self.obs_names = data.obs_names
            checkpoint = None
            if checkpoint_dir is not None:
                def checkpoint(z, cov, history):
                    merged = _continue_history(previous, history)
                    self._write_model(Path(checkpoint_dir), z, cov, merged, {**settings, "n_epochs": len(merged["epoch"])})
            return self._fit_data(data, config, train_size, generator, order, checkpoint, checkpoint_every)

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

    def _fit_data(
        self,
        data: CountData,
        config: TrainConfig,
        train_size: float,
        generator: torch.Generator,
        order: np.ndarray | None = None,
        checkpoint=None,
        checkpoint_every: int = 10,
    ):
        """Split, start and train; returns (history, (n, L) representations,
        covariate key -> (n, 2)). ``order`` (warm start): rows of the stored
        representations to start from. ``checkpoint(z, cov, history)`` is
        called every ``checkpoint_every`` epochs."""
        a = self.init_args
        n = data.n_obs
        perm = torch.randperm(n, generator=generator).numpy()
        n_val = int(round((1.0 - train_size) * n)) if train_size < 1.0 else 0
        n_val = min(n_val, n - 1)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

        labels = torch.as_tensor(data.labels.codes) if data.labels is not None else None
        guide = None
        if order is not None:
            rows = torch.as_tensor(order)
            z0 = self.representation[rows].clone()
            cov_init = {k: self.cov_representation[k][rows].clone() for k in data.covariates}
        else:
            z0 = self._start(data, generator)
            if a["init"] == "pca" and labels is None and a.get("init_clustering", "leiden") == "leiden":
                guide = torch.as_tensor(graph_clusters(z0.numpy(), self.gmm.n_mix_comp, seed=a["seed"]))
                init_mixture_from_labels(self.gmm, z0[train_idx].to(self.device), guide[train_idx])
            elif a["init"] == "pca":
                init_mixture(self.gmm, z0[train_idx].to(self.device),
                             None if labels is None else labels[train_idx].to(self.device), generator=None)
            cov_init = {key: self.cov_gmms[key].mean.detach().cpu()[torch.as_tensor(cat.codes)]
                        for key, cat in data.covariates.items()}

        weights = self._cell_weights(data)
        # one copy of the counts on the device; the training and validation sets are row views of it
        all_counts = {m: DeviceCounts(c, data.library[m], self.device) for m, c in data.counts.items()}

        def cell_set(rows: np.ndarray) -> CellSet:
            rows_t = torch.as_tensor(rows)
            return CellSet(
                rep=RepresentationLayer(a["latent_dim"], len(rows), z0[rows_t]).to(self.device),
                cov_reps={k: RepresentationLayer(COVARIATE_DIM, len(rows), v[rows_t]).to(self.device) for k, v in cov_init.items()},
                counts={m: c.subset(rows) for m, c in all_counts.items()},
                cov_codes={k: torch.as_tensor(cat.codes[rows], device=self.device) for k, cat in data.covariates.items()},
                labels=None if labels is None else labels[rows_t].to(self.device),
                guide=None if guide is None else guide[rows_t].to(self.device),
                weight={m: w[rows] for m, w in weights.items()},
            )

        train_cells = cell_set(train_idx)
        val_cells = cell_set(val_idx) if n_val > 0 else None

        def gather() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            z_all = torch.empty(n, a["latent_dim"])
            cov_all = {k: torch.empty(n, COVARIATE_DIM) for k in data.covariates}
            for idx, cells in ((train_idx, train_cells), (val_idx, val_cells)):
                if cells is None:
                    continue
                z_all[torch.as_tensor(idx)] = cells.rep.z.detach().cpu()
                for k in cov_all:
                    cov_all[k][torch.as_tensor(idx)] = cells.cov_reps[k].z.detach().cpu()
            return z_all, cov_all

        def on_epoch_end(epoch: int, history: dict[str, list]) -> None:
            if epoch % checkpoint_every == 0:
                checkpoint(*gather(), {**history, "n_train": [len(train_idx)], "n_val": [int(n_val)]})

        history = train(self.decoder, self.gmm, dict(self.cov_gmms), train_cells, val_cells, config, generator,
                        on_epoch_end=None if checkpoint is None else on_epoch_end)
        history["n_train"] = [len(train_idx)]
        history["n_val"] = [int(n_val)]
        return (history, *gather())

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
        return torch.from_numpy(
            pca_scores(
                list(data.counts.values()),
                list(data.library.values()),
                a["latent_dim"],
                generator=generator,
                groups=_joint_codes([cat.codes for cat in data.covariates.values()], data.n_obs),
                observed=[data.observed.get(m) for m in data.counts],
            )
        )

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def cluster_probabilities(self, z: torch.Tensor | np.ndarray) -> np.ndarray:
        """Mixture component probabilities of representations ``z`` (n, L): (n, K) float32.

        Computed in row chunks of :data:`PROBABILITY_CHUNK` cells, so the
        (chunk, K, L) temporaries stay small at any n."""
        self._check_fitted()
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        out = np.empty((z.shape[0], self.gmm.n_mix_comp), dtype=np.float32)
        for start in range(0, z.shape[0], PROBABILITY_CHUNK):
            part = z[start : start + PROBABILITY_CHUNK].to(self.device)
            out[start : start + part.shape[0]] = self.gmm.sample_probs(part).cpu().numpy()
        return out

    def _write_outputs(
        self, adata, z: torch.Tensor, cov: dict[str, torch.Tensor], key: str, extra_uns: dict | None = None
    ) -> None:
        """Write the documented keys into ``adata`` (AnnData or MuData); every value
        is computed before the first assignment, so a failure leaves ``adata`` as it was."""
        probs = self.cluster_probabilities(z)
        cats = [str(i) for i in range(probs.shape[1])]
        obsm = {f"X_{key}": z.numpy().astype(np.float32)}
        obsm.update({f"X_{key}_{name}": c.numpy().astype(np.float32) for name, c in cov.items()})
        obsm[f"X_{key}_cluster_probs"] = probs.astype(np.float32)
        cluster = pd.Categorical.from_codes(probs.argmax(1), categories=cats)
        uns = self._uns_record()
        uns.update(extra_uns or {})
        for name, value in obsm.items():
            adata.obsm[name] = value
        adata.obs[f"{key}_cluster"] = cluster
        adata.uns[key] = uns

    def _uns_record(self) -> dict:
        settings = {k: ("" if v is None else v) for k, v in self.init_args.items()}
        fit = {k: ("" if v is None else v) for k, v in self.fit_settings.items()}
        hist = {k: np.asarray(v) for k, v in self.history.items()}
        return {"version": __version__, "params": settings, "fit": fit, "history": hist}

    def get_latent_representation(self) -> np.ndarray:
        """Representations of the training cells, (n_obs, latent_dim), in their original order."""
        self._check_fitted()
        return self.representation.numpy().copy()

    # ------------------------------------------------------------------ new cells
    def transform(
        self,
        adata_new,
        init: str = "mean",
        n_samples: int = 10,
        n_starts: int = 2,
        max_epochs: int = 100,
        layer: str | None = None,
        batch_size: int = 1024,
        key_added: str = "dgd",
        seed: int | None = None,
        verbose: bool = True,
        lr: float = 0.3,
        patience: int = 5,
        min_delta: float = 1e-4,
        min_overlap: float = 0.5,
        max_elements: int = 20_000_000,
        modality: str | None = None,
    ) -> "DGD":
        """Embed new cells: fit fresh representations against the frozen decoder and mixtures.

        ``adata_new`` is an AnnData or a MuData carrying any of the model's
        modalities: a MuData's modalities are matched by name, an AnnData's by
        ``.var[modality_key]`` or, for a plain AnnData, ``modality`` (default:
        the model's modality sharing most of its feature names, e.g. the RNA
        of an RNA-only query). Cells are fitted on the modalities they have;
        :meth:`predict_modality` then decodes the others.

        The trained model is never changed (decoder, mixtures and the training
        representations stay as they are).

        Features are matched by name to the training features. Training
        features missing from ``adata_new`` are left out of the likelihood (the
        decoded fractions are renormalised over the features present, and
        library sizes are the cells' totals over those); extra features are
        ignored. Fewer than ``min_overlap`` (default 50%) of the training
        features present is an error, as is a cell without counts in them.

        Steps:

        1. Every cell is scored by the full objective (negative-binomial NLL +
           mixture prior + covariate prior) at every candidate start: each
           mixture component's mean (``init='mean'``, the default) or
           ``n_samples`` draws from each component (``init='sample'``, drawn
           with ``seed``), combined with every component mean of each covariate
           mixture. One vectorised pass; its intermediates stay within about
           ``max_elements`` floats.
        2. Each cell is optimised from its ``n_starts`` best-scored candidates
           (only the new representations move; Adam with betas as in fit). Steps
           are in units of the start component's standard deviation (``lr`` =
           0.3 of it, decaying by 0.9 per step), so cells of tight and broad
           components converge alike. After 5 epochs only each cell's better
           start continues. A cell stops when its loss has not improved by more
           than ``min_delta`` (relative) for ``patience`` epochs; all stop by
           ``max_epochs``. Each cell keeps its lowest-loss state.

        Defaults measured on six labelled sets (``benchmarks/transform.py``):
        a second start lowers the loss of a cell whose best-scored component
        mean is not its best basin; per-cell stopping needs about half the
        steps of a plateau on the total loss; means with ``lr=0.3`` gave
        clusters and neighbours closer to those of fit than samples or larger
        steps. The training representations written by :meth:`fit` are not
        refitted against the final decoder, so they can differ from what
        ``transform`` gives for the same cells (compare by transforming a copy
        of the training data).

        Covariates (``covariate_keys`` of the model) are read from
        ``adata_new.obs``. A cell of a known class starts at, and is scored
        with, its class's component. A cell of a class unseen in training (a
        new batch), with a missing value, or with the column absent altogether
        is treated as unknown (label -1): its prior is the full covariate
        mixture and the candidate search picks the best-fitting known class to
        start from. No change to the model is needed. Labels (``label_key``)
        are not read: new cells are unlabelled.

        Writes the same keys as :meth:`fit` (and only after success: a failed
        transform leaves ``adata_new`` unchanged), with ``key = key_added``:
        ``obsm[f"X_{key}"]``, ``obsm[f"X_{key}_{covariate}"]``,
        ``obs[f"{key}_cluster"]``, ``obsm[f"X_{key}_cluster_probs"]`` and
        ``uns[key]`` (the model's record, plus ``uns[key]["transform"]``:
        settings, feature overlap, unseen classes and the loss history).

        ``seed`` (default: the model's seed) drives ``init='sample'``; the same
        seed gives identical results on CPU.

        Parameters
        ----------
        adata_new
            AnnData or MuData with raw counts of the new cells.
        init, n_samples, n_starts
            Candidate starts (see step 1 and 2).
        max_epochs, lr, patience, min_delta
            Optimisation of each cell (see step 2).
        layer
            Layer with the raw counts (None: ``.X``; a dict modality -> layer for a MuData).
        batch_size
            Cells decoded at a time during optimisation.
        key_added
            Prefix of the keys written.
        seed
            Seed of ``init='sample'`` (default: the model's).
        verbose
            tqdm progress bar over epochs.
        min_overlap
            Smallest share of a modality's training features the new data must carry.
        max_elements
            Memory bound of the candidate scoring, in floats.
        modality
            For a plain AnnData of a multi-modal model: which modality it holds.

        Returns
        -------
        ``self`` (read the new representations from ``adata_new.obsm[f"X_{key}"]``).
        """
        import time

        from .data import read_new_data
        from .train.new_cells import INIT_TYPES, NewCellConfig, fit_new_cells

        self._check_fitted()
        if init not in INIT_TYPES:
            raise ValueError(f"init must be one of {INIT_TYPES}, got {init!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        for name, value in (("n_samples", n_samples), ("n_starts", n_starts), ("max_epochs", max_epochs),
                            ("batch_size", batch_size), ("patience", patience), ("max_elements", max_elements)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        t0 = time.perf_counter()
        new = read_new_data(adata_new, self.features, layer, self.covariate_categories, min_overlap,
                            modality_key=self.init_args.get("modality_key"), modality=modality)
        kinds = {m: self.decoder.likelihoods[m] for m in new.data.modalities}
        _binarise(new.data, [m for m, lik in kinds.items() if lik.binary])
        config = NewCellConfig(
            init=init, n_samples=int(n_samples), n_starts=int(n_starts), max_epochs=int(max_epochs),
            batch_size=int(batch_size),
            lr=float(lr), betas=tuple(self.fit_settings.get("betas", (0.5, 0.7))),
            patience=int(patience), min_delta=float(min_delta), max_elements=int(max_elements), verbose=verbose,
        )
        seed = self.init_args["seed"] if seed is None else int(seed)
        cells = self._new_cell_set(new)
        with onednn_float32_matmul(self.device):
            history = fit_new_cells(self.decoder, self.gmm, dict(self.cov_gmms), cells, config,
                                    torch.Generator().manual_seed(seed))
        z = cells.rep.z.detach().cpu()
        cov = {k: r.z.detach().cpu() for k, r in cells.cov_reps.items()}
        record = self._transform_record(new, config, layer, seed, history, time.perf_counter() - t0)
        self._write_outputs(adata_new, z, cov, key_added, extra_uns={"transform": record})
        return self

    def _new_cell_set(self, new):
        """A CellSet (representations at zero) for new cells read by ``read_new_data``."""
        from .train.objective import CellSet

        d = new.data
        return CellSet(
            rep=RepresentationLayer(self.latent_dim, d.n_obs).to(self.device),
            cov_reps={k: RepresentationLayer(COVARIATE_DIM, d.n_obs).to(self.device) for k in self.cov_gmms},
            counts={m: DeviceCounts(c, d.library[m], self.device) for m, c in d.counts.items()},
            cov_codes={k: torch.as_tensor(cat.codes, device=self.device) for k, cat in d.covariates.items()},
            labels=None,
            feature_index={
                m: None if a.complete else torch.as_tensor(a.feature_index, device=self.device)
                for m, a in new.alignments.items()
            },
            weight=self._cell_weights(d),
        )

    @staticmethod
    def _transform_record(new, config, layer, seed: int, history: dict, seconds: float) -> dict:
        """``uns[key]["transform"]``: settings, overlap, classes, history (h5ad-writable)."""
        return {
            "n_obs": new.data.n_obs,
            "init": config.init,
            "n_samples": config.n_samples,
            "n_starts": config.n_starts,
            "max_epochs": config.max_epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "betas": list(config.betas),
            "patience": config.patience,
            "min_delta": config.min_delta,
            "layer": "" if layer is None else layer,
            "seed": seed,
            "n_epochs": len(history["epoch"]),
            "cell_epochs": float(np.sum(history["n_active"]) / max(new.data.n_obs, 1)),
            "n_candidates": int(history["n_candidates"][0]),
            "features": {
                m: {"n_shared": a.n_shared, "n_missing": a.n_missing, "n_extra": a.n_extra}
                for m, a in new.alignments.items()
            },
            "unseen_classes": {k: list(v) for k, v in new.unseen_classes.items()},
            "missing_covariates": list(new.missing_covariates),
            "history": {
                "loss": np.asarray(history["loss"], dtype=np.float64),
                "reconstruction": np.asarray(history["reconstruction"], dtype=np.float64),
                "start_loss": float(history["start_loss"][0]),
            },
            "seconds": float(seconds),
            "seconds_init": float(history["seconds_init"][0]),
        }

    # ------------------------------------------------------------------ expression
    def get_normalized_expression(
        self,
        adata=None,
        library_size: float | str | None = None,
        modality: str = "rna",
        key: str = "dgd",
        transform_batch: str | dict[str, str] | None = None,
        layer: str | None = None,
        batch_size: int = 1024,
    ) -> pd.DataFrame:
        """Denoised expression decoded from the cells' representations.

        Parameters
        ----------
        adata
            None: the training cells (``self.representation``, in training
            order). Else cells carrying ``obsm[f"X_{key}"]`` (and
            ``obsm[f"X_{key}_{covariate}"]`` per covariate) from :meth:`fit` or
            :meth:`transform`.
        library_size
            None: fractions (each row sums to 1 over the modality's training
            features). A number: expected counts at that library size (rows sum
            to it). ``'latent'``: expected counts at each cell's own library
            size, read from ``adata``'s counts (``adata.X`` or ``layer``); when
            training features are missing there, the observed total over the
            features present is divided by their decoded share.
        modality
            Which modality's features to decode.
        transform_batch
            A covariate class name (or ``{covariate: class}``): decode every cell
            with that class's component mean as its covariate representation,
            i.e. as if measured in that batch.
        batch_size
            Cells decoded at a time.

        Returns
        -------
        DataFrame (cells x training features of ``modality``), float32; index
        the cells' names, columns the feature names.
        """
        self._check_fitted()
        if modality not in self.features:
            raise KeyError(f"modality {modality!r} is not in the model (modalities: {sorted(self.features)}).")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        fixed = self._transform_batch_inputs(transform_batch)
        z, cov, names = self._stored_representations(adata, key, skip=set(fixed))
        n = z.shape[0]
        scale = self._library_scale(adata, library_size, layer, n, modality)
        out = np.empty((n, len(self.features[modality])), dtype=np.float32)
        keys = list(self.cov_gmms)
        with torch.no_grad():
            for start in range(0, n, int(batch_size)):
                stop = min(start + int(batch_size), n)
                parts = [z[start:stop]] + [
                    fixed[k].expand(stop - start, -1) if k in fixed else cov[k][start:stop] for k in keys
                ]
                x_in = torch.cat(parts, dim=-1).to(self.device)
                out[start:stop] = torch.exp(self.decoder(x_in, modalities=[modality])[modality]).cpu().numpy()
        if isinstance(scale, tuple):  # 'latent': observed totals over the features present / their decoded share
            library, columns = scale
            scale = library / np.maximum(out[:, columns].sum(axis=1, dtype=np.float64), 1e-12)
        if scale is not None:
            out *= np.asarray(scale, dtype=np.float32).reshape(-1, 1)
        return pd.DataFrame(out, index=pd.Index(names), columns=pd.Index(self.features[modality]), copy=False)

    def predict_modality(
        self,
        adata=None,
        modality: str | None = None,
        library_size: float | None = None,
        key: str = "dgd",
        transform_batch: str | dict[str, str] | None = None,
        batch_size: int = 1024,
    ) -> pd.DataFrame:
        """Predict a modality the cells were not measured in (e.g. proteins of an RNA-only query).

        Decodes the cells' representations through the head of ``modality``:
        the representations come from :meth:`fit` (``adata`` None: the training
        cells, or an object ``fit`` wrote into) or :meth:`transform` (run it on
        the query first: it fits the cells on the modalities they have). Reads
        ``obsm[f"X_{key}"]`` and ``obsm[f"X_{key}_{covariate}"]``; writes nothing.

        Parameters
        ----------
        adata
            AnnData / MuData carrying the representations, or None.
        modality
            The modality to predict; required when the model has several.
        library_size
            None: fractions (rows sum to 1 over the modality's features). A
            number: expected counts at that library size. To compare with
            measured data, use e.g. the median library size of the modality in
            the training data.
        transform_batch
            Decode as if measured in this covariate class (see
            :meth:`get_normalized_expression`).
        batch_size
            Cells decoded at a time.

        Returns
        -------
        DataFrame (cells x the modality's training features), float32.
        """
        self._check_fitted()
        if modality is None:
            if len(self.features) > 1:
                raise ValueError(f"the model has modalities {sorted(self.features)}; pass modality= to choose one.")
            modality = next(iter(self.features))
        if isinstance(library_size, str):
            raise ValueError("predict_modality takes library_size None or a number; the cells' own library size "
                             "in an unmeasured modality is unknown.")
        return self.get_normalized_expression(adata, library_size, modality, key, transform_batch, None, batch_size)

    def _stored_representations(self, adata, key: str, skip: set[str]):
        """(n, L) representations, covariate key -> (n, 2), and the cell names:
        the training cells' (``adata`` None) or those stored in ``adata.obsm``."""
        if adata is None:
            return self.representation, dict(self.cov_representation), list(self.obs_names)
        name = f"X_{key}"
        if name not in adata.obsm:
            raise KeyError(
                f"adata.obsm has no {name!r}; run dgd.fit(adata) or dgd.transform(adata) first "
                f"(or pass key= the key_added used; obsm keys: {list(adata.obsm.keys())})."
            )
        z = np.asarray(adata.obsm[name], dtype=np.float32)
        if z.shape != (adata.n_obs, self.latent_dim):
            raise ValueError(f"adata.obsm[{name!r}] has shape {z.shape}, expected ({adata.n_obs}, {self.latent_dim}).")
        cov = {}
        for k in self.cov_gmms:
            if k in skip:
                continue
            ck = f"X_{key}_{k}"
            if ck not in adata.obsm:
                raise KeyError(f"adata.obsm has no {ck!r} (covariate {k!r}); run fit or transform first, "
                               "or pass transform_batch= to decode in a chosen class.")
            cov[k] = torch.as_tensor(np.asarray(adata.obsm[ck], dtype=np.float32))
        return torch.as_tensor(z), cov, [str(v) for v in adata.obs_names]

    def _transform_batch_inputs(self, transform_batch) -> dict[str, torch.Tensor]:
        """covariate key -> (1, 2) component mean of the requested class (weights within the class)."""
        if transform_batch is None:
            return {}
        if isinstance(transform_batch, dict):
            wanted = {str(k): str(v) for k, v in transform_batch.items()}
        else:
            keys = [k for k, cats in self.covariate_categories.items() if str(transform_batch) in cats]
            if not keys:
                raise KeyError(f"transform_batch {transform_batch!r} is not a class of any covariate "
                               f"({self.covariate_categories}).")
            if len(keys) > 1:
                raise ValueError(f"transform_batch {transform_batch!r} is a class of several covariates {keys}; "
                                 "pass a dict {covariate: class}.")
            wanted = {keys[0]: str(transform_batch)}
        out = {}
        for k, cls in wanted.items():
            if k not in self.covariate_categories:
                raise KeyError(f"{k!r} is not a covariate of the model (covariates: {list(self.covariate_categories)}).")
            if cls not in self.covariate_categories[k]:
                raise KeyError(f"class {cls!r} is not a class of covariate {k!r} ({self.covariate_categories[k]}).")
            g = self.cov_gmms[k]
            label = torch.tensor([self.covariate_categories[k].index(cls)], device=g.mean.device)
            with torch.no_grad():
                out[k] = (g.label_mixture_probs(label) @ g.mean).cpu()
        return out

    def _library_scale(self, adata, library_size, layer, n: int, modality: str):
        """None (fractions), an (n,) or scalar scale, or for ``'latent'`` the
        tuple (observed totals (n,), decoded columns they cover)."""
        if library_size is None:
            return None
        if isinstance(library_size, str):
            if library_size != "latent":
                raise ValueError(f"library_size must be None, a number or 'latent', got {library_size!r}.")
            if adata is None:
                raise ValueError("library_size='latent' needs the cells' counts: pass adata.")
            from .data import read_new_data

            new = read_new_data(adata, {modality: self.features[modality]}, layer, None,
                                modality_key=self.init_args.get("modality_key"), modality=modality)
            return new.data.library[modality], new.alignments[modality].feature_index
        value = float(library_size)
        if not value > 0:
            raise ValueError(f"library_size must be > 0, got {library_size}.")
        return value

    def _check_fitted(self) -> None:
        if self.representation is None:
            raise RuntimeError("This DGD is not fitted yet: call fit(adata) or DGD.load(dir) first.")

    # ------------------------------------------------------------------ persistence
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
        self._write_model(path, self.representation, self.cov_representation, self.history, self.fit_settings)

    def _write_model(
        self, path: Path, representation: torch.Tensor, cov_representation: dict[str, torch.Tensor],
        history: dict[str, list], fit_settings: dict[str, Any],
    ) -> None:
        """Write the model with the given training-cell representations (n, L)
        and covariate representations to ``path`` (see :meth:`save`)."""
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}
        tensors.update({f"gmm.{k}": v.detach().cpu().clone() for k, v in self.gmm.state_dict().items()})
        for key, g in self.cov_gmms.items():
            tensors.update({f"cov_gmm.{key}.{k}": v.detach().cpu().clone() for k, v in g.state_dict().items()})
        tensors["representation"] = representation.detach().cpu().clone()
        for key, c in cov_representation.items():
            tensors[f"cov_representation.{key}"] = c.detach().cpu().clone()
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
        }
        # the weights alternate between two names and config.json names the current one, so that
        # at any moment config.json and the weights it names are a complete pair of one state
        current = _weights_file(path)
        weights = WEIGHTS_FILE_ALT if current == WEIGHTS_FILE and (path / WEIGHTS_FILE).is_file() else WEIGHTS_FILE
        config["weights_file"] = weights
        tmp_weights, tmp_config = path / f".{weights}.tmp", path / f".{CONFIG_FILE}.tmp"
        torch.save(tensors, tmp_weights)
        tmp_config.write_text(json.dumps(config))
        os.replace(tmp_weights, path / weights)
        os.replace(tmp_config, path / CONFIG_FILE)
        stale = path / (WEIGHTS_FILE_ALT if weights == WEIGHTS_FILE else WEIGHTS_FILE)
        if stale.is_file():
            stale.unlink()

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
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
        unknown = sorted(set(config.get("init_args") or {}) - known)
        if unknown:
            raise ValueError(
                f"{path} holds settings this dgdcell ({__version__}) does not know: {unknown} (saved by dgdcell "
                f"{saved_version}). Upgrade dgdcell to load it."
            )
        try:
            return cls._from_saved(config, tensors, device)
        except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as err:
            raise ValueError(
                f"{path} does not hold a consistent saved DGD ({type(err).__name__}: {err}); "
                f"were {CONFIG_FILE} and the weights written by the same model?"
            ) from err

    @classmethod
    def _from_saved(cls, config: dict, tensors: dict[str, torch.Tensor], device: str) -> "DGD":
        """A model from a parsed ``config.json`` and its tensors (KeyError / RuntimeError when they do not match)."""
        if not isinstance(tensors, dict):
            raise TypeError(f"the weights file holds a {type(tensors).__name__}, not a dict of tensors")
        model = cls(device=device, **config["init_args"])
        labels = config["label_categories"]
        with torch.random.fork_rng(devices=[]):
            model._build(
                {m: len(f) for m, f in config["features"].items()},
                {k: len(c) for k, c in config["covariate_categories"].items()},
                None if labels is None else len(labels),
            )
        model.decoder.load_state_dict(_prefixed(tensors, "decoder."))
        model.gmm.load_state_dict(_prefixed(tensors, "gmm."))
        for key, g in model.cov_gmms.items():
            g.load_state_dict(_prefixed(tensors, f"cov_gmm.{key}."))
        model.representation = tensors["representation"]
        model.cov_representation = {k: tensors[f"cov_representation.{k}"] for k in config["covariate_categories"]}
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

    def __repr__(self) -> str:
        a = self.init_args
        state = f"fitted on {len(self.obs_names)} cells" if self.is_fitted else "not fitted"
        return (
            f"DGD(latent_dim={a['latent_dim']}, n_components={a['n_components']}, "
            f"covariance_type={a['covariance_type']!r}, covariate_keys={a['covariate_keys']}, "
            f"label_key={a['label_key']!r}; {state})"
        )


def _covariate_mixture(n_classes: int) -> GaussianMixtureSupervised:
    """Supervised 2-D mixture for one covariate: one isotropic component per
    class, means spread evenly on the unit circle."""
    g = GaussianMixtureSupervised(n_classes, 1, COVARIATE_DIM, "isotropic", mean_init=(2.0, 5.0), sd_init=(0.2, 1.0))
    angle = torch.arange(n_classes) * (2 * math.pi / n_classes)
    with torch.no_grad():
        g.mean.copy_(torch.stack([angle.cos(), angle.sin()], -1))
    return g


def _binarise(data: CountData, modalities: list[str]) -> None:
    """Counts of ``modalities`` set to 1 where > 0 (a new matrix; its index
    arrays are shared, and the input's, which may be the caller's AnnData's,
    are never written), library sizes recounted as the number of features on
    (unobserved cells keep 1)."""
    for m in modalities:
        old = data.counts[m]
        csr = sp.csr_matrix((np.ones_like(old.data), old.indices, old.indptr), shape=old.shape, copy=False)
        data.counts[m] = csr
        library = np.diff(csr.indptr).astype(np.float64)
        data.library[m] = np.where(data.observed_mask(m), library, 1.0)


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


def _weights_file(path: Path) -> str:
    """The weights file that ``path/config.json`` names (``weights.pt`` when it names none or is unreadable)."""
    try:
        name = json.loads((path / CONFIG_FILE).read_text()).get("weights_file", WEIGHTS_FILE)
    except (OSError, ValueError, AttributeError):
        return WEIGHTS_FILE
    return name if name in (WEIGHTS_FILE, WEIGHTS_FILE_ALT) else WEIGHTS_FILE


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
