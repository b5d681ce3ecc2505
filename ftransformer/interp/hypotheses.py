"""A DAS hypothesis sweep as ONE vmap: every (layer, position, k) trained together, each its own optimizer state.

A hypothesis is a member of a stack: its rotation params (``interp.das``), its own Adam state, and three masks
that say where it acts: a one-hot over the swept layers, a one-hot over positions, and the first ``k`` of
``k_max = max(ks)`` rotated coordinates. Every member runs the model with a swap (``das.rotated_swap``) at
every swept layer, switched off (``torch.where`` keeps the base value exactly) everywhere but its own layer and
position; so its loss, gradient and update are those of ``das.train_das`` on its hypothesis alone. One training
step is ``vmap`` of ``das.optimizer_step`` over the members; IIA on held-out pairs is a second vmap.
"""

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.das import das_params, last_position_loss, optimizer_step, orthogonal, rotated_swap
from ftransformer.interp.steering import check_site
from ftransformer.optim import adamw
from ftransformer.shapes import Tensor, Tokens
from ftransformer.tree import flatten_with_paths, stack

Pairs = tuple[Tensor, Tensor, Tensor]  # (base, source, counterfactual labels): token ids (n, seq), (n, seq), (n,)


class DasSweep(NamedTuple):
    """The sweep's result: ``iia[layer, position, k]`` (held-out), the trained stack (member = (layer, position,
    k) in that nesting order), and each step's loss per member ``[steps, member]``."""

    iia: Tensor
    params: dict
    losses: Tensor


class Hypotheses(NamedTuple):
    """The members' masks: ``layer_on [member, layers]``, ``at [member, seq, 1]``, ``k_mask [member, width]``."""

    layer_on: Tensor
    at: Tensor
    k_mask: Tensor


def hypothesis_masks(n_layers: int, positions: Sequence[int], ks: Sequence[int], seq: int, d: int) -> Hypotheses:
    """The masks of every (layer, position, k), in that nesting order (``n_layers`` swept layers)."""
    if not positions or not ks:
        raise ValueError(f"positions and ks must be non-empty, got positions={positions!r}, ks={ks!r}")
    for p in positions:
        validate.int_in("each of positions", p, -seq, seq, high_name="seq")
    for k in ks:
        validate.int_in("each of ks", k, 1, d, closed=True, high_name="d_model")
    grid = list(itertools.product(range(n_layers), positions, ks))
    layer_on = torch.stack([torch.arange(n_layers) == li for li, _, _ in grid])
    at = torch.stack([(torch.arange(seq) == p % seq)[:, None] for _, p, _ in grid])
    k_mask = torch.stack([torch.arange(d) < k for _, _, k in grid])
    return Hypotheses(layer_on, at, k_mask)


def _sources(params: dict, cfg: Config, source: Tokens, sites: list[str]) -> Tensor:
    """The source run's activation at every swept site, stacked ``[layers, *batch, seq, width]``."""
    with torch.no_grad():
        acts = flatten_with_paths(forward_with_activations(params, source, cfg)[1])
    return torch.stack([acts[s] for s in sites])


def _member_logits(params: dict, cfg: Config, sites: list[str], base: Tokens, sources: Tensor, params_i: dict,
                   layer_on: Tensor, at: Tensor, k_mask: Tensor) -> Tensor:
    """One member's intervened logits: the swap at every swept site, live only at its own layer and position."""
    rotation = orthogonal(params_i["rotation"])

    def swap_at(j: int):
        return lambda h: rotated_swap(h, sources[j], rotation, k_mask, at & layer_on[j])

    interventions = {site: swap_at(j) for j, site in enumerate(sites)}
    return forward_with_activations(params, base, cfg, interventions=interventions)[0]


def _check_pairs(name: str, pairs: Pairs) -> Pairs:
    if not isinstance(pairs, tuple) or len(pairs) != 3:
        raise TypeError(f"{name} must be a (base, source, labels) tuple, got {type(pairs).__name__}")
    base, source, labels = pairs
    if base.shape != source.shape or labels.shape != base.shape[:-1]:
        raise ValueError(f"{name}: base {tuple(base.shape)}, source {tuple(source.shape)} and labels "
                         f"{tuple(labels.shape)} must be (n, seq), (n, seq) and (n,)")
    return pairs


def das_sweep(
    params: dict, cfg: Config, train: Pairs, test: Pairs, *, layers: Sequence[int], positions: Sequence[int],
    ks: Sequence[int], site: str = "resid_post", steps: int = 200, lr: float = 0.05, seed: int = 0,
    chunk_size: int | None = None,
) -> DasSweep:
    """DAS for every (layer, position, k): trained by ONE vmapped ``ft.optim`` step per iteration (each member
    from ``das_params(d_model, seed=seed)`` with its own Adam state), scored by IIA on ``test``. Each member
    equals ``das.train_das`` at ``blocks.{layer}.{site}``, ``positions=[position]``, ``k`` run alone."""
    layers = list(layers)
    for layer in layers:
        validate.int_in("each of layers", layer, 0, cfg.n_layers, high_name="n_layers")
    sites = [f"blocks.{layer}.{site}" for layer in layers]
    for s in sites:
        check_site(s, cfg)
    base, source, labels = _check_pairs("train", train)
    masks = hypothesis_masks(len(layers), list(positions), list(ks), base.shape[-1], cfg.d_model)
    sources = _sources(params, cfg, source, sites)
    members = masks.layer_on.shape[0]
    stacked = stack([das_params(cfg.d_model, seed=seed, dtype=sources.dtype)] * members)
    opt = adamw(lr, weight_decay=0.0)

    def loss(p: dict, layer_on: Tensor, at: Tensor, k_mask: Tensor) -> Tensor:
        return last_position_loss(_member_logits(params, cfg, sites, base, sources, p, layer_on, at, k_mask), labels)

    step = torch.func.vmap(optimizer_step(loss, opt), chunk_size=chunk_size)
    state, losses = stack([opt.init(das_params(cfg.d_model, dtype=sources.dtype))] * members), []
    validate.int_in("steps", steps, 1, 10**9)
    for _ in range(steps):
        stacked, state, value = step(stacked, state, *masks)
        losses.append(value.detach())
    scores = sweep_iia(params, cfg, test, stacked, masks, sites, chunk_size=chunk_size)
    shape = dict(layers=len(layers), seq=len(positions), k=len(ks))
    return DasSweep(rearrange(scores, "(layers seq k) -> layers seq k", **shape), stacked, torch.stack(losses))


def sweep_iia(params: dict, cfg: Config, test: Pairs, stacked: dict, masks: Hypotheses, sites: list[str], *,
              chunk_size: int | None = None) -> Tensor:
    """Held-out IIA of every member of ``stacked`` (one vmap): the fraction of pairs answering the label."""
    base, source, labels = _check_pairs("test", test)
    sources = _sources(params, cfg, source, sites)

    def member(p: dict, layer_on: Tensor, at: Tensor, k_mask: Tensor) -> Tensor:
        logits = _member_logits(params, cfg, sites, base, sources, p, layer_on, at, k_mask)
        return (logits[..., -1, :].argmax(-1) == labels).to(torch.float64).mean()

    with torch.no_grad():
        return torch.func.vmap(member, chunk_size=chunk_size)(stacked, *masks)


__all__ = ["DasSweep", "Hypotheses", "das_sweep", "hypothesis_masks", "sweep_iia"]
