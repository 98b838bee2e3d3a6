"""What :class:`dgdcell.DGD` writes and reports: the component probabilities of
representations, the ``obsm`` / ``obs`` / ``uns`` outputs of ``fit`` and
``transform`` (all computed before the first assignment), the ``uns`` record and
the summary a fit prints.

:class:`OutputsMixin` holds these DGD methods; ``fit`` and ``transform`` call them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._version import __version__

#: cells per chunk of :meth:`DGD.cluster_probabilities`
PROBABILITY_CHUNK = 65536


class OutputsMixin:
    """The output half of :class:`dgdcell.DGD` (see the module docstring)."""

    def _fit_summary(self, adata, key: str) -> str:
        """What a fit prints at its end: epochs, why it stopped, the best validation loss, cluster sizes."""
        f, h = self.fit_settings, self.history
        why = {"early_stopping": f"early stopping ({f.get('patience')}+ epochs without improvement, a flat trend)",
               "max_epochs": f"the epoch cap ({f.get('max_epochs')})",
               "interrupted": "interrupted (the best state so far is kept)"}.get(f.get("stopped"), "")
        best = int(f.get("best_epoch") or 0)
        sizes = np.bincount(np.asarray(adata.obs[f"{key}_cluster"].cat.codes), minlength=self.gmm.n_mix_comp)
        lines = [f"dgdcell: fitted {len(self.obs_names)} cells in {h['epoch'][-1] if h['epoch'] else 0} epochs "
                 f"({h['seconds'][-1] if h['seconds'] else 0:.1f} s), stopped by {why}"]
        if best:
            lines.append(f"  best validation loss {h['val_loss'][best - 1]:.2f} nats per cell at epoch {best} "
                         f"(reconstruction {h['val_reconstruction'][best - 1]:.2f}; the prior's log density can be "
                         "positive, so the total can be lower)")
        lines.append(f"  {self.gmm.n_mix_comp} components, cells per cluster: {', '.join(map(str, sizes))}")
        return "\n".join(lines)

    def cluster_probabilities(self, z: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray | None = None,
                              n_samples: int = 16) -> np.ndarray:
        """Mixture component probabilities of representations ``z`` (n, L): (n, K) float32.

        With posterior standard deviations ``std`` (n, L): the probabilities
        averaged over ``n_samples`` draws from each cell's Normal posterior
        (drawn from a generator seeded with the model's seed: reproducible).
        Computed in row chunks of :data:`PROBABILITY_CHUNK` cells, so the
        (chunk, K, L) temporaries stay small at any n."""
        self._check_fitted()
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        std = None if std is None else torch.as_tensor(np.asarray(std), dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.init_args["seed"])
        out = np.empty((z.shape[0], self.gmm.n_mix_comp), dtype=np.float32)
        for start in range(0, z.shape[0], PROBABILITY_CHUNK):
            part = z[start : start + PROBABILITY_CHUNK]
            if std is None:
                probs = self.gmm.sample_probs(part.to(self.device))
            else:
                eps = torch.randn((int(n_samples), *part.shape), generator=gen)
                draws = (part + std[start : start + PROBABILITY_CHUNK] * eps).reshape(-1, part.shape[1])
                probs = self.gmm.sample_probs(draws.to(self.device)).view(int(n_samples), part.shape[0], -1).mean(0)
            out[start : start + part.shape[0]] = probs.cpu().numpy()
        return out

    def _write_outputs(
        self, adata, z: torch.Tensor, cov: dict[str, torch.Tensor], key: str, extra_uns: dict | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        """Write the documented keys into ``adata`` (AnnData or MuData); every value
        is computed before the first assignment, so a failure leaves ``adata`` as it was.
        ``std``: posterior standard deviations (``obsm[f"X_{key}_std"]``; the cluster
        probabilities are then averaged over posterior samples)."""
        probs = self.cluster_probabilities(z, std)
        cats = [str(i) for i in range(probs.shape[1])]
        obsm = {f"X_{key}": z.numpy().astype(np.float32)}
        if std is not None:
            obsm[f"X_{key}_std"] = std.numpy().astype(np.float32)
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
