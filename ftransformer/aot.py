"""Ahead-of-time compilation of the decode step's block: the machinery behind ``generate(..., step="aot")``
(``decode_steps.decode_step_for("aot", params)`` runs the loop's in-place step with the block this builds).

``torch.compile`` enters every compiled call through dynamo: a cache lookup per call, and a guard per
parameter leaf on the first step of a generation. Ahead-of-time compilation removes that layer:
``torch.export`` traces one block (params, residual, mask, rotary tables, cache buffers) into a graph,
AOTInductor (``torch._inductor.aoti_compile_and_package``) compiles the graph into a shared library, and
every layer of every step calls that library with its own params and buffers: params are inputs, not
constants, so one build serves all layers of one shape, and the build time does not grow with depth.
The cache buffers are written in place, as in the eager loop; the library returns the new residual.
The embedding, masks and unembedding around the blocks run eagerly (a few dozen ops a token).

The block attends with the written-out (``"einsum"``) attention (``layers.attention_kernel``): for one
query over the cache, AOTInductor fuses the written-out form into its own kernels, while the fused SDPA
operator keeps a fixed cost per call.

Shapes are static. A block is built per (config, params structure, shapes and strides, batch shape,
cache length, dtype, device), on the first decode step that needs it. The cache length is rounded up to a
multiple of ``CACHE_BUCKET`` slots (at most ``max_seq_len``; the extra slots are masked), so generations of
nearby lengths share a build (``step="compile"`` buckets the same way). The last ``KEEP`` blocks built stay
loaded for the rest of the process. Float params only: the int8 product (``layers.int8``) is a
Python-registered operator, which a compiled library cannot call; ``step="compile"`` handles int8 trees.
An export leaves einops' backend cache as it found it (``einops_backends_kept``), so it never makes a
``torch.compile``'d step rebuild.
"""

import collections
import contextlib
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ftransformer.cache import KVCache
from ftransformer.config import Config
from ftransformer.layers.attention import attention_kernel
from ftransformer.layers.embedding import Rotary
from ftransformer.layers.masks import Mask
from ftransformer.tree import flatten_with_paths
from ftransformer.quantization import is_quantized

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this, so nearby lengths share a build
KEEP = 8  # built blocks kept loaded (least recently used dropped first)
_BUILT: collections.OrderedDict = collections.OrderedDict()  # (layer, signature) -> the loaded library of that block
# A decode step as the generation loop calls it: (params, token, cache, cfg) -> (logits, cache).
Step = Callable[[dict, Tensor, KVCache, Config], tuple[Tensor, KVCache]]
# A block as the decode step's in-place forward calls it (layers.block.block_with_cache's signature).
Layer = Callable[..., tuple[Tensor, Tensor, Tensor]]


class _ExportedLayer(torch.nn.Module):
    """One block whose program writes the cache buffers in place and returns the new residual only (what an
    exported program takes: tensors in, no input returned)."""

    def __init__(self, layer: Layer, cfg: Config, write, causal: bool):
        super().__init__()
        self.layer, self.cfg, self.write, self.causal = layer, cfg, write, causal

    def forward(self, params: dict, x: Tensor, allowed: Tensor, rotary, k: Tensor, v: Tensor, index: Tensor):
        mask, rotary = Mask(allowed, self.causal), None if rotary is None else Rotary(*rotary)
        return self.layer(params, x, self.cfg, mask=mask, rotary=rotary, k_cache=k, v_cache=v, write_index=index,
                          write=self.write)[0]


def _signature(cfg: Config, args: tuple) -> tuple:
    """What a built library depends on: the config and every input's path, shape, strides, dtype and device
    (strides too: a compiled library assumes the memory layout it was built for and does not check it)."""
    leaves = tuple((path, tuple(x.shape), x.stride(), x.dtype, str(x.device)) if isinstance(x, Tensor) else (path, x)
                   for path, x in flatten_with_paths(args).items())
    return cfg, leaves


@contextlib.contextmanager
def einops_backends_kept():
    """Leave einops' backend cache (tensor type -> backend) as it was found: ``torch.export`` adds its own tensor
    types to it, and ``torch.compile``'d code that traced through einops guards on that cache, so a compiled
    step built before or after an export would otherwise rebuild once more."""
    from einops import _backends

    kept = dict(_backends._type2backend)
    try:
        yield
    finally:
        _backends._type2backend.clear()
        _backends._type2backend.update(kept)


def _build(module: _ExportedLayer, args: tuple):
    with attention_kernel("einsum"), torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="ft-aoti-") as tmp, \
            einops_backends_kept():
        # torch 2.13's own export code copies a LeafSpec, which it has deprecated: not ours to act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(module, args, strict=False)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "decode_block.pt2"))
        return torch._inductor.aoti_load_package(package)  # loaded, the package file is no longer needed


def cache_length(needed: int, cfg: Config) -> int:
    """The cache length a compiled step (ahead of time or ``torch.compile``'d) is built for: ``needed`` rounded up
    to a multiple of ``CACHE_BUCKET``, at most ``cfg.max_seq_len`` (and never below ``needed``)."""
    return max(needed, min(cfg.max_seq_len, math.ceil(needed / CACHE_BUCKET) * CACHE_BUCKET))


def check_params(params: dict) -> None:
    """Raise ``ValueError`` unless ``params`` is a float tree, the only kind a built step can run."""
    if is_quantized(params):
        raise ValueError('step="aot" takes float params; an int8 tree decodes with step="compile" or "eager"')


def _library(layer: Layer, write, cfg: Config, causal: bool, args: tuple):
    key = (layer, write, causal, _signature(cfg, args))
    if key in _BUILT:
        _BUILT.move_to_end(key)
    else:
        _BUILT[key] = _build(_ExportedLayer(layer, cfg, write, causal), args)
        while len(_BUILT) > KEEP:
            _BUILT.popitem(last=False)
    return _BUILT[key]


def compile_ahead_of_time(layer: Layer, params: dict) -> Layer:
    """``layer`` (a block with ``block_with_cache``'s signature, writing the cache buffers in place) compiled ahead
    of time (see the module), for the generation over ``params`` that calls it: each block's first call finds
    or builds the library for its shapes, and the later steps reuse it.

    Raises ``ValueError`` for an int8 params tree.
    """
    check_params(params)
    found: dict[tuple, object] = {}  # (id(a block's params), shapes) -> its library; params live while the loop runs

    def compiled(params: dict, x: Tensor, cfg: Config, *, mask: Mask, rotary, k_cache: Tensor, v_cache: Tensor,
                 write_index: Tensor, write) -> tuple[Tensor, Tensor, Tensor]:
        # as plain tuples: a program's input spec cannot name the library's own NamedTuple types
        args = (params, x, mask.allowed, None if rotary is None else tuple(rotary), k_cache, v_cache, write_index)
        key = (id(params), x.shape, k_cache.shape)
        library = found.get(key)
        if library is None:  # the loop passes the same shapes every step
            library = found[key] = _library(layer, write, cfg, mask.causal, args)
        return library(*args), k_cache, v_cache

    return compiled


def built_steps() -> int:
    """How many built blocks this process holds (one per distinct shape, at most ``KEEP``)."""
    return len(_BUILT)


def clear() -> None:
    """Drop every built block (the next generation builds afresh, as a benchmark of build time wants)."""
    _BUILT.clear()


__all__ = ["CACHE_BUCKET", "KEEP", "Layer", "Step", "built_steps", "cache_length", "check_params", "clear", "compile_ahead_of_time"]
