"""Distributed alignment search (DAS, Geiger et al.): a trainable interchange intervention as a pytree.

The intervention's params are ``{"rotation": A}``, an unconstrained ``[d, d]`` matrix; ``orthogonal(A)`` is
the rotation ``R = matrix_exp(A - A^T)``, orthogonal for every ``A`` (a pure function, so ``torch.func.grad``
flows through it). ``das_intervention`` rotates the base run's activation at a site (``z = R h``), puts the
source run's first ``k`` rotated coordinates in place of the base's at the chosen positions, and rotates
back (``h' = R^T z'``): the swapped subspace is spanned by the first ``k`` rows of ``R`` (``subspace``).

Training (``train_das``) minimises the cross-entropy of the intervened model's last-position logits against
the counterfactual labels, by ``torch.func.grad`` over the intervention params ONLY: the model's params are
closed over as constants, nothing is marked ``requires_grad`` and no gradient is computed for them.
``iia`` is the interchange-intervention accuracy on (held-out) pairs. ``fit`` is the optimiser loop, shared
with ``interp.reft``.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.steering import check_site
from ftransformer.optim import GradientTransformation, adamw, apply_updates
from ftransformer.shapes import Float, Logits, Tensor, Tokens
from ftransformer.tree import flatten_with_paths

SitePositions = Sequence[int] | None  # the sequence positions an intervention acts at; None: all of them


def orthogonal(a: Float[Tensor, "rows cols"]) -> Float[Tensor, "rows rows"]:
    """The rotation ``matrix_exp(a - a^T)``: orthogonal (determinant 1) for every square ``a``."""
    if not isinstance(a, Tensor) or a.ndim != 2 or a.shape[0] != a.shape[1]:
        got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"the rotation parameter must be a square (d, d) matrix, got {got}")
    return torch.linalg.matrix_exp(a - a.T)


def das_params(d: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> dict:
    """``{"rotation": A}`` with ``A ~ N(0, scale^2)``: a random starting rotation of a ``d``-wide site."""
    validate.integer("d", d)
    gen = torch.Generator().manual_seed(seed)
    return {"rotation": scale * torch.randn(d, d, generator=gen, dtype=dtype)}


def subspace(params_i: dict, k: int) -> Float[Tensor, "width k"]:
    """The swapped subspace in the site's own coordinates: orthonormal columns, the first ``k`` rows of ``R``."""
    return orthogonal(params_i["rotation"])[:k].T


def principal_angles(q_a: Float[Tensor, "d_model k"], q_b: Float[Tensor, "d_model k"]) -> Float[Tensor, " k"]:
    """The principal angles (degrees, ascending) between the spans of two orthonormal-column matrices:
    ``arccos`` of the singular values of ``q_a^T q_b``."""
    if q_a.shape != q_b.shape:
        raise ValueError(f"the two bases must have the same shape, got {tuple(q_a.shape)} and {tuple(q_b.shape)}")
    cosines = torch.linalg.svdvals(q_a.T @ q_b).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cosines))


def position_mask(positions: SitePositions, seq: int, device: torch.device) -> Tensor:
    """A ``[seq, 1]`` bool mask, true at ``positions`` (negative ones count from the end; None: everywhere)."""
    if positions is None:
        return torch.ones(seq, 1, dtype=torch.bool, device=device)
    for p in positions:
        validate.int_in("each of positions", p, -seq, seq, high_name="seq")
    mask = torch.zeros(seq, dtype=torch.bool, device=device)
    mask[torch.tensor([p % seq for p in positions], dtype=torch.long, device=device)] = True
    return mask[:, None]


def rotated_swap(
    h: Float[Tensor, "*batch seq width"], source: Float[Tensor, "*batch seq width"], rotation: Float[Tensor, "width width"],
    k_mask: Tensor, at: Tensor,
) -> Float[Tensor, "*batch seq width"]:
    """``R^T where(k_mask, R s, R h)`` where ``at`` (broadcast over ``[seq, 1]``), ``h`` elsewhere: the one swap
    that DAS, its sweeps and their tests share (``k_mask``: which rotated coordinates come from the source)."""
    if h.shape != source.shape:
        raise ValueError(f"the base activation has shape {tuple(h.shape)}, the source {tuple(source.shape)}")
    z = torch.where(k_mask, source @ rotation.T, h @ rotation.T)
    return torch.where(at, z @ rotation, h)


def first_k_mask(k: int, d: int, device: torch.device | None = None) -> Tensor:
    """A ``[d]`` bool mask, true at the first ``k`` coordinates (the swapped subspace of size ``k``)."""
    validate.int_in("k", k, 1, d, closed=True, high_name="d")
    return torch.arange(d, device=device) < k


