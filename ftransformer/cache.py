"""Learning-path step 8: the KV-cache as explicit state.

While generating, every new token attends to the keys and values of all tokens before it. Those do
not change, so we keep them: one fixed-size buffer per layer for keys and one for values, plus, per
row, how many slots are filled. A token at slot ``s`` has position ``s``; it writes its key/value to
slot ``s`` and may look at slots ``0..s``.

The cache is a pytree (a ``NamedTuple`` of tensors) that goes into ``forward_with_cache`` and comes
back out as a *new* cache: the one passed in is never modified. Buffers have a fixed size
(``max_len``), so a compiled decode step sees the same shapes at every step and never recompiles.

Ragged batches use right padding: row ``b`` holds its real tokens in slots ``0..lengths[b]-1``.
Padding tokens of a chunk are written past the row's length, where causal masking hides them and
the row's next tokens overwrite them. The mask that hides them is ``layers.masks.cache_mask``.
"""

from typing import NamedTuple

import torch
from ftransformer import validate
from ftransformer.config import Config
from ftransformer.shapes import Int, Positions, Tensor
from ftransformer.tracing import is_tracing


class KVCache(NamedTuple):
    """Per-layer key/value buffers and the number of filled slots per row.

    ``k[i]`` and ``v[i]`` are layer ``i``'s buffers, ``[*batch, kv_heads, max_len, head_dim]``;
    ``lengths`` is ``[*batch]`` (int64): slots filled, which is also the position of each row's next
    token. Every leaf leads with the batch axes, so the cache slices, stacks and vmaps like a batch.
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    lengths: Tensor

    @property
    def max_len(self) -> int:
        """Slots per row (the longest sequence this cache can hold)."""
        return self.k[0].shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.lengths.shape


def init_cache(
    cfg: Config,
    batch_size: int | tuple[int, ...],
    max_len: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> KVCache:
    """An empty cache for ``batch_size`` rows (an int, or a tuple for several batch axes).

    ``max_len`` defaults to ``cfg.max_seq_len`` and may not exceed it (positions past it have no
    embedding). Size it to prompt + new tokens: attention reads the whole buffer at every step.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    batch_shape = (batch_size,) if validate.is_int(batch_size) else batch_size
    if not (
        isinstance(batch_shape, tuple)
        and all(validate.is_int(n) and n > 0 for n in batch_shape)
    ):
        raise ValueError(f"batch_size must be a positive int or a tuple of them, got {batch_size!r}")
    if max_len is None:
        max_len = cfg.max_seq_len
    validate.positive_int("max_len", max_len)
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    shape = (*batch_shape, cfg.n_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)),
        v=tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)),
        lengths=torch.zeros(batch_shape, dtype=torch.int64, device=device),
    )


def check_cache(cache: KVCache, cfg: Config, tokens: Tensor, params: dict | None = None) -> None:
    """Raise ``ValueError`` if ``cache`` does not fit ``cfg``, the batch shape of ``tokens``, or the
    dtype/device of ``params``."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (see init_cache), got {type(cache).__name__}")
    if len(cache.k) != cfg.n_layers or len(cache.v) != cfg.n_layers:
        raise ValueError(f"cache has {len(cache.k)} layers but n_layers={cfg.n_layers}")
    expected = (*cache.lengths.shape, cfg.n_kv_heads, cache.max_len, cfg.head_dim)
    for name, buffers in (("k", cache.k), ("v", cache.v)):
        for i, buf in enumerate(buffers):
            if tuple(buf.shape) != expected:
                raise ValueError(
                    f"cache.{name}[{i}] has shape {tuple(buf.shape)} but expected "
                    f"(*batch, kv_heads, max_len, head_dim) = {expected}"
                )
    if params is not None and cache.k:
        weights, buf = params["embed"]["tokens"], cache.k[0]
        if buf.dtype != weights.dtype or buf.device != weights.device:
            raise ValueError(
                f"cache buffers are {buf.dtype} on {buf.device} but the params are {weights.dtype} on "
                f"{weights.device}; build the cache with init_cache(..., dtype=..., device=...) to match"
            )
    if tuple(tokens.shape[:-1]) != tuple(cache.lengths.shape):
        raise ValueError(
            f"tokens has batch shape {tuple(tokens.shape[:-1])} but the cache has batch shape "
            f"{tuple(cache.lengths.shape)}"
        )


def check_room(lengths: Int[Tensor, "*batch"], seq: int, max_len: int) -> None:
    """Raise ``ValueError`` if writing ``seq`` more tokens would run past ``max_len`` (skipped while tracing)."""
    if is_tracing(lengths):
        return
    asked = int(lengths.max()) + seq if lengths.numel() else seq
    if asked > max_len:
        raise ValueError(
            f"the cache would need length {asked} (filled {asked - seq} + seq={seq}) but max_len={max_len}"
        )


def query_slots(lengths: Int[Tensor, "*batch"], seq: int) -> Positions:
    """Slot (= position) of each new token: row ``b`` continues at ``lengths[b]``."""
    return lengths[..., None] + torch.arange(seq, device=lengths.device)


def write_index(slots: Positions, kv_heads: int, head_dim: int) -> Int[
    Tensor, "*batch kv_heads seq head_dim"
]:
    """The ``scatter`` index that puts new keys/values at their slots (a broadcast view: no copy).

    Built once per call and shared by every layer's ``write_kv`` (``ftransformer.layers.attention``).
    """
    return slots[..., None, :, None].expand(*slots.shape[:-1], kv_heads, slots.shape[-1], head_dim)

