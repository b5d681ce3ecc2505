"""Split an adapted tree into what trains (the adapters' ``a``, ``b``, ``m``) and what stays (everything else).

``split(params) -> (trainable, frozen)``: ``trainable`` is a nested tree of the adapter tensors alone, at the
adapters' paths (``blocks.0.attn.w_qkv.a``, ...), so gradients, optimizer states and checkpoints of it hold the
adapter only; ``frozen`` is ``params`` with each adapter reduced to a ``FrozenAdapter(base, scale)``.
``combine(trainable, frozen)`` puts them back together; it is cheap (no copies), so a loss written as a
function of ``trainable`` alone differentiates the adapters and never the base, and ``vmap`` over a stack of
``trainable`` trees with ``frozen`` not mapped runs many adapters on one shared base.
"""

from typing import NamedTuple

from torch import Tensor

from ftransformer import tree
from ftransformer.layers.adapter import ADAPTERS, DoRAWeight, LoRAWeight
from ftransformer.layers.int8 import Int8Weight
from ftransformer.peft.adapters import is_weight_node, map_nodes

TRAINABLE = ("a", "b", "m")  # the fields of an adapter that train (m: DoRA's only)


class FrozenAdapter(NamedTuple):
    """What of an adapter does not train: its base matrix and its scale."""

    base: Tensor | Int8Weight
    scale: Tensor


def _is_node(x) -> bool:
    return is_weight_node(x) or isinstance(x, FrozenAdapter)


def split(params: dict) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the adapters' ``a``/``b``/``m`` as a tree of their own, and the rest."""
    flat = {}
    for path, x in tree.flatten_with_paths(params, is_leaf=is_weight_node).items():
        if isinstance(x, ADAPTERS):
            flat.update({f"{path}.{f}": getattr(x, f) for f in TRAINABLE if hasattr(x, f)})
    if not flat:
        raise ValueError("params hold no adapter (LoRAWeight or DoRAWeight): wrap them with peft.lora first")
    frozen = map_nodes(params, lambda p, x: FrozenAdapter(x.base, x.scale) if isinstance(x, ADAPTERS) else x)
    return tree.unflatten_paths(flat), frozen


def _rebuilt(path: str, x: FrozenAdapter, flat: dict, used: set):
    names = [f"{path}.{f}" for f in TRAINABLE if f"{path}.{f}" in flat]
    if names[:2] != [f"{path}.a", f"{path}.b"]:
        raise ValueError(f"trainable has no adapter at {path!r} (expected {path}.a and {path}.b), got {names}")
    used.update(names)
    a, b = flat[f"{path}.a"], flat[f"{path}.b"]
    if len(names) == 3:
        return DoRAWeight(x.base, a, b, x.scale, flat[f"{path}.m"])
    return LoRAWeight(x.base, a, b, x.scale)


def combine(trainable: dict, frozen: dict) -> dict:
    """The adapted params ``split`` took apart (the same tensors, no copies)."""
    flat = tree.flatten_with_paths(trainable)
    used: set[str] = set()
    params = map_nodes(
        frozen, lambda p, x: _rebuilt(p, x, flat, used) if isinstance(x, FrozenAdapter) else x, is_node=_is_node
    )
    extra = sorted(set(flat) - used)
    if extra:
        raise ValueError(f"trainable has tensors at {extra[:4]} where frozen has no adapter")
    return params
