"""The decode steps: one new token per row through the model, against the KV-cache.

* ``decode_step`` is the public one: checked, pure (it returns a new cache and leaves its argument be);
* ``decode_step_in_place`` is the generation loop's: the loop owns its cache, so the step writes the
  buffers in place and skips the per-step checks;
* ``torch_compiled_decode_step(mode)`` is that step through ``torch.compile`` (on a CUDA device,
  ``mode="reduce-overhead"``: the step is captured once as a CUDA graph and replayed per token), and
  ``aot_compiled_decode_step(params)`` that step compiled ahead of time by AOTInductor (``ftransformer.aot``);
* ``loop_decode_step(compile, params)`` picks one of the last three for ``generate(compile=...)``.

``untie_for_decoding`` gives the loop a copy of the model whose unembedding decodes faster.
"""

import functools

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import aot, tree
from ftransformer.cache import KVCache
from ftransformer.config import Config
from ftransformer.layers.int8 import memo_by_tensor
from ftransformer.model import _forward_with_cache_in_place, forward_with_cache
from ftransformer.quantization import is_quantized, quantize_matrix

_INT8_UNEMBED: dict = {}  # embedding table -> its int8 [d_model, vocab] copy (see untie_for_decoding)


def forward_in_place(
    params: dict, tokens: Int[Tensor, "*batch seq"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch seq vocab"], KVCache]:
    """``forward_with_cache`` for a loop that owns ``cache``: writes its buffers in place, checks nothing.

    Every in-place caller (the decode steps here, speculative decoding) goes through this one function.
    """
    return _forward_with_cache_in_place(params, tokens, cache, cfg)


def decode_step(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """One new token per row through the model; returns its next-token logits and the new cache."""
    logits, cache = forward_with_cache(params, token[..., None], cache, cfg)
    return logits[..., 0, :], cache


def decode_step_in_place(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """``decode_step`` for the generation loop, which owns its cache: it writes the buffers in place.

    The loop checked the prompt and the room in the cache once, and samples ids in range by
    construction, so the per-step checks (ops and host syncs on every token) are skipped too.
    Copying the buffers every step costs more than the rest of the step's non-matmul work together.
    """
    logits, cache = forward_in_place(params, token[..., None], cache, cfg)
    return logits[..., 0, :], cache


COMPILE_MODES = (None, "reduce-overhead")  # torch.compile modes of the decode step: default, CUDA graphs


@functools.cache
def torch_compiled_decode_step(mode: str | None = None):
    """``decode_step_in_place`` compiled by ``torch.compile`` with static shapes: every step reuses one graph.

    Built on first use (no compile work at import). Run it with jaxtyping checking off: a checked
    function graph-breaks.

    ``mode="reduce-overhead"`` (CUDA) captures the compiled step as a CUDA graph: one launch a token
    instead of a few hundred kernel launches. Use it through ``cuda_graph_decode_step``, which marks the
    params and the cache buffers (written in place) as static, so replays neither copy them nor skip the graph.

    Inductor's C++ wrapper calls the step's ~50 kernels and products from C++ instead of generated
    Python: measured on the seed preset, 2.35 against 2.69 ms a step (1 thread), the same logits to the
    bit, for ~10 s more compile time once (the compiled code is cached on disk).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode is not None:
        return torch.compile(decode_step_in_place, fullgraph=True, dynamic=False, mode=mode)
    return torch.compile(decode_step_in_place, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


_STATIC_PARAMS: list = [None]  # id() of the params tree whose leaves were marked static last


def _mark_static(leaves: list) -> None:
    """Mark tensors whose storage lives across steps as static for CUDA graphs (no recompile guard: a new
    address, e.g. the next generation's cache, makes the graph re-record once)."""
    for x in leaves:
        torch._dynamo.mark_static_address(x)


def cuda_graph_decode_step(params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
                           ) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """``torch_compiled_decode_step("reduce-overhead")`` with the params and cache marked static (CUDA).

    The logits live in the graph's memory until the next replay: sample from them before the next step.
    A new cache (each generation allocates one) re-records the graph once; the compiled code is reused.
    """
    if _STATIC_PARAMS[0] != id(params):  # once per params tree (a generation's untied copy is a new one)
        _mark_static(tree.leaves(params))
        _STATIC_PARAMS[0] = id(params)
    if not hasattr(cache.k[0], "_dynamo_static_input_type"):  # the buffers are allocated together
        _mark_static([*cache.k, *cache.v])
    return torch_compiled_decode_step("reduce-overhead")(params, token, cache, cfg)


def aot_compiled_decode_step(params: dict) -> aot.Step:
    """``decode_step_in_place`` compiled ahead of time by AOTInductor (``ftransformer.aot``), built on its
    first call for the shapes it sees. Raises ``ValueError`` for an int8 params tree."""
    return aot.compile_ahead_of_time(decode_step_in_place, params)


def check_compile(compile, params: dict) -> None:
    """Raise ``ValueError`` unless ``compile`` is False, True or ``"aot"`` and ``params`` suits it."""
    if not (isinstance(compile, bool) or compile == "aot"):
        raise ValueError(f'compile must be False, True (torch.compile) or "aot" (AOTInductor), got {compile!r}')
    if compile == "aot":
        aot.check_params(params)


def loop_decode_step(compile: bool | str, params: dict) -> aot.Step:
    """The in-place decode step ``generate(compile=...)`` runs: eager (False), ``torch.compile`` (True; on
    CUDA params, captured as a CUDA graph: ``cuda_graph_decode_step``) or AOTInductor (``"aot"``)."""
    if compile == "aot":
        return aot_compiled_decode_step(params)
    if not compile:
        return decode_step_in_place
    on_cuda = params["embed"]["tokens"].device.type == "cuda"
    return cuda_graph_decode_step if on_cuda else torch_compiled_decode_step()


def loop_cache_length(compile: bool | str, needed: int, cfg: Config) -> int:
    """The cache length the loop allocates for ``needed`` slots: rounded up for ``"aot"``, so that nearby
    lengths share one built step (``aot.cache_length``)."""
    return aot.cache_length(needed, cfg) if compile == "aot" else needed


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


__all__ = [
    "COMPILE_MODES", "aot_compiled_decode_step", "check_compile", "cuda_graph_decode_step", "decode_step", "decode_step_in_place", "forward_in_place",
    "loop_cache_length", "loop_decode_step", "torch_compiled_decode_step", "untie_for_decoding",
]
