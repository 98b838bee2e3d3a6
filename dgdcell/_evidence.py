"""The evidence of a fit: :meth:`DGD.score`, ``n_components='auto'`` and the evidence curve over K.

AnnData-facing helpers of :class:`~dgdcell.DGD` (``score`` and ``select_n_components`` in :class:`EvidenceMixin`, a base of it); the maths is in
:mod:`dgdcell.train.variational` and :class:`dgdcell.module.DGDModule`.

- ``score``: per-cell importance-sampled ``log p(x)`` with each cell's posterior
  as proposal (``posterior='normal'``: the fitted Normal; ``'map'``: a diagonal
  Laplace approximation around the cell's point), and the ELBO under the same
  proposal, with standard errors, written to ``.obs``.
- ``auto_components``: ``n_components='auto'`` (or a list of candidates): a
  screening fit with one component, then for every candidate K a full-covariance
  mixture fitted by EM to the cells' representations; K has the largest BIC
  approximation of the evidence (:data:`AUTO_METHOD` ``'bic'``; the held-out
  evidence rules ``'refit'`` and ``'mixture'`` stay, measured against it in
  docs/posteriors.md).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ._checks import check_int
from .data import binarise, read_new_data
from .latent import RepresentationLayer
from .module import COVARIATE_DIM
from .train import CellSet, DeviceCounts
from .train.variational import (
    evidence_summary,
    fit_mixture,
    fit_posteriors,
    importance_log_weights,
    laplace_log_std,
    with_posterior,
)

if TYPE_CHECKING:
    from ._fitting import _FitRun
    from .model import DGD

logger = logging.getLogger(__name__)

#: posterior samples per validation cell for the evidence curve over K
CURVE_SAMPLES = 32
#: epochs (at most) of the ELBO fit of new cells' posteriors after the MAP search of ``transform``
POSTERIOR_EPOCHS = 50
#: a mean held-out evidence gain per cell smaller than this (nats) does not justify more components
MIN_GAIN = 0.05
#: how ``n_components='auto'`` compares K: 'bic' (the Schwarz approximation of the evidence of a
#: full-covariance mixture of the converged screening fit's representations, as mclust chooses K),
#: 'mixture' (held-out evidence of mixtures fitted to the screening latent space) or 'refit'
#: (held-out evidence of the validation cells after training on with each K); measured against each
#: other in docs/posteriors.md ("Choosing K")
AUTO_METHOD = "bic"
#: k-means starts of each candidate mixture of AUTO_METHOD 'bic' (the best EM result is kept)
BIC_STARTS = 5
#: at most this many cells (a seeded subsample) enter the mixtures of AUTO_METHOD 'bic'
BIC_MAX_CELLS = 20_000
#: epochs each candidate K trains on from the screening state (AUTO_METHOD 'refit')
ADAPT_EPOCHS = 15
#: draws per cell from its proposal that the candidate mixtures are fitted to
EM_DRAWS = 4
#: folds of the cross-validated mixture evidence of ``n_components='auto'``
CV_FOLDS = 5
#: components of the screening fit of ``n_components='auto'``
SCREEN_COMPONENTS = 1


def _cells(self: "DGD", data, rows: np.ndarray | None, z: torch.Tensor, cov: dict[str, torch.Tensor],
           feature_index: dict | None = None) -> CellSet:
    """The cells ``rows`` (all when None) of ``data`` (a CountData) at points ``z`` / ``cov`` (their rows)."""
    n = data.n_obs
    rows = np.arange(n) if rows is None else np.asarray(rows)
    rows_t = torch.as_tensor(rows)
    weights = self._cell_weights(data)
    cont = self._continuous_input(data.continuous)
    return CellSet(
        rep=RepresentationLayer(self.latent_dim, len(rows), z[rows_t]).to(self.device),
        cov_reps={k: RepresentationLayer(COVARIATE_DIM, len(rows), cov[k][rows_t]).to(self.device)
                  for k in self.cov_gmms},
        counts={m: DeviceCounts(c, data.library[m], self.device).subset(rows) for m, c in data.counts.items()},
        cov_codes={k: torch.as_tensor(cat.codes[rows], device=self.device) for k, cat in data.covariates.items()},
        feature_index=dict(feature_index or {}),
        weight={m: w[torch.as_tensor(rows, device=w.device)] for m, w in weights.items()},
        continuous=None if cont is None else cont[rows_t].to(self.device),
    )


def _proposal(self: "DGD", cells: CellSet, std: torch.Tensor | None) -> tuple[CellSet, str]:
    """``cells`` with their proposal: the Normal posterior (``std`` given) or a Laplace approximation."""
    if std is not None:
        return with_posterior(cells, cells.rep.z, std.to(cells.rep.z.device).clamp_min(1e-12).log()), "posterior"
    return with_posterior(cells, cells.rep.z, laplace_log_std(self.module, cells)), "laplace"


def _obsm_array(adata, name: str, shape: tuple[int, int], hint: str) -> torch.Tensor:
    if name not in adata.obsm:
        raise ValueError(f"score needs adata.obsm[{name!r}]; {hint}")
    value = np.asarray(adata.obsm[name], dtype=np.float32)
    if value.shape != shape:
        raise ValueError(f"adata.obsm[{name!r}] has shape {value.shape}, expected {shape}; {hint}")
    return torch.from_numpy(value.copy())


def _candidates(spec, n_train: int) -> list[int]:
    from .model import AUTO_COMPONENTS

    ks = sorted({int(k) for k in (AUTO_COMPONENTS if spec == "auto" else spec)})
    ks = [k for k in ks if k <= n_train]
    if not ks:
        raise ValueError(f"no candidate number of components fits the {n_train} training cells; pass smaller ones.")
    return ks


def one_se_choice(per_cell: np.ndarray, ks: list[int], min_gain: float | None = None
                  ) -> tuple[int, np.ndarray, np.ndarray]:
    """K from a (n_K, n_cells) held-out evidence table: the smallest K whose
    mean is within one standard error of the best (the error of the paired
    per-cell difference to the best), or within ``min_gain`` nats per cell
    (default :data:`MIN_GAIN`) of it, whichever is wider: a redundant extra
    component changes every cell's evidence alike, so its standard error can
    be tiny while the gain is of no consequence. Returns (K, means, standard errors)."""
    min_gain = MIN_GAIN if min_gain is None else float(min_gain)
    means = per_cell.mean(1)
    best = int(np.argmax(means))
    diff = per_cell - per_cell[best]
    se = diff.std(1, ddof=1) / np.sqrt(per_cell.shape[1]) if per_cell.shape[1] > 1 else np.zeros(len(ks))
    ok = np.flatnonzero(means >= means[best] - np.maximum(se, min_gain))
    return int(ks[int(ok[0])]), means, se


def _auto_by_mixture(self: "DGD", adata, run: "_FitRun", layer) -> tuple[int, dict[str, Any]]:
    """Resolve ``n_components='auto'`` (or a list) for ``fit``: returns (K, the ``uns`` record).

    1. A screening fit with :data:`SCREEN_COMPONENTS` component (a single
       Gaussian prior: no clustering pressure on the latent space).
    2. Every cell's held-out evidence under each candidate K: the cells are
       split into :data:`CV_FOLDS` folds; a K-component mixture is fitted by
       k-means + EM to the latent means of the other folds, and the cell's
       ``log p(x)`` under the screening decoder with that mixture as prior is
       estimated by importance sampling (its posterior, or for a MAP model the
       Laplace approximation, as proposal; :data:`CURVE_SAMPLES` draws shared by
       every K and fold, so the decoder runs once per draw). The decoder term is
       common to every K, so held-out-ness of the mixture is what matters.
    3. K is the smallest candidate whose mean held-out evidence is within one
       standard error (of the paired per-cell difference) of the best.
    """
    ks = _candidates(self.init_args["n_components"], run.data.n_obs - int(round((1 - run.train_size) * run.data.n_obs)))
    self._k_auto = SCREEN_COMPONENTS
    _, z_all, cov_all, std_all = self._fit_run(run)
    n = run.data.n_obs
    cells, proposal = _proposal(self, _cells(self, run.data, None, z_all, cov_all), std_all)
    gen = torch.Generator().manual_seed(self.init_args["seed"])
    fold = torch.randperm(n, generator=gen) % CV_FOLDS
    # the mixtures are fitted to draws from the cells' proposals (EM on uncertain points): a
    # component cannot become narrower than the cells' own uncertainty
    mean, std = cells.rep.z.detach().cpu(), cells.rep.std.detach().cpu()
    draws = mean + std * torch.randn((EM_DRAWS, *mean.shape), generator=gen)
    gmms = [fit_mixture(self.gmm, draws[:, fold != f].reshape(-1, mean.shape[1]).to(self.device), k, generator=gen)
            for f in range(CV_FOLDS) for k in ks]
    log_w = importance_log_weights(self.module, cells, CURVE_SAMPLES, gen, gmms=gmms)  # (folds * K, S, n)
    table = evidence_summary(log_w)["log_evidence"].view(CV_FOLDS, len(ks), n).cpu()
    per_cell = table.gather(0, fold.view(1, 1, n).expand(1, len(ks), n))[0].numpy().astype(np.float64)
    k, means, se = one_se_choice(per_cell, ks)
    logger.info("n_components='auto': chose K=%d by held-out evidence", k)
    record = {"chosen": k, "candidates": np.asarray(ks), "log_evidence": means, "se": se,
              "screening_components": SCREEN_COMPONENTS, "n_folds": CV_FOLDS, "n_samples": CURVE_SAMPLES,
              "proposal": proposal, "rule": "smallest K within one standard error (at least MIN_GAIN nats) of the best held-out evidence",
              "method": "mixture", "min_gain": MIN_GAIN}
    return k, record


def _auto_by_refit(self: "DGD", adata, run: "_FitRun", layer) -> tuple[int, dict[str, Any]]:
    """Resolve ``n_components='auto'`` (or a list) for ``fit``: returns (K, the ``uns`` record).

    1. A screening fit with :data:`SCREEN_COMPONENTS` component (a single
       Gaussian prior: no clustering pressure on the latent space yet).
    2. For every candidate K, from the screening state: a K-component mixture
       fitted by k-means + EM to the training cells' latent means replaces the
       prior, and decoder, mixture and representations train on for
       :data:`ADAPT_EPOCHS` epochs (so the latent space can take the shape a
       K-component prior gives it); the validation cells' representations are
       fitted alongside against the frozen decoder, as in ``fit``.
    3. Each validation cell's ``log p(x)`` under that K-component model, by
       importance sampling (its posterior, or for a MAP model the Laplace
       approximation, as proposal; :data:`CURVE_SAMPLES` draws).
    4. K is the smallest candidate whose mean held-out evidence is within one
       standard error (of the paired per-cell difference) of the best.
    """
    from ._fitting import _split
    from .train import train

    ks = _candidates(self.init_args["n_components"], run.data.n_obs - int(round((1 - run.train_size) * run.data.n_obs)))
    self._k_auto = SCREEN_COMPONENTS
    _, z_all, cov_all, std_all = self._fit_run(run)
    seed = self.init_args["seed"]
    val_idx, train_idx = _split(run.data.n_obs, run.train_size, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    config = replace(run.config, max_epochs=ADAPT_EPOCHS, guide_epochs=0, warmup_epochs=0, early_stopping=False,
                     verbose=False)
    screen_module = self.module
    per_cell, proposal = [], ""
    try:
        for k in ks:
            sets = []
            for rows in (train_idx, val_idx):
                cells = _cells(self, run.data, rows, z_all, cov_all)
                if std_all is not None:
                    cells = with_posterior(cells, cells.rep.z, std_all[torch.as_tensor(rows)].log())
                sets.append(cells)
            module = copy.deepcopy(screen_module)
            module.gmm = fit_mixture(screen_module.gmm, sets[0].rep.z.detach(), k, generator=gen)
            train(module, sets[0], sets[1], config, gen)
            self.module = module
            val = sets[1]
            val, proposal = _proposal(self, val, val.rep.std.detach() if val.variational else None)
            log_w = importance_log_weights(module, val, CURVE_SAMPLES, gen)[0]
            per_cell.append(evidence_summary(log_w)["log_evidence"].cpu().numpy().astype(np.float64))
    finally:
        self.module = screen_module
    k, means, se = one_se_choice(np.stack(per_cell), ks)
    logger.info("n_components='auto': chose K=%d by held-out evidence", k)
    record = {"chosen": k, "candidates": np.asarray(ks), "log_evidence": means, "se": se,
              "screening_components": SCREEN_COMPONENTS, "adapt_epochs": ADAPT_EPOCHS, "n_validation": len(val_idx),
              "n_samples": CURVE_SAMPLES, "proposal": proposal,
              "rule": "smallest K within one standard error (at least MIN_GAIN nats) of the best held-out evidence",
              "method": "refit", "min_gain": MIN_GAIN}
    return k, record


def bic_curve(z: np.ndarray, ks: list[int], seed: int) -> np.ndarray:
    """The BIC evidence approximation per cell, ``-BIC / (2 n)`` (nats), of a full-covariance Gaussian
    mixture with each K in ``ks`` fitted by EM (scikit-learn, :data:`BIC_STARTS` k-means starts) to the
    points ``z`` (n, L); NaN where EM cannot fit K components (collapsed ones) or K >= n."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z = np.asarray(z, dtype=np.float64)
    out = np.full(len(ks), np.nan)
    for i, k in enumerate(ks):
        if k >= len(z):
            continue
        try:
            with warnings.catch_warnings():  # an EM start that stops at max_iter is still a candidate
                warnings.simplefilter("ignore", ConvergenceWarning)
                gm = GaussianMixture(k, covariance_type="full", n_init=BIC_STARTS, random_state=seed % 2**32,
                                     max_iter=500).fit(z)
        except ValueError:  # a component collapsed onto too few points
            continue
        out[i] = -gm.bic(z) / (2 * len(z))
    return out


