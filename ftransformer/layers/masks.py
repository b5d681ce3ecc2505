"""Which keys each query may attend to: one rule, built once per forward call and passed to every layer.

The rule is causality by position: a query at position ``i`` may look at a key at position ``j`` when
``j <= i``. Without a cache the keys are the queries' own positions; with one they are the cache's
slots, where right padding sits past each row's length and is hidden by the same rule.

A sliding window of ``w`` (``Config.attention.window``, per layer) adds ``j > i - w``: a query sees its
own key and the ``w - 1`` before it. With a cache the window is a mask over the whole cache (keys
older than the window stay in the buffers, invisible); a ring buffer of window size would save that
memory and is not done here. Packed rows (several documents in one row, ``documents`` ids) add
``documents[j] == documents[i]``: block-diagonal causal. ``layer_masks`` builds one mask per distinct
window, once per call.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from ftransformer.shapes import AttnBias, AttnMask, Bool, Int, Positions, Tensor


class Mask(NamedTuple):
    """What attention needs to know about who sees whom, shared by every layer of one call.

    ``allowed`` is Bool (True: may attend) or an additive bias (0 to keep a key, -inf to hide it): a
    bias built once saves SDPA converting a Bool mask in every layer. ``causal`` says ``allowed`` is
    exactly the lower triangle of a square ``seq x seq`` mask, so SDPA may use its fused causal kernel
    without reading the tensor.
    """

    allowed: AttnMask | AttnBias
    causal: bool = False


def causal_mask(
    q_positions: Int[Tensor, "*#batch seq"], k_positions: Int[Tensor, "*#batch kv_seq"], window: int | None = None
) -> Bool[Tensor, "*#batch seq kv_seq"]:
    """True where query i may look at key j: key position <= query position (and > query - ``window``)."""
    allowed = k_positions[..., None, :] <= q_positions[..., :, None]
    if window is not None:
        allowed = allowed & (k_positions[..., None, :] > q_positions[..., :, None] - window)
    return allowed


def self_mask(
    positions: Int[Tensor, "*#batch seq"],
    window: int | None = None,
    documents: Int[Tensor, "*#batch seq"] | None = None,
) -> Mask:
    """The mask of a sequence attending to itself (``positions`` increasing along ``seq``, or restarting at
    each of the packed ``documents``, whose block-diagonal causal mask lets no query see another document)."""
    if documents is not None:
        index = torch.arange(documents.shape[-1], device=documents.device)
        same = documents[..., None, :] == documents[..., :, None]
        return Mask(causal_mask(index, index, window) & same)
    # Increasing positions make causal_mask the lower triangle, whatever the values: hence causal=True.
    if window is not None:
        return Mask(causal_mask(positions, positions, window))
    return Mask(causal_mask(positions, positions), causal=True)


def as_bias(mask: AttnMask, dtype: torch.dtype = torch.float32) -> AttnBias:
    """A Bool mask as an additive bias: 0 where a query may attend, -inf elsewhere."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


def cache_mask(slots: Positions, max_len: int, dtype: torch.dtype = torch.float32, window: int | None = None) -> Mask:
    """The mask of new tokens at ``slots`` over all ``max_len`` slots of a KV-cache, as a bias of ``dtype``."""
    return Mask(as_bias(causal_mask(slots, torch.arange(max_len, device=slots.device), window), dtype))


def layer_masks(cfg, build: Callable[[int | None], Mask]) -> tuple[Mask, ...]:
    """One mask per layer, ``build(window)`` called once per distinct window of ``cfg``
    (``lambda w: self_mask(positions, w)`` or ``lambda w: cache_mask(slots, max_len, dtype, w)``)."""
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    built = {w: build(w) for w in dict.fromkeys(windows)}
    return tuple(built[w] for w in windows)


def document_positions(documents: Int[Tensor, "*#batch seq"]) -> Int[Tensor, "*#batch seq"]:
    """Positions that restart at 0 where each packed document starts (``documents`` constant within one)."""
    index = torch.arange(documents.shape[-1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[..., 1:] = documents[..., 1:] != documents[..., :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=-1).values
