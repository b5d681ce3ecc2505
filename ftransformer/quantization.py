"""Weight-only int8 quantization as a pytree transform: ``quantize(params, cfg, "int8")`` -> params.

Every projection matrix (``w_qkv``, ``w_o``, ``w_in``, ``w_gate``, ``w_out`` of each block, and an
untied ``unembed.w``) becomes an ``Int8Weight``: int8 values and one float scale per output channel
(column), symmetric, ``scale = max|column| / 127``, so each entry is off by at most ``scale / 2``.
Embeddings, norms and biases stay in float (they are small, or -- the token table -- read one row per
token). Activations stay in float: only the bytes each decoding step reads shrink, 4x for the matrices.

The result is an ordinary params tree: ``forward``, ``generate`` (compiled or not), the KV-cache,
speculative decoding and checkpoints take it as they take float params (``layers.linear`` understands
the leaf). Training takes float params: quantize a trained model.
"""

from torch import Tensor

from ftransformer import tree
from ftransformer.config import Config
from ftransformer.layers.int8 import Int8Weight, as_float, fbgemm_available, quantize_matrix

SCHEMES = ("int8",)
MATRICES = ("w_qkv", "w_o", "w_in", "w_gate", "w_out")  # the projections of a block (attention and MLP)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def quantize(params: dict, cfg: Config, scheme: str = "int8") -> dict:
    """A new params tree with every projection matrix in ``scheme`` (``"int8"``); ``params`` is untouched.

    Raises ``ValueError`` for an unknown scheme, a tree that is quantized already, or a matrix whose
    shape does not fit ``cfg``.
    """
    _check_scheme(scheme)
    fbgemm_available()  # probe the fast int8 product now, eagerly, not first inside a compiled step
    if is_quantized(params):
        raise ValueError("params are quantized already (dequantize them first to quantize again)")
    blocks = []
    for i, block in enumerate(params["blocks"]):
        new = dict(block)
        for part in ("attn", "mlp"):
            if part in block:
                new[part] = {k: quantize_matrix(_checked(v, cfg, f"blocks.{i}.{part}.{k}")) if k in MATRICES else v
                             for k, v in block[part].items()}
        blocks.append(new)
    out = {**params, "blocks": blocks}
    if "unembed" in params:
        out["unembed"] = {**params["unembed"], "w": quantize_matrix(_checked(params["unembed"]["w"], cfg, "unembed.w"))}
    return out


def _checked(w, cfg: Config, path: str) -> Tensor:
    if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"{path}: expected a float matrix to quantize, got {_describe(w)}")
    if cfg.d_model not in w.shape:
        raise ValueError(f"{path}: shape {tuple(w.shape)} does not fit the config (neither side is d_model={cfg.d_model})")
    return w


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _is_int8(x) -> bool:
    return isinstance(x, Int8Weight)


def dequantize(params: dict) -> dict:
    """The float params a quantized tree stands for (float trees come back unchanged)."""
    return tree.map(lambda x: as_float(x) if _is_int8(x) else x, params, is_leaf=_is_int8)


def is_quantized(params) -> bool:
    """Whether any leaf of ``params`` is an ``Int8Weight``."""
    return any(_is_int8(x) for x in tree.leaves(params, is_leaf=_is_int8))


def weight_bytes(params) -> int:
    """Bytes of every tensor in ``params`` (int8 matrices count one byte an entry)."""
    return sum(x.numel() * x.element_size() for x in tree.leaves(params) if isinstance(x, Tensor))
