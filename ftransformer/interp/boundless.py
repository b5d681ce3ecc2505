"""Boundless DAS (Wu et al. 2023): DAS whose subspace size is learned, a soft boundary over the rotated coordinates.

The params are ``{"rotation": A, "boundary": b}`` (``A`` as in ``interp.das``; ``b`` a 0-d tensor in coordinate
units). Rotated coordinate ``i`` is taken from the source with weight ``m_i = sigmoid((b - i - 1/2) / T)``: a
soft step that is 1 for the coordinates below the boundary and 0 above it, as sharp as the temperature ``T``
makes it. Training anneals ``T`` geometrically (``temperature_schedule``: from soft, where every coordinate
gets a gradient, to nearly hard) and adds ``size_weight * b / d`` to the counterfactual cross-entropy, so the
boundary settles just past the last coordinate the variable needs (at ``k - 1/2 + O(T)``): ``learned_size``
counts the coordinates swapped more than half, ``i + 1/2 < b``.
"""

import torch

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.das import (
    SitePositions,
    das_params,
    fit,
    last_position_loss,
    orthogonal,
    position_mask,
    site_activation,
)
from ftransformer.shapes import Float, Logits, Tensor, Tokens


def boundless_das_params(d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, boundary: float | None = None) -> dict:
    """A random rotation (``das_params``) and a boundary, at ``d / 2`` unless given."""
    params_i = das_params(d, seed=seed, dtype=dtype)
    start = d / 2 if boundary is None else boundary
    if not (validate.is_number(start) and 0 <= start <= d):
        raise ValueError(f"boundary must be a number in [0, d={d}], got {start!r}")
    return params_i | {"boundary": torch.tensor(float(start), dtype=dtype)}


def boundary_mask(boundary: Float[Tensor, ""], d: int, temperature: float | Tensor) -> Float[Tensor, " width"]:
    """``sigmoid((boundary - i - 1/2) / temperature)`` for ``i = 0 .. d-1``: how much of each rotated coordinate is swapped."""
    centres = torch.arange(d, dtype=boundary.dtype, device=boundary.device) + 0.5
    return torch.sigmoid((boundary - centres) / temperature)


def boundless_intervention(
    params_i: dict, source_activation: Float[Tensor, "*batch seq width"], temperature: float | Tensor,
    positions: SitePositions = None,
):
    """``h -> R^T ((1 - m) R h + m R s)`` at ``positions`` (all when None), ``m`` the soft boundary mask."""
    rotation = orthogonal(params_i["rotation"])
    mask = boundary_mask(params_i["boundary"], rotation.shape[0], temperature)

    def swap(h: Tensor) -> Tensor:
        if h.shape != source_activation.shape:
            raise ValueError(f"the base activation has shape {tuple(h.shape)}, the source {tuple(source_activation.shape)}")
        z = torch.lerp(h @ rotation.T, source_activation @ rotation.T, mask)
        return torch.where(position_mask(positions, h.shape[-2], h.device), z @ rotation, h)

    return swap


def boundless_logits(
    params: dict, cfg: Config, site: str, base: Tokens, source_activation: Tensor, params_i: dict,
    temperature: float | Tensor, positions: SitePositions = None,
) -> Logits:
    """The logits of the base run with the soft-boundary swap from the source's activation at ``site``."""
    swap = boundless_intervention(params_i, source_activation, temperature, positions)
    return forward_with_activations(params, base, cfg, interventions={site: swap})[0]


def temperature_schedule(steps: int, start: float = 2.0, end: float = 0.05) -> Float[Tensor, " steps"]:
    """``steps`` temperatures falling geometrically from ``start`` to ``end``."""
    validate.int_in("steps", steps, 1, 10**9)
    if not 0 < end <= start:
        raise ValueError(f"temperatures must satisfy 0 < end <= start, got start={start}, end={end}")
    return torch.logspace(torch.log10(torch.tensor(start)), torch.log10(torch.tensor(end)), steps, dtype=torch.float64)


def learned_size(params_i: dict) -> int:
    """The subspace size Boundless DAS learned: how many rotated coordinates are swapped more than half
    (``m_i > 1/2 <=> i + 1/2 < b``, at any temperature)."""
    d = params_i["rotation"].shape[0]
    return int((torch.arange(d, dtype=torch.float64) + 0.5 < float(params_i["boundary"])).sum())


def train_boundless_das(
    params: dict, cfg: Config, site: str, base: Tokens, source: Tokens, labels: Tensor, *,
    positions: SitePositions = None, steps: int = 150, lr: float = 0.1, size_weight: float = 1.0,
    temperatures: tuple[float, float] = (1.0, 0.05), seed: int = 0, boundary: float | None = 1.0,
) -> tuple[dict, list[float]]:
    """Boundless DAS on counterfactual pairs: rotation and boundary trained together (``interp.das.fit``, the
    model's params constants) on cross-entropy + ``size_weight * boundary / d``, the temperature annealed
    over ``temperatures`` (the boundary starts at ``boundary``: small, so it grows until the variable fits). Returns ``(params_i, losses)``; ``learned_size(params_i)`` is the subspace size."""
    if not (validate.is_number(size_weight) and size_weight >= 0):
        raise ValueError(f"size_weight must be a number >= 0, got {size_weight!r}")
    source_activation = site_activation(params, source, cfg, site)
    params_i = boundless_das_params(cfg.d_model, seed=seed, dtype=source_activation.dtype, boundary=boundary)
    schedule = temperature_schedule(steps, *temperatures).to(source_activation.dtype)

    def loss(p: dict, temperature: Tensor) -> Tensor:
        logits = boundless_logits(params, cfg, site, base, source_activation, p, temperature, positions)
        return last_position_loss(logits, labels) + size_weight * p["boundary"] / cfg.d_model

    return fit(loss, params_i, steps=steps, lr=lr, per_step=schedule)


__all__ = [
    "boundary_mask", "boundless_das_params", "boundless_intervention", "boundless_logits", "learned_size",
    "temperature_schedule", "train_boundless_das",
]
