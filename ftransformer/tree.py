"""Pytree tools: the one walker for parameters, gradients, optimizer states and checkpoints.

A tree is nested ``dict`` / ``list`` / ``tuple`` / ``NamedTuple`` containers with leaves (tensors,
mostly; anything else, ``None`` included, is a leaf too) at the ends, as in ``torch.utils._pytree``, on
which this module is built. Leaves come in one order everywhere: dicts in insertion order, sequences by
index.

**The path convention.** A leaf's path is the keys from the root down to it, joined by dots::

    "blocks.0.attn.w_qkv"          dict keys as they are, list and tuple positions as numbers
    "blocks.0.attn.w_qkv.q"        a NamedTuple contributes its field names: an ``Int8Weight``'s
    "blocks.0.attn.w_qkv.scale"    two tensors (``layers.int8``), ...
    "1.mu.blocks.0.attn.w_qkv"     ... and an optimizer state: element 1 of a ``chain`` state tuple,
                                   the ``mu`` field of its ``AdamWState``, then the params' own path

Checkpoints name their tensors this way (``ftransformer.checkpoint``), and so do the HF interop and the
activation taps. A dict key with a dot in it can give two leaves one path (``{"a.b": x, "a": {"b": y}}``);
``flatten_with_paths`` refuses such a tree rather than drop one of them.

``flatten`` / ``unflatten`` are the fast pair for hot loops (an optimizer step flattens a dozen trees):
a lean walk over exactly those containers, with the same leaf order as ``torch.utils._pytree`` and a
tree definition that compares with ``==``. ``map`` is ``torch.utils._pytree.tree_map``.
"""

import builtins
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

PyTree = Any
# A tree definition: None for a leaf, else (container type, dict keys or None, child definitions).
TreeDef = Any
IsLeaf = Callable[[Any], bool] | None
# Exact types, as torch.utils._pytree matches them (a dict or tuple subclass it does not know is a leaf).
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, torch.Size)
_LEAF, _MAPPING, _SEQUENCE = "leaf", "mapping", "sequence"
_KINDS: dict[type, str] = {}
_NO_TEMPLATE = object()


# ---------------------------------------------------------------- leaves and structure


def map(fn: Callable, tree: PyTree, *rest: PyTree, is_leaf: IsLeaf = None) -> PyTree:
    """Apply ``fn`` leaf by leaf (to matching leaves of ``rest`` too); the structure is kept.

    ``is_leaf(node) -> True`` stops the walk at ``node`` and hands it to ``fn`` whole.
    """
    return pytree.tree_map(fn, tree, *rest, is_leaf=is_leaf)


def _kind_of(kind: type) -> str:
    """``_MAPPING``, ``_SEQUENCE`` or ``_LEAF`` for nodes of type ``kind`` (remembered: one dict lookup
    a node afterwards)."""
    if kind in _MAPPINGS:
        found = _MAPPING
    elif kind in _SEQUENCES or (issubclass(kind, tuple) and hasattr(kind, "_fields")):
        found = _SEQUENCE
    else:
        found = _LEAF
    _KINDS[kind] = found
    return found


def flatten(tree: PyTree, *, is_leaf: IsLeaf = None) -> tuple[list, TreeDef]:
    """The leaves of ``tree`` in order, and its definition (for ``unflatten``)."""
    out: list = []
    return out, _walk(tree, out, is_leaf)


def _walk(node, out: list, is_leaf: IsLeaf) -> TreeDef:
    # Module-level like ``_build``: a self-calling closure would keep ``out`` alive in a reference cycle.
    kind = type(node)
    found = _KINDS.get(kind) or _kind_of(kind)
    if found is _LEAF or (is_leaf is not None and is_leaf(node)):
        out.append(node)
        return None
    if found is _MAPPING:
        return (kind, tuple(node), tuple([_walk(v, out, is_leaf) for v in node.values()]))
    return (kind, None, tuple([_walk(v, out, is_leaf) for v in node]))


def leaves(tree: PyTree, *, is_leaf: IsLeaf = None) -> list:
    """The leaves of ``tree`` in order (the order ``map`` visits them)."""
    return flatten(tree, is_leaf=is_leaf)[0]


def unflatten(values: Sequence, treedef: TreeDef) -> PyTree:
    """The tree of definition ``treedef`` with ``values`` as its leaves (the inverse of ``flatten``)."""
    return _build(treedef, iter(values))


def _build(d: TreeDef, it: Iterator) -> PyTree:
    # A module-level function, not a closure calling itself: such a closure is a reference cycle that
    # would keep ``values`` (a step's gradients, an optimizer's new moments) alive until the cyclic GC runs.
    if d is None:
        return next(it)
    kind, keys, children = d
    built = [_build(c, it) for c in children]
    if keys is not None:
        return kind(zip(keys, built))
    return kind(*built) if hasattr(kind, "_fields") else kind(built)


def num_leaves(treedef: TreeDef) -> int:
    """How many leaves a tree of definition ``treedef`` has."""
    return 1 if treedef is None else sum(num_leaves(c) for c in treedef[2])


