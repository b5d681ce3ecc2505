"""Learning-path step 1: token embeddings and the three ways to say where a token is."""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor


def embed_tokens(
    w: Float[Tensor, "vocab d_model"], tokens: Int[Tensor, "*batch seq"]
) -> Float[Tensor, "*batch seq d_model"]:
    """Look up one row of the embedding table per token id."""
    return F.embedding(tokens, w)


def learned_positions(
    w: Float[Tensor, "max_seq d_model"], positions: Int[Tensor, "*batch seq"]
) -> Float[Tensor, "*batch seq d_model"]:
    """Look up one row of the learned position table per position (GPT-2)."""
    return F.embedding(positions, w)


def sinusoidal_positions(
    positions: Int[Tensor, "*batch seq"], d_model: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "*batch seq d_model"]:
    """Fixed sin/cos features (Vaswani et al. 2017): pair i turns at frequency base^(-2i/d_model)."""
    freqs = torch.exp(torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32) * (-math.log(base) / d_model))
    angles = positions.to(torch.float32)[..., None] * freqs
    # Interleave as [sin0, cos0, sin1, cos1, ...] so each frequency's pair sits side by side.
    return rearrange(torch.stack([angles.sin(), angles.cos()], dim=-1), "... seq half two -> ... seq (half two)").to(dtype)


def rotary_angles(
    positions: Int[Tensor, "*batch seq"], head_dim: int, *, base: float = 10000.0
) -> tuple[Float[Tensor, "*batch seq half"], Float[Tensor, "*batch seq half"]]:
    """cos and sin of the rotary angles position * base^(-2i/head_dim), one per pair of channels."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(
    x: Float[Tensor, "*batch heads seq head_dim"],
    cos: Float[Tensor, "*#batch seq half"],
    sin: Float[Tensor, "*#batch seq half"],
) -> Float[Tensor, "*batch heads seq head_dim"]:
    """Rotate each pair (x[i], x[i + head_dim/2]) by its angle (RoPE, the GPT-NeoX/Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.unsqueeze(-3).to(x.dtype)
    sin = sin.unsqueeze(-3).to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
