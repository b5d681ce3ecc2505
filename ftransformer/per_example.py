"""``vmap`` over examples: per-example gradients, their norms, the gradient noise scale and DP-SGD.

A model here is a function of a parameter pytree, so ``torch.func.vmap(grad(...))`` gives every
example's gradient in one call (what Opacus hooks into ``nn.Module``s to get). DP-SGD
(``optim.dp_aggregate``, stepped by ``make_per_example_train_step``) and the gradient noise scale
(``gradient_noise_scale``, McCandlish et al. 2018) are made of them.

Attention runs on the einsum path here (``layers.kernel_here``'s rule under ``vmap``): PyTorch's fused
``scaled_dot_product_attention`` has had no ``vmap`` batching rule for its backward pass (``vmap`` then
falls back to a slow per-example loop, and on some versions and devices refuses), while the written-out
einsum path is made of ops that all batch. ``with layers.attention_kernel("sdpa"):`` forces the fused
kernel (``bench vmap`` times both on the running torch).
"""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from ftransformer import tree
from ftransformer import optim, random
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.model import check_ids, check_tokens, loss_fn
from ftransformer.train import TrainStep, apply_optimizer, check_optimizer, step_metrics

PyTree = Any


def _check_batch(tokens: Tensor, targets: Tensor, cfg: Config, ignore_index: int) -> None:
    check_tokens(tokens, cfg)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
    if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {got}")
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)


def _example_loss(cfg: Config, treedef, ignore_index: int, params_of: Callable[[dict], dict] | None = None):
    """``(leaves, tokens[seq], targets[seq], key) -> that one example's mean loss`` over its counted targets."""

    def loss_of(leaves, tokens, targets, key):
        params = tree.unflatten(leaves, treedef)
        params = params if params_of is None else params_of(params)
        total = loss_fn(params, tokens, targets, cfg, key=key, ignore_index=ignore_index, reduction="sum")
        # An example of nothing but padding gives a zero gradient instead of 0/0.
        return total / (targets != ignore_index).sum().clamp(min=1).to(total.dtype)

    return loss_of


# ---------------------------------------------------------------- per-example gradients


def per_example_grads(
    params: dict,
    tokens: Tensor,
    targets: Tensor,
    cfg: Config,
    *,
    key: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    params_of: Callable[[dict], dict] | None = None,
) -> dict:
    """The gradient of each example's mean loss: every leaf of ``params`` gains a leading ``batch`` axis.

    ``tokens`` and ``targets`` are ``(batch, seq)``; example ``i``'s gradient is that of
    ``loss_fn(params, tokens[i], targets[i], cfg)``, computed for all ``i`` at once by
    ``vmap(grad(...))``. Attention runs on the einsum path (the module note says
    why). ``key`` gives every example its own dropout key (split from it);
    ``chunk_size`` bounds how many examples are in flight at once (memory), as in ``vmap``.
    ``params_of(params)``: the model params ``params`` stand for (e.g. adapters joined to a frozen base,
    ``peft.private``), so the gradients are of ``params`` alone.
    """
    _check_batch(tokens, targets, cfg, ignore_index)
    leaves, treedef = tree.flatten(params)
    grad_fn = torch.func.grad(_example_loss(cfg, treedef, ignore_index, params_of))
    keys = None if key is None else random.split(key, tokens.shape[0])
    batched = torch.func.vmap(grad_fn, in_dims=(None, 0, 0, None if keys is None else 0), chunk_size=chunk_size)
    grads = batched(leaves, tokens, targets, keys)
    return tree.unflatten(list(grads), treedef)


def per_example_grad_norms(params: dict, tokens: Tensor, targets: Tensor, cfg: Config, **options) -> Float[Tensor, " batch"]:
    """The L2 norm of each example's gradient (all parameters together): which sequences pull hardest.

    ``options``: ``per_example_grads``'s keywords (``key``, ``ignore_index``, ``chunk_size``).
    """
    return optim.per_example_norms(per_example_grads(params, tokens, targets, cfg, **options))


