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
    inv: Float[Tensor, "*#batch 1"] | None = None,
) -> Float[Tensor, "*batch d_model"]:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis (no centring, no bias).

    ``float32`` (``Norm.float32``): "normalize" normalises in float32, casts back to x's dtype, then scales
    (Hugging Face's order); "normalize_and_scale" scales in float32 too, then casts (OLMo-2's). The same
    numbers in float32; below it, the order decides the rounding. ``unit_offset``: scale by ``1 + scale``
    instead, normalising and scaling in float32 before the cast (Gemma's order, ``Norm.unit_offset``).
    ``inv``: the factor ``1 / rms`` to use instead of x's own (see ``norm``).
    """
    if unit_offset or float32 == "normalize_and_scale":
        h = x.to(torch.float32)
        w = scale.to(torch.float32)
        return (h * _inverse_rms(h, eps, inv) * (1.0 + w if unit_offset else w)).to(x.dtype)
    if float32 == "normalize":
        h = x.to(torch.float32)
        return (h * _inverse_rms(h, eps, inv)).to(x.dtype) * scale
    return x * _inverse_rms(x, eps, inv) * scale


def _inverse_rms(x: Tensor, eps: float, inv: Tensor | None = None) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis, or ``inv`` where given (cast to x's dtype)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) if inv is None else inv.to(x.dtype)


def inverse_scale(x: Float[Tensor, "*batch d_model"], spec: Norm) -> Float[Tensor, "*batch 1"]:
    """The factor the norm multiplies x (centred, for LayerNorm) by: ``1 / sqrt(var + eps)`` or
    ``1 / sqrt(mean(x^2) + eps)``; ``norm(..., inv=inverse_scale(x, spec))`` of x is ``norm`` of x."""
    if spec.kind == "rmsnorm":
        return _inverse_rms(x, spec.eps)
    return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + spec.eps)


def norm_scale(params: dict, spec: Norm) -> Float[Tensor, " d_model"]:
    """The factor ``norm`` multiplies the normalised x by: ``scale``, or ``1 + scale`` under ``unit_offset``."""
    return 1.0 + params["scale"] if spec.unit_offset else params["scale"]


def identity_params(params: dict, spec: Norm) -> dict:
    """Parameters shaped like ``params`` under which the norm only normalises (factor 1, bias 0)."""
    scale = params["scale"]
    out = {"scale": torch.zeros_like(scale) if spec.unit_offset else torch.ones_like(scale)}
    return out if "bias" not in params else {**out, "bias": torch.zeros_like(params["bias"])}


def check_removes_mean(spec: Norm, what: str) -> None:
    """``ValueError`` unless the norm subtracts its input's mean over d_model (LayerNorm): for a consumer (``what``)
    that relies on every reader ignoring a constant added along d_model."""
    if spec.kind != "layernorm":
        raise ValueError(
            f"{what} supports Config.norm.kind='layernorm' only (a norm that subtracts the mean), got {spec.kind!r}"
        )


def init_norm(spec: Norm, width: int, *, bias: bool) -> dict:
    """A norm's parameters at init: the identity (scale 1, or 0 under ``unit_offset``), a bias for a biased
    LayerNorm."""
    p = {"scale": (torch.zeros if spec.unit_offset else torch.ones)(width)}
    if bias and spec.kind == "layernorm":
        p["bias"] = torch.zeros(width)
    return p


def norm(
    params: dict, x: Float[Tensor, "*batch d_model"], spec: Norm, *, inv: Float[Tensor, "*#batch 1"] | None = None
) -> Float[Tensor, "*batch d_model"]:
    """The spec's normalisation, with ``params = {"scale": ..., "bias"?: ...}`` (``init_norm``'s leaves).

    ``inv``: the factor to divide by frozen (``inverse_scale`` of another value, e.g. the whole residual
    stream whose parts x are): the norm is then an affine map of x, ``norm(a + b) = norm(a) + norm(b) -
    norm(0)``, which is what splits a normed sum into its parts' shares (direct logit attribution).
    """
    if spec.kind == "rmsnorm":
        return rms_norm(x, params["scale"], eps=spec.eps, float32=spec.float32, unit_offset=spec.unit_offset, inv=inv)
    if inv is None:
        return layer_norm(x, params["scale"], params.get("bias"), eps=spec.eps)
    out = (x - x.mean(-1, keepdim=True)) * inv * params["scale"]
    return out if params.get("bias") is None else out + params["bias"]
