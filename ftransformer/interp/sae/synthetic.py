"""Ground truth for SAEs: superposition data built from known directions, and how well a decoder found them.

``superposition_batch`` draws sparse non-negative combinations of ``n_features`` unit directions in
``d_in < n_features`` dimensions (the toy-models-of-superposition setting): every feature fires on a
token with probability ``p``, with a magnitude uniform in ``[0.5, 1.5)``. An SAE trained on it should
learn a decoder row for each direction; ``mean_max_cosine`` scores that.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from ftransformer import random


def feature_directions(key: Tensor, n_features: int, d_in: int, *, dtype: torch.dtype = torch.float32
                       ) -> Float[Tensor, "features d_in"]:
    """``n_features`` random unit directions (Gaussian, normalized)."""
    w = random.normal(key, (n_features, d_in), dtype=dtype)
    return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)


def superposition_batch(key: Tensor, directions: Float[Tensor, "features d_in"], batch: int, p: float
                        ) -> Float[Tensor, "batch d_in"]:
    """``batch`` activations, each a sparse combination of ``directions`` (each fires with probability ``p``)."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    k_on, k_size = random.split(key, 2)
    shape = (batch, directions.shape[0])
    on = random.uniform(k_on, shape, dtype=directions.dtype) < p
    size = 0.5 + random.uniform(k_size, shape, dtype=directions.dtype)
    return (on * size) @ directions


def max_cosines(directions: Float[Tensor, "features d_in"], w_dec: Float[Tensor, "d_sae d_in"]
                ) -> Float[Tensor, " features"]:
    """For each true direction, its best cosine similarity with any decoder row."""
    unit = w_dec / torch.linalg.vector_norm(w_dec, dim=-1, keepdim=True).clamp_min(1e-12)
    return (directions @ unit.T).max(-1).values


def mean_max_cosine(directions: Float[Tensor, "features d_in"], w_dec: Float[Tensor, "d_sae d_in"]) -> float:
    """The mean over true directions of their best cosine with a decoder row (1.0: all recovered)."""
    return float(max_cosines(directions, w_dec).mean())
