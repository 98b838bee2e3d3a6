"""DGD: the user-facing model. Wires data reading, latent priors, decoder and training."""

from __future__ import annotations

import copy
from dataclasses import replace
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._expression import PREDICTION_AVERAGE, ExpressionMixin
from ._outputs import PROBABILITY_CHUNK, OutputsMixin  # noqa: F401 (re-exported)
from ._fitting import (FittingMixin, _FitRun, _check_checkpoint_dir, _check_train_size, _continue_history,
                       _n_validation)
from ._persistence import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, PersistenceMixin  # noqa: F401 (re-exported)
from . import _evidence
from ._evidence import EvidenceMixin
from ._query import QueryMixin
from .data import binarise, read_data
from .latent import COVARIANCE_TYPES, GaussianMixture
from ._checks import check_int, check_not_view, check_number, check_pair, check_widths, resolve_device
from .module import DGDModule
from .nn import LIKELIHOODS, Decoder
from .train import TrainConfig
from .train.distributed import abort_comm, open_comm
from .train.streaming import DEFAULT_BLOCK_CELLS

logger = logging.getLogger(__name__)

#: the per-cell posteriors of ``DGD(posterior=...)``
POSTERIORS = ("map", "normal")
#: the candidate numbers of components of ``n_components='auto'``
AUTO_COMPONENTS = tuple(range(2, 21))

#: covariate names that would overwrite another output (``obsm[f"X_{key}_{name}"]``)
RESERVED_COVARIATE_NAMES = ("cluster_probs", "std")


def _check_keys(name: str, keys) -> list[str]:
    """obs column names: a string or a list of distinct strings, none of them reserved."""
    if keys is None:
        return []
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"{name} must be an obs column name or a list of them, got {keys!r}.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name} names a column twice: {list(keys)}.")
    clash = [k for k in keys if k in RESERVED_COVARIATE_NAMES]
    if clash:
        raise ValueError(f"{name}: {clash} would overwrite the output obsm['X_dgd_{clash[0]}']; rename that obs "
                         f"column (e.g. adata.obs['{clash[0]}_'] = adata.obs['{clash[0]}']).")
    return list(keys)


#: how the mixture starts (see ``DGD(init_clustering=...)``)
INIT_CLUSTERINGS = ("leiden", "balanced", "kmeans")

#: how the start of a fit with covariates removes them (see ``DGD(start_correction=...)``)
START_CORRECTIONS = ("harmony", "centre")

#: how the mixture's component variances are set (see ``DGD(component_variance=...)``)
COMPONENT_VARIANCES = ("pooled", "learned")


def default_max_epochs(n_cells: int) -> int:
    """Epoch cap for a default fit: 300 for small data, fewer for large (early stopping usually ends sooner)."""
    return int(min(300, max(30, round(300 * (20000 / max(n_cells, 1)) ** 0.5))))