def make_per_example_train_step(
    cfg: Config,
    optimizer: optim.GradientTransformation,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    params_of: Callable[[dict], dict] | None = None,
) -> TrainStep:
    """A ``train.TrainStep`` like ``make_train_step``'s whose optimizer receives per-example gradients.

    ``step(params, opt_state, (tokens, targets), key) -> (params, opt_state, metrics)``. The optimizer must
    reduce the batch axis -- start its chain with ``optim.dp_aggregate`` (DP-SGD). ``metrics`` holds
    ``loss`` (token-weighted mean, as ``make_train_step``), ``grad_norm`` (norm of the plain mean of the
    per-example gradients, before any clipping), ``mean_example_grad_norm`` (the average example's
    gradient norm: compare it with the clip norm), ``lr`` and ``tokens``. ``params_of``: as ``per_example_grads``'.
    """
    check_optimizer(optimizer)

    def step(params, opt_state, batch, key=None):
        tokens, targets = unpack_batch(batch)
        grads = per_example_grads(
            params, tokens, targets, cfg, key=key, ignore_index=ignore_index,
            chunk_size=chunk_size, params_of=params_of,
        )
        with torch.no_grad():
            n_tokens = (targets != ignore_index).sum()
            model = params if params_of is None else params_of(params)
            loss = loss_fn(model, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
            loss = loss / n_tokens.clamp(min=1)
            norms = optim.per_example_norms(grads)
            grad_norm = optim.global_norm([x.mean(0) for x in tree.leaves(grads)])
        params, new_state = apply_optimizer(optimizer, params, grads, opt_state)
        return params, new_state, step_metrics(loss, grad_norm, new_state, n_tokens, mean_example_grad_norm=norms.mean())

    return TrainStep(optimizer.init, step)


# ---------------------------------------------------------------- gradient noise scale


class NoiseScale(NamedTuple):
    """The simple gradient noise scale and the two unbiased estimates it is the ratio of (0-d tensors)."""

    b_simple: Tensor  # tr(Sigma) / |G|^2: the batch size around which larger batches stop paying off
    trace_cov: Tensor  # tr(Sigma): total variance of one example's gradient
    grad_sq_norm: Tensor  # |G|^2: squared norm of the true (expected) gradient


def gradient_noise_scale(grads: PyTree) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

    ``grads`` are per-example gradients (leading batch axis of size B >= 2). With ``g_i`` the examples'
    gradients and ``g`` their mean, both estimates are unbiased:

        tr(Sigma) = sum_i |g_i - g|^2 / (B - 1)        |G|^2 = |g|^2 - tr(Sigma) / B

    (the paper's Appendix A with B_small = 1, B_big = B). The ratio is not unbiased and is noisy for one
    batch: average ``trace_cov`` and ``grad_sq_norm`` over several batches first (``noise_scale`` does).
    """
    leaves = tree.leaves(grads)
    if not leaves or leaves[0].ndim == 0 or leaves[0].shape[0] < 2:
        raise ValueError("gradient_noise_scale needs per-example gradients of at least 2 examples")
    b = leaves[0].shape[0]
    sq_each = optim.per_example_norms(grads).square()
    mean_sq = sum(x.to(torch.float32).mean(0).square().sum() for x in leaves)
    trace = (sq_each.sum() - b * mean_sq) / (b - 1)
    g2 = mean_sq - trace / b
    return NoiseScale(b_simple=trace / g2, trace_cov=trace, grad_sq_norm=g2)


def noise_scale(
    params: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100
) -> NoiseScale:
    """``gradient_noise_scale`` over several ``(tokens, targets)`` batches: both estimates averaged, then divided."""
    traces, g2s = [], []
    for batch in batches:
        tokens, targets = unpack_batch(batch)
        grads = per_example_grads(params, tokens, targets, cfg, ignore_index=ignore_index)
        est = gradient_noise_scale(grads)
        traces.append(est.trace_cov)
        g2s.append(est.grad_sq_norm)
        del grads
    if not traces:
        raise ValueError("noise_scale needs at least one batch, got none")
    trace, g2 = torch.stack(traces).mean(), torch.stack(g2s).mean()
    return NoiseScale(b_simple=trace / g2, trace_cov=trace, grad_sq_norm=g2)


def noise_scale_record(cfg: Config, *, max_batches: int = 4) -> Callable[[dict, list], dict]:
    """A ``record_extra`` for ``loop.fit``: ``{"noise_scale": B_simple}`` from up to ``max_batches`` fixed train batches."""

    def extra(params: dict, train_batches: list) -> dict:
        return {"noise_scale": float(noise_scale(params, train_batches[:max_batches], cfg).b_simple)}

    return extra


__all__ = [
    "NoiseScale", "gradient_noise_scale", "make_per_example_train_step", "noise_scale",
    "noise_scale_record", "per_example_grad_norms", "per_example_grads",
]