def _auto_by_bic(self: "DGD", adata, run: "_FitRun", layer) -> tuple[int, dict[str, Any]]:
    """Resolve ``n_components='auto'`` (or a list) for ``fit``: returns (K, the ``uns`` record).

    1. A screening fit with :data:`SCREEN_COMPONENTS` component (a single Gaussian
       prior: no clustering pressure on the latent space), with the fit's own epoch cap.
    2. For every candidate K, a full-covariance Gaussian mixture fitted by EM to the
       cells' representations (posterior means; at most :data:`BIC_MAX_CELLS`, a seeded
       subsample) and its BIC, the Schwarz approximation of the log evidence of the
       mixture (Fraley & Raftery's mclust chooses K this way): ``log p(z | K) ~
       log-likelihood - p_K log(n) / 2``, ``p_K`` the mixture's parameters. The
       representations' clusters are not diagonal Gaussians (their axes correlate), so
       the components have full covariances here, whatever the model's own.
    3. K is the candidate with the largest approximation (the smallest BIC).
    """
    ks = _candidates(self.init_args["n_components"], run.data.n_obs - int(round((1 - run.train_size) * run.data.n_obs)))
    self._k_auto = SCREEN_COMPONENTS
    _, z_all, _, _ = self._fit_run(run)
    seed = self.init_args["seed"]
    z = z_all.detach().cpu().numpy().astype(np.float64)
    if len(z) > BIC_MAX_CELLS:
        z = z[np.sort(np.random.default_rng(seed).choice(len(z), BIC_MAX_CELLS, replace=False))]
    curve = bic_curve(z, ks, seed)
    if not np.isfinite(curve).any():
        raise ValueError(f"n_components='auto': no candidate mixture ({ks}) could be fitted to the {len(z)} cells' "
                         "representations; pass smaller candidates or an integer n_components.")
    k = int(ks[int(np.nanargmax(curve))])
    logger.info("n_components='auto': chose K=%d by the BIC of the representations' mixture", k)
    record = {"chosen": k, "candidates": np.asarray(ks), "log_evidence": curve, "se": np.zeros(len(ks)),
              "screening_components": SCREEN_COMPONENTS, "n_cells": len(z), "n_init": BIC_STARTS,
              "rule": "largest BIC approximation of the log evidence (per cell) of a full-covariance Gaussian "
                      "mixture of the screening fit's representations",
              "method": "bic"}
    return k, record


