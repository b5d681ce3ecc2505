"""int8 weights: the leaf type ``Int8Weight`` and the products that read it.

An ``Int8Weight`` stands for a ``[d_in, d_out]`` float matrix ``w ~= q * scale``: int8 values and one
float scale per output column (made by ``ftransformer.quantization``). Two ways to multiply by it:

* **reference** -- ``(x @ q.float()) * scale``: exactly the weight-only product (the only rounding is the
  weights'), on any device, under ``grad`` and ``vmap``. It converts the matrix on every call, so it is
  no faster than float.
* **fbgemm** -- PyTorch's int8 CPU GEMM (``torch.ops.quantized.linear_dynamic``): the activations are
  quantized to 8 bits on the fly (one scale for the whole input) and the product runs on int8 dot-product
  instructions, reading a quarter of the float bytes. Used for inputs of at most ``FAST_ROWS`` rows
  (decoding: the step whose time the weights' bytes set), on CPU float32, outside ``grad``/``vmap``.
  Its extra rounding (the activations') is measured by ``ftransformer bench generate --int8``.

Which product runs is probed once per process (``product()``): fbgemm with 8-bit activations
(``reduce_range=False``) where it gets the reference's answer; else with 7-bit activations
(``reduce_range=True``, what PyTorch's own dynamic quantization uses on x86): on CPUs without VNNI the
8-bit product's int16 accumulation saturates, the 7-bit one's does not; else the reference.

The fbgemm path is a ``torch.library`` operator (registered on first use), so a compiled decode step calls it
as one opaque node.
It needs the weight in fbgemm's packed layout, made once per ``Int8Weight`` and kept while ``q`` lives.
"""

import warnings
import weakref
from typing import NamedTuple

import torch
from jaxtyping import Float, Int8
from torch import Tensor

from ftransformer.layers.nf4 import NF4Weight, dequantize_nf4
from ftransformer.tracing import compiling, functorch_wrapped

FAST_ROWS = 16  # inputs with at most this many rows (decode steps) take the fbgemm product


class Int8Weight(NamedTuple):
    """A ``[d_in, d_out]`` matrix stored as int8 with per-output-channel scales: ``w ~= q * scale``.

    A NamedTuple, so it is a pytree node: ``tree.map``, ``tree.to``, ``torch.compile`` and checkpoints
    see its two tensors as leaves (paths ``....w_qkv.q`` and ``....w_qkv.scale``).
    """

    q: Int8[Tensor, "d_in d_out"]
    scale: Float[Tensor, " d_out"]
    PATHS_BY_FIELD = True  # checkpoint paths name the fields (".q", ".scale"), not tuple indices

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> Float[Tensor, "d_in d_out"]:
        """The float matrix this stands for."""
        return self.q.to(self.scale.dtype) * self.scale


def as_float(
    w: Float[Tensor, "d_in d_out"] | Int8Weight | NF4Weight, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "d_in d_out"]:
    """``w`` as a float matrix (an ``Int8Weight`` dequantized, an ``NF4Weight`` dequantized in ``dtype``; a
    float matrix as it is)."""
    if isinstance(w, NF4Weight):
        return dequantize_nf4(w, dtype)
    return w.dequantize() if isinstance(w, Int8Weight) else w


def quantize_matrix(w: Float[Tensor, "d_in d_out"]) -> Int8Weight:
    """Symmetric int8 with a scale per output column: ``|w - q * scale| <= scale / 2`` elementwise."""
    with torch.no_grad():
        scale = w.abs().amax(dim=0).clamp_min(torch.finfo(w.dtype).tiny) / 127.0
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q=q, scale=scale)


def reference_matmul(x: Float[Tensor, "*batch d_in"], w: Int8Weight) -> Float[Tensor, "*batch d_out"]:
    """``x @ (q * scale)`` as ``(x @ q) * scale``: the scale touches the outputs, not the matrix."""
    return (x @ w.q.to(x.dtype)) * w.scale


# ---------------------------------------------------------------- the fbgemm product

def memo_by_tensor(cache: dict, t: Tensor, make):
    """``make()``, computed once per tensor ``t`` (while ``t`` lives and is not modified in place) and kept in
    ``cache``: for data derived from weights, such as a packed layout, made on first use."""
    key = id(t)
    hit = cache.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = make()
    if hit is None or hit[0]() is not t:
        weakref.finalize(t, cache.pop, key, None)
    cache[key] = (weakref.ref(t), t._version, value)
    return value


_PACKED: dict[int, tuple] = {}  # id(q) -> (weakref to q, q._version, fbgemm's packed weight)


