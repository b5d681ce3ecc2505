"""A DAS hypothesis sweep as ONE stacked step: every (layer, position, k) trained at once, each its own optimizer state.

A hypothesis is a member of a stack: its rotation params (``interp.das``), its own Adam state, and two masks
that say how it acts: a one-hot over positions and the first ``k`` of ``k_max = max(ks)`` rotated coordinates.
A member runs only from its own layer on, the way ``interp.patching``'s sweeps start a patched run at the
patched layer: the base run's activations before layer ``L`` are the same for every member at ``L`` and need
no gradient (the rotation acts at ``L``), so the base and source runs are computed ONCE (no grad, ``starts``),
and a member at ``L`` is its swap (``das.rotated_swap``, vmapped over the members) of the base run's cached
value at its site, then the blocks after it (``resid_post``: blocks ``L + 1, ...``; a site inside block ``L``:
block ``L`` from its cached ``resid_pre``, swap inside). All members go through the blocks in ONE batched pass
(``_wavefront``): each layer's members join the runs of the layers before at their own block, and only the last
position is unembedded. One training iteration is ONE ``ft.optim`` step of the whole stack (``sweep_step``):
``grad`` of the sum of the members' (independent) losses gives each member its own gradient, and the update
is a ``vmap`` over the members' Adam states; so every member equals ``das.train_das`` on it alone.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from einops import rearrange

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.das import das_params, last_position_loss, orthogonal, rotated_swap
from ftransformer.interp.steering import check_site
from ftransformer.layers.block import block
from ftransformer.layers.tap import Tap
from ftransformer.model import BlockInputs, block_inputs, unembed
from ftransformer.optim import adamw, apply_updates
from ftransformer.shapes import Logits, Tensor, Tokens
from ftransformer.tree import flatten_with_paths, stack

Pairs = tuple[Tensor, Tensor, Tensor]  # (base, source, counterfactual labels): token ids (n, seq), (n, seq), (n,)


class DasSweep(NamedTuple):
    """The sweep's result: ``iia[layer, position, k]`` (held-out), the trained stack (member = (layer, position,
    k) in that nesting order), and each step's loss per member ``[steps, member]``."""

    iia: Tensor
    params: dict
    losses: Tensor


class Hypotheses(NamedTuple):
    """The masks of one layer's members: ``at [member, seq, 1]``, ``k_mask [member, width]``."""

    at: Tensor
    k_mask: Tensor


class Start(NamedTuple):
    """Where the members at one layer start: the residual ``x`` entering block ``first``, the block inputs of
    the base run, the source run's value at the site, and the site's path (None: the swap acts on ``x``)."""

    x: Tensor
    first: int
    inputs: BlockInputs
    source: Tensor
    path: str | None


def hypothesis_masks(positions: Sequence[int], ks: Sequence[int], seq: int, d: int) -> Hypotheses:
    """The masks of every (position, k) of one layer, in that nesting order."""
    if not positions or not ks:
        raise ValueError(f"positions and ks must be non-empty, got positions={positions!r}, ks={ks!r}")
    for p in positions:
        validate.int_in("each of positions", p, -seq, seq, high_name="seq")
    for k in ks:
        validate.int_in("each of ks", k, 1, d, closed=True, high_name="d_model")
    grid = list(itertools.product(positions, ks))
    at = torch.stack([(torch.arange(seq) == p % seq)[:, None] for p, _ in grid])
    k_mask = torch.stack([torch.arange(d) < k for _, k in grid])
    return Hypotheses(at, k_mask)


