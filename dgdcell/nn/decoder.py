"""The decoder: representation -> per-modality feature fractions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .likelihoods import LIKELIHOODS


def _mlp(n_in: int, hidden: Sequence[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, int(h)), nn.ReLU()]
        n_in = int(h)
    return nn.Sequential(*layers), n_in


class Decoder(nn.Module):
    """Shared trunk, then one head per modality ending in a softmax over its features.

    Parameters
    ----------
    n_input
        Input dimension (latent_dim plus 2 per covariate).
    n_features
        Mapping modality name -> number of features.
    n_hidden
        Widths of the shared trunk's hidden layers.
    n_hidden_head
        Widths of each head's hidden layers; the head's last layer maps to the
        modality's features.
    likelihood
        Mapping modality name -> likelihood name (``'nb'`` or ``'bernoulli'``,
        see :data:`~dgdcell.nn.likelihoods.LIKELIHOODS`); default NB for all.
    dispersion_init
        Initial NB dispersion.

    Notes
    -----
    ``forward(z)`` returns, per modality, the log fractions ``log p`` of shape
    (n, G_m) whose exp sums to 1 over the modality's features. The expected
    count is ``library_size * p``.
    """

    def __init__(
        self,
        n_input: int,
        n_features: Mapping[str, int],
        n_hidden: Sequence[int] = (100, 100),
        n_hidden_head: Sequence[int] = (100, 100),
        likelihood: Mapping[str, str] | None = None,
        dispersion_init: float = 2.0,
    ):
        super().__init__()
        self.n_input = int(n_input)
        self.modalities = list(n_features)
        self.trunk, n_trunk = _mlp(self.n_input, n_hidden)
        self.heads = nn.ModuleDict()
        self.likelihoods = nn.ModuleDict()
        likelihood = dict(likelihood or {})
        for mod, n_feat in n_features.items():
            body, n_last = _mlp(n_trunk, n_hidden_head)
            self.heads[mod] = nn.Sequential(body, nn.Linear(n_last, int(n_feat)))
            kind = likelihood.get(mod, "nb")
            if kind not in LIKELIHOODS:
                raise ValueError(f"Unknown likelihood {kind!r} for modality {mod!r}; choose from {sorted(LIKELIHOODS)}.")
            self.likelihoods[mod] = LIKELIHOODS[kind](int(n_feat), dispersion_init)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every layer's weights and biases anew from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        (PyTorch's default for ``nn.Linear``), from ``generator`` (CPU) when given."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
                        p.copy_(u.mul_(2.0 * bound).sub_(bound))

    def logits(
        self,
        z: torch.Tensor,
        feature_index: Mapping[str, torch.Tensor | None] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unnormalised head outputs per modality, (n, G_m).

        ``feature_index`` optionally restricts a modality to a subset of its
        features (used when new data lack some features); ``modalities``
        restricts the heads evaluated (default: all).
        """
        h = self.trunk(z)
        out = {}
        for mod in self.modalities if modalities is None else modalities:
            lg = self.heads[mod](h)
            if feature_index is not None and feature_index.get(mod) is not None:
                lg = lg[:, feature_index[mod]]
            out[mod] = lg
        return out

    def log_mean(
        self,
        z: torch.Tensor,
        log_library: Mapping[str, torch.Tensor],
        feature_index: Mapping[str, torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Log expected counts ``log(s * p)`` per modality, (n, G_m), given
        per-cell log library sizes (n,). The softmax runs over the (selected)
        features: ``log_softmax(logits) + log s`` (one fused kernel; about 3x
        faster forward and backward than logsumexp then subtraction).
        Only the modalities in ``log_library`` are decoded."""
        return {
            mod: torch.log_softmax(lg, dim=-1) + log_library[mod].unsqueeze(-1)
            for mod, lg in self.logits(z, feature_index, list(log_library)).items()
        }

    def forward(
        self,
        z: torch.Tensor,
        feature_index: Mapping[str, torch.Tensor | None] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Log fractions per modality, (n, G_m), whose exp sums to 1 over the
        (selected) features; ``modalities`` as in :meth:`logits`."""
        return {mod: torch.log_softmax(lg, dim=-1) for mod, lg in self.logits(z, feature_index, modalities).items()}
