"""Wrap a parameter tree's matrices in low-rank adapters (``lora``), fold them back (``merge``), drop their inputs.

``lora`` turns every matrix whose path matches one of ``targets`` (``fnmatch`` patterns over
``tree.flatten_with_paths``' paths, where ``*`` also crosses dots) into a ``LoRAWeight`` (or ``DoRAWeight``)
initialised as PEFT does: ``a`` kaiming-uniform with ``a=sqrt(5)`` (uniform in ``+-1/sqrt(d_in)``), ``b = 0``,
``scale = alpha / rank``, DoRA's ``m`` the base's column norms. With ``b = 0`` the forward at step 0 equals the
base's bit for bit. Vectors a pattern matches (biases, norm scales) are left alone; a pattern that matches
only vectors, or nothing, is an error.
"""

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor

from ftransformer import random, tree, validate
from ftransformer.config import Config
from ftransformer.layers.adapter import ADAPTERS, AdapterDropout, DoRAWeight, LoRAWeight, column_norm
from ftransformer.layers.int8 import Int8Weight, as_float

DEFAULT_TARGETS = ("blocks.*.attn.w_qkv", "blocks.*.attn.w_o", "blocks.*.mlp.*")
EMBEDDING_TABLES = ("embed.tokens", "embed.positions")  # read by lookup, not by linear


def is_weight_node(x) -> bool:
    """Whether ``x`` is one weight of the tree as ``linear`` reads it (an int8 matrix or an adapter: one node)."""
    return isinstance(x, (Int8Weight, *ADAPTERS))


def map_nodes(params, fn, is_node=is_weight_node):
    """``params`` with every weight node ``x`` (tensor, ``Int8Weight``, adapter: what ``is_node`` accepts) at
    ``path`` replaced by ``fn(path, x)``."""
    paths = tree.flatten_with_paths(params, is_leaf=is_node)
    nodes, treedef = tree.flatten(params, is_leaf=is_node)
    return tree.unflatten([fn(path, x) for path, x in zip(paths, nodes)], treedef)


def _is_matrix(x) -> bool:
    return isinstance(x, Int8Weight) or (isinstance(x, Tensor) and x.ndim == 2 and x.is_floating_point())


def select(params: dict, targets: Sequence[str]) -> list[str]:
    """The paths of the matrices ``targets`` match; ValueError for a pattern that matches no matrix."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of path patterns, got {targets!r}")
    nodes = tree.flatten_with_paths(params, is_leaf=is_weight_node)
    chosen = []
    for pattern in targets:
        hits = [p for p in nodes if fnmatchcase(p, pattern)]
        if not hits:
            raise ValueError(f"target {pattern!r} matched no parameter; paths look like {list(nodes)[:6]}")
        adapted = [p for p in hits if isinstance(nodes[p], ADAPTERS)]
        if adapted:
            raise ValueError(f"target {pattern!r} matched {adapted[:3]}, which already hold adapters")
        matrices = [p for p in hits if _is_matrix(nodes[p]) and p not in EMBEDDING_TABLES]
        if not matrices:
            shapes = {p: tuple(nodes[p].shape) for p in hits[:4]}
            raise ValueError(f"target {pattern!r} matched no [d_in, d_out] matrix read by linear, only {shapes}")
        chosen += [p for p in matrices if p not in chosen]
    return chosen


def init_adapter(w, rank: int, alpha: float, key: Tensor, dora: bool) -> LoRAWeight | DoRAWeight:
    """PEFT's initial adapter over ``w``: ``a`` uniform in ``+-1/sqrt(d_in)``, ``b = 0``, ``scale = alpha/rank``."""
    d_in, d_out = w.shape
    like = w.scale if isinstance(w, Int8Weight) else w  # an int8 matrix's float dtype is its scales'
    dtype, device = like.dtype, like.device
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    a = (random.uniform(key.to(device), (d_in, rank), dtype=dtype) * 2.0 - 1.0) * bound
    b = torch.zeros(rank, d_out, dtype=dtype, device=device)
    scale = torch.tensor(alpha / rank, dtype=dtype, device=device)
    adapter = LoRAWeight(w, a, b, scale)
    return DoRAWeight(*adapter, m=column_norm(adapter)) if dora else adapter


def lora(
    params: dict, cfg: Config, *, rank: int, alpha: float | int, targets: Sequence[str] = DEFAULT_TARGETS,
    key: Tensor, dora: bool = False,
) -> dict:
    """``params`` with the matrices ``targets`` match wrapped in fresh adapters (the base tensors shared, not copied)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    validate.positive_int("rank", rank)
    validate.positive_number("alpha", alpha)
    validate.boolean("dora", dora)
    if not isinstance(key, Tensor) or key.dtype != torch.int64:
        raise TypeError(f"key must be a random key (ft.random.key(seed), an int64 tensor), got {key!r}")
    chosen = select(params, targets)
    keys = {p: random.fold_in(key, i) for i, p in enumerate(chosen)}
    return map_nodes(params, lambda p, x: init_adapter(x, rank, float(alpha), keys[p], dora) if p in keys else x)


def merged_matrix(w: LoRAWeight | DoRAWeight) -> Tensor:
    """The float matrix an adapter stands for (an int8 base dequantized first)."""
    v = as_float(w.base) + w.scale * (w.a @ w.b)
    return v if isinstance(w, LoRAWeight) else v * (w.m / column_norm(w))


def merge(params: dict) -> dict:
    """Plain params: every adapter replaced by the float matrix it stands for (``params`` is not changed)."""
    return map_nodes(params, lambda p, x: merged_matrix(x) if isinstance(x, ADAPTERS) else x)


def dropout(params: dict, rate: float, key: Tensor | None) -> dict:
    """``params`` for one training forward: each adapter's input dropped at ``rate`` (its own key folded from
    ``key``); the base's input is not. ``key=None`` or ``rate=0``: ``params`` as they are."""
    if not (isinstance(rate, float | int) and 0.0 <= rate < 1.0):
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    if key is None or rate == 0:
        return params
    paths = [p for p, x in tree.flatten_with_paths(params, is_leaf=is_weight_node).items() if isinstance(x, ADAPTERS)]
    keys = {p: random.fold_in(key, i) for i, p in enumerate(paths)}
    return map_nodes(params, lambda p, x: AdapterDropout(x, float(rate), keys[p]) if p in keys else x)
