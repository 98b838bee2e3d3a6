"""New cells (query mapping): fresh representations against the frozen module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import time

import numpy as np
import torch

from . import _evidence
from ._checks import check_int, check_number, check_not_view
from .data import binarise, read_new_data
from .latent import RepresentationLayer
from .module import COVARIATE_DIM
from .train import CellSet, DeviceCounts
from .train.distributed import abort_comm, merge_rank_histories, open_comm
from .train.candidates import INIT_TYPES, candidate_starts
from .train.new_cells import NewCellConfig, fit_new_cells, frozen, merge_histories
from .train.streaming import DEFAULT_BLOCK_CELLS

if TYPE_CHECKING:
    from .model import DGD


# ``transform`` is a method of :class:`QueryMixin` (a base of :class:`~dgdcell.DGD`); its helpers take the model first.


#: training cells whose representations join transform's candidate starts (``transform(n_reference=)``)
N_REFERENCE = 500


def _reference_starts(self, n_reference: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of the training representations whose points join the candidate starts: a seeded
    sample, (R,) long, sorted (empty for ``n_reference=0``). With covariates every reference point
    is combined with every covariate component, so R is ``n_reference`` divided by their number
    of combinations (at least 1)."""
    rep = self.representation
    if not n_reference:
        return torch.zeros(0, dtype=torch.long)
    combos = int(np.prod([g.n_mix_comp for g in self.cov_gmms.values()])) if self.cov_gmms else 1
    r = min(rep.shape[0], max(1, n_reference // combos))
    return torch.randperm(rep.shape[0], generator=generator)[:r].sort().values


def _bounds(rows: np.ndarray) -> tuple[int, int]:
    """``(first, last + 1)`` of a contiguous run of rows (a rank's shard)."""
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)


def _agreed(comm, what: str, fn):
    """``fn()``; data-parallel, every rank learns whether every other's succeeded (see ``Comm.agree``)."""
    return fn() if comm is None else comm.agree(what, fn)


def _world_size(distributed) -> int:
    """The number of processes a ``transform`` with ``distributed`` would shard over (1: none)."""
    from .train.distributed import resolve_distributed, world_size

    return world_size() if resolve_distributed(distributed) else 1


def _new_cell_set(self, new, data=None):
    """A CellSet (representations at zero) for new cells read by ``read_new_data``
    (of ``data``, a block of ``new.data`` with its counts in memory; default all of it)."""
    d = new.data if data is None else data
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
        continuous=None if (c := self._continuous_input(d.continuous)) is None else c.to(self.device),
    )


