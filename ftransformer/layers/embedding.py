"""Learning-path step 1: token embeddings and the three ways to say where a token is."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ftransformer.layers.linear import init_normal
from ftransformer.shapes import Float, Int, Positions, Residual, Tensor, Tokens


def embed_tokens(w: Float[Tensor, "vocab d_model"], tokens: Tokens) -> Residual:
    """Look up one row of the embedding table per token id."""
    return F.embedding(tokens, w)


def learned_positions(w: Float[Tensor, "max_seq d_model"], positions: Positions) -> Residual:
    """Look up one row of the learned position table per position (GPT-2)."""
    return F.embedding(positions, w)


def sinusoidal_positions(
    positions: Positions, d_model: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Residual:
    """Fixed sin/cos features (Vaswani et al. 2017): pair i turns at frequency base^(-2i/d_model)."""
    freqs = torch.exp(torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32) * (-math.log(base) / d_model))
    angles = positions.to(torch.float32)[..., None] * freqs
    # Interleave as [sin0, cos0, sin1, cos1, ...] so each frequency's pair sits side by side.
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(dtype)


class Rotary(NamedTuple):
    """The rotary tables of one call's positions, built once and shared by every layer."""

    cos: Float[Tensor, "*#batch seq half"]
    sin: Float[Tensor, "*#batch seq half"]


def rotary_frequencies(
    head_dim: int, *, base: float = 10000.0, scaling=None, device: torch.device | None = None
) -> Float[Tensor, " half"]:
    """base^(-2i/head_dim), one per pair of channels, stretched by ``scaling`` (a ``config.RopeScaling``).

    ``"linear"`` divides every frequency by ``factor``. ``"llama3"`` divides those whose wavelength
    exceeds ``original_max_seq_len / low_freq_factor``, keeps those below ``original_max_seq_len /
    high_freq_factor``, and blends linearly (in ``original_max_seq_len / wavelength``) in between.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1's rule, written as transformers writes it so the float32 rounding matches too.
    factor, low, high, context = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    divided = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * divided / factor + smooth * divided
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, blended, divided)


def rotary_angles(
    positions: Int[Tensor, "*#batch seq"], head_dim: int, *, base: float = 10000.0, scaling=None
) -> Rotary:
    """cos and sin of the rotary angles position * frequency, one per pair of channels (``rotary_frequencies``)."""
    inv_freq = rotary_frequencies(head_dim, base=base, scaling=scaling, device=positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return Rotary(angles.cos(), angles.sin())


def rotary_tables(positions: Int[Tensor, "*#batch seq"], cfg, *, windowed: bool = False) -> Rotary | None:
    """The tables ``cfg``'s attention layers rotate queries and keys by; None unless ``cfg.positional`` is "rope".

    ``windowed``: the tables of the sliding-window layers, with ``cfg.positional.window_base`` (unscaled) when set.
    """
    if cfg.positional.kind != "rope":
        return None
    if windowed and cfg.positional.window_base is not None:
        return rotary_angles(positions, cfg.rotary_dim, base=cfg.positional.window_base)
    return rotary_angles(positions, cfg.rotary_dim, base=cfg.positional.base, scaling=cfg.positional.scaling)


def apply_rotary(
    x: Float[Tensor, "*batch heads seq head_dim"],
    cos: Float[Tensor, "*#batch seq half"],
    sin: Float[Tensor, "*#batch seq half"],
    *,
    in_float32: bool = False,
) -> Float[Tensor, "*batch heads seq head_dim"]:
    """Rotate each pair (x[i], x[i + half]) by its angle (RoPE, the GPT-NeoX/Llama layout).

    Tables narrower than the head (``half < head_dim / 2``: partial rotary) turn the first ``2 * half``
    channels and pass the rest through unchanged. ``in_float32``: rotate in float32 and cast back
    (``Config.positional.float32``); else the tables are cast to ``x``'s dtype first.
    """
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rotated], cos, sin, in_float32=in_float32), x[..., rotated:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    dtype = torch.float32 if in_float32 else x.dtype
    cos = cos.unsqueeze(-3).to(dtype)
    sin = sin.unsqueeze(-3).to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def init_embed(cfg, gen: torch.Generator) -> dict:
    """The embedding's parameters: ``tokens`` [vocab, d_model], and ``positions`` [max_seq, d_model] for a
    learned position table; N(0, init_std)."""
    embed = {"tokens": init_normal(gen, (cfg.vocab_size, cfg.d_model), cfg.init_std)}
    if cfg.positional.kind == "learned":
        embed["positions"] = init_normal(gen, (cfg.max_seq_len, cfg.d_model), cfg.init_std)
    return embed