def auto_components(self: "DGD", adata, run: "_FitRun", layer) -> tuple[int, dict[str, Any]]:
    """Resolve ``n_components='auto'`` (or a list) for ``fit``: returns (K, the ``uns`` record),
    by :data:`AUTO_METHOD` (see :func:`_auto_by_bic`, :func:`_auto_by_mixture` and :func:`_auto_by_refit`)."""
    method = {"bic": _auto_by_bic, "refit": _auto_by_refit, "mixture": _auto_by_mixture}[AUTO_METHOD]
    return method(self, adata, run, layer)


def evidence_frame(record: dict) -> pd.DataFrame:
    """The evidence curve of ``uns[key]["n_components"]`` as a DataFrame (one row per K)."""
    ks = np.asarray(record["candidates"])
    return pd.DataFrame({"n_components": ks, "log_evidence": np.asarray(record["log_evidence"]),
                         "se": np.asarray(record["se"]), "chosen": ks == int(record["chosen"])})


def fit_new_posteriors(self: "DGD", cells: CellSet, config, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """``transform`` under ``posterior='normal'``: from the MAP points the search found,
    Normal posteriors started at their Laplace approximation and fitted to the ELBO
    (means, log stds and covariate points move; module frozen). Writes the means into
    ``cells`` and returns the (n, L) stds and the history."""
    q = with_posterior(cells, cells.rep.z, laplace_log_std(self.module, cells))
    history = fit_posteriors(self.module, q, POSTERIOR_EPOCHS, float(self.fit_settings.get("lr_representation", 1e-2)),
                             tuple(config.betas), config.batch_size, self.init_args.get("posterior_samples", 1),
                             generator=generator)
    with torch.no_grad():
        cells.rep.z.copy_(q.rep.z)
    return q.rep.std.detach().cpu(), history


class EvidenceMixin:
    """``DGD.score`` and ``DGD.select_n_components`` (see the module docstring)."""

    def score(
        self: "DGD",
        adata,
        n_samples: int = 100,
        batch_size: int = 4096,
        seed: int | None = None,
        key_added: str = "dgd",
        layer: str | None = None,
        modality: str | None = None,
    ) -> "DGD":
        """Per-cell evidence: the importance-sampled ``log p(x)`` and the ELBO, with standard errors.

        For each cell, ``n_samples`` draws ``z_s`` from a proposal ``q`` give the
        log weights ``w_s = log p(x | z_s, c) + log p_GMM(z_s) + log p(c | class)
        - log q(z_s)`` (``c``: the covariate representations, held at their
        points); ``log p(x) ~ log mean_s exp(w_s)`` (IWAE-style; it rises towards
        the true ``log p(x)`` as ``n_samples`` grows and is never below the ELBO
        ``mean_s w_s`` of the same draws). The proposal is each cell's Normal
        posterior (``posterior='normal'``), or, for a MAP model, a diagonal
        Laplace approximation around the cell's point: ``std_d = H_dd^(-1/2)``,
        with ``H_dd`` the curvature of the cell's loss along coordinate ``d``
        (central differences, step 0.01, of its autograd gradient; floored at the
        widest mixture component's precision).

        The cells are those of ``adata`` at the representations in
        ``adata.obsm[f"X_{key}"]`` (and ``X_{key}_std``, ``X_{key}_<covariate>``),
        i.e. the training cells after :meth:`fit` or new cells after
        :meth:`transform`; features are matched by name as in ``transform``.
        Labels are not used (the full mixture is the prior).

        Writes ``obs[f"{key}_log_evidence"]``, ``obs[f"{key}_log_evidence_se"]``
        (delta-method standard error of the log-mean-exp), ``obs[f"{key}_elbo"]``,
        ``obs[f"{key}_elbo_se"]`` (nats per cell) and ``uns[key]["score"]``
        (settings and means), only after success.

        Parameters
        ----------
        adata
            The AnnData or MuData the model was fitted on or has transformed.
        n_samples
            Proposal draws per cell (>= 2).
        batch_size
            (cell, draw) pairs decoded at a time.
        seed
            Seed of the draws (default: the model's); the same seed gives identical CPU results.
        key_added
            The prefix the representations were written under, and of the keys written.
        layer, modality
            As for :meth:`transform`.

        Returns
        -------
        ``self``.
        """
        self._check_fitted()
        n_samples = check_int("n_samples", n_samples, 2)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = self.init_args["seed"] if seed is None else check_int("seed", seed, 0, 2**63 - 1)
        if not isinstance(key_added, str) or not key_added:
            raise ValueError(f"key_added must be the non-empty prefix the representations were written under, got "
                             f"{key_added!r}.")
        new = read_new_data(adata, self.features, layer, self.covariate_categories, 0.0,
                            continuous_keys=self.init_args.get("continuous_covariate_keys"),
                            modality_key=self.init_args.get("modality_key"), modality=modality)
        binarise(new.data, [m for m in new.data.modalities if self.decoder.likelihoods[m].binary])
        n, dim = new.data.n_obs, self.latent_dim
        hint = "run fit(adata) or transform(adata) with this key_added first."
        z = _obsm_array(adata, f"X_{key_added}", (n, dim), hint)
        cov = {k: _obsm_array(adata, f"X_{key_added}_{k}", (n, COVARIATE_DIM), hint) for k in self.cov_gmms}
        std = _obsm_array(adata, f"X_{key_added}_std", (n, dim), hint) if self.variational else None
        findex = {m: None if a.complete else torch.as_tensor(a.feature_index, device=self.device)
                  for m, a in new.alignments.items()}
        cells, proposal = _proposal(self, _cells(self, new.data, None, z, cov, findex), std)
        n_values = max(sum(c.n_features for c in cells.counts.values()), 1)
        log_w = importance_log_weights(self.module, cells, n_samples, torch.Generator().manual_seed(seed),
                                       max_elements=batch_size * n_values)[0]
        est = {k: v.cpu().numpy().astype(np.float64) for k, v in evidence_summary(log_w).items()}
        record = {"n_samples": n_samples, "seed": seed, "proposal": proposal,
                  "mean_log_evidence": float(est["log_evidence"].mean()), "mean_elbo": float(est["elbo"].mean())}
        for name in ("log_evidence", "log_evidence_se", "elbo", "elbo_se"):
            adata.obs[f"{key_added}_{name}"] = est[name]
        if isinstance(adata.uns.get(key_added), dict):
            adata.uns[key_added]["score"] = record
        else:
            adata.uns[key_added] = {"score": record}
        return self

    def select_n_components(self: "DGD", adata, n_components=None, key_added: str = "dgd", **fit_kwargs) -> pd.DataFrame:
        """Fit with K chosen by the evidence and return the evidence curve over K.

        The same as ``DGD(n_components=candidates).fit(adata)`` (the model keeps
        ``n_components`` = the candidates and is fitted with the chosen K), with
        ``n_components`` the candidates (default ``'auto'``: 2..20). Returns a
        DataFrame with ``n_components``, ``log_evidence`` (nats per cell: the
        BIC approximation of the log evidence of a full-covariance mixture of the
        screening fit's representations; for the held-out rules of
        ``dgdcell._evidence.AUTO_METHOD`` the mean held-out ``log p(x)`` per
        validation cell), ``se`` (0 for the BIC; else the standard error of the
        difference to the best K) and ``chosen``; also in ``uns[key]["n_components"]``.

        Parameters
        ----------
        adata
            AnnData or MuData with raw counts (as for :meth:`fit`).
        n_components
            Candidate numbers of components (default: the model's own list, or ``'auto'``).
        key_added
            Prefix of the keys written (as for :meth:`fit`).
        **fit_kwargs
            Passed to :meth:`fit` (``max_epochs``, ``train_size``, ``layer``, ...).

        Returns
        -------
        pandas.DataFrame
            The evidence curve, one row per candidate K.
        """
        from .model import DGD

        if n_components is None:
            own = self.init_args["n_components"]
            spec = own if isinstance(own, (str, list)) else "auto"
        else:
            spec = n_components
        DGD(n_components=spec)  # validates the candidates before anything changes
        saved = self.init_args["n_components"]
        self.init_args["n_components"] = spec if spec == "auto" else sorted({int(k) for k in spec})
        try:
            self.fit(adata, key_added=key_added, **fit_kwargs)
        except BaseException:
            self.init_args["n_components"] = saved
            raise
        return evidence_frame(adata.uns[key_added]["n_components"])
