"""4-bit NormalFloat weights (QLoRA's NF4): the leaf type ``NF4Weight``, ``quantize_nf4`` and ``dequantize_nf4``.

NF4 (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, Appendix E)
stores each weight as a 4-bit index into ``NF4_CODE``, 16 quantiles of a standard normal scaled to [-1, 1],
times its block's absolute maximum (blocks of 64 weights). The absmax values are themselves quantized
("double quantization", section 3 of the paper) the way bitsandbytes does it: their mean is subtracted and
the rest stored as 8-bit codes of bitsandbytes' dynamic map, with one float32 scale per 256 blocks.

Layout, chosen so the codes equal bitsandbytes' ``quantize_4bit(w.T, quant_type="nf4", blocksize=64)`` for
the same matrix (``w.T`` is ``torch.nn.Linear``'s ``[d_out, d_in]``, what ``bnb.nn.Linear4bit`` quantizes):
the ``[d_in, d_out]`` matrix is quantized as its transpose laid flat row by row, two codes a byte, the first
in the high nibble. Dequantizing is plain tensor ops (a table lookup and products), so ``grad``, ``vmap`` and
``torch.compile`` go through it; ``linear`` dequantizes in the input's dtype (bf16 under a bf16 precision
policy, float32 on CPU by default) and multiplies.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Float32, UInt8
from torch import Tensor

# The published NF4 code book (QLoRA, Appendix E; bitsandbytes' get_4bit_type("nf4")), float32 values.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK = 64  # weights per absmax (QLoRA's and bitsandbytes' default)
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes allows
SUPERBLOCK = 256  # absmax values per float32 scale in the double quantization


def dynamic_map() -> Float32[Tensor, " code"]:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``): 256 sorted values in [-1, 1]."""
    data = []
    for i in range(7):  # max_exponent_bits = 7 of 8 bits, one of them the sign
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # float32 products, as bitsandbytes rounds them
        data += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0] + [0.0] * (256 - len(data) - 2)
    return torch.tensor(sorted(data), dtype=torch.float32)


NF4_TABLE = torch.tensor(NF4_CODE, dtype=torch.float32)
DYNAMIC_TABLE = dynamic_map()


class NF4Weight(NamedTuple):
    """A ``[d_in, d_out]`` matrix in NF4: packed 4-bit codes of its transpose, double-quantized block absmax.

    A NamedTuple, so a pytree node: its four tensors are leaves at ``....codes``, ``....absmax``,
    ``....absmax_scale`` and ``....absmax_offset``.
    """

    codes: UInt8[Tensor, "d_out cols"]  # two 4-bit codes a byte of the [d_out, d_in] transpose, high nibble first
    absmax: UInt8[Tensor, " blocks"]  # each block's absmax minus the offset, as a dynamic-map code
    absmax_scale: Float32[Tensor, " superblocks"]  # one float32 scale per 256 blocks
    absmax_offset: Float32[Tensor, ""]  # the mean absmax, subtracted before quantizing them
    PATHS_BY_FIELD = True  # checkpoint paths name the fields, not tuple indices

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[-1] * 2, self.codes.shape[-2]))

    def dequantize(self, dtype: torch.dtype) -> Float[Tensor, "d_in d_out"]:
        """The float matrix this stands for, in ``dtype``."""
        return dequantize_nf4(self, dtype)


def _blockwise(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], as bitsandbytes computes them (float32)."""
    n = flat.numel()
    full = n - n % block
    blocks = rearrange(flat[:full], "(blocks block) -> blocks block", block=block)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:  # a last, shorter block (bitsandbytes divides there instead of multiplying by the reciprocal)
        tail = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    return absmax, scaled


def _nearest(scaled: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest value of the sorted ``table`` (ties to the lower one, as bitsandbytes' bucketize)."""
    return torch.bucketize(scaled, (table[:-1] + table[1:]) / 2)


