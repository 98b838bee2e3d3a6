"""Reference formulas the library's implementations are checked against (tests only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nb_log_prob(x: torch.Tensor, log_mu: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Element-wise negative-binomial log pmf, dense:
    ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) + r log(r / (r + mu)) + x log(mu / (r + mu))``
    (``scipy.stats.nbinom(n=r, p=r / (r + mu))``), the lgamma terms in float64."""
    r = torch.exp(log_r)
    x64 = x.double()
    r64 = r.double()
    lgam = (torch.lgamma(x64 + r64) - torch.lgamma(r64) - torch.lgamma(x64 + 1.0)).to(log_mu.dtype)
    return lgam - r * F.softplus(log_mu - log_r) - x * F.softplus(log_r - log_mu)


def nan_reconstruction_after(n_calls: int, monkeypatch) -> dict:
    """Make :meth:`dgdcell.module.DGDModule.loss` return a NaN reconstruction
    from its ``n_calls + 1``-th call on (training and validation batches each
    count); returns the call counter."""
    from dgdcell.module import DGDModule, LossOutput

    real = DGDModule.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] > n_calls:
            out = LossOutput({m: v * float("nan") for m, v in out.reconstruction.items()}, out.prior,
                             out.parameter_prior)
        return out

    monkeypatch.setattr(DGDModule, "loss", loss)
    return calls
