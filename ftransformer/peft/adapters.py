"""Wrap a parameter tree's matrices in low-rank adapters (``lora``), fold them back (``merge``), drop their inputs.

``lora`` turns every matrix whose path matches one of ``targets`` (``fnmatch`` patterns over
``tree.flatten_with_paths``' paths, where ``*`` also crosses dots) into a ``LoRAWeight`` (or ``DoRAWeight``)
initialised as PEFT does: ``a`` kaiming-uniform with ``a=sqrt(5)`` (uniform in ``+-1/sqrt(d_in)``), ``b = 0``,
``scale = alpha / rank``, DoRA's ``m`` the base's column norms. With ``b = 0`` the forward at step 0 equals the
base's bit for bit. Vectors a pattern matches (biases, norm scales) are left alone; a pattern that matches
only vectors, or nothing, is an error.

``base="nf4"`` (QLoRA) or ``base="int8"`` quantizes each targeted matrix before wrapping it, so the adapters sit
on a 4-bit NormalFloat (``layers.nf4``) or int8 base and step 0 equals the quantized base's forward; ``a``, ``b``
(and ``m``) keep the float matrix's dtype. ``merge`` dequantizes a quantized base first and returns plain
float matrices: nothing is re-quantized, so the merged model computes what the adapted one does.
"""

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor

from ftransformer import random, tree, validate
from ftransformer.config import Config
from ftransformer.layers.adapter import ADAPTERS, AdapterDropout, DoRAWeight, LoRAWeight, column_norm
from ftransformer.layers.int8 import Int8Weight, as_float, quantize_matrix
from ftransformer.layers.nf4 import NF4Weight, quantize_nf4

DEFAULT_TARGETS = ("blocks.*.attn.w_qkv", "blocks.*.attn.w_o", "blocks.*.mlp.*")
EMBEDDING_TABLES = ("embed.tokens", "embed.positions")  # read by lookup, not by linear
QUANTIZERS = {None: lambda w: w, "int8": quantize_matrix, "nf4": quantize_nf4}  # lora's ``base`` choices
QUANTIZED = (Int8Weight, NF4Weight)


def is_weight_node(x) -> bool:
    """Whether ``x`` is one weight of the tree as ``linear`` reads it (a quantized matrix or an adapter: one node)."""
    return isinstance(x, (*QUANTIZED, *ADAPTERS))


def map_nodes(params, fn, is_node=is_weight_node):
    """``params`` with every weight node ``x`` (tensor, ``Int8Weight``, adapter: what ``is_node`` accepts) at
    ``path`` replaced by ``fn(path, x)``."""
    paths = tree.flatten_with_paths(params, is_leaf=is_node)
    nodes, treedef = tree.flatten(params, is_leaf=is_node)
    return tree.unflatten([fn(path, x) for path, x in zip(paths, nodes)], treedef)


def _is_matrix(x) -> bool:
    return isinstance(x, QUANTIZED) or (isinstance(x, Tensor) and x.ndim == 2 and x.is_floating_point())


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


def _float_like(w) -> Tensor:
    """A tensor with ``w``'s float dtype and device (an int8 matrix's are its scales', an NF4 one's float32)."""
    if isinstance(w, Int8Weight):
        return w.scale
    return w.absmax_scale if isinstance(w, NF4Weight) else w


def init_adapter(
    w, rank: int, alpha: float, key: Tensor, dora: bool, base: str | None = None
) -> LoRAWeight | DoRAWeight:
    """PEFT's initial adapter over ``w`` quantized as ``base`` says: ``a`` uniform in ``+-1/sqrt(d_in)``, ``b = 0``,
    ``scale = alpha/rank``."""
    d_in, d_out = w.shape
    like = _float_like(w)
    dtype, device = like.dtype, like.device
    if base is not None and isinstance(w, QUANTIZED):
        raise ValueError(f"base={base!r} quantizes the targets, but one is already a {type(w).__name__}")
    w = QUANTIZERS[base](w)
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    a = (random.uniform(key.to(device), (d_in, rank), dtype=dtype) * 2.0 - 1.0) * bound
    b = torch.zeros(rank, d_out, dtype=dtype, device=device)
    scale = torch.tensor(alpha / rank, dtype=dtype, device=device)
    adapter = LoRAWeight(w, a, b, scale)
    return DoRAWeight(*adapter, m=column_norm(adapter)) if dora else adapter


def lora(
    params: dict, cfg: Config, *, rank: int, alpha: float | int, targets: Sequence[str] = DEFAULT_TARGETS,
    key: Tensor, dora: bool = False, base: str | None = None,
) -> dict:
    """``params`` with the matrices ``targets`` match wrapped in fresh adapters (the base tensors shared, not copied;
    ``base="nf4"`` or ``"int8"``: quantized first, QLoRA)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    validate.positive_int("rank", rank)
    validate.positive_number("alpha", alpha)
    validate.boolean("dora", dora)
    if base not in QUANTIZERS:
        raise ValueError(f"base must be one of {list(QUANTIZERS)}, got {base!r}")
    if not isinstance(key, Tensor) or key.dtype != torch.int64:
        raise TypeError(f"key must be a random key (ft.random.key(seed), an int64 tensor), got {key!r}")
    chosen = select(params, targets)
    keys = {p: random.fold_in(key, i) for i, p in enumerate(chosen)}
    alpha = float(alpha)  # an int alpha (PEFT's lora_alpha=32) is a scale like any other
    return map_nodes(params, lambda p, x: init_adapter(x, rank, alpha, keys[p], dora, base) if p in keys else x)


def merged_matrix(w: LoRAWeight | DoRAWeight) -> Tensor:
    """The float matrix an adapter stands for (a quantized base dequantized first, in the adapter's dtype)."""
    v = as_float(w.base, w.a.dtype) + w.scale * (w.a @ w.b)
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
