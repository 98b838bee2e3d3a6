"""Decoded expression of a fitted DGD: denoised and batch-corrected expression, predicted modalities."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from ._checks import check_int, check_number
from .data import read_continuous, read_new_data
from .module import COVARIATE_DIM
from .train.streaming import DEFAULT_BLOCK_CELLS

logger = logging.getLogger(__name__)

#: ``predict_modality``'s estimates (see its docstring)
PREDICTION_METHODS = ("empirical", "point")
#: most training representations in ``predict_modality``'s empirical prior
EMPIRICAL_CANDIDATES = 10_000
#: how ``predict_modality``'s empirical estimate averages the decoded fractions over the weighted
#: training points: ``'geometric'`` (``exp`` of the weighted mean of their logs; what ``fit`` calibrates
#: the temperatures for and records in ``fit_settings["prediction_average"]``) or ``'arithmetic'`` (the
#: weighted mean; models saved before dgdcell recorded the setting)
PREDICTION_AVERAGES = ("geometric", "arithmetic")
PREDICTION_AVERAGE = "geometric"


#: cells and features of the fitted data on which ``fit`` calibrates ``predict_modality``'s temperature
CALIBRATION_CELLS = 1000
CALIBRATION_FEATURES = 1000
#: the temperatures ``fit`` chooses from (see ``DGD._calibrate_prediction``)
PREDICTION_TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0)


def _calibration_truth(counts, library: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cells, F) measured ``log1p(1e4 x / total)`` of the (at most
    :data:`CALIBRATION_FEATURES`) features detected in most cells, and their
    column indices (features detected in none left out)."""
    import scipy.sparse as sp

    from .train.initialisation import log_normalise

    counts = sp.csr_matrix(counts)
    detected = np.asarray((counts > 0).sum(0)).ravel()
    order = np.argsort(-detected, kind="stable")[:CALIBRATION_FEATURES]
    feats = np.sort(order[detected[order] > 0])
    return log_normalise(counts[:, feats].tocsr(), library).toarray(), feats


