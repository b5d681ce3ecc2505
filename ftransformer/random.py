"""Explicit random keys, JAX style: a key is an int64 tensor; the same key gives the same numbers.

The bits come from a counter-based integer hash written in plain tensor ops, so a key behaves the same
eagerly, under ``torch.func.vmap`` (each member's key gives that member its own numbers) and under
``torch.compile`` -- which torch's global, stateful generator cannot promise.
"""

import torch

from ftransformer import validate
from ftransformer.shapes import Int, Key, Tensor

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one never leaves int64.
_M1, _M2, _GOLDEN = 0x7FEB352D, 0x5BD1E995, 0x1E3779B9


def key(seed: int) -> Key:
    """A key from an integer seed."""
    if not validate.is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.tensor(seed & 0x7FFFFFFFFFFFFFFF, dtype=torch.int64)


def _mix(x: Tensor) -> Tensor:
    """Avalanche 32-bit values (held in int64) into well-spread 32-bit values."""
    x = ((x ^ (x >> 16)) * _M1) & _MASK32
    x = ((x ^ (x >> 15)) * _M2) & _MASK32
    return x ^ (x >> 16)


def _seed32(k: Key) -> Tensor:
    # The offsets keep the all-zero key away from the hash's fixed point at 0.
    return _mix(_mix((k & _MASK32) ^ 0x2545F491) ^ ((k >> 32) & _MASK32) ^ 0x6A09E667)


def split(k: Key, n: int = 2) -> Int[Tensor, " _"]:
    """``n`` independent keys derived from ``k`` (a tensor of shape ``[n]``; index it for each key)."""
    counter = torch.arange(n, dtype=torch.int64, device=k.device)
    s = _seed32(k)
    hi = _mix(_mix(counter * 2 + 1) ^ s)
    lo = _mix(_mix(counter * 2 + 2) ^ (s * _GOLDEN & _MASK32))
    return (hi << 30) ^ lo


def fold_in(k: Key, data: int | Tensor) -> Key:
    """A new key from ``k`` and an integer (e.g. a step number; an int64 tensor works too, and under ``vmap``)."""
    s = _seed32(k)
    d = _mix(torch.as_tensor(data & _MASK32, dtype=torch.int64, device=k.device) ^ 0x5BF03635)
    return (_mix(s ^ d) << 30) ^ _mix((s + d * _GOLDEN) & _MASK32)


def uniform(k: Key, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform numbers in ``[0, 1)`` of the given shape."""
    numel = 1
    for size in shape:
        numel *= size
    s = _seed32(k)
    counter = torch.arange(numel, dtype=torch.int64, device=k.device)
    bits = _mix(_mix(counter ^ s) ^ ((s * _GOLDEN) & _MASK32) ^ 0x3C6EF372)
    return ((bits >> 8).to(dtype) * (1.0 / (1 << 24))).reshape(shape)


def normal(k: Key, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal numbers of the given shape (Box-Muller on two uniform streams of ``k``)."""
    k1, k2 = split(k, 2)
    # 1 - u lies in (0, 1], so the log is finite.
    radius = torch.sqrt(-2.0 * torch.log1p(-uniform(k1, shape, dtype=torch.float32)))
    return (radius * torch.cos((2.0 * torch.pi) * uniform(k2, shape, dtype=torch.float32))).to(dtype)


def dropout(x: Tensor, rate: float, k: Key | None) -> Tensor:
    """Inverted dropout of ``x`` at ``rate`` driven by key ``k``; the identity when ``k`` is None or rate is 0."""
    if k is None or rate == 0.0:
        return x
    keep = uniform(k, x.shape, dtype=x.dtype) >= rate
    return x * keep / (1.0 - rate)
