"""Normalisation: LayerNorm (GPT-2) and RMSNorm (Llama)."""

import torch
import torch.nn.functional as F

from ftransformer.config import Norm
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
    float32: str = "none",
    unit_offset: bool = False,
) -> Float[Tensor, "*batch d_model"]:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis (no centring, no bias).

    ``float32`` (``Norm.float32``): "normalize" normalises in float32, casts back to x's dtype, then scales
    (Hugging Face's order); "normalize_and_scale" scales in float32 too, then casts (OLMo-2's). The same
    numbers in float32; below it, the order decides the rounding. ``unit_offset``: scale by ``1 + scale``
    instead, normalising and scaling in float32 before the cast (Gemma's order, ``Norm.unit_offset``).
    """
    if unit_offset or float32 == "normalize_and_scale":
        h = x.to(torch.float32)
        w = scale.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w if unit_offset else w)).to(x.dtype)
    if float32 == "normalize":
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * scale
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def norm(params: dict, x: Float[Tensor, "*batch d_model"], spec: Norm) -> Float[Tensor, "*batch d_model"]:
    """The spec's normalisation, with ``params = {"scale": ..., "bias"?: ...}`` (``init_norm``'s leaves)."""
    if spec.kind == "rmsnorm":
        return rms_norm(x, params["scale"], eps=spec.eps, float32=spec.float32, unit_offset=spec.unit_offset)
    return layer_norm(x, params["scale"], params.get("bias"), eps=spec.eps)


def init_norm(spec: Norm, width: int, *, bias: bool) -> dict:
    """A norm's parameters: the identity at init (scale 1, or 0 with ``unit_offset``), a bias for a biased
    LayerNorm."""
    p = {"scale": (torch.zeros if spec.unit_offset else torch.ones)(width)}
    if bias and spec.kind == "layernorm":
        p["bias"] = torch.zeros(width)
    return p