def _spearman_columns(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The Spearman correlation of each column of ``pred`` with the same column of
    ``truth`` (average ranks for ties): (columns,), NaN where either is constant."""
    from scipy.stats import rankdata

    rp, rt = rankdata(pred, axis=0), rankdata(truth, axis=0)
    rp -= rp.mean(0)
    rt -= rt.mean(0)
    den = np.sqrt((rp * rp).sum(0) * (rt * rt).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rp * rt).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def _averaged_values(log_frac: torch.Tensor, average: str) -> torch.Tensor:
    """What ``predict_modality``'s empirical estimate takes the weighted mean of, for ``average``
    (:data:`PREDICTION_AVERAGES`): the log fractions (``'geometric'``) or the fractions."""
    return log_frac if average == "geometric" else torch.exp(log_frac)


class ExpressionMixin:
    """:class:`~dgdcell.DGD` methods that decode the cells' representations."""

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
        batch_size = check_int("batch_size", batch_size, 1)
        fixed = self._transform_batch_inputs(transform_batch)
        z, cov, names = self._stored_representations(adata, key, skip=set(fixed))
        n = z.shape[0]
        scale = self._library_scale(adata, library_size, layer, n, modality)
        out = self._decode_fractions(z, cov, self._stored_continuous(adata), modality, fixed, batch_size)
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
        method: str | None = None,
        layer: str | None = None,
        n_candidates: int = EMPIRICAL_CANDIDATES,
        seed: int | None = None,
        max_elements: int = 20_000_000,
        temperature: float | None = None,
        average: str | None = None,
    ) -> pd.DataFrame:
        """Predict a modality the cells were not measured in (e.g. proteins of an RNA-only query).

        Two estimates (``method``):

        - ``'empirical'`` (the default for cells passed as ``adata`` that carry
          counts of another of the model's modalities and not of ``modality``): the
          modality's decoded fractions averaged over the posterior of the cells'
          representation given their measured counts, under an empirical prior: the
          training cells' representations (at most ``n_candidates``, a sample drawn
          with ``seed`` beyond that), equally likely a priori. Each training point
          ``z_j`` is weighted by the likelihood of the cell's counts there,
          ``w_ij ~ p(x_i | z_j, c_i)`` (every modality the cell was measured in,
          with the model's ``modality_weights``; covariates at the cell's class),
          tempered, ``w_ij ~ p(x_i | z_j, c_i)^(1/T)``, and the prediction is the
          weighted geometric mean ``exp(sum_j w_ij log decode(z_j))`` (``average``;
          the posterior mean of the log fraction, the scale on which expression is
          compared). With thousands of genes the untempered
          weights sit on one or two training points (the likelihood treats
          genes as independent given ``z``, so it is overconfident); ``fit``
          chooses ``T`` for each modality of a multi-modal model by leave-one-out
          on up to 1,000 of its cells (predicted from their other modalities
          against the other training points; the ``T`` in 1-10 whose predictions
          correlate best with their measured values; ``fit_settings
          ["prediction_temperature"]``), and by the same leave-one-out a
          ``T`` for each feature it scored (up to 1,000 per modality;
          ``fit_settings["prediction_feature_temperature"]``, one per feature,
          the modality's ``T`` for those not scored; on PBMC 10k the proteins'
          run from 1 to 10). Each feature is then averaged under its own tempered
          weights. Geometric means are not rescaled (rescaling them to sum to 1
          lost 0.01-0.02 of the Spearman correlation below), so a row need not
          sum to 1: under one temperature it sums to at most 1 (Jensen's
          inequality), under the features' own a little above or below.
          ``average='arithmetic'`` gives the weighted mean instead (the posterior
          mean of the fractions), rescaled to sum to 1 where the features'
          temperatures differ.
          Reads the cells'
          counts (``adata.X`` / ``layer``, or the MuData's modalities), matched
          to the training features by name as in :meth:`transform`.
          Why: a point fitted from one modality alone lies where no training
          cell was, and the decoder's head of the missing modality was only
          trained at the points of cells measured in it; the empirical prior
          keeps the prediction where the training cells are
          (``benchmarks/results/multimodal.md``: proteins of held-out CITE-seq
          cells from RNA alone, mean Spearman 0.790 against 0.685 at the point on PBMC 10k,
          0.624 against 0.573 on CBMC; 0.775 and 0.620 with the arithmetic mean under
          temperatures chosen for it, 0.758 and 0.610 untempered). The cost is one likelihood per (cell,
          training point) pair, as for ``transform``'s candidate scoring: about
          45 s for 6,661 cells x 5,328 training points x 1,000 genes on two CPU
          threads. Fewer candidates are faster and less accurate (PBMC 10k, untempered:
          0.728 / 0.743 / 0.754 at 500 / 2,000 / all 5,328).
        - ``'point'`` (the default otherwise: ``adata=None``, cells measured in
          ``modality`` (their point is then fitted to it) or carrying only their
          representations, and models with continuous covariates or saved without
          training representations):
          decodes each cell's representation through the head of ``modality``:
          the representations come from :meth:`fit` (``adata`` None: the training
          cells, or an object ``fit`` wrote into) or :meth:`transform` (run it on
          the query first: it fits the cells on the modalities they have). Reads
          ``obsm[f"X_{key}"]`` and ``obsm[f"X_{key}_{covariate}"]``.

        Writes nothing.

        Parameters
        ----------
        adata
            AnnData / MuData of the cells (carrying the representations for
            ``'point'``; their counts for ``'empirical'``), or None: the training cells.
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
            Cells decoded at a time (``'point'``).
        method
            ``'empirical'``, ``'point'`` or None (see above).
        layer
            Layer of ``adata`` holding the counts (``'empirical'``; default ``.X``).
        n_candidates
            Most training representations in the empirical prior (``'empirical'``).
        seed
            Seed of the sample of training representations when there are more
            than ``n_candidates`` (default: the model's).
        max_elements
            Memory bound of the likelihood pass, in floats (``'empirical'``).
        temperature
            ``T`` of the empirical weights (``'empirical'``; a number > 0, 1 is
            Bayes' rule), the same for every feature. None: the ones ``fit``
            chose for ``modality``'s features (see above; the modality's single
            ``T`` for a model saved before dgdcell chose one per feature, 1 for a
            model saved before it chose any).
        average
            How the empirical estimate averages the decoded fractions over the
            weighted training points: ``'geometric'`` or ``'arithmetic'`` (see
            above); None: the one ``fit`` calibrated the temperatures for
            (``fit_settings["prediction_average"]``; ``'arithmetic'`` for a model
            saved before dgdcell recorded it).

        Returns
        -------
        DataFrame (cells x the modality's training features), float32.
        """
        self._check_fitted()
        if modality is None:
            if len(self.features) > 1:
                raise ValueError(f"the model has modalities {sorted(self.features)}; pass modality= to choose one.")
            modality = next(iter(self.features))
        if modality not in self.features:
            raise KeyError(f"modality {modality!r} is not in the model (modalities: {sorted(self.features)}).")
        if isinstance(library_size, str):
            raise ValueError("predict_modality takes library_size None or a number; the cells' own library size "
                             "in an unmeasured modality is unknown.")
        if average is not None and average not in PREDICTION_AVERAGES:
            raise ValueError(f"average must be one of {PREDICTION_AVERAGES} (or None for the one fit calibrated), "
                             f"got {average!r}.")
        method = self._prediction_method(adata, method, modality)
        if method == "point":
            return self.get_normalized_expression(adata, library_size, modality, key, transform_batch, None,
                                                  batch_size)
        n_candidates = check_int("n_candidates", n_candidates, 1)
        max_elements = check_int("max_elements", max_elements, 1)
        seed = self.init_args["seed"] if seed is None else check_int("seed", seed, 0, 2**63 - 1)
        scale = None if library_size is None else check_number("library_size", library_size)
        if temperature is None:
            temperature = self._fitted_temperatures(modality)
        else:
            temperature = check_number("temperature", temperature)
        if average is None:  # models saved before dgdcell recorded it took the arithmetic mean
            average = self.fit_settings.get("prediction_average", "arithmetic")
        out, names = self._empirical_fractions(adata, modality, layer, self._transform_batch_inputs(transform_batch),
                                               n_candidates, seed, max_elements, temperature, average)
        if scale is not None:
            out *= np.float32(scale)
        return pd.DataFrame(out, index=pd.Index(names), columns=pd.Index(self.features[modality]), copy=False)

    def _fitted_temperatures(self, modality: str) -> float | list[float]:
        """The temperatures ``fit`` chose for predicting ``modality``: one per feature where it
        scored them (the modality's shared one for the others), else the shared one (1 for a model
        saved before dgdcell recorded it)."""
        shared = float((self.fit_settings.get("prediction_temperature") or {}).get(modality, 1.0))
        per = [float(t) for t in (self.fit_settings.get("prediction_feature_temperature") or {}).get(modality, [])]
        if len(per) != len(self.features[modality]):
            return shared
        return per if len(set(per)) > 1 else per[0]

    def _prediction_method(self, adata, method: str | None, modality: str) -> str:
        """``predict_modality``'s method: the one asked for (checked) or the default."""
        continuous = bool(self.init_args.get("continuous_covariate_keys"))
        stored = self.representation is not None and self.representation.shape[0] > 0
        if method is None:
            usable = (adata is not None and stored and not continuous
                      and self._shares_features(adata, [m for m in self.features if m != modality])
                      and not self._shares_features(adata, [modality]))
            return "empirical" if usable else "point"
        if method not in PREDICTION_METHODS:
            raise ValueError(f"method must be one of {PREDICTION_METHODS} (or None for the default), got {method!r}.")
        if method == "empirical":
            if adata is None:
                raise ValueError("method='empirical' weighs training points by the likelihood of the cells' counts: "
                                 "pass adata= the cells (or method='point' to decode the training cells' points).")
            if continuous:
                raise ValueError("method='empirical' does not support models with continuous_covariate_keys yet "
                                 "(the candidates are decoded once for all cells); use method='point'.")
            if not stored:
                raise ValueError("method='empirical' needs the training cells' representations, and this model has "
                                 "none (saved without them); use method='point'.")
        return method

    def _shares_features(self, adata, modalities: list[str]) -> bool:
        """Whether ``adata`` holds features of any of the model's ``modalities`` (a MuData: in a modality
        of that name)."""
        mods = getattr(adata, "mod", None)
        if mods is not None:
            return any(m in mods and bool(mods[m].var_names.isin(list(self.features[m])).any()) for m in modalities)
        names = {str(v) for v in adata.var_names}
        return any(not names.isdisjoint(self.features[m]) for m in modalities)

    def _reference_rows(self, n_candidates: int, seed: int) -> torch.Tensor:
        """Rows of ``self.representation`` in the empirical prior: all, or a sorted
        sample of ``n_candidates`` drawn with ``seed``."""
        n = self.representation.shape[0]
        if n <= n_candidates:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_candidates].sort().values

    def _calibrate_prediction(self, data, max_elements: int = 20_000_000
                              ) -> dict[str, tuple[float, list[float]]]:
        """modality -> (the temperature of ``predict_modality``'s empirical weights
        when predicting it from the other modalities, one temperature per
        feature of the modality), chosen on the fitted cells ``data`` (a
        CountData, in fitting order) by leave-one-out; empty for a model with one
        modality or with continuous covariates.

        Up to :data:`CALIBRATION_CELLS` cells measured in every modality (a sample
        drawn with the model's seed) are predicted from their other modalities,
        each against the empirical prior of :meth:`predict_modality` with its own
        point left out (averaged as :data:`PREDICTION_AVERAGE` says), at
        every temperature of :data:`PREDICTION_TEMPERATURES`;
        the temperature whose predictions have the highest mean Spearman
        correlation with the cells' measured values (``log1p(1e4 x / total)``, per
        feature, over the :data:`CALIBRATION_FEATURES` features detected in most
        of them) wins; ties go to the lower one. Each of those features also
        gets the temperature at which its own correlation is highest: the
        features of a modality differ in how sharply the other modalities
        place them (on PBMC 10k the proteins' best temperatures run from 1 to
        10), and the shared one stays for the features not scored."""
        from dataclasses import replace

        from ._evidence import _cells
        from .train.candidates import candidate_scores, candidate_starts, tempered_means
        from .train.new_cells import frozen

        mods = list(self.features)
        if len(mods) < 2 or self.init_args.get("continuous_covariate_keys"):
            return {}
        measured = np.flatnonzero(np.all([data.observed_mask(m) for m in mods], axis=0))
        if measured.size < 2:
            return {}
        seed = int(self.init_args["seed"])
        ref_rows = self._reference_rows(EMPIRICAL_CANDIDATES, seed)
        pick = torch.randperm(measured.size, generator=torch.Generator().manual_seed(seed + 1))[:CALIBRATION_CELLS]
        probe = np.sort(measured[pick.numpy()])
        probe_data = data.take(probe)
        n = probe.size
        cells = _cells(self, probe_data, None, torch.zeros(n, self.latent_dim),
                       {k: torch.zeros(n, COVARIATE_DIM) for k in self.cov_gmms})
        # a cell's own point is left out: candidate c stands for reference row c // n_combos
        position = torch.full((data.n_obs,), -1, dtype=torch.long)
        position[ref_rows] = torch.arange(ref_rows.numel())
        own = position[torch.as_tensor(probe)].to(self.device)
        out = {}
        with frozen(self.module):
            cand = candidate_starts(self.gmm, dict(self.cov_gmms),
                                    reference=self.representation.detach()[ref_rows].to(self.device),
                                    include_means=False)
            n_combos = cand.n // ref_rows.numel()
            has_own = (own >= 0).nonzero().squeeze(1)
            own_cols = own[has_own].unsqueeze(1) * n_combos + torch.arange(n_combos, device=self.device)
            for m in mods:
                others = [k for k in mods if k != m]
                sub = replace(cells, counts={k: cells.counts[k] for k in others},
                              weight={k: v for k, v in cells.weight.items() if k in others})
                scores = candidate_scores(self.module, sub, cand, max_elements, mixture_prior=False)
                scores[has_own.unsqueeze(1), own_cols] = torch.inf
                keep = torch.isfinite(scores).any(1)  # cells with some other admissible point
                truth, feats = _calibration_truth(probe_data.counts[m], probe_data.library[m])
                if feats.size == 0 or int(keep.sum()) < 2:
                    continue
                feats_t = torch.as_tensor(feats, device=self.device)

                def values(ci: torch.Tensor) -> torch.Tensor:
                    cov = {k: v[ci] for k, v in cand.cov.items()}
                    return _averaged_values(self.module.log_fractions(cand.z[ci], cov, [m])[m][:, feats_t],
                                            PREDICTION_AVERAGE)

                means = tempered_means(scores[keep], values, PREDICTION_TEMPERATURES).cpu().numpy()
                truth = truth[keep.cpu().numpy()]
                rho = np.stack([_spearman_columns(means[t], truth) for t in range(len(PREDICTION_TEMPERATURES))])
                scored = np.isfinite(rho).all(0)  # features that vary in the probe cells and their predictions
                if not scored.any():
                    continue
                rho = rho[:, scored]
                fit = rho.mean(1)
                best = int(np.argmax(fit))  # ties: the lower temperature
                own = rho.argmax(0)
                per_feature = np.full(len(self.features[m]), PREDICTION_TEMPERATURES[best], dtype=np.float64)
                per_feature[feats[scored]] = np.asarray(PREDICTION_TEMPERATURES)[own]
                out[m] = (float(PREDICTION_TEMPERATURES[best]), [float(t) for t in per_feature])
                logger.info("predict_modality(%r): temperature %g (leave-one-out mean Spearman of %d cells %.3f; "
                            "%.3f at 1; %.3f with each of %d features at its own)", m, out[m][0], int(keep.sum()),
                            fit[best], fit[0], float(rho[own, np.arange(own.size)].mean()), int(scored.sum()))
        return out

    def _empirical_fractions(self, adata, modality: str, layer, fixed: dict[str, torch.Tensor], n_candidates: int,
                             seed: int, max_elements: int, temperature: float | list[float] = 1.0,
                             average: str = PREDICTION_AVERAGE) -> tuple[np.ndarray, list[str]]:
        """(n, features) float32 fractions of ``modality`` averaged (``average``) over the weighted
        training representations of the empirical prior (see :meth:`predict_modality`), and the cells'
        names."""
        from ._evidence import _cells
        from .data import binarise
        from .train.candidates import candidate_posterior_mean, candidate_starts
        from .train.new_cells import frozen

        try:
            new = read_new_data(adata, self.features, layer, self.covariate_categories, 0.0,
                                modality_key=self.init_args.get("modality_key"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"predict_modality(method='empirical') weighs the training points by the cells' counts, "
                             f"and reading them failed: {err} (method='point' decodes obsm['X_dgd'] instead).") from None
        binarise(new.data, [m for m in new.data.modalities if self.decoder.likelihoods[m].binary])
        n = new.data.n_obs
        findex = {m: None if a.complete else torch.as_tensor(a.feature_index, device=self.device)
                  for m, a in new.alignments.items()}
        # counts read from disk (backed) come in blocks of cells; in memory, all at once
        step = DEFAULT_BLOCK_CELLS if new.data.backed else max(n, 1)
        reference = self.representation.detach()[self._reference_rows(n_candidates, seed)]
        with frozen(self.module):
            cand = candidate_starts(self.gmm, dict(self.cov_gmms), reference=reference.to(self.device),
                                    include_means=False)

            def values(ci: torch.Tensor) -> torch.Tensor:
                cov = {k: (fixed[k].to(self.device).expand(ci.shape[0], -1) if k in fixed else v[ci])
                       for k, v in cand.cov.items()}
                return _averaged_values(self.module.log_fractions(cand.z[ci], cov, [modality])[modality], average)

            means, sizes = [], []
            for start in range(0, n, step):
                data = new.data.block(start, min(start + step, n)) if new.data.backed else new.data
                b = data.n_obs
                # the cells' own representations are not read: only their counts and covariate classes
                cells = _cells(self, data, None, torch.zeros(b, self.latent_dim),
                               {k: torch.zeros(b, COVARIATE_DIM) for k in self.cov_gmms}, findex)
                mean, ess = candidate_posterior_mean(self.module, cells, cand, values, max_elements,
                                                     temperature=temperature)
                means.append(mean.cpu().numpy().astype(np.float32, copy=False))
                sizes.append(ess.cpu())
                del cells
        logger.info("predict_modality: empirical prior of %d training representations; median effective sample "
                    "size of the weights %.1f", reference.shape[0], float(torch.cat(sizes).median()))
        out = np.concatenate(means)
        if average == "geometric":  # back from the mean log
            np.exp(out, out=out)
        elif not isinstance(temperature, (int, float)):  # the features' means under their own weights: back to fractions
            out /= out.sum(1, keepdims=True)
        return out, [str(v) for v in adata.obs_names]

    def differential_expression(self, adata=None, groupby=None, group1=None, group2=None, **kwargs):
        """Differential expression from decoded expression, between groups of cells or between two
        classes of a covariate for the same cells (counterfactual): one row per feature with
        scvi-tools' columns (``lfc_mean``, ``proba_de``, ``bayes_factor``, ``is_de_fdr_<fdr>``, ...).

        The same as :func:`dgdcell.differential.differential_expression` with this model first.

        Parameters
        ----------
        adata
            Cells carrying ``obsm["X_dgd"]`` (from :meth:`fit` or :meth:`transform`) and the
            ``groupby`` column; None: the training cells (``groupby`` then an array in
            ``obs_names`` order).
        groupby
            obs column (or array) of the groups; with ``covariate=``, the cell populations.
        group1, group2
            The groups compared (``group2=None``: the rest; ``group1=None``: every group
            against the rest); with ``covariate=``, the two classes of the covariate.
        **kwargs
            Every other keyword of :func:`dgdcell.differential.differential_expression`
            (``covariate``, ``restrict_to``, ``idx1`` / ``idx2``, ``mode``, ``delta``,
            ``fdr_target``, ``pseudocount``, ``transform_batch``, ``n_samples``, ``seed``,
            ``sampler``, ...).

        Returns
        -------
        DataFrame, one row per feature (see :func:`dgdcell.differential.differential_expression`).
        """
        from .differential import differential_expression

        return differential_expression(self, adata, groupby=groupby, group1=group1, group2=group2, **kwargs)

    def posterior_sampler(self, modality: str = "rna", key: str = "dgd", seed: int = 0, batch_size: int = 1024):
        """A sampler of the cells' posteriors for :func:`dgdcell.differential.differential_expression`.

        For a model fitted with ``posterior="normal"``: the returned callable
        ``sampler(cells, transform_batches)`` draws one point per cell from its
        Normal posterior, ``z = mean + std * e`` with ``e ~ N(0, I)`` (means and
        standard deviations read from ``cells.obsm[f"X_{key}"]`` and
        ``obsm[f"X_{key}_std"]``, written by :meth:`fit` or :meth:`transform`),
        and decodes that same draw under each entry of ``transform_batches``
        (None or a ``transform_batch``), returning one ``(cells, features)``
        array of fractions of ``modality`` per entry. The covariate
        representations are held at their points. Draws come from a CPU
        generator seeded with ``seed``, so a sequence of calls is reproducible.

        ``differential_expression`` uses it by default for such models
        (``sampler=None``), which makes its statistics scVI's Monte Carlo
        estimates over posterior samples.

        Parameters
        ----------
        modality
            The modality whose features are decoded.
        key
            The ``key_added`` of the fit or transform that wrote the posteriors.
        seed
            Seed of the draws.
        batch_size
            Cells decoded at a time.

        Returns
        -------
        The sampler, a callable ``(cells, transform_batches) -> list of arrays``.
        """
        self._check_fitted()
        if not self.variational:
            raise ValueError("posterior_sampler needs a model with per-cell posteriors: DGD(posterior='normal'). "
                             "A MAP model has one point per cell (differential_expression then compares cells).")
        if modality not in self.features:
            raise KeyError(f"modality {modality!r} is not in the model (modalities: {sorted(self.features)}).")
        batch_size = check_int("batch_size", batch_size, 1)
        generator = torch.Generator().manual_seed(check_int("seed", seed, 0, 2**63 - 1))

        def sampler(cells, transform_batches):
            fixed = [self._transform_batch_inputs(tb) for tb in transform_batches]
            # covariate representations every setting replaces need not be stored (as in get_normalized_expression)
            skip = set.intersection(*(set(f) for f in fixed)) if fixed else set()
            mean, cov, _ = self._stored_representations(cells, key, skip=skip)
            name = f"X_{key}_std"
            if name not in cells.obsm:
                raise KeyError(f"cells.obsm has no {name!r}: fit or transform the cells with this model "
                               f"(posterior='normal') first, or pass key= the key_added used.")
            std = torch.as_tensor(_stored(cells, name, self.latent_dim))
            z = mean + std * torch.randn(mean.shape, generator=generator)
            continuous = self._stored_continuous(cells)
            return [self._decode_fractions(z, cov, continuous, modality, f, batch_size) for f in fixed]

        return sampler

    def _decode_fractions(self, z: torch.Tensor, cov: dict[str, torch.Tensor], continuous: torch.Tensor | None,
                          modality: str, fixed: dict[str, torch.Tensor], batch_size: int) -> np.ndarray:
        """(n, features) float32 decoded fractions of ``modality`` at points ``z`` (n, L), with the covariate
        representations ``cov`` (classes in ``fixed`` replaced by their (1, 2) component means)."""
        n = z.shape[0]
        out = np.empty((n, len(self.features[modality])), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                c = {k: (fixed[k].expand(stop - start, -1) if k in fixed else cov[k][start:stop]).to(self.device)
                     for k in self.cov_gmms}
                cont = None if continuous is None else continuous[start:stop].to(self.device)
                log_frac = self.module.log_fractions(z[start:stop].to(self.device), c, [modality], continuous=cont)
                out[start:stop] = torch.exp(log_frac[modality]).cpu().numpy()
        return out

    def _stored_continuous(self, adata) -> torch.Tensor | None:
        """(n, C) standardised continuous covariates of the cells to decode: the training cells'
        (``adata`` None) or read from ``adata.obs``; None when the model has none."""
        keys = self.init_args.get("continuous_covariate_keys") or []
        if not keys:
            return None
        if adata is None:
            return self.continuous_input
        return self._continuous_input(read_continuous(adata, keys))

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
        z = _stored(adata, name, self.latent_dim)
        cov = {}
        for k in self.cov_gmms:
            if k in skip:
                continue
            ck = f"X_{key}_{k}"
            if ck not in adata.obsm:
                raise KeyError(f"adata.obsm has no {ck!r} (covariate {k!r}); run fit or transform first, "
                               "or pass transform_batch= to decode in a chosen class.")
            cov[k] = torch.as_tensor(_stored(adata, ck, 2))
        return torch.as_tensor(z), cov, [str(v) for v in adata.obs_names]

    def _transform_batch_inputs(self, transform_batch) -> dict[str, torch.Tensor]:
        """covariate key -> (1, 2) component mean of the requested class (weights within the class)."""
        out = {}
        for k, cls in resolve_transform_batch(self.covariate_categories, transform_batch).items():
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
            new = read_new_data(adata, {modality: self.features[modality]}, layer, None,
                                modality_key=self.init_args.get("modality_key"), modality=modality)
            return new.data.library[modality], new.alignments[modality].feature_index
        return check_number("library_size", library_size)


def _stored(adata, name: str, width: int) -> np.ndarray:
    """``adata.obsm[name]`` as (n_obs, width) finite float32, or a ValueError naming the key."""
    try:
        value = np.asarray(adata.obsm[name], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.obsm[{name!r}] is not a numeric matrix ({err}); run fit or transform again.") from None
    if value.shape != (adata.n_obs, width):
        raise ValueError(f"adata.obsm[{name!r}] has shape {value.shape}, expected ({adata.n_obs}, {width}); "
                         "run fit or transform again (or pass key= the key_added used).")
    if not np.isfinite(value).all():
        raise ValueError(f"adata.obsm[{name!r}] has {int((~np.isfinite(value)).sum())} non-finite values; "
                         "decoding them would give non-finite expression. Run fit or transform again.")
    return value


def resolve_transform_batch(covariate_categories: dict[str, list[str]], transform_batch) -> dict[str, str]:
    """``transform_batch`` (None, a class name, or a dict covariate -> class) as a checked dict
    covariate -> class name ({} for None): a bare class name must belong to exactly one covariate."""
    cats = {str(k): [str(c) for c in v] for k, v in covariate_categories.items()}
    if transform_batch is None:
        return {}
    if isinstance(transform_batch, Mapping):
        out = {}
        for k, v in transform_batch.items():
            if str(k) not in cats:
                raise KeyError(f"transform_batch: {k!r} is not a covariate of the model (covariates: {list(cats)}).")
            if str(v) not in cats[str(k)]:
                raise KeyError(f"transform_batch: {v!r} is not a class of covariate {k!r} (classes: {cats[str(k)]}).")
            out[str(k)] = str(v)
        return out
    owners = [k for k, c in cats.items() if str(transform_batch) in c]
    if not owners:
        raise KeyError(f"transform_batch {transform_batch!r} is not a class of any covariate of the model "
                       f"({cats or 'the model has no covariates'}).")
    if len(owners) > 1:
        raise ValueError(f"transform_batch {transform_batch!r} is a class of several covariates {owners}; "
                         "pass a dict {covariate: class}.")
    return {owners[0]: str(transform_batch)}