class DGD(FittingMixin, QueryMixin, EvidenceMixin, OutputsMixin, ExpressionMixin, PersistenceMixin):
    """Deep generative decoder with a Gaussian-mixture prior (no encoder).

    Parameters
    ----------
    latent_dim
        Dimension L of each cell's representation ``z``.
    n_components
        Number of mixture components K (clusters). Default: 10, or the number
        of label classes when ``label_key`` is given (K must then be a multiple
        of it). ``'auto'``: chosen over ``AUTO_COMPONENTS`` by the BIC evidence
        approximation of a full-covariance mixture of a one-component screening
        fit's representations (see :meth:`select_n_components` and
        ``docs/posteriors.md``); the chosen K and the curve go into ``uns``.
    covariance_type
        ``'diagonal'`` (default), ``'isotropic'`` or ``'fixed'``.
    covariate_keys
        ``adata.obs`` columns (batch, donor, ...) each modelled by its own 2-D
        representation with a supervised mixture prior (one component per class).
        ``categorical_covariate_keys`` is the same (the scvi-tools name).
    continuous_covariate_keys
        Numeric ``adata.obs`` columns (percent mitochondrial counts, cell-cycle
        scores, ...) whose values, standardised with the training cells' mean
        and standard deviation, enter the decoder directly. They must also be
        columns of data passed to ``transform`` and to the decoding methods.
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
    component_variance
        ``'pooled'`` (default): every component has the same variances, the
        pooled within-cluster variances of the start (of the data-driven
        start's clusters, weighted by their sizes; ``sd_init`` with
        ``init='zero'``), fixed while the means and weights are learned.
        ``'learned'``: each component learns its own. With point (MAP)
        representations learned variances are degenerate: shrinking a
        component raises the prior density of its cells without bound while
        the decoder rescales, so components shrink onto their means (median
        sd 0.005 on PBMC 4k), cells lose their within-cluster differences and
        one broad component catches the cells the others do not fit. Fixed
        variances per component keep such a broad component (it grew to 64%
        of the cells on CITE-seq PBMC); one shared variance has none.
        ``docs/mixture.md`` has the measurements.
    init
        ``'pca'`` (default: representations start at scaled PCA scores of the
        log-normalised counts and the mixture at a GMM fit of them) or
        ``'zero'`` (classic: representations at 0, random means).
    init_clustering
        With ``init='pca'`` and no ``label_key``: how the mixture starts.
        ``'leiden'`` (default): Leiden clusters of the PCA start (kNN graph,
        resolution tuned to K clusters; the consensus of 10 seeded Leiden runs,
        the one that agrees best with the others) give each component its cells; during
        the first ``guide_epochs`` epochs of ``fit`` each cell's prior is its
        cluster's component, so the latent forms one Gaussian blob per cluster
        before the mixture runs free. ``'balanced'``: the same on a kNN graph
        balanced across the covariate classes (each cell's nearest cells of
        every class, as BBKNN does), so that start clusters do not split by
        class: on Kang (condition covariate) it lowers the counterfactual
        ratio (4.57 -> 2.84), on CellBench (5 batches) it costs ARI (1.000 ->
        0.888); see ``docs/mixture.md``. ``'kmeans'``: k-means + EM, no guide.
    start_correction
        With ``init='pca'`` and categorical covariates: how the start removes
        them. ``'harmony'`` (default): the PCA start (centred within each
        class) is corrected by Harmony (``harmonypy``, diversity penalty
        ``theta = 1``), so that the start clusters, and the mixture components
        guided by them, hold cells of every class; the decoder's covariate
        path then has to carry the covariate's effect. On Kang (condition) the
        counterfactual ratio falls from 3.02 to 0.91. ``'centre'``: only the
        per-class centring (models fitted before this option). Fits without
        covariates are unaffected. ``docs/mixture.md`` has the measurements.
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
    posterior
        ``'map'`` (default: a point per cell, maximum a posteriori) or
        ``'normal'`` (a mean and a diagonal standard deviation per cell, fitted
        by the ELBO; ``obsm["X_dgd_std"]`` holds the standard deviations).
    posterior_samples
        With ``posterior='normal'``: reparameterised samples per cell per step (default 1).
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
        component_variance: str = "pooled",
        init: str = "pca",
        init_clustering: str = "leiden",
        start_correction: str = "harmony",
        dispersion_init: float = 2.0,
        likelihood: str | dict[str, str] = "nb",
        modality_key: str | None = None,
        modality_weights: dict[str, float] | None = None,
        device: str = "auto",
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        posterior: str = "map",
        posterior_samples: int = 1,
    ):
        latent_dim = check_int("latent_dim", latent_dim, 1)
        n_components = _check_components(n_components)
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS} ('map': a point per cell; 'normal': a mean and "
                             f"a standard deviation per cell), got {posterior!r}.")
        posterior_samples = check_int("posterior_samples", posterior_samples, 1)
        seed = check_int("seed", seed, 0, 2**63 - 1)
        n_hidden, n_hidden_head = check_widths("n_hidden", n_hidden), check_widths("n_hidden_head", n_hidden_head)
        mean_init, sd_init = check_pair("mean_init", mean_init), check_pair("sd_init", sd_init)
        weight_alpha = check_number("weight_alpha", weight_alpha)
        dispersion_init = check_number("dispersion_init", dispersion_init)
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
        if component_variance not in COMPONENT_VARIANCES:
            raise ValueError(f"component_variance must be one of {COMPONENT_VARIANCES} ('pooled': one fixed variance "
                             f"shared by the components, the default; 'learned'), got {component_variance!r}.")
        if init not in ("pca", "zero"):
            raise ValueError(f"init must be 'pca' or 'zero', got {init!r}.")
        if init_clustering not in INIT_CLUSTERINGS:
            raise ValueError(f"init_clustering must be one of {INIT_CLUSTERINGS}, got {init_clustering!r}.")
        if start_correction not in START_CORRECTIONS:
            raise ValueError(f"start_correction must be one of {START_CORRECTIONS} ('harmony': Harmony on the PCA "
                             f"start, the default; 'centre': per-class centring only), got {start_correction!r}.")
        if categorical_covariate_keys is not None:
            if covariate_keys is not None and list(covariate_keys) != list(categorical_covariate_keys):
                raise ValueError("covariate_keys and categorical_covariate_keys are the same setting; pass one.")
            covariate_keys = categorical_covariate_keys
        covariate_keys = _check_keys("covariate_keys", covariate_keys)
        continuous = _check_keys("continuous_covariate_keys", continuous_covariate_keys)
        if set(continuous) & set(covariate_keys):
            raise ValueError(f"{sorted(set(continuous) & set(covariate_keys))} are both categorical and continuous "
                             "covariates; choose one for each column.")
        if label_key is not None and (not isinstance(label_key, str) or label_key in covariate_keys):
            raise ValueError(f"label_key must be an obs column name that is not also a covariate, got {label_key!r}.")
        if not isinstance(modality_weights or {}, dict):
            raise ValueError(f"modality_weights must be a dict modality -> weight, got {modality_weights!r}.")
        for mod, w in (modality_weights or {}).items():
            check_number(f"modality_weights[{mod!r}]", w)
        if not isinstance(likelihood, (str, dict)):
            raise ValueError(f"likelihood must be a name or a dict modality -> name, got {likelihood!r}.")
        for kind in [likelihood] if isinstance(likelihood, str) else list(dict(likelihood).values()):
            if kind not in LIKELIHOODS:
                raise ValueError(f"unknown likelihood {kind!r}; choose from {sorted(LIKELIHOODS)}.")
        if modality_key is not None and not isinstance(modality_key, str):
            raise ValueError(f"modality_key must be a .var column name or None, got {modality_key!r}.")
        self.init_args: dict[str, Any] = dict(
            latent_dim=latent_dim,
            n_components=n_components,
            covariance_type=covariance_type,
            covariate_keys=list(covariate_keys or []),
            continuous_covariate_keys=continuous,
            label_key=label_key,
            seed=seed,
            n_hidden=[int(h) for h in n_hidden],
            n_hidden_head=[int(h) for h in n_hidden_head],
            mean_init=[float(v) for v in mean_init],
            sd_init=[float(v) for v in sd_init],
            weight_alpha=float(weight_alpha),
            component_variance=component_variance,
            init=init,
            init_clustering=init_clustering,
            start_correction=start_correction,
            dispersion_init=float(dispersion_init),
            likelihood=likelihood if isinstance(likelihood, str) else {str(k): str(v) for k, v in likelihood.items()},
            modality_key=modality_key,
            modality_weights={str(k): float(v) for k, v in (modality_weights or {}).items()},
            posterior=posterior,
            posterior_samples=posterior_samples,
        )
        self.device = resolve_device(device)
        self.module: DGDModule | None = None
        self.representation: torch.Tensor | None = None  # (n_obs, L) for the training cells, in their order
        self.cov_representation: dict[str, torch.Tensor] = {}
        #: (n_obs, L) posterior standard deviations of the training cells (``posterior='normal'``; else None)
        self.representation_std: torch.Tensor | None = None
        #: continuous covariate -> (mean, sd) of the training cells (the decoder sees (x - mean) / sd)
        self.continuous_stats: dict[str, list[float]] = {}
        #: (n_obs, C) standardised continuous covariates of the training cells (None without any)
        self.continuous_input: torch.Tensor | None = None
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
        if _is_auto(k):
            k = self.fit_settings.get("n_components") if self._k_auto is None else self._k_auto
            if k is None:
                raise ValueError("n_components='auto' is resolved during fit; this model has no chosen K.")
        if n_classes is None:
            return (10 if k is None else k), 1
        k = n_classes if k is None else k
        if k % n_classes:
            raise ValueError(
                f"n_components={k} must be a multiple of the {n_classes} classes of label_key "
                f"{self.init_args['label_key']!r}."
            )
        return k, k // n_classes

    #: K to build with while ``n_components='auto'`` is being resolved (None otherwise)
    _k_auto: int | None = None

    @property
    def variational(self) -> bool:
        """True for ``posterior='normal'``."""
        return self.init_args.get("posterior", "map") == "normal"

    def _likelihoods(self, modalities: list[str]) -> dict[str, str]:
        """modality -> likelihood name for the data's modalities."""
        spec = self.init_args.get("likelihood", "nb")
        if isinstance(spec, str):
            return {m: spec for m in modalities}
        unknown = sorted(set(spec) - set(modalities))
        if unknown:
            raise ValueError(f"likelihood names modalities {unknown} that the data lack (modalities: {modalities}).")
        return {m: spec.get(m, "nb") for m in modalities}

    @property
    def decoder(self) -> Decoder | None:
        """The module's decoder (None before fitting)."""
        return None if self.module is None else self.module.decoder

    @property
    def gmm(self) -> GaussianMixture | None:
        """The module's mixture prior on the representations (None before fitting)."""
        return None if self.module is None else self.module.gmm

    @property
    def cov_gmms(self) -> nn.ModuleDict:
        """covariate key -> the module's supervised covariate mixture."""
        return nn.ModuleDict() if self.module is None else self.module.cov_gmms

    def _build(self, n_features: dict[str, int], cov_classes: dict[str, int], n_classes: int | None) -> None:
        """A new :class:`~dgdcell.module.DGDModule` for data of these sizes, initialised from the seed."""
        a = self.init_args
        k, _ = self._n_components(n_classes)
        self.module = DGDModule(
            a["latent_dim"], n_features, self._likelihoods(list(n_features)), cov_classes,
            n_continuous=len(a.get("continuous_covariate_keys") or []), n_components=k, n_label_classes=n_classes,
            n_hidden=a["n_hidden"], n_hidden_head=a["n_hidden_head"], dispersion_init=a["dispersion_init"],
            covariance_type=a["covariance_type"], mean_init=tuple(a["mean_init"]), sd_init=tuple(a["sd_init"]),
            weight_alpha=a["weight_alpha"], generator=torch.Generator().manual_seed(a["seed"]),
        ).to(self.device)

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
        distributed: bool | None = None,
        block_size: int | None = None,
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
        (``patience`` epochs without a relative improvement of ``min_delta``,
        unless the loss's robust trend is still falling faster than that).
        The best state is kept.

        Counts stay sparse throughout; canonical float32 CSR counts (what
        AnnData files usually hold) are used in place, without a copy, and
        are never modified.

        Large data: the ``.X`` of a backed AnnData
        (``anndata.read_h5ad(path, backed="r")``, or an AnnData whose ``.X``
        is ``anndata.io.sparse_dataset`` of an h5ad / zarr group) is read
        from disk block by block (see ``docs/large_data.md``): one streaming
        pass checks the counts and sums each cell's library size, the start
        reads only its sampled cells plus two passes of blocks, and every
        epoch reads each block of ``block_size`` cells once. Memory then grows
        with the cells' representations, not with the counts. The results are
        written into the AnnData's in-memory ``obsm`` / ``obs`` / ``uns`` as
        usual; the file itself is never written (save with
        ``adata.write_h5ad(new_path)``).

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
            improvement of ``min_delta`` (after the guided and warm-up phases),
            once the Theil-Sen trend of the last ``2 * patience`` validation
            losses no longer promises that improvement over the next
            ``patience`` epochs: a noisy loss that keeps falling slowly does not
            end the fit on a lucky low point (``dgdcell.train.loop.still_improving``).
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
        distributed
            Data-parallel fit on ``torch.distributed`` (see
            ``docs/distributed.md``): every process calls ``fit`` with the
            same data and settings; each owns a shard of the cells, the
            decoder and mixture gradients are summed over the processes, and
            every process ends with the same complete model and outputs;
            ``batch_size`` is then the global minibatch (each process decodes
            about ``batch_size / N`` cells per step) and the fit equals the
            one-process fit up to the order of floating-point sums.
            None (default): data-parallel when launched by ``torchrun``
            (``WORLD_SIZE`` > 1) or when a process group of more than one
            process is initialised; True: require it; False: never (each
            process fits on its own).
        block_size
            Shuffle block-wise: each epoch visits blocks of ``block_size``
            consecutive cells (of the training and of the validation cells,
            in file order) in a random order and the cells of each block in a
            random order; no minibatch spans two blocks. Default: None (a
            random permutation of all cells) in memory,
            :data:`~dgdcell.train.streaming.DEFAULT_BLOCK_CELLS` for counts
            on disk, where each block is one read. The same value gives an
            in-memory fit of the same file the same minibatches, and the
            same result. A file sorted by cell type or batch gives blocks of
            few types: shuffle its rows once when writing it.

        Returns
        -------
        ``self``.
        """
        a = self.init_args
        config = TrainConfig(
            max_epochs=1 if max_epochs is None else max_epochs, batch_size=batch_size, lr_decoder=lr_decoder,
            lr_representation=lr_representation, lr_mixture=lr_mixture, betas=betas, early_stopping=early_stopping,
            patience=patience, min_delta=min_delta, warmup_epochs=warmup_epochs, guide_epochs=guide_epochs,
            n_samples=a.get("posterior_samples", 1), block_size=block_size, verbose=verbose,
        ).checked()
        train_size = _check_train_size(train_size)
        if not isinstance(key_added, str) or not key_added:
            raise ValueError(f"key_added must be a non-empty string (the prefix of the keys written), got {key_added!r}.")
        if modalities is not None and (isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities)):
            raise ValueError(f"modalities must be a list of modality names, got {modalities!r}.")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (an integer), got {checkpoint_every!r}.")
        if warm_start and not self.is_fitted:
            raise ValueError("warm_start=True continues a fitted model; fit first or load one with DGD.load(dir).")
        if checkpoint_dir is not None:
            _check_checkpoint_dir(Path(checkpoint_dir), warm_start)
        check_not_view(adata, "fit")
        data = read_data(adata, layer, a["covariate_keys"], a["label_key"], a.get("modality_key"), modalities,
                         continuous_keys=a.get("continuous_covariate_keys"))
        unknown = sorted(set(a.get("modality_weights") or {}) - set(data.modalities))
        if unknown:
            raise ValueError(f"modality_weights names modalities {unknown} that the data lack (modalities: "
                             f"{data.modalities}).")
        binarise(data, [m for m, kind in self._likelihoods(data.modalities).items() if LIKELIHOODS[kind].binary])
        n = data.n_obs
        n_classes = data.labels.n_classes if data.labels is not None else None
        if data.labels is not None and n_classes == 0:
            raise ValueError(f"label_key {a['label_key']!r} has no non-missing values.")
        if _is_auto(a["n_components"]):
            if warm_start or n_classes is not None:
                raise ValueError("n_components='auto' chooses K afresh without labels; it cannot be combined with "
                                 "warm_start or label_key: pass a number of components.")
            if train_size >= 1.0:
                raise ValueError("n_components='auto' chooses K after a screening fit that stops on its validation "
                                 "cells; use train_size < 1 (default 0.9).")
        k, _ = (1, 1) if _is_auto(a["n_components"]) else self._n_components(n_classes)
        if k > n:
            raise ValueError(f"n_components={k} exceeds the number of cells ({n}); choose fewer components.")
        n_train = n - _n_validation(n, train_size)
        if n_train < k:
            raise ValueError(f"train_size={train_size} leaves {n_train} of {n} cells to train on, too few for {k} "
                             "components; use a larger train_size (default 0.9).")
        for m in data.modalities if data.mosaic else []:
            missing = int((~data.observed_mask(m)).sum())
            if missing:
                logger.info("%d of %d cells lack modality %r: fitted on their other modalities", missing, n, m)
        config.max_epochs = default_max_epochs(n) if max_epochs is None else config.max_epochs
        if data.backed and config.block_size is None:
            config.block_size = DEFAULT_BLOCK_CELLS
        settings = {**config.settings(), "layer": layer, "modalities": list(data.modalities),
                    "train_size": train_size, "warm_start": bool(warm_start)}
        run = _FitRun(data, replace(config, guide_epochs=0) if warm_start else config, train_size, n_classes,
                      order=self._warm_start_order(data) if warm_start else None,
                      previous={k: list(v) for k, v in self.history.items()} if warm_start else {},
                      settings=settings, checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                      checkpoint_every=int(checkpoint_every))
        backup = self._state(copy_modules=warm_start)
        device = self.device
        try:
            run.comm = open_comm(distributed, self.device)  # None in one process
            if run.comm is not None:
                if self.variational or _is_auto(a["n_components"]):
                    raise ValueError("posterior='normal' and n_components='auto' do not run data-parallel yet; fit "
                                     "in one process (distributed=False) or use posterior='map' and a given K.")
                self.device = run.comm.model_device
                settings["world_size"] = run.comm.world_size
            extra_uns = {}
            if _is_auto(a["n_components"]):
                self._k_auto, extra_uns["n_components"] = _evidence.auto_components(self, adata, run, layer)
                settings["n_components"] = self._k_auto
            history, z_all, cov_all, std_all = self._fit_run(run)
            stop = {key: history.pop(key)[0] for key in ("stopped", "best_epoch")}
            self.representation, self.cov_representation = z_all, cov_all
            self.representation_std = std_all
            self.history = _continue_history(run.previous, history)
            self.fit_settings = {**settings, "n_epochs": len(self.history["epoch"]), **stop}
            # predict_modality's empirical average, which the temperatures below are calibrated for
            self.fit_settings["prediction_average"] = PREDICTION_AVERAGE
            temperatures = self._calibrate_prediction(run.data)
            if temperatures:
                self.fit_settings["prediction_temperature"] = {m: t for m, (t, _) in temperatures.items()}
                self.fit_settings["prediction_feature_temperature"] = {m: f for m, (_, f) in temperatures.items()}
            if run.checkpoint_dir is not None:
                def write() -> None:
                    self._write_model(run.checkpoint_dir, z_all, cov_all, self.history, self.fit_settings,
                                      representation_std=std_all)
                if run.comm is None:
                    write()
                else:  # rank 0 writes the complete model; every rank learns whether it could
                    run.comm.agree("writing the final checkpoint", write if run.comm.rank == 0 else None)
            self._write_outputs(adata, z_all, cov_all, key_added, extra_uns=extra_uns, std=std_all)
        except BaseException:  # also KeyboardInterrupt: a failed or interrupted fit leaves the model as it was
            self._restore_state(backup)
            self.device = device
            abort_comm(run.comm)  # the other processes stop at once
            raise
        finally:
            self._k_auto = None
        if verbose and (run.comm is None or run.comm.rank == 0):
            print(self._fit_summary(adata, key_added))
        return self

    #: attributes that make up a fitted model
    _STATE_ATTRS = ("module", "representation", "cov_representation", "representation_std", "continuous_stats",
                    "continuous_input",
                    "features",
                    "covariate_categories", "label_categories", "obs_names", "history", "fit_settings")

    def _state(self, copy_modules: bool) -> dict[str, Any]:
        """The fitted state's attributes (modules deep-copied with ``copy_modules``,
        needed when training will change them in place)."""
        return {name: (copy.deepcopy(getattr(self, name)) if copy_modules else getattr(self, name))
                for name in self._STATE_ATTRS}

    def _restore_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _check_fitted(self) -> None:
        if self.representation is None:
            raise RuntimeError("This DGD is not fitted yet: call fit(adata) or DGD.load(dir) first.")

    def __repr__(self) -> str:
        a = self.init_args
        state = f"fitted on {len(self.obs_names)} cells" if self.is_fitted else "not fitted"
        return (
            f"DGD(latent_dim={a['latent_dim']}, n_components={a['n_components']}, "
            f"covariance_type={a['covariance_type']!r}, covariate_keys={a['covariate_keys']}, "
            f"label_key={a['label_key']!r}; {state})"
        )


def _is_auto(spec) -> bool:
    """True when ``n_components`` asks for K to be chosen (``'auto'`` or a list of candidates)."""
    return isinstance(spec, (str, list))


def _check_components(spec):
    """``n_components`` checked: None, an int >= 1, ``'auto'`` or a list of candidate ints (sorted, distinct)."""
    if spec is None or spec == "auto":
        return spec
    if isinstance(spec, (list, tuple, range, np.ndarray)):
        try:
            ks = sorted({check_int("n_components", k, 1) for k in spec})
        except ValueError:
            ks = []
        if len(ks) < 2:
            raise ValueError(f"n_components as candidates must list at least two numbers >= 1 (e.g. range(2, 21)), "
                             f"got {spec!r}.")
        return ks
    if isinstance(spec, str):
        raise ValueError(f"n_components must be a number of components >= 1, 'auto' (chosen by the evidence) or "
                         f"a list of candidates, got {spec!r}.")
    return check_int("n_components", spec, 1)
