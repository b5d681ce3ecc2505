"""The decode steps: one new token per row through the model, against the KV-cache.

``decode_step`` is the public one: checked, pure (it returns a new cache and leaves its argument be).

The generation loops run a ``Stepper``: the step as a value, chosen in one place, ``decode_step_for(kind,
params)``. Every kind runs the same in-place step (the loop owns its cache, so the step writes the buffers in
place and skips the per-step checks), and gives the same tokens:

* ``"eager"``: that step as it is;
* ``"compile"``: on CPU, the step with its block compiled by ``torch.compile`` once for every layer (params are
  arguments, so one graph serves all layers of one shape: the build does not grow with depth); on CUDA params
  the whole step, captured as a CUDA graph (``mode="reduce-overhead"``) and replayed once per token;
* ``"aot"``: the step with its block compiled ahead of time by AOTInductor, one library for every layer
  (``ftransformer.aot``; float params only).

Compiled steps are built for static shapes, so both compiled kinds round the cache length up to a bucket
(``aot.cache_length``): a new prompt or ``max_new_tokens`` within the bucket reuses the built step.

``untie_for_decoding`` gives the loop a copy of the model whose unembedding decodes faster.
"""

import contextlib
import functools
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import aot, tree
from ftransformer.cache import KVCache
from ftransformer.config import Config
from ftransformer.layers.block import block_with_cache
from ftransformer.layers.int8 import memo_by_tensor
from ftransformer.layers.tap import NO_TAP, Tap, WithTensors
from ftransformer.model import forward_with_cache, forward_with_cache_in_place
from ftransformer.quantization import is_quantized, quantize_matrix

_INT8_UNEMBED: dict = {}  # embedding table -> its int8 [d_model, vocab] copy (see untie_for_decoding)
STEP_KINDS = ("eager", "compile", "aot")  # the decode steps a generation loop can run (decode_step_for)
_COMPILE_MODES = (None, "reduce-overhead")  # torch.compile modes of the decode step: default, CUDA graphs


