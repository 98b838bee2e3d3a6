"""The cells a :func:`dgdcell.differential.differential_expression` call compares:
:class:`_Source` decodes rows of the AnnData (or of the training cells) through the
model's public interface and reads their counts; ``_run_group`` /
``_run_counterfactual`` turn one comparison into the two sides' decoded fractions."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._de_statistics import _raw_columns, _Sides, _zero_reference

logger = logging.getLogger(__name__)

#: warn when ``adata=None`` forces the decoding of all training cells at once beyond this many bytes
_FULL_DECODE_WARN_BYTES = 2 << 30


class _Source:
    """The cells being compared: decodes rows of ``adata`` (or of the training cells) and reads their counts."""

    def __init__(self, model, adata, modality, key, batch_size, sampler, layer):
        self.model, self.adata, self.modality, self.key = model, adata, modality, key
        self.batch_size, self.sampler = batch_size, sampler
        self.features = [str(f) for f in model.features[modality]]
        self._full: dict[str, np.ndarray] = {}
        if adata is None:
            if sampler is not None:
                raise ValueError("sampler= needs adata= (it draws from the cells' representations stored in "
                                 "adata.obsm); pass the AnnData the model was fitted on.")
            if layer is not None:
                raise ValueError("layer= needs adata= (the training cells' counts are not kept in the model).")
            self.n = len(model.obs_names)
            self.obs_names = [str(v) for v in model.obs_names]
        else:
            if not (hasattr(adata, "obsm") and hasattr(adata, "obs") and hasattr(adata, "n_obs")):
                raise TypeError(f"adata must be an AnnData or MuData (or None), got {type(adata).__name__}.")
            rep = f"X_{key}"
            if rep not in adata.obsm:
                raise KeyError(f"adata.obsm has no {rep!r}: run model.fit(adata) or model.transform(adata) first, "
                               f"or pass key= the key_added used (obsm keys: {list(adata.obsm.keys())}).")
            self.n = int(adata.n_obs)
            self.obs_names = [str(v) for v in adata.obs_names]
        if self.n == 0:
            raise ValueError("adata has no cells.")
        self.counts = self._counts(layer) if adata is not None else None

    # ---- decoding
    def decode(self, rows: np.ndarray, settings: list) -> list[np.ndarray]:
        """(len(rows), n_features) float32 fractions per setting, for distinct ``rows``."""
        if self.sampler is not None:
            return self._decode_sampler(rows, settings)
        if self.adata is None:
            out = []
            for tb in settings:
                tag = repr(sorted(tb.items())) if tb else "None"
                if tag not in self._full:
                    nbytes = self.n * len(self.features) * 4
                    if nbytes > _FULL_DECODE_WARN_BYTES:
                        logger.warning("adata=None: decoding all %d training cells at once (%.1f GB); pass adata= "
                                       "to decode only the sampled cells.", self.n, nbytes / 2**30)
                    self._full[tag] = self.model.get_normalized_expression(
                        None, modality=self.modality, key=self.key, transform_batch=tb or None,
                        batch_size=self.batch_size).to_numpy(dtype=np.float32)
                out.append(self._full[tag][rows])
            return out
        out = [np.empty((rows.size, len(self.features)), dtype=np.float32) for _ in settings]
        for start in range(0, rows.size, self.batch_size):
            stop = min(start + self.batch_size, rows.size)
            cells = self.adata[rows[start:stop]]
            for s, tb in enumerate(settings):
                frame = self.model.get_normalized_expression(
                    cells, modality=self.modality, key=self.key, transform_batch=tb or None,
                    batch_size=self.batch_size)
                out[s][start:stop] = frame.to_numpy(dtype=np.float32)
        return out

    def _decode_sampler(self, rows: np.ndarray, settings: list) -> list[np.ndarray]:
        """One fresh posterior draw per entry of ``rows`` (which may repeat a cell)."""
        out = [np.empty((rows.size, len(self.features)), dtype=np.float32) for _ in settings]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        first = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
        occurrence = np.empty(rows.size, dtype=np.int64)
        occurrence[order] = np.arange(rows.size) - np.repeat(first, np.diff(np.r_[first, rows.size]))
        for r in range(int(occurrence.max()) + 1 if rows.size else 0):
            positions = np.flatnonzero(occurrence == r)
            positions = positions[np.argsort(rows[positions], kind="stable")]
            for start in range(0, positions.size, self.batch_size):
                pos = positions[start:start + self.batch_size]
                cells = self.adata[rows[pos]]
                draws = self.sampler(cells, [tb or None for tb in settings])
                if not isinstance(draws, (list, tuple)) or len(draws) != len(settings):
                    raise ValueError(f"sampler must return a list of {len(settings)} arrays (one per transform_batch), "
                                     f"got {type(draws).__name__}.")
                for s, d in enumerate(draws):
                    d = np.asarray(d.to_numpy() if isinstance(d, pd.DataFrame) else d, dtype=np.float32)
                    if d.shape != (pos.size, len(self.features)):
                        raise ValueError(f"sampler returned an array of shape {d.shape}, expected "
                                         f"({pos.size}, {len(self.features)}) (cells x features of {self.modality!r}).")
                    out[s][pos] = d
        return out

    # ---- counts and obs
    def _counts(self, layer):
        """(matrix, column of each model feature in it or -1) or None when no counts cover the features."""
        adata = self.adata
        holder = adata
        if hasattr(adata, "mod"):
            if self.modality not in adata.mod:
                return None
            holder = adata.mod[self.modality]
        if layer is not None:
            if layer not in holder.layers:
                raise KeyError(f"layer {layer!r} not found (layers: {list(holder.layers.keys())}); pass layer= the "
                               "layer holding the raw counts, or None for .X.")
            X = holder.layers[layer]
        else:
            X = holder.X
        if X is None:
            return None
        cols = pd.Index([str(v) for v in holder.var_names]).get_indexer(pd.Index(self.features))
        if (cols < 0).all():
            return None
        if holder is not adata:  # a MuData modality: map the MuData's cells to the modality's rows
            rows = pd.Index([str(v) for v in holder.obs_names]).get_indexer(pd.Index(self.obs_names))
        else:
            rows = None
        return X, cols, rows

    def observed_classes(self, covariate: str) -> np.ndarray | None:
        if self.adata is None:
            return None
        obs = _obs_frame(self.adata, covariate)
        if obs is None:
            return None
        return np.asarray([None if pd.isna(v) else str(v) for v in obs[covariate].to_numpy()], dtype=object)

    def raw_statistics(self, rows: np.ndarray | None) -> dict[str, np.ndarray] | None:
        """Per feature: mean count, share of non-zero cells, mean counts per 10k (over the modality's features
        present in the counts; NaN for features missing there) over ``rows``; and per cell (``library``) its
        counts summed over those features."""
        if self.counts is None or rows is None:
            return None
        X, cols, map_rows = self.counts
        if map_rows is not None:
            rows = map_rows[rows]
            rows = np.sort(rows[rows >= 0])
        n_feat = len(self.features)
        if rows.size == 0:
            nan = np.full(n_feat, np.nan)
            return {"mean": nan, "nonzero": nan, "normalized": nan, "library": np.zeros(0)}
        present = cols >= 0
        total = np.zeros(present.sum())
        nonzero = np.zeros(present.sum())
        normalized = np.zeros(present.sum())
        libraries = []
        chunk = 8192
        for start in range(0, rows.size, chunk):
            sub = X[rows[start:start + chunk]]
            sub = sub.tocsr()[:, cols[present]] if sp.issparse(sub) else np.asarray(sub)[:, cols[present]]
            if sp.issparse(sub):
                sub = sub.tocsr().astype(np.float64)
                library = np.asarray(sub.sum(axis=1)).ravel()
                scale = np.where(library > 0, 1e4 / np.maximum(library, 1e-12), 0.0)
                total += np.asarray(sub.sum(axis=0)).ravel()
                nonzero += np.asarray((sub != 0).sum(axis=0), dtype=np.float64).ravel()
                normalized += np.asarray(sub.multiply(scale[:, None]).sum(axis=0)).ravel()
            else:
                sub = np.asarray(sub, dtype=np.float64)
                library = sub.sum(axis=1)
                scale = np.where(library > 0, 1e4 / np.maximum(library, 1e-12), 0.0)
                total += sub.sum(axis=0)
                nonzero += (sub != 0).sum(axis=0)
                normalized += (sub * scale[:, None]).sum(axis=0)
            libraries.append(library)
        out = {}
        for name, acc in (("mean", total), ("nonzero", nonzero), ("normalized", normalized)):
            full = np.full(n_feat, np.nan)
            full[present] = acc / rows.size
            out[name] = full
        out["library"] = np.concatenate(libraries)  # per cell: its counts over the modality's features
        return out


def _subsample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if rows.size <= n:
        return rows
    return np.sort(rng.choice(rows, size=n, replace=False))


def _run_group(source: _Source, comp: dict, fixed: dict, n_samples: int, rng):
    setting = [dict(fixed)]
    sides = []
    for rows in (comp["rows1"], comp["rows2"]):
        if source.sampler is None:
            decoded = _subsample(rows, n_samples, rng)
            (values,) = source.decode(decoded, setting)
            sides.append(values)
        else:
            draws = rng.choice(rows, size=n_samples, replace=True)
            (values,) = source.decode(draws, setting)
            sides.append(values)
    if source.sampler is None:
        i1 = rng.integers(sides[0].shape[0], size=n_samples)
        i2 = rng.integers(sides[1].shape[0], size=n_samples)
    else:
        i1 = i2 = np.arange(n_samples)
    raw1 = source.raw_statistics(comp["rows1"])
    raw2 = source.raw_statistics(comp["rows2"])
    exact = source.sampler is None  # MAP: the tail probabilities over *all* pairs of decoded cells, exactly
    return _Sides(sides[0], i1, sides[1], i2, all_pairs=exact), _raw_columns(raw1, raw2), _zero_reference(raw1, raw2)


def _run_counterfactual(source: _Source, comp: dict, fixed: dict, n_samples: int, rng):
    settings = [{**fixed, comp["covariate"]: comp["name1"]}, {**fixed, comp["covariate"]: comp["name2"]}]
    rows = comp["rows"]
    if source.sampler is None:
        rows = _subsample(rows, n_samples, rng)
    else:
        rows = rng.choice(rows, size=n_samples, replace=True)
    a1, a2 = source.decode(rows, settings)
    index = np.arange(rows.size)
    if comp["obs_rows1"] is not None:
        raw1 = source.raw_statistics(comp["obs_rows1"])
        raw2 = source.raw_statistics(comp["obs_rows2"])
        return _Sides(a1, index, a2, index), _raw_columns(raw1, raw2), _zero_reference(raw1, raw2)
    # classes not observed (no obs column): the population's counts serve both sides, for the pseudocount only
    both = source.raw_statistics(comp["rows"])
    return _Sides(a1, index, a2, index), None, _zero_reference(both, both)


def _obs_frame(adata, column: str) -> pd.DataFrame | None:
    """``adata.obs`` holding ``column``; for a MuData also a modality's column ('mod:column' or a modality's obs)."""
    obs = adata.obs
    if column in obs.columns:
        return obs
    if hasattr(adata, "mod"):
        prefixed = [c for c in obs.columns if str(c).endswith(f":{column}")]
        if prefixed:
            return pd.DataFrame({column: obs[prefixed[0]]}, index=obs.index)
        for mod in adata.mod.values():
            if column in mod.obs.columns and mod.n_obs == adata.n_obs and mod.obs_names.equals(adata.obs_names):
                return pd.DataFrame({column: mod.obs[column]}, index=obs.index)
    return None
