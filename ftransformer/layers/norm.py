"""Normalisation: LayerNorm (GPT-2) and RMSNorm (Llama)."""

import torch
import torch.nn.functional as F

from ftransformer.shapes import Float, Tensor


def layer_norm(
    x: Float[Tensor, "*batch d_model"],
    scale: Float[Tensor, " d_model"],
    bias: Float[Tensor, " d_model"] | None = None,
    *,
    eps: float = 1e-5,
) -> Float[Tensor, "*batch d_model"]:
    """(x - mean) / sqrt(var + eps) * scale + bias, over the last axis."""
    return F.layer_norm(x, scale.shape, scale, bias, eps)


def rms_norm(
    x: Float[Tensor, "*batch d_model"],
    scale: Float[Tensor, " d_model"],
    *,
    eps: float = 1e-5,
    upcast: bool = False,
    unit_offset: bool = False,
    scale_in_float32: bool = False,
) -> Float[Tensor, "*batch d_model"]:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis (no centring, no bias).

    ``upcast``: normalise in float32, cast back to x's dtype, then scale -- Hugging Face's order
    (``Config.norm_upcast``). The same numbers in float32; below it, the order decides the rounding.
    ``unit_offset``: scale by ``1 + scale`` instead, normalising and scaling in float32 before the cast
    (Gemma's order, ``Config.norm_unit_offset``). ``scale_in_float32`` (with ``upcast``): scale in float32,
    then cast (OLMo-2's order, ``Config.norm_scale_in_float32``).
    """
    if unit_offset or (upcast and scale_in_float32):
        h = x.to(torch.float32)
        w = scale.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w if unit_offset else w)).to(x.dtype)
    if upcast:
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * scale
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def norm(params: dict, x: Float[Tensor, "*batch d_model"], cfg) -> Float[Tensor, "*batch d_model"]:
    """The config's normalisation, with ``params = {"scale": ..., "bias"?: ...}``."""
    if cfg.norm == "rmsnorm":
        return rms_norm(x, params["scale"], eps=cfg.norm_eps, upcast=cfg.norm_upcast, unit_offset=cfg.norm_unit_offset,
                        scale_in_float32=cfg.norm_scale_in_float32)
    return layer_norm(x, params["scale"], params.get("bias"), eps=cfg.norm_eps)
