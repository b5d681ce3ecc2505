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
    inv: Float[Tensor, "*#batch 1"] | None = None,
) -> Float[Tensor, "*batch d_model"]:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis (no centring, no bias).

    ``upcast``: normalise in float32, cast back to x's dtype, then scale -- Hugging Face's order
    (``Config.norm_upcast``). The same numbers in float32; below it, the order decides the rounding.
    ``unit_offset``: scale by ``1 + scale`` instead, normalising and scaling in float32 before the cast
    (Gemma's order, ``Config.norm_unit_offset``). ``scale_in_float32`` (with ``upcast``): scale in float32,
    then cast (OLMo-2's order, ``Config.norm_scale_in_float32``). ``inv``: the factor ``1 / rms`` to use
    instead of x's own (see ``norm``).
    """
    if unit_offset or (upcast and scale_in_float32):
        h = x.to(torch.float32)
        w = scale.to(torch.float32)
        return (h * _inverse_rms(h, eps, inv) * (1.0 + w if unit_offset else w)).to(x.dtype)
    if upcast:
        h = x.to(torch.float32)
        return (h * _inverse_rms(h, eps, inv)).to(x.dtype) * scale
    return x * _inverse_rms(x, eps, inv) * scale


def _inverse_rms(x: Tensor, eps: float, inv: Tensor | None = None) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis, or ``inv`` where given (cast to x's dtype)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) if inv is None else inv.to(x.dtype)


def inverse_scale(x: Float[Tensor, "*batch d_model"], cfg) -> Float[Tensor, "*batch 1"]:
    """The factor the config's norm multiplies x (centred, for LayerNorm) by: ``1 / sqrt(var + eps)`` or
    ``1 / sqrt(mean(x^2) + eps)``; ``norm(..., inv=inverse_scale(x, cfg))`` of x is ``norm`` of x."""
    if cfg.norm == "rmsnorm":
        return _inverse_rms(x, cfg.norm_eps)
    return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + cfg.norm_eps)


def norm_scale(params: dict, cfg) -> Float[Tensor, " d_model"]:
    """The factor ``norm`` multiplies the normalised x by: ``scale``, or ``1 + scale`` under ``cfg.norm_unit_offset``."""
    return 1.0 + params["scale"] if cfg.norm_unit_offset else params["scale"]


def identity_params(params: dict, cfg) -> dict:
    """Parameters shaped like ``params`` under which the norm only normalises (factor 1, bias 0)."""
    scale = params["scale"]
    out = {"scale": torch.zeros_like(scale) if cfg.norm_unit_offset else torch.ones_like(scale)}
    return out if "bias" not in params else {**out, "bias": torch.zeros_like(params["bias"])}


def norm(
    params: dict, x: Float[Tensor, "*batch d_model"], cfg, *, inv: Float[Tensor, "*#batch 1"] | None = None
) -> Float[Tensor, "*batch d_model"]:
    """The config's normalisation, with ``params = {"scale": ..., "bias"?: ...}``.

    ``inv``: the factor to divide by frozen (``inverse_scale`` of another value, e.g. the whole residual
    stream whose parts x are): the norm is then an affine map of x, ``norm(a + b) = norm(a) + norm(b) -
    norm(0)``, which is what splits a normed sum into its parts' shares (direct logit attribution).
    """
    if cfg.norm == "rmsnorm":
        return rms_norm(x, params["scale"], eps=cfg.norm_eps, upcast=cfg.norm_upcast, unit_offset=cfg.norm_unit_offset,
                        scale_in_float32=cfg.norm_scale_in_float32, inv=inv)
    if inv is None:
        return layer_norm(x, params["scale"], params.get("bias"), eps=cfg.norm_eps)
    out = (x - x.mean(-1, keepdim=True)) * inv * params["scale"]
    return out if params.get("bias") is None else out + params["bias"]