def das_intervention(
    params_i: dict, source_activation: Float[Tensor, "*batch seq width"], k: int, positions: SitePositions = None
) -> Callable[[Tensor], Tensor]:
    """``h -> R^T swap(R h)``: the first ``k`` rotated coordinates of the base taken from the source, at
    ``positions`` (all when None); elsewhere the base's value is returned unchanged."""
    rotation = orthogonal(params_i["rotation"])
    k_mask = first_k_mask(k, rotation.shape[0], rotation.device)

    def swap(h: Tensor) -> Tensor:
        at = position_mask(positions, h.shape[-2], h.device)
        return rotated_swap(h, source_activation, rotation, k_mask, at)

    return swap


def site_activation(params: dict, tokens: Tokens, cfg: Config, site: str) -> Tensor:
    """The value at ``site`` of a plain (no-grad) run on ``tokens``: the source side of an interchange."""
    check_site(site, cfg)
    with torch.no_grad():
        return flatten_with_paths(forward_with_activations(params, tokens, cfg)[1])[site]


def interchange_logits(
    params: dict, cfg: Config, site: str, base: Tokens, source_activation: Tensor, params_i: dict, k: int,
    positions: SitePositions = None,
) -> Logits:
    """The logits of the base run with the DAS swap from the source's activation at ``site``."""
    swap = das_intervention(params_i, source_activation, k, positions)
    return forward_with_activations(params, base, cfg, interventions={site: swap})[0]


def optimizer_step(loss: Callable[..., Tensor], opt: GradientTransformation) -> Callable:
    """``step(params_i, opt_state, *args) -> (params_i, opt_state, loss)``: one ``ft.optim`` update by
    ``torch.func.grad`` of ``loss(params_i, *args)`` over ``params_i`` alone; pure, so a stack of
    hypotheses trains by ``vmap`` of this very step."""
    grad_and_loss = torch.func.grad_and_value(loss)

    def step(params_i: dict, opt_state, *args):
        grads, value = grad_and_loss(params_i, *args)
        updates, opt_state = opt.update(grads, opt_state, params_i)
        return apply_updates(params_i, updates), opt_state, value

    return step


def fit(
    loss: Callable[..., Tensor], params_i: dict, *, steps: int, lr: float, per_step: Tensor | None = None,
) -> tuple[dict, list[float]]:
    """Adam (``ft.optim.adamw``, no decay) on ``loss`` by ``torch.func.grad`` over ``params_i`` alone (``optimizer_step``);
    ``per_step[i]`` (a temperature, say) is ``loss``'s second argument at step ``i`` when given. Returns the
    trained params and the loss before each step."""
    validate.int_in("steps", steps, 1, 10**9)
    if per_step is not None and len(per_step) != steps:
        raise ValueError(f"per_step must have one value per step ({steps}), got {len(per_step)}")
    opt = adamw(lr, weight_decay=0.0)
    step, state, losses = optimizer_step(loss, opt), opt.init(params_i), []
    for i in range(steps):
        params_i, state, value = step(params_i, state, *(() if per_step is None else (per_step[i],)))
        losses.append(float(value))
    return params_i, losses


def last_position_loss(logits: Logits, labels: Tensor) -> Tensor:
    """The mean cross-entropy of the last position's logits against ``labels`` (``[*batch]`` token ids)."""
    if labels.shape != logits.shape[:-2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-2])} (one per sequence), got {tuple(labels.shape)}")
    last = rearrange(logits[..., -1, :], "... vocab -> (...) vocab")
    return F.cross_entropy(last, rearrange(labels, "... -> (...)"))


def train_das(
    params: dict, cfg: Config, site: str, base: Tokens, source: Tokens, labels: Tensor, k: int, *,
    positions: SitePositions = None, steps: int = 200, lr: float = 0.05, init: dict | None = None, seed: int = 0,
) -> tuple[dict, list[float]]:
    """DAS trained on counterfactual pairs: the rotation that makes the base run, with the source's ``k``-dim
    subspace swapped in at ``site`` / ``positions``, predict ``labels`` at its last position. The model's
    ``params`` are constants (closed over); returns ``(params_i, losses)``."""
    source_activation = site_activation(params, source, cfg, site)
    params_i = das_params(cfg.d_model, seed=seed, dtype=source_activation.dtype) if init is None else init

    def loss(p: dict) -> Tensor:
        return last_position_loss(interchange_logits(params, cfg, site, base, source_activation, p, k, positions), labels)

    return fit(loss, params_i, steps=steps, lr=lr)


def iia(
    params: dict, cfg: Config, site: str, base: Tokens, source: Tokens, labels: Tensor, params_i: dict, k: int, *,
    positions: SitePositions = None,
) -> Tensor:
    """Interchange-intervention accuracy: the fraction of pairs whose intervened last-position argmax is the label."""
    source_activation = site_activation(params, source, cfg, site)
    with torch.no_grad():
        logits = interchange_logits(params, cfg, site, base, source_activation, params_i, k, positions)
    return (logits[..., -1, :].argmax(-1) == labels).to(torch.float64).mean()