def starts(params: dict, cfg: Config, base: Tokens, source: Tokens, layers: Sequence[int], site: str) -> list[Start]:
    """Each swept layer's ``Start``, from ONE no-grad base run and ONE source run (their cached activations)."""
    with torch.no_grad():
        base_acts = flatten_with_paths(forward_with_activations(params, base, cfg)[1])
        source_acts = flatten_with_paths(forward_with_activations(params, source, cfg)[1])
    inputs, out = block_inputs(base, cfg), []
    for layer in layers:
        path = f"blocks.{layer}.{site}"
        if site == "resid_post":
            out.append(Start(base_acts[path], layer + 1, inputs, source_acts[path], None))
        else:
            out.append(Start(base_acts[f"blocks.{layer}.resid_pre"], layer, inputs, source_acts[path], path))
    return out


def _swaps(start: Start, rotations: Tensor, masks: Hypotheses) -> Callable[[Tensor], Tensor]:
    """``h -> [member, *h]``: each member's swap of ``h`` (rotation ``rotations[i]``, masks ``masks[i]``), a vmap."""
    swap_all = torch.func.vmap(rotated_swap, in_dims=(0 if start.path else None, None, 0, 0, 0))
    return lambda h: swap_all(h, start.source, rotations, masks.k_mask, masks.at)


def _wavefront(params: dict, cfg: Config, groups: list[Start], rotations: Tensor, masks: Hypotheses) -> Logits:
    """The last-position logits ``[group * member, *batch, 1, vocab]`` (``rotations``: ``[group, member, d, d]``):
    ONE batched pass through the blocks, a layer's members joining the runs of the layers before at their own
    block (as ``patching``'s sweeps do), so each block runs once on every member alive there."""
    xs, joined, inputs = None, [], groups[0].inputs
    for i in range(min(s.first for s in groups), cfg.n_layers + 1):
        for j, s in enumerate(groups):  # members whose swap acts on the residual entering block i
            if s.first == i and s.path is None:
                new = _swaps(s, rotations[j], masks)(s.x)
                xs, joined = (new if xs is None else torch.cat([xs, new])), joined + [j]
        if i == cfg.n_layers:
            break
        if xs is not None:
            xs = block(params["blocks"][i], xs, cfg, mask=inputs.masks[i], rotary=inputs.rotaries[i])
        for j, s in enumerate(groups):  # members whose swap acts inside block i
            if s.first == i and s.path is not None:
                tap = Tap({s.path: _swaps(s, rotations[j], masks)}, record=False).scope(f"blocks.{i}")
                x = s.x.expand(rotations.shape[1], *s.x.shape)
                new = block(params["blocks"][i], x, cfg, mask=inputs.masks[i], rotary=inputs.rotaries[i], tap=tap)
                xs, joined = (new if xs is None else torch.cat([xs, new])), joined + [j]
    logits = unembed(params, xs[..., -1:, :], cfg)
    logits = rearrange(logits, "(group member) ... -> group member ...", group=len(groups))
    return rearrange(logits[torch.tensor(joined).argsort()], "group member ... -> (group member) ...")


def sweep_logits(params: dict, cfg: Config, groups: list[Start], stacked: dict, masks: Hypotheses,
                 chunk: int | None = None) -> Logits:
    """Every member's last-position logits ``[member, *batch, 1, vocab]``, layer-major (``groups[j]``'s members
    are rows ``j * m ... (j + 1) * m - 1`` of ``stacked``, ``m`` = the members of one layer); ``chunk``: the
    most members of one layer in one batched pass (None: all of them)."""
    rotations, m = torch.func.vmap(orthogonal)(stacked["rotation"]), masks.at.shape[0]
    if rotations.shape[0] != len(groups) * m:
        raise ValueError(f"the stack has {rotations.shape[0]} members, expected {len(groups)} layers x {m}")
    if chunk is not None:
        validate.int_in("chunk_size", chunk, 1, 10**9)
    size = m if chunk is None else chunk
    rotations = rearrange(rotations, "(group member) ... -> group member ...", member=m)
    parts = [_wavefront(params, cfg, groups, rotations[:, c : c + size], Hypotheses(*(x[c : c + size] for x in masks)))
             for c in range(0, m, size)]
    parts = [rearrange(x, "(group member) ... -> group member ...", group=len(groups)) for x in parts]
    return rearrange(torch.cat(parts, dim=1), "group member ... -> (group member) ...")


