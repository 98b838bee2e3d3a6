"""Neural parts: the decoder and count likelihoods (no AnnData here)."""

from .decoder import Decoder
from .likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    NegativeBinomial,
    bernoulli_log_prob_sparse,
    nb_log_prob_sparse,
)

__all__ = ["Decoder", "LIKELIHOODS", "Bernoulli", "NegativeBinomial", "bernoulli_log_prob_sparse", "nb_log_prob_sparse"]
