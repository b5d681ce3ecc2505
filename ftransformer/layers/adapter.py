"""Low-rank adapters as weight leaves: ``LoRAWeight``, ``DoRAWeight`` and the products ``linear`` takes with them.

A ``LoRAWeight`` stands for ``base + scale * a @ b`` (``base`` ``[d_in, d_out]``, float, an ``Int8Weight`` or
an ``NF4Weight``; ``a`` ``[d_in, rank]``, ``b`` ``[rank, d_out]``), computed as ``x @ base + scale * (x @ a) @ b``
so the full-size sum is never formed. A ``DoRAWeight`` adds a magnitude ``m`` ``[d_out]``: the weight is
``m * V / ||V||`` with ``V = base + scale * a @ b`` and the norm taken per output column (over ``d_in``), detached
from the gradient as DoRA's paper and PEFT do. Both are NamedTuples, so parameter trees stay plain pytrees
(paths ``....w_qkv.a``, ``....w_qkv.b``). ``AdapterDropout`` wraps either for one call: dropout on the adapter's
input only (PEFT's ``lora_dropout``), driven by an explicit key (made by ``ftransformer.peft.dropout``).
"""

from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor

from ftransformer import random
from ftransformer.layers.int8 import Int8Weight, as_float
from ftransformer.layers.nf4 import NF4Weight


class LoRAWeight(NamedTuple):
    """``base + scale * a @ b``: a frozen ``[d_in, d_out]`` matrix plus a rank-``rank`` update."""

    base: Float[Tensor, "d_in d_out"] | Int8Weight | NF4Weight
    a: Float[Tensor, "d_in rank"]
    b: Float[Tensor, "rank d_out"]
    scale: Float[Tensor, ""]


class DoRAWeight(NamedTuple):
    """``m * V / ||V||`` (column norms, detached) with ``V = base + scale * a @ b``."""

    base: Float[Tensor, "d_in d_out"] | Int8Weight | NF4Weight
    a: Float[Tensor, "d_in rank"]
    b: Float[Tensor, "rank d_out"]
    scale: Float[Tensor, ""]
    m: Float[Tensor, " d_out"]


class AdapterDropout(NamedTuple):
    """An adapter leaf whose adapter input is dropped at ``rate`` with ``key`` (one forward's worth)."""

    weight: LoRAWeight | DoRAWeight
    rate: float
    key: Tensor


ADAPTERS = (LoRAWeight, DoRAWeight)
Adapted = LoRAWeight | DoRAWeight | AdapterDropout  # what ``linear`` takes as an adapted weight
ADAPTED = (LoRAWeight, DoRAWeight, AdapterDropout)  # the same, as the tuple ``isinstance`` checks on the hot path


def column_norm(w: LoRAWeight | DoRAWeight) -> Float[Tensor, " d_out"]:
    """``||base + scale * a @ b||`` per output column, detached (DoRA's weight norm)."""
    v = as_float(w.base, w.a.dtype).detach() + w.scale * (w.a.detach() @ w.b.detach())
    return v.norm(dim=0)


def adapter_output(
    x: Float[Tensor, "*batch d_in"],
    w: LoRAWeight | DoRAWeight | AdapterDropout,
    bias: Float[Tensor, " d_out"] | None,
    base_product,
) -> Float[Tensor, "*batch d_out"]:
    """``x`` times the adapted weight, plus ``bias``; ``base_product(x, base, bias)`` is the frozen affine map
    (the bias goes into the base's product, so at ``b = 0`` the output is the base layer's to the bit)."""
    dropped = x
    if isinstance(w, AdapterDropout):
        w, dropped = w.weight, random.dropout(x, w.rate, w.key)
    y = base_product(x, w.base, bias)
    update = w.scale * ((dropped @ w.a) @ w.b)
    if isinstance(w, LoRAWeight):
        return y + update
    # PEFT's DoRA forward: base(x) + (g - 1) * base(x_dropped) + g * update (the bias outside), g = m / ||V||.
    # Without dropout it is g * (x @ V) + bias; at b = 0, g is exactly 1 and the output is exactly the base's.
    g = w.m / column_norm(w)
    if dropped is not x:
        base_dropped = base_product(dropped, w.base, None)
    else:
        base_dropped = y if bias is None else y - bias
    return y + (g - 1) * base_dropped + g * update