def flatten_like(tree: PyTree, treedef: TreeDef, name: str = "tree") -> list:
    """The leaves of ``tree``, which must have the definition ``treedef`` (``ValueError`` naming ``name``
    and both structures otherwise)."""
    values, got = flatten(tree)
    if got != treedef:
        expected = unflatten([0] * num_leaves(treedef), treedef)
        diff = _path_difference(list(flatten_with_paths(expected)), list(flatten_with_paths(tree)))
        raise ValueError(f"{name} must have the same tree structure as params: expected "
                         f"{diff or f'{pytree.tree_structure(expected)}, got {pytree.tree_structure(tree)}'}")
    return values


def _path_difference(expected: list[str], got: list[str]) -> str:
    """``"n paths, got: k missing ([...]) and j unexpected ([...])"``, or "" when both name the same paths."""
    have, want = set(got), set(expected)
    missing, extra = [p for p in expected if p not in have], [p for p in got if p not in want]
    if not (missing or extra):
        return ""
    return (f"{len(expected)} paths, got {len(missing)} missing ({missing[:3]}) and {len(extra)} unexpected "
            f"({extra[:3]})")


def to(tree: PyTree, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PyTree:
    """Move and/or cast every floating-point tensor leaf (integer tensors only move; others stay)."""

    def move(x):
        if isinstance(x, Tensor):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return x

    return map(move, tree)


# ---------------------------------------------------------------- paths


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey (NamedTuple fields)
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"cannot name pytree key {entry!r}: expected a dict key, a position or a field")


def flatten_with_paths(tree: PyTree, *, is_leaf: IsLeaf = None) -> dict[str, Any]:
    """``{"blocks.0.attn.w_qkv": leaf, ...}`` in leaf order, named by the module's path convention
    (``is_leaf`` as in ``map``: a node it accepts is one leaf)."""
    with_paths, _ = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    flat = {".".join(_key_name(k) for k in path): leaf for path, leaf in with_paths}
    if len(flat) != len(with_paths):
        names = [".".join(_key_name(k) for k in path) for path, _ in with_paths]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"expected one leaf per path, got several at {twice} (a dict key with a '.' in it?)")
    return flat


def unflatten_paths(flat: dict[str, Any], like: PyTree = _NO_TEMPLATE) -> PyTree:
    """The tree ``flat`` (``{path: leaf}``) stands for.

    Without ``like``: nested dicts, with lists where every key of a level is a number 0..n-1. With
    ``like``: the structure of ``like`` (NamedTuples and tuples included), each leaf looked up by its
    path; ``flat`` must hold exactly ``like``'s paths.
    """
    if like is _NO_TEMPLATE:
        return _listify(_nest(flat))
    expected = list(flatten_with_paths(like))
    diff = _path_difference(expected, list(flat))
    if diff:
        raise ValueError(f"expected the template's {diff}")
    return pytree.tree_unflatten([flat[p] for p in expected], pytree.tree_structure(like))


def _nest(flat: dict[str, Any]) -> dict:
    root: dict = {}
    for path, leaf in flat.items():
        node = root
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return root


def _listify(node):
    if not isinstance(node, dict):
        return node
    node = {k: _listify(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node) and sorted(builtins.map(int, node)) == list(range(len(node))):
        return [node[str(i)] for i in range(len(node))]
    return node


# ---------------------------------------------------------------- stack / unstack


def _check_same_leaves(reference: list, other: list, i: int) -> None:
    for a, b in zip(reference, other):
        if isinstance(a, Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            raise ValueError(
                f"trees[{i}] has a leaf of shape {tuple(b.shape)} ({b.dtype}) where trees[0] has "
                f"{tuple(a.shape)} ({a.dtype}): only trees of the same shapes (models of one config) stack"
            )


def stack(trees: Sequence[PyTree]) -> PyTree:
    """One tree whose every leaf is the trees' leaves stacked on a new leading ``member`` axis.

    Works for any trees of one structure and shapes: parameters, optimizer states, metrics.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one tree, got none")
    first, treedef = flatten(trees[0])
    rows = [first]
    for i, t in enumerate(trees[1:], 1):
        rows.append(flatten_like(t, treedef, f"trees[{i}]"))
        _check_same_leaves(first, rows[-1], i)
    return unflatten([torch.stack(list(members)) for members in zip(*rows)], treedef)


def unstack(stacked: PyTree) -> list[PyTree]:
    """The inverse of ``stack``: one tree per member (views into ``stacked``)."""
    values, treedef = flatten(stacked)
    if not values:
        raise ValueError("unstack needs a tree with at least one tensor, got none")
    sizes = {x.shape[0] if x.ndim else None for x in values}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"expected every leaf to share one leading member axis, got leading sizes "
                         f"{sorted(builtins.map(str, sizes))}")
    per_leaf = [x.unbind(0) for x in values]
    return [unflatten([members[m] for members in per_leaf], treedef) for m in range(values[0].shape[0])]


__all__ = [
    "PyTree", "TreeDef", "flatten", "flatten_like", "flatten_with_paths", "leaves", "map", "num_leaves", "stack",
    "to", "unflatten", "unflatten_paths", "unstack",
]