def decode_step(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """One new token per row through the model; returns its next-token logits and the new cache."""
    logits, cache = forward_with_cache(params, token[..., None], cache, cfg)
    return logits[..., 0, :], cache


def _in_place_step(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config, *, tap: Tap = NO_TAP
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """``decode_step`` for a loop that owns its cache: it writes the buffers in place (the ``"eager"`` step).

    The loop checked the prompt and the room in the cache once, and samples ids in range by
    construction, so the per-step checks (ops and host syncs on every token) are skipped too.
    Copying the buffers every step costs more than the rest of the step's non-matmul work together.
    ``tap`` applies interventions (``tapped_step``).
    """
    logits, cache = forward_with_cache_in_place(params, token[..., None], cache, cfg, tap=tap)
    return logits[..., 0, :], cache


@functools.cache
def _compiled_step(mode: str | None = None):
    """``_in_place_step`` compiled by ``torch.compile`` with static shapes: every step reuses one graph.

    Built on first use (no compile work at import). Run it with jaxtyping checking off: a checked
    function graph-breaks. ``mode="reduce-overhead"`` is for ``_cuda_graph_step``.

    Inductor's C++ wrapper calls the step's ~50 kernels and products from C++ instead of generated
    Python: measured on the seed preset, 2.35 against 2.69 ms a step (1 thread), the same logits to the
    bit, for ~10 s more compile time once (the compiled code is cached on disk).
    """
    if mode not in _COMPILE_MODES:
        raise ValueError(f"mode must be one of {_COMPILE_MODES}, got {mode!r}")
    if mode is not None:
        return torch.compile(_in_place_step, fullgraph=True, dynamic=False, mode=mode)
    return torch.compile(_in_place_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def _block_residual(params: dict, x: Tensor, cfg: Config, **cache_args) -> Tensor:
    """``block_with_cache``'s new residual alone (it writes the buffers in place): what ``_compiled_block``
    compiles, so that the compiled code returns no alias of its inputs (which costs a view rebuilt per call)."""
    return block_with_cache(params, x, cfg, **cache_args)[0]


@functools.cache
def _compiled_block():
    """``_block_residual`` under ``torch.compile`` with static shapes, built on first use: one graph per block
    shape (params, batch, cache length), shared by every layer of that shape.

    Compiling one block instead of the whole step keeps the build time independent of depth (the whole
    30-layer step of SmolLM2-135M takes minutes to compile); the embedding, masks and unembedding around
    the blocks run eagerly, a few dozen ops a token.
    """
    return torch.compile(_block_residual, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def _compiled_layer(params: dict, x: Tensor, cfg: Config, *, k_cache: Tensor, v_cache: Tensor, **rest
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``block_with_cache`` through ``_compiled_block``: the buffers it was given, written in place."""
    return _compiled_block()(params, x, cfg, k_cache=k_cache, v_cache=v_cache, **rest), k_cache, v_cache


def _blockwise(layer: aot.Layer) -> aot.Step:
    """``_in_place_step`` whose blocks run ``layer`` (a compiled ``block_with_cache``; given ``tap=`` where active)."""

    def step(params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config, *, tap: Tap = NO_TAP
             ) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
        logits, cache = forward_with_cache_in_place(params, token[..., None], cache, cfg, layer=layer, tap=tap)
        return logits[..., 0, :], cache

    return step


@functools.cache
def _blockwise_step() -> aot.Step:
    """The ``"compile"`` step on CPU: ``_in_place_step`` whose blocks run ``_compiled_block``."""
    return _blockwise(_compiled_layer)


_STATIC_PARAMS: list = [None]  # id() of the params tree whose leaves were marked static last


def _mark_static(leaves: list) -> None:
    """Mark tensors whose storage lives across steps as static for CUDA graphs (no recompile guard: a new
    address, e.g. the next generation's cache, makes the graph re-record once)."""
    for x in leaves:
        torch._dynamo.mark_static_address(x)


def _cuda_graph_step(params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
                    ) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """``_compiled_step("reduce-overhead")`` with the params and cache marked static: one CUDA graph replay a
    token instead of a few hundred kernel launches (``"compile"`` on CUDA params).

    The logits live in the graph's memory until the next replay: sample from them before the next step.
    A new cache (each generation allocates one) re-records the graph once; the compiled code is reused.
    """
    if _STATIC_PARAMS[0] != id(params):  # once per params tree (a generation's untied copy is a new one)
        _mark_static(tree.leaves(params))
        _STATIC_PARAMS[0] = id(params)
    if not hasattr(cache.k[0], "_dynamo_static_input_type"):  # the buffers are allocated together
        _mark_static([*cache.k, *cache.v])
    return _compiled_step("reduce-overhead")(params, token, cache, cfg)


class Stepper(NamedTuple):
    """A generation loop's decode step as a value (built by ``decode_step_for``): ``step(params, token, cache,
    cfg) -> (logits, cache)`` writes the cache's buffers in place."""

    kind: str  # one of STEP_KINDS
    step: aot.Step

    def cache_length(self, needed: int, cfg: Config) -> int:
        """The cache length to allocate for ``needed`` slots: rounded up for the compiled kinds, so that nearby
        lengths share one built step (``aot.cache_length``)."""
        return needed if self.kind == "eager" else aot.cache_length(needed, cfg)

    def guards(self, i: int):
        """Dynamo's guards in full, or (``"compile"`` after step 0) only those that tell compiled graphs apart.

        The first compiled step of a generation checks every guard (and compiles or picks the graph); the
        later steps pass the same params, cfg and same-shaped token and cache, so re-checking a guard per
        parameter leaf every token would only add overhead (~0.1-0.25 ms a token for the seed preset).
        """
        if self.kind != "compile" or i == 0:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def decode_step_for(kind: str | Stepper, params: dict) -> Stepper:
    """The one place a generation loop's decode step is chosen: ``kind`` is one of ``STEP_KINDS`` (see the
    module), or a ``Stepper`` already built (``whole_graph_step``). Raises ``ValueError`` for another kind,
    or for ``"aot"`` with an int8 ``params`` tree."""
    if isinstance(kind, Stepper):
        return kind
    if kind not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {kind!r}")
    if kind == "aot":
        return Stepper(kind, _blockwise(aot.compile_ahead_of_time(block_with_cache, params)))
    if kind == "eager":
        return Stepper(kind, _in_place_step)
    on_cuda = params["embed"]["tokens"].device.type == "cuda"
    return Stepper(kind, _cuda_graph_step if on_cuda else _blockwise_step())


def _tapped_block_residual(params: dict, x: Tensor, cfg: Config, names: tuple[str, ...], fns: tuple,
                           tensors: tuple[tuple[Tensor, ...], ...], **cache_args) -> Tensor:
    """``_block_residual`` under the interventions ``WithTensors(fns[i], tensors[i])`` at the block's ``names[i]``:
    what ``_compiled_tapped_block`` compiles, the tensors its arguments (no constants baked into the graph)."""
    tap = Tap({n: WithTensors(f, t) for n, f, t in zip(names, fns, tensors)}, record=False)
    return block_with_cache(params, x, cfg, tap=tap, **cache_args)[0]


@functools.cache
def _compiled_tapped_block():
    """``_tapped_block_residual`` under ``torch.compile`` (static shapes), built on first use: one graph per block
    shape and set of intervention functions, whatever the values of their tensors."""
    return torch.compile(_tapped_block_residual, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def _block_interventions(tap: Tap) -> tuple[tuple[str, ...], tuple, tuple]:
    """The names (inside the block), functions and tensors of the ``WithTensors`` interventions ``tap`` (scoped to
    one block) applies."""
    local = {path[len(tap.prefix):]: fn for path, fn in tap.interventions.items() if path.startswith(tap.prefix)}
    return tuple(local), tuple(fn.fn for fn in local.values()), tuple(tuple(fn.tensors) for fn in local.values())


def _compiled_tapped_layer(params: dict, x: Tensor, cfg: Config, *, k_cache: Tensor, v_cache: Tensor,
                           tap: Tap = NO_TAP, **rest) -> tuple[Tensor, Tensor, Tensor]:
    """``_compiled_layer``, or, where ``tap`` intervenes in this block, ``_compiled_tapped_block`` with the
    interventions' tensors as arguments."""
    names, fns, tensors = _block_interventions(tap)
    if not names:
        return _compiled_layer(params, x, cfg, k_cache=k_cache, v_cache=v_cache, **rest)
    x = _compiled_tapped_block()(params, x, cfg, names, fns, tensors, k_cache=k_cache, v_cache=v_cache, **rest)
    return x, k_cache, v_cache


def is_compilable(interventions: dict) -> bool:
    """Whether every intervention is a ``WithTensors`` (what a ``"compile"`` step takes as arguments)."""
    return all(isinstance(fn, WithTensors) for fn in interventions.values())


def tapped_step(tap: Tap, kind: str = "eager") -> Stepper:
    """The ``kind`` step (``"eager"`` or ``"compile"``) with ``tap`` threaded through every token's pass: the decode
    step of a generation under interventions (``generation.generate(interventions=...)``).

    ``"compile"`` (CPU and CUDA alike: blockwise, no CUDA graph) takes only ``WithTensors`` interventions
    (``is_compilable``): the blocks they act in run ``_compiled_tapped_block``, their tensors passed per call,
    the others the plain compiled block; ``embed`` and ``final`` act in the eager code around the blocks.
    """
    if kind == "eager":
        return Stepper("eager", functools.partial(_in_place_step, tap=tap))
    if kind != "compile" or not is_compilable(tap.interventions):
        raise ValueError(f"a tapped step is 'eager', or 'compile' with WithTensors interventions only; got {kind!r} "
                         f"with {sorted(type(fn).__name__ for fn in tap.interventions.values())}")
    step = _blockwise(_compiled_tapped_layer)
    return Stepper("compile", lambda params, token, cache, cfg: step(params, token, cache, cfg, tap=tap))


def whole_graph_step() -> Stepper:
    """The ``"compile"`` step as one ``torch.compile`` graph over all layers (the benchmark's baseline for the
    blockwise step; its build time grows with depth)."""
    return Stepper("compile", _compiled_step())


def untie_for_decoding(params: dict, cfg: Config) -> tuple[dict, Config]:
    """The same model with a tied unembedding stored apart as ``[d_model, vocab]``: same logits, faster decode.

    One token per step makes the unembedding a matrix-vector product over the largest matrix. CPU
    kernels stream a ``[d_model, vocab]`` matrix (x @ W) about 3x faster than the transposed view of
    the ``[vocab, d_model]`` embedding table once the weights no longer sit in cache (measured: 0.33 vs
    1.1 ms for the seed preset). The copy is made once per generation; the caller's params are untouched.
    Of an int8 tree (``ftransformer.quantization``) the copy is int8 as well, made once per embedding table
    (quantizing and packing it takes longer than a short generation).
    """
    if not cfg.embeddings.tie:
        return params, cfg
    table = params["embed"]["tokens"]
    if is_quantized(params):  # an int8 model reads its largest matrix as int8 too
        w = memo_by_tensor(_INT8_UNEMBED, table, lambda: quantize_matrix(table.detach().t().contiguous()))
    else:
        with torch.no_grad():
            w = table.t().contiguous()
    return {**params, "unembed": {"w": w}}, cfg.replace(tie_embeddings=False)


def clear_compiled() -> None:
    """Forget the ``torch.compile``'d steps (the next ``"compile"`` step compiles afresh, as a test or a
    benchmark of compile time wants); ``aot.clear`` does the same for ahead-of-time steps."""
    _compiled_step.cache_clear()
    _compiled_block.cache_clear()
    _blockwise_step.cache_clear()
    _compiled_tapped_block.cache_clear()


__all__ = ["STEP_KINDS", "Stepper", "clear_compiled", "decode_step", "decode_step_for", "is_compilable", "tapped_step",
           "untie_for_decoding", "whole_graph_step"]
