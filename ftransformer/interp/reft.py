"""LoReFT (Wu et al. 2024): a low-rank representation edit ``h + R^T (W h + b - R h)`` as a trainable pytree.

The params are ``{"R": [r, d], "W": [r, d], "b": [r]}``; the rows of ``R`` are made orthonormal by a QR
factorisation (``orthonormal_rows``), so the edit replaces ``h``'s component in an ``r``-dimensional subspace
by ``W h + b`` and leaves the orthogonal complement alone. ``train_reft`` trains it like DAS
(``interp.das.fit``: ``torch.func.grad`` over the edit's params only, the model's weights closed over).
"""

from collections.abc import Callable

import torch

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.das import SitePositions, fit, last_position_loss, position_mask
from ftransformer.interp.steering import check_site
from ftransformer.shapes import Float, Logits, Tensor, Tokens


def orthonormal_rows(raw: Float[Tensor, "rank width"]) -> Float[Tensor, "rank width"]:
    """``raw``'s rows made orthonormal (Q of the QR factorisation of ``raw^T``); needs ``r <= d``."""
    if not isinstance(raw, Tensor) or raw.ndim != 2 or raw.shape[0] > raw.shape[1]:
        got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        raise ValueError(f"R must be an (r, d) matrix with r <= d, got {got}")
    return torch.linalg.qr(raw.T).Q.T


def reft_params(d: int, r: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, kind: str = "loreft") -> dict:
    """A rank-``r`` edit of a ``d``-wide site, a no-op at init: random ``R``, ``b = 0`` and ``W = R``'s
    orthonormal rows (LoReFT) or ``W = 0`` (DiReFT, ``kind="direft"``)."""
    validate.integer("d", d)
    validate.int_in("r", r, 1, d, closed=True, high_name="d")
    validate.one_of("kind", kind, ("loreft", "direft"))
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(r, d, generator=gen, dtype=dtype)
    rows = orthonormal_rows(raw)
    w = rows.clone() if kind == "loreft" else torch.zeros_like(rows)
    return {"R": raw, "W": w, "b": torch.zeros(r, dtype=dtype)}


def loreft_intervention(params_i: dict, positions: SitePositions = None) -> Callable[[Tensor], Tensor]:
    """``h -> h + R^T (W h + b - R h)`` at ``positions`` (all when None), ``h`` unchanged elsewhere."""
    rows = orthonormal_rows(params_i["R"])
    w, b = params_i["W"], params_i["b"]
    if w.shape != rows.shape or b.shape != rows.shape[:1]:
        raise ValueError(f"W must have shape {tuple(rows.shape)} and b {tuple(rows.shape[:1])}, got {tuple(w.shape)} and {tuple(b.shape)}")

    def edit(h: Tensor) -> Tensor:
        if h.shape[-1] != rows.shape[1]:
            raise ValueError(f"the edit is {rows.shape[1]} wide, the site {h.shape[-1]}")
        edited = h + (h @ w.T + b - h @ rows.T) @ rows
        return torch.where(position_mask(positions, h.shape[-2], h.device), edited, h)

    return edit


def direft_intervention(params_i: dict, positions: SitePositions = None) -> Callable[[Tensor], Tensor]:
    """DiReFT: ``h -> h + R^T (W h + b)`` at ``positions``, the same params as LoReFT without the ``- R h``
    (the edit adds to the subspace instead of replacing it)."""
    rows = orthonormal_rows(params_i["R"])
    w, b = params_i["W"], params_i["b"]

    def edit(h: Tensor) -> Tensor:
        return torch.where(position_mask(positions, h.shape[-2], h.device), h + (h @ w.T + b) @ rows, h)

    return edit


EDITS = {"loreft": loreft_intervention, "direft": direft_intervention}


def reft_logits(
    params: dict, cfg: Config, site: str, tokens: Tokens, params_i: dict, positions: SitePositions = None,
    kind: str = "loreft",
) -> Logits:
    """The logits of ``tokens`` with the ``kind`` edit (``"loreft"`` or ``"direft"``) at ``site``."""
    check_site(site, cfg)
    validate.one_of("kind", kind, tuple(EDITS))
    return forward_with_activations(params, tokens, cfg, interventions={site: EDITS[kind](params_i, positions)})[0]


def train_reft(
    params: dict, cfg: Config, site: str, tokens: Tokens, labels: Tensor, r: int, *,
    positions: SitePositions = None, steps: int = 200, lr: float = 0.05, seed: int = 0, kind: str = "loreft",
) -> tuple[dict, list[float]]:
    """A rank-``r`` LoReFT (or ``kind="direft"``) edit at ``site`` / ``positions`` trained so the last position predicts ``labels``;
    the model's ``params`` stay constants. Returns ``(params_i, losses)``."""
    check_site(site, cfg)
    validate.one_of("kind", kind, tuple(EDITS))
    params_i = reft_params(cfg.d_model, r, seed=seed, dtype=params["embed"]["tokens"].dtype, kind=kind)

    def loss(p: dict) -> Tensor:
        return last_position_loss(reft_logits(params, cfg, site, tokens, p, positions, kind), labels)

    return fit(loss, params_i, steps=steps, lr=lr)