def sweep_step(params: dict, cfg: Config, groups: list[Start], masks: Hypotheses, labels: Tensor, opt,
               chunk: int | None = None) -> Callable:
    """``step(stacked, opt_state) -> (stacked, opt_state, losses [member])``: ONE ``ft.optim`` step of the whole
    stack. The members' losses are independent, so ``grad`` of their sum is, row by row, each member's own
    gradient; the update is ``vmap``-ed over members (each its own Adam state)."""
    per_member = torch.func.vmap(last_position_loss, in_dims=(0, None))

    def total(stacked: dict) -> tuple[Tensor, Tensor]:
        losses = per_member(sweep_logits(params, cfg, groups, stacked, masks, chunk), labels)
        return losses.sum(), losses

    grad_and_losses, update = torch.func.grad(total, has_aux=True), torch.func.vmap(opt.update)

    def step(stacked: dict, opt_state) -> tuple:
        grads, losses = grad_and_losses(stacked)
        updates, opt_state = update(grads, opt_state, stacked)
        return apply_updates(stacked, updates), opt_state, losses.detach()

    return step


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
    """DAS for every (layer, position, k): each iteration ONE ``ft.optim`` step of the whole stack (``sweep_step``;
    each member from ``das_params(d_model, seed=seed)`` with its own Adam state, run from its own layer on),
    scored by IIA on ``test``. Each member equals ``das.train_das`` at ``blocks.{layer}.{site}``,
    ``positions=[position]``, ``k`` run alone. ``chunk_size``: the most members in one batched run (memory)."""
    layers = list(layers)
    for layer in layers:
        validate.int_in("each of layers", layer, 0, cfg.n_layers, high_name="n_layers")
        check_site(f"blocks.{layer}.{site}", cfg)
    base, source, labels = _check_pairs("train", train)
    masks = hypothesis_masks(list(positions), list(ks), base.shape[-1], cfg.d_model)
    validate.int_in("steps", steps, 1, 10**9)
    groups, opt = starts(params, cfg, base, source, layers, site), adamw(lr, weight_decay=0.0)
    dtype, members = groups[0].source.dtype, masks.at.shape[0] * len(groups)
    stacked = stack([das_params(cfg.d_model, seed=seed, dtype=dtype)] * members)
    state = stack([opt.init(das_params(cfg.d_model, dtype=dtype))] * members)
    step, losses = sweep_step(params, cfg, groups, masks, labels, opt, chunk_size), []
    for _ in range(steps):
        stacked, state, value = step(stacked, state)
        losses.append(value)
    scores = sweep_iia(params, cfg, test, stacked, masks, layers, site, chunk_size=chunk_size)
    shape = dict(layers=len(layers), seq=len(positions), k=len(ks))
    return DasSweep(rearrange(scores, "(layers seq k) -> layers seq k", **shape), stacked, torch.stack(losses))


def sweep_iia(params: dict, cfg: Config, test: Pairs, stacked: dict, masks: Hypotheses, layers: Sequence[int],
              site: str = "resid_post", *, chunk_size: int | None = None) -> Tensor:
    """Held-out IIA of every member of ``stacked`` (layer-major over ``layers``, ``masks`` per layer): the
    fraction of pairs whose intervened last-position argmax is the label."""
    base, source, labels = _check_pairs("test", test)
    with torch.no_grad():
        logits = sweep_logits(params, cfg, starts(params, cfg, base, source, layers, site), stacked, masks, chunk_size)
        return (logits[..., -1, :].argmax(-1) == labels).to(torch.float64).mean(-1)


__all__ = ["DasSweep", "Hypotheses", "Start", "das_sweep", "hypothesis_masks", "starts", "sweep_iia", "sweep_logits",
           "sweep_step"]
