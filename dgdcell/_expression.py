"""Decoded expression of a fitted DGD: denoised and batch-corrected expression, predicted modalities."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from ._checks import check_int, check_number
from .data import read_continuous, read_new_data


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
