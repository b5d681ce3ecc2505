"""The one leaf op every projection uses: ``x @ w + b`` with ``w`` stored ``[d_in, d_out]``.

``w`` is a float matrix, or an ``Int8Weight`` (``ftransformer.layers.int8``, made by
``ftransformer.quantization``): int8 values with one float scale per output column, ``w ~= q * scale``;
an ``NF4Weight`` (``ftransformer.layers.nf4``: 4-bit NormalFloat, dequantized in ``x``'s dtype);
or a low-rank adapter over any of them (``ftransformer.layers.adapter``, made by ``ftransformer.peft``).
"""

import torch
import torch.nn.functional as F

from ftransformer.layers.adapter import ADAPTED, Adapted, adapter_output
from ftransformer.layers.int8 import Int8Weight, int8_matmul
from ftransformer.layers.nf4 import NF4Weight, nf4_matmul
from ftransformer.layers.probe import Probe
from ftransformer.shapes import Float, Tensor


def linear(
    x: Float[Tensor, "*batch d_in"],
    w: Float[Tensor, "d_in d_out"] | Int8Weight | NF4Weight | Adapted | Probe,
    b: Float[Tensor, " d_out"] | None = None,
) -> Float[Tensor, "*batch d_out"]:
    """Affine map. ``w`` is ``[d_in, d_out]`` (the order of ``x @ w``, as GPT-2's Conv1D): float, int8, NF4, adapted."""
    if isinstance(w, Probe):  # influence functions read the input and the output gradient (layers/probe.py)
        return w.tap(x, linear(x, w.weight, b))
    if isinstance(w, ADAPTED):
        return adapter_output(x, w, b, linear)
    if isinstance(w, Int8Weight):
        y = int8_matmul(x, w)
        return y if b is None else y + b
    if isinstance(w, NF4Weight):
        return nf4_matmul(x, w, b)
    # F.linear wants [d_out, d_in]; the transpose is a free view and one fused addmm does the rest.
    return F.linear(x, w.t(), b)


def init_normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> Tensor:
    """N(0, std) values of ``shape`` drawn from ``gen`` (a weight or a table); empty on the meta device."""
    if torch.get_default_device().type == "meta":
        # Shapes only (checkpoint and Hugging Face loaders): drawing on meta would import torch._dynamo (~3 s).
        return torch.empty(shape)
    # Scaled in place: no second full-size temporary, which GPT-2-sized tables would feel.
    return torch.randn(shape, generator=gen).mul_(std)
