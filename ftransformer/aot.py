"""Ahead-of-time compilation of a decode step: the machinery behind ``generate(..., step="aot")``
(``decode_steps.decode_step_for("aot", params)`` hands it the loop's in-place step).

``torch.compile`` enters every compiled call through dynamo: a cache lookup per step, and a guard per
parameter leaf on the first step of a generation. Ahead-of-time compilation removes that layer:
``torch.export`` traces the decode step once into a graph, AOTInductor
(``torch._inductor.aoti_compile_and_package``) compiles the graph into a shared library, and each step
calls that library with the flattened params, token and cache. The cache buffers are written in place,
as in the eager loop; the step returns the logits and the new lengths.

The step attends with the written-out (``"einsum"``) attention whatever ``cfg.attn_impl`` says: for one
query over the cache, AOTInductor fuses the written-out form into its own kernels, while the fused SDPA
operator keeps a fixed cost per call. Measured on the ``seed`` preset, batch 1, 1 thread, in one process
(``bench generate --compile --aot``): AOTInductor with einsum 2.35 ms/token, with SDPA 2.68,
``torch.compile`` 3.07 (the floor: 1.59); the same tokens from all.

Shapes are static. A step is built per (config, params structure, shapes and strides, batch shape,
cache length, dtype, device), on the first decode step that needs it, which takes ~15-40 s on a 2-core
CPU. The cache length is rounded up to a multiple of ``CACHE_BUCKET`` slots (at most ``max_seq_len``;
the extra slots are masked), so generations of nearby lengths share a step. The last ``KEEP`` steps
built stay loaded for the rest of the process; params are inputs, not constants, so other params of the
same shapes reuse a step too. Float params only: the int8 product (``layers.int8``) is a
Python-registered operator, which a compiled library cannot call; ``step="compile"`` handles int8 trees.
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
from ftransformer.tree import flatten_with_paths
from ftransformer.quantization import is_quantized

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this, so nearby lengths share a step
KEEP = 8  # built steps kept loaded (least recently used dropped first)
_BUILT: collections.OrderedDict = collections.OrderedDict()  # (step, signature) -> the loaded library of that step
# A decode step as the generation loop calls it: (params, token, cache, cfg) -> (logits, cache).
Step = Callable[[dict, Tensor, KVCache, Config], tuple[Tensor, KVCache]]


class _ExportedStep(torch.nn.Module):
    """A decode step with the cache as plain tuples (what an exported program takes)."""

    def __init__(self, step: Step, cfg: Config):
        super().__init__()
        self.step, self.cfg = step, cfg

    def forward(self, params: dict, token: Tensor, k: tuple, v: tuple, lengths: Tensor):
        logits, cache = self.step(params, token, KVCache(k=k, v=v, lengths=lengths), self.cfg)
        return logits, cache.lengths


def _signature(params: dict, token: Tensor, cache: KVCache, cfg: Config) -> tuple:
    # strides too: a compiled library assumes the memory layout it was built for and does not check it
    leaves = tuple((path, tuple(x.shape), x.stride(), x.dtype) for path, x in flatten_with_paths(params).items())
    buffers = (tuple(cache.k[0].shape), cache.k[0].stride(), cache.k[0].dtype, len(cache.k))
    return cfg, leaves, tuple(token.shape), token.dtype, buffers, str(token.device)


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


def _build(step: Step, params: dict, token: Tensor, cache: KVCache, cfg: Config):
    module = _ExportedStep(step, cfg.replace(attn_impl="einsum"))
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="ft-aoti-") as tmp, \
            einops_backends_kept():
        # torch 2.13's own export code copies a LeafSpec, which it has deprecated: not ours to act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(module, (params, token, cache.k, cache.v, cache.lengths), strict=False)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "decode_step.pt2"))
        return torch._inductor.aoti_load_package(package)  # loaded, the package file is no longer needed


def cache_length(needed: int, cfg: Config) -> int:
    """The cache length an ahead-of-time step is built for: ``needed`` rounded up to a multiple of
    ``CACHE_BUCKET``, at most ``cfg.max_seq_len`` (and never below ``needed``)."""
    return max(needed, min(cfg.max_seq_len, math.ceil(needed / CACHE_BUCKET) * CACHE_BUCKET))


def check_params(params: dict) -> None:
    """Raise ``ValueError`` unless ``params`` is a float tree, the only kind a built step can run."""
    if is_quantized(params):
        raise ValueError('step="aot" takes float params; an int8 tree decodes with step="compile" or "eager"')


def _library(step: Step, params: dict, token: Tensor, cache: KVCache, cfg: Config):
    key = (step, _signature(params, token, cache, cfg))
    if key in _BUILT:
        _BUILT.move_to_end(key)
    else:
        _BUILT[key] = _build(step, params, token, cache, cfg)
        while len(_BUILT) > KEEP:
            _BUILT.popitem(last=False)
    return _BUILT[key]


def compile_ahead_of_time(step: Step, params: dict) -> Step:
    """``step`` compiled ahead of time (see the module), called as the generation loop calls its other
    decode steps. Its first call finds or builds the library for those shapes; ``step`` must write the
    cache's buffers in place (the library returns only the logits and the new lengths).

    Raises ``ValueError`` for an int8 params tree.
    """
    check_params(params)
    library = None

    def compiled(params: dict, token: Tensor, cache: KVCache, cfg: Config) -> tuple[Tensor, KVCache]:
        nonlocal library
        if library is None:  # the loop passes the same shapes every step
            library = _library(step, params, token, cache, cfg)
        logits, lengths = library(params, token, cache.k, cache.v, cache.lengths)
        return logits, cache._replace(lengths=lengths)

    return compiled


def built_steps() -> int:
    """How many built decode steps this process holds (one per distinct shape, at most ``KEEP``)."""
    return len(_BUILT)


def clear() -> None:
    """Drop every built step (the next generation builds afresh, as a benchmark of build time wants)."""
    _BUILT.clear()


__all__ = ["CACHE_BUCKET", "KEEP", "Step", "built_steps", "cache_length", "check_params", "clear", "compile_ahead_of_time"]