def _check_matrix(w, block: int) -> None:
    if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point():
        got = f"a {w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise TypeError(f"quantize_nf4 expects a float [d_in, d_out] matrix, got {got}")
    if w.shape[0] % 2:
        raise ValueError(f"quantize_nf4 packs two codes a byte along d_in: expected an even d_in, "
                         f"got d_in={w.shape[0]}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def quantize_nf4(w: Tensor, block: int = BLOCK) -> NF4Weight:
    """``w`` (a float ``[d_in, d_out]`` matrix) in NF4, ``block`` weights a block, absmax double-quantized."""
    _check_matrix(w, block)
    with torch.no_grad():
        flat = rearrange(w, "d_in d_out -> (d_out d_in)").float()
        absmax, scaled = _blockwise(flat, block)
        codes = rearrange(_nearest(scaled, NF4_TABLE.to(w.device)).to(torch.uint8), "(cols pair) -> cols pair", pair=2)
        packed = rearrange((codes[:, 0] << 4) | codes[:, 1], "(d_out cols) -> d_out cols", d_out=w.shape[1])
        offset = absmax.mean()
        absmax_scale, scaled_absmax = _blockwise(absmax - offset, SUPERBLOCK)
        absmax_codes = _nearest(scaled_absmax, DYNAMIC_TABLE.to(w.device)).to(torch.uint8)
    return NF4Weight(packed, absmax_codes, absmax_scale, offset)


def block_absmax(q: NF4Weight) -> Float32[Tensor, " blocks"]:
    """Each block's absmax as the double quantization stores it (float32, as bitsandbytes dequantizes it)."""
    n = q.absmax.shape[-1]
    per_block = torch.repeat_interleave(q.absmax_scale, SUPERBLOCK)[:n]
    return DYNAMIC_TABLE.to(q.absmax.device)[q.absmax.long()] * per_block + q.absmax_offset


def block_size(q: NF4Weight) -> int:
    """The block size ``q`` was quantized with (the one of ``BLOCKS`` that gives its number of blocks)."""
    n, blocks = q.codes.numel() * 2, q.absmax.shape[-1]
    for block in BLOCKS:
        if -(n // -block) == blocks:
            return block
    raise ValueError(f"an NF4Weight of {n} weights cannot have {blocks} blocks of any size in {BLOCKS}")


def dequantize_rows(q: NF4Weight, dtype: torch.dtype) -> Float[Tensor, "d_out d_in"]:
    """The matrix's transpose ``[d_out, d_in]`` (the layout ``F.linear`` takes), in ``dtype``.

    The products are exact in float64 and rounded once (float32, then ``dtype``) otherwise, like bitsandbytes'."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    nibbles = torch.stack([q.codes >> 4, q.codes & 15], dim=-1)
    values = NF4_TABLE.to(q.codes.device, work)[rearrange(nibbles, "d_out cols pair -> (d_out cols pair)").long()]
    n, block = values.shape[0], block_size(q)
    padded = F.pad(values, (0, -n % block))
    scaled = rearrange(padded, "(blocks block) -> blocks block", block=block) * block_absmax(q).to(work)[:, None]
    return rearrange(scaled.reshape(-1)[:n], "(d_out d_in) -> d_out d_in", d_out=q.codes.shape[-2]).to(dtype)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype) -> Float[Tensor, "d_in d_out"]:
    """The ``[d_in, d_out]`` float matrix ``q`` stands for, in ``dtype`` (a transposed view)."""
    return rearrange(dequantize_rows(q, dtype), "d_out d_in -> d_in d_out")


class _FrozenNF4Product(torch.autograd.Function):
    """``x @ w`` for a frozen NF4 ``w`` that keeps only the packed codes for backward, not the float matrix.

    Plain ops would save the dequantized ``[d_out, d_in]`` matrix of every layer until backward (``dx`` needs
    it), so a QLoRA step would hold as much as a float base. This recomputes it in ``backward`` and ``jvp``
    instead. ``setup_context`` + ``generate_vmap_rule`` make it compose with ``grad``, ``vmap``, ``jvp`` and
    ``torch.compile``; ``backward`` is made of differentiable ops, so second derivatives in ``x`` work too.
    The codes and scales get no gradient (the base is frozen by construction: they are integers or fixed).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, codes, absmax, absmax_scale, absmax_offset):
        return F.linear(x, dequantize_rows(NF4Weight(codes, absmax, absmax_scale, absmax_offset), x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *stored = inputs
        ctx.dtype = x.dtype
        ctx.save_for_backward(*stored)
        ctx.save_for_forward(*stored)

    @staticmethod
    def backward(ctx, grad):
        rows = dequantize_rows(NF4Weight(*ctx.saved_tensors), ctx.dtype)
        return grad @ rows, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        return F.linear(x_tangent, dequantize_rows(NF4Weight(*ctx.saved_tensors), ctx.dtype))


def nf4_matmul(
    x: Float[Tensor, "*batch d_in"], w: NF4Weight, b: Float[Tensor, " d_out"] | None
) -> Float[Tensor, "*batch d_out"]:
    """``x @ w + b`` with ``w`` dequantized in ``x``'s dtype (recomputed in backward, not kept: see above)."""
    if not torch.is_grad_enabled():
        return F.linear(x, dequantize_rows(w, x.dtype), b)
    y = _FrozenNF4Product.apply(x, *w)
    return y if b is None else y + b


def nbytes(q: NF4Weight) -> int:
    """Bytes of the four tensors that store ``q``."""
    return sum(t.numel() * t.element_size() for t in q)