def _transform_record(new, config, layer, seed: int, history: dict, seconds: float, n_reference: int,
                      reference_rows: torch.Tensor) -> dict:
    """``uns[key]["transform"]``: settings, overlap, classes, history (h5ad-writable)."""
    return {
        "n_obs": new.data.n_obs,
        "init": config.init,
        "n_samples": config.n_samples,
        "n_starts": config.n_starts,
        "n_reference": int(n_reference),
        "reference_rows": reference_rows.numpy().astype(np.int64),
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


class QueryMixin:
    """``DGD.transform``: new cells embedded against the fitted decoder (see the module docstring)."""

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
        distributed: bool | None = None,
        block_size: int | None = None,
        n_reference: int = N_REFERENCE,
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
           ``max_elements`` floats. The candidates also include ``n_reference``
           training cells' representations (a sample drawn with ``seed``), so a
           new cell can start in the part of a component where cells like it sit,
           not only at its mean.
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
        steps. Starting from training cells' representations as well (``n_reference``)
        raised the share of re-embedded sci-CAR kidney training cells that
        ``transform`` puts in the component ``fit`` gave them (cells not among the
        starts) and the label transfer to new cells, at a lower loss, for
        1.25-1.9x the time (``benchmarks/results/transform.md``). The training representations written by :meth:`fit`
        are not refitted against the final decoder, so they can still differ from
        what ``transform`` gives for the same cells (compare by transforming a
        copy of the training data).

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
        distributed
            Shard the new cells across the processes of a ``torch.distributed``
            run (see ``docs/distributed.md``): every process calls ``transform``
            with the same data, fits its contiguous block of the cells against its
            copy of the frozen model, and every process ends with all the cells'
            outputs. None (default): when launched by ``torchrun`` or under an
            initialised process group of more than one process; False: never.
            With fewer cells than processes every process fits them all.
        n_reference
            Training cells whose representations join the candidate starts (a
            sample of at most this many, drawn with ``seed``; divided among the
            covariate classes' components when the model has covariates). 0: the
            component means (or samples) only. Their rows among the training
            cells are recorded in ``uns[key]["transform"]["reference_rows"]``:
            when re-embedding the training cells, those cells start at their own
            representation.
        block_size
            Embed the cells in blocks of this many consecutive cells, one after
            the other (each cell's fit is its own, so only memory and the
            candidate scoring's log-library grid, spanned per block, depend on
            it). Default: all at once in memory;
            :data:`~dgdcell.train.streaming.DEFAULT_BLOCK_CELLS` for counts read
            from disk (a backed AnnData's ``.X``: one streaming pass checks them
            and sums the library sizes, then each block is read once). The
            candidate starts are drawn once for all blocks.

        Returns
        -------
        ``self`` (read the new representations from ``adata_new.obsm[f"X_{key}"]``).
        """
        self._check_fitted()
        if init not in INIT_TYPES:
            raise ValueError(f"init must be one of {INIT_TYPES}, got {init!r}.")
        lr = check_number("lr", lr, high=10.0)
        min_delta = check_number("min_delta", min_delta, open_low=False)
        min_overlap = check_number("min_overlap", min_overlap, high=1.0)
        for name, value in (("n_samples", n_samples), ("n_starts", n_starts), ("max_epochs", max_epochs),
                            ("batch_size", batch_size), ("patience", patience), ("max_elements", max_elements)):
            check_int(name, value, 1)
        if seed is not None:
            seed = check_int("seed", seed, 0, 2**63 - 1)
        if block_size is not None:
            block_size = check_int("block_size", block_size, 1)
        n_reference = check_int("n_reference", n_reference, 0)
        t0 = time.perf_counter()
        if not isinstance(key_added, str) or not key_added:
            raise ValueError(f"key_added must be a non-empty string (the prefix of the keys written), got {key_added!r}.")
        check_not_view(adata_new, "transform")
        new = read_new_data(adata_new, self.features, layer, self.covariate_categories, min_overlap,
                            continuous_keys=self.init_args.get("continuous_covariate_keys"),
                            modality_key=self.init_args.get("modality_key"), modality=modality)
        kinds = {m: self.decoder.likelihoods[m] for m in new.data.modalities}
        binarise(new.data, [m for m, lik in kinds.items() if lik.binary])
        config = NewCellConfig(
            init=init, n_samples=int(n_samples), n_starts=int(n_starts), max_epochs=int(max_epochs),
            batch_size=int(batch_size),
            lr=float(lr), betas=tuple(self.fit_settings.get("betas", (0.5, 0.7))),
            patience=int(patience), min_delta=float(min_delta), max_elements=int(max_elements), verbose=verbose,
        )
        seed = self.init_args["seed"] if seed is None else int(seed)
        generator = torch.Generator().manual_seed(seed)
        d = new.data
        if self.variational and distributed:
            raise ValueError("a posterior='normal' model's transform does not run data-parallel yet; pass "
                             "distributed=False.")
        comm = None if self.variational else (
            open_comm(distributed, self.device) if d.n_obs >= _world_size(distributed) else None)
        if block_size is None and d.backed:
            block_size = DEFAULT_BLOCK_CELLS
        std = None
        try:
            # the cells this process fits: all, or (data-parallel) its contiguous shard
            lo, hi = (0, d.n_obs) if comm is None else _bounds(comm.shard(np.arange(d.n_obs)))
            if comm is not None and comm.rank != 0:
                config.verbose = False
            ref_rows = _reference_starts(self, n_reference, generator)
            with frozen(self.module):  # drawn once, for all blocks (and identical on every rank)
                cand = candidate_starts(self.gmm, dict(self.cov_gmms), config.init, config.n_samples, generator,
                                        reference=self.representation[ref_rows].to(self.device))
            if self.variational or block_size is None or block_size >= hi - lo:
                cells = _new_cell_set(self, new, d.block(lo, hi) if d.backed or comm is not None else d)
                history = _agreed(comm, "fitting its new cells",
                                  lambda: fit_new_cells(self.module, cells, config, generator, candidates=cand))
                if self.variational:  # Normal posteriors from the points found: Laplace start, then the ELBO
                    std, post = _evidence.fit_new_posteriors(self, cells, config, generator)
                z = cells.rep.z.detach().cpu()
                cov = {k: r.z.detach().cpu() for k, r in cells.cov_reps.items()}
            else:  # block by block (read from disk per block when backed), the candidates drawn once
                z = torch.empty(hi - lo, self.latent_dim)
                cov = {k: torch.empty(hi - lo, COVARIATE_DIM) for k in self.cov_gmms}
                parts = []

                def fit_blocks() -> None:
                    for start in range(lo, hi, block_size):
                        stop = min(start + block_size, hi)
                        cells = _new_cell_set(self, new, d.block(start, stop))
                        parts.append((stop - start,
                                      fit_new_cells(self.module, cells, config, generator, candidates=cand)))
                        z[start - lo:stop - lo] = cells.rep.z.detach().cpu()
                        for k, r in cells.cov_reps.items():
                            cov[k][start - lo:stop - lo] = r.z.detach().cpu()
                        del cells

                _agreed(comm, "fitting its new cells", fit_blocks)
                history = merge_histories(parts)
            if comm is not None:  # every rank gets every cell's results, in the data's order
                z, cov = torch.cat(comm.gather(z)), {k: torch.cat(comm.gather(v)) for k, v in cov.items()}
                history = merge_rank_histories(comm, history, hi - lo)
        except BaseException:
            abort_comm(comm)  # the other processes stop at once
            raise
        record = _transform_record(new, config, layer, seed, history, time.perf_counter() - t0, n_reference, ref_rows)
        record["block_size"] = 0 if block_size is None else int(block_size)
        if std is not None:
            record["posterior_history"] = {k: np.asarray(v, dtype=np.float64) for k, v in post.items()}
        self._write_outputs(adata_new, z, cov, key_added, extra_uns={"transform": record}, std=std)
        return self