def _pack(q: Tensor, scale: Tensor):
    """fbgemm's packed form of ``q * scale``."""
    with warnings.catch_warnings():  # fbgemm takes its weight as a quantized tensor, a dtype torch deprecates
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qt = torch._make_per_channel_quantized_tensor(
            q.t().contiguous(), scale.double(), torch.zeros(q.shape[1], dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(qt, None)


def packed_count() -> int:
    """How many int8 matrices hold a packed copy now (tests check that decoding packs each once)."""
    return len(_PACKED)


FBGEMM, FBGEMM_REDUCED, REFERENCE = "fbgemm reduce_range=False", "fbgemm reduce_range=True", "reference"
PRODUCTS = (FBGEMM, FBGEMM_REDUCED, REFERENCE)  # what product() may answer, in the order the probe tries them
_CHOSEN: list[str] = []  # filled by the first product() call: one of PRODUCTS


def _fbgemm_product(rows: Tensor, packed, reduce_range: bool) -> Tensor:
    """fbgemm's dynamic int8 product of ``rows`` ``[n, d_in]`` with a packed weight (the probe's subject)."""
    return torch.ops.quantized.linear_dynamic(rows, packed, reduce_range)


def _fbgemm_matmul(x: Tensor, q: Tensor, scale: Tensor, reduce_range: bool | None = None) -> Tensor:
    if reduce_range is None:  # the range the probe chose
        reduce_range = _CHOSEN == [FBGEMM_REDUCED]
    rows = x.reshape(-1, x.shape[-1])
    y = _fbgemm_product(rows, memo_by_tensor(_PACKED, q, lambda: _pack(q, scale)), reduce_range)
    return y.reshape(*x.shape[:-1], q.shape[1])


# What a compiled step calls: the same product as one opaque operator, ``torch.ops.ftransformer.int8_matmul``
# (eager calls the function itself). Registered through ``torch.library.Library`` rather than
# ``torch.library.custom_op``, whose Python wrappers cost ~4x more per call than the dispatcher alone.
# Registered on first use (``fbgemm_available``, which runs eagerly before any compiled step takes the
# fast path), not at import: importing ftransformer changes no global operator table.
_LIBRARY: list[torch.library.Library] = []  # the one registration, once made


def _fake_int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[1])


def register_op() -> None:
    """Register ``torch.ops.ftransformer.int8_matmul`` (CPU kernel and shape function); later calls do nothing."""
    if _LIBRARY:
        return
    lib = torch.library.Library("ftransformer", "DEF")
    lib.define("int8_matmul(Tensor x, Tensor q, Tensor scale) -> Tensor")
    lib.impl("int8_matmul", _fbgemm_matmul, "CPU")
    torch.library.register_fake("ftransformer::int8_matmul", _fake_int8_matmul, lib=lib)
    _LIBRARY.append(lib)


def op_registered() -> bool:
    """Whether ``register_op`` has run in this process."""
    return bool(_LIBRARY)


def _probe(reduce_range: bool) -> bool:
    """Whether this PyTorch build runs the fbgemm product with ``reduce_range`` and gets the reference's answer."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = quantize_matrix(torch.randn(64, 32, generator=gen))
        x = torch.randn(2, 64, generator=gen)
        ref = reference_matmul(x, w)
        got = _fbgemm_matmul(x, w.q, w.scale, reduce_range)
        return bool(torch.allclose(got, ref, atol=0.05 * float(ref.abs().max())))
    except (RuntimeError, NotImplementedError, AttributeError):  # a build without fbgemm/quantized ops
        return False
    finally:
        _PACKED.clear()


def choose_product() -> str:
    """Probe the fbgemm product with 8-bit, then 7-bit activations: the first that passes, else the reference."""
    for name, reduce_range in ((FBGEMM, False), (FBGEMM_REDUCED, True)):
        if _probe(reduce_range):
            return name
    return REFERENCE


def product() -> str:
    """The product a decode step's int8 matmul runs here, one of ``PRODUCTS`` (probed once per process)."""
    if not _CHOSEN:
        _CHOSEN.append(choose_product())
        if _CHOSEN[0] != REFERENCE:
            register_op()
    return _CHOSEN[0]


def fbgemm_available() -> bool:
    """Whether an fbgemm int8 product works here (``product()`` is not the reference)."""
    return product() != REFERENCE


def _takes_fast_path(x: Tensor) -> bool:
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad):
        return False
    if x.numel() // x.shape[-1] > FAST_ROWS:
        return False
    if compiling():  # traced: the probe ran eagerly (quantize calls it), read its answer
        return bool(_CHOSEN) and _CHOSEN[0] != REFERENCE and op_registered()
    return not functorch_wrapped(x) and fbgemm_available()


def int8_matmul(x: Float[Tensor, "*batch d_in"], w: Int8Weight) -> Float[Tensor, "*batch d_out"]:
    """``x @ (q * scale)``: fbgemm's int8 GEMM for few rows on CPU (see the module note), else the reference."""
    if _takes_fast_path(x):
        op = torch.ops.ftransformer.int8_matmul if compiling() else _fbgemm_matmul
        return op(x, w.q, w.scale)
    return reference_matmul(x, w)
