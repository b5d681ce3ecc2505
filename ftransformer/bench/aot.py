"""The decode step compiled ahead of time: the ``KV-cache (AOTInductor)`` contender of ``bench generate --aot``.

``torch.compile`` runs a compiled step through dynamo on every call: a cache lookup and (on the first
step of a generation) a guard per parameter leaf. ``torch.export`` traces the same step once into a
graph, and AOTInductor (``torch._inductor.aoti_compile_and_package``) compiles that graph into a shared
library whose runner is called with the flattened params and cache, with no dynamo at run time. The
step is the generation loop's own (``generate._owned_decode_step``): it writes the cache buffers in
place and returns the logits and the new lengths.

Shapes are static: a step is built for one batch shape, cache length, dtype and params structure, and
takes 20-40 s to build on a 2-core CPU. Float params only: the int8 product is a Python-registered op.
This is a benchmark contender, measuring what ahead-of-time compilation would save; ``generate(...,
compile=True)`` stays on ``torch.compile``.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.generate import _owned_decode_step, prefill, untie_for_decoding
from ftransformer.quantize import is_quantized


class _DecodeStep(torch.nn.Module):
    """The loop's decode step with the cache as plain tuples (an exported program's inputs are
    plain containers); the buffers are written in place, the new lengths returned."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def forward(self, params: dict, token: Tensor, k: tuple, v: tuple, lengths: Tensor):
        logits, cache = _owned_decode_step(params, token, KVCache(k=k, v=v, lengths=lengths), self.cfg)
        return logits, cache.lengths


def aot_greedy(params: dict, cfg: Config, prompt: Tensor, new_tokens: int, package_dir: str | Path) -> Callable[[], Tensor]:
    """Build the AOTInductor decode step for ``prompt``'s shape (its package written in ``package_dir``);
    returns a function that generates ``prompt`` + ``new_tokens`` greedy tokens with it, like
    ``generate(params, prompt, cfg, max_new_tokens=new_tokens, temperature=0)``."""
    if is_quantized(params):
        raise ValueError("the AOTInductor contender takes float params (the int8 product is a Python op)")
    params, cfg = untie_for_decoding(params, cfg)
    max_len = prompt.shape[-1] + new_tokens
    dtype = params["embed"]["tokens"].dtype

    def start() -> tuple[Tensor, KVCache]:
        cache = init_cache(cfg, tuple(prompt.shape[:-1]), max_len=max_len, dtype=dtype, device=prompt.device)
        with torch.no_grad():
            return prefill(params, prompt, cache, cfg)

    logits, cache = start()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13's own export code copies a LeafSpec, which it has deprecated: not ours to act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(
            _DecodeStep(cfg), (params, logits.argmax(-1), cache.k, cache.v, cache.lengths), strict=False
        )
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(package_dir) / "decode_step.pt2"))
    step = torch._inductor.aoti_load_package(package)

    def run() -> Tensor:
        logits, cache = start()
        tokens = []
        for i in range(new_tokens):
            token = logits.argmax(-1)
            tokens.append(token)
            if i + 1 < new_tokens:
                logits, lengths = step(params, token, cache.k, cache.v, cache.lengths)
                cache = cache._replace(lengths=lengths)
        return torch.cat([prompt, torch.stack(tokens, dim=-1)], dim=-1)

    return run


__all__ = ["aot_greedy"]
