"""Learning-path step 8 (continued): generation = prefill, then decode steps, each followed by a sample.

* ``prefill`` runs the whole prompt through the model once, filling the KV-cache;
* ``decode_step`` (``ftransformer.decode_steps``) runs one new token per row against the cache;
* ``sample`` (``ftransformer.sampling``) turns the last logits into the next token: greedy, temperature,
  top-k, top-p, with an explicit random key so a seed reproduces a text exactly.

``generate_stream`` yields the new tokens as they are produced; ``generate`` collects them after the
prompt. Prompts of different lengths share a batch with right padding and ``seq_lengths``. Stop tokens
end a stream through ``ftransformer.stopping``, as they end speculative decoding (``generate(draft=...)``).
"""

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.decode_steps import check_compile, loop_cache_length, loop_decode_step, untie_for_decoding
from ftransformer.model import check_seq_lengths, check_tokens, forward_with_cache, is_tracing
from ftransformer.sampling import Sampling, next_token, resolve_sampling
from ftransformer.speculative import speculative_generate
from ftransformer.stopping import check_max_new_tokens, stack_steps, until_stopped

# Generation's vocabulary in one import, as before these moved to their own modules:
# `from ftransformer.generation import decode_step, sample` keeps working.
from ftransformer.decode_steps import decode_step  # noqa: F401
from ftransformer.sampling import sample  # noqa: F401

SeqLengths = Int[Tensor, "*batch"] | None


def _seq_lengths(seq_lengths: Tensor | None, prompt_lengths: Tensor | None) -> Tensor | None:
    """``seq_lengths``, or the deprecated ``prompt_lengths`` that says the same (with a warning)."""
    if prompt_lengths is None:
        return seq_lengths
    warnings.warn("prompt_lengths= is deprecated: pass seq_lengths= (the name forward_with_cache uses)",
                  DeprecationWarning, stacklevel=3)
    if seq_lengths is not None:
        raise ValueError("give seq_lengths only (prompt_lengths is its deprecated name), not both")
    return prompt_lengths


def prefill(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cache: KVCache,
    cfg: Config,
    *,
    seq_lengths: SeqLengths = None,
    prompt_lengths: SeqLengths = None,
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """Put the prompt into the cache; returns the logits after each row's last real token and the new cache.

    ``seq_lengths`` counts the real tokens of each row (the rest is right padding); None: all.
    ``prompt_lengths`` is its deprecated name.
    """
    seq_lengths = _seq_lengths(seq_lengths, prompt_lengths)
    logits, cache = forward_with_cache(params, prompt, cache, cfg, seq_lengths=seq_lengths)
    if seq_lengths is None:
        return logits[..., -1, :], cache
    last = (seq_lengths - 1).clamp(min=0)[..., None, None].expand(*seq_lengths.shape, 1, logits.shape[-1])
    return logits.gather(-2, last).squeeze(-2), cache


def _check_seq_lengths(seq_lengths, prompt: Tensor) -> int:
    """Validate ``seq_lengths`` for generation (each row holds at least one real token); returns the longest."""
    check_seq_lengths(seq_lengths, prompt)  # the model's one rule: an integer (*batch,) tensor in [0, seq]
    if seq_lengths is None or is_tracing(seq_lengths):
        return prompt.shape[-1]
    # Generation samples after each row's last real token, so a row needs one (forward_with_cache allows 0).
    if bool((seq_lengths < 1).any()):
        raise ValueError(f"seq_lengths must lie in [1, seq={prompt.shape[-1]}] to generate, got {seq_lengths.tolist()}")
    return int(seq_lengths.max()) if seq_lengths.numel() else prompt.shape[-1]


def _check_generate_args(prompt: Tensor, cfg: Config, max_new_tokens: int, seq_lengths: Tensor | None) -> int:
    """Validate a generation request; returns the cache length it needs."""
    check_tokens(prompt, cfg, name="prompt")
    check_max_new_tokens(max_new_tokens)
    longest = _check_seq_lengths(seq_lengths, prompt)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt of seq={longest} plus max_new_tokens={max_new_tokens} is {longest + max_new_tokens} "
            f"tokens but max_seq_len={cfg.max_seq_len}"
        )
    # Prefill writes every column of a padded prompt, so the cache holds at least all of them.
    return max(prompt.shape[-1], longest + max_new_tokens, 1)


def generate_stream(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    temperature: float | int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    seq_lengths: SeqLengths = None,
    pad_id: int = 0,
    compile: bool | str = False,
    prompt_lengths: SeqLengths = None,
) -> Iterator[Int[Tensor, "*batch"]]:
    """Yield the next token of every row, one step at a time, as soon as it is sampled.

    The sampling options come as ``sampling=Sampling(...)`` or as the keywords ``temperature`` (default
    1.0), ``top_k``, ``top_p`` and ``seed`` (default 0). A row that produced one of ``stop_tokens``
    yields ``pad_id`` afterwards; the stream ends after ``max_new_tokens`` steps or once every row has
    stopped. ``compile=True`` runs the decode step through ``torch.compile`` (one graph for all steps;
    worth it for long generations); ``compile="aot"`` runs it compiled ahead of time by AOTInductor
    (``ftransformer.aot``: faster per token, float params only, ~15-40 s to build once per shape).
    ``prompt_lengths`` is the deprecated name of ``seq_lengths``.
    """
    # Checked here, at the call; the generator below starts working at the first next().
    seq_lengths = _seq_lengths(seq_lengths, prompt_lengths)
    check_compile(compile, params)
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    max_len = _check_generate_args(prompt, cfg, max_new_tokens, seq_lengths)
    steps = _decode_loop(params, prompt, cfg, max_len, max_new_tokens, sampling, seq_lengths, compile)
    return until_stopped(steps, stop_tokens, pad_id)


def _decode_loop(
    params: dict,
    prompt: Tensor,
    cfg: Config,
    max_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    seq_lengths: Tensor | None,
    compile: bool | str,
) -> Iterator[Tensor]:
    """Prefill, then ``max_new_tokens`` times: sample a token, yield it, run it through the decode step."""
    if max_new_tokens == 0:
        return
    dtype = params["embed"]["tokens"].dtype
    params, cfg = untie_for_decoding(params, cfg)
    max_len = loop_cache_length(compile, max_len, cfg)
    cache = init_cache(cfg, tuple(prompt.shape[:-1]), max_len=max_len, dtype=dtype, device=prompt.device)
    # Gradients are never wanted here: without no_grad, params that require grad would make every step
    # record a graph (and keep the cache alive through it). Entered per step, never across a yield,
    # so the caller's grad mode is untouched while the stream is paused.
    with torch.no_grad():
        logits, cache = prefill(params, prompt, cache, cfg, seq_lengths=seq_lengths)
    step = loop_decode_step(compile, params)
    key = random.key(sampling.seed).to(prompt.device)
    for i in range(max_new_tokens):
        # Greedy decoding draws nothing, so it skips deriving the step's key (a dozen ops per token).
        token = next_token(logits, None if sampling.greedy else random.fold_in(key, i), sampling)
        yield token
        if i + 1 == max_new_tokens:
            return
        with torch.no_grad(), _guards_checked(compile is not True or i == 0):
            logits, cache = step(params, token, cache, cfg)


def _guards_checked(check: bool):
    """Dynamo's guards in full (``check``), or only those that tell compiled graphs apart.

    The first compiled step of a generation checks every guard (and compiles or picks the graph); the
    later steps pass the same params, cfg and same-shaped token and cache, so re-checking a guard per
    parameter leaf every token would only add overhead (~0.1-0.25 ms a token for the seed preset).
    """
    return contextlib.nullcontext() if check else torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def generate_stream_sliding(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    temperature: float | int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    keep: int | None = None,
    compile: bool | str = False,
) -> Iterator[Int[Tensor, "*batch"]]:
    """``generate_stream`` that may run past ``max_seq_len``: whenever the context is full it starts a fresh
    cache from the last ``keep`` tokens (default: half of ``max_seq_len``) and goes on.

    The model never sees more than ``max_seq_len`` tokens, as in training; re-filling only when full
    (rather than cropping and recomputing every step) keeps the KV-cache's speed. Each segment samples
    with its own key derived from ``seed``. A row that produced one of ``stop_tokens`` yields ``pad_id``
    afterwards; the stream ends once every row has stopped. ``compile`` picks the decode step as in
    ``generate_stream`` (the full segments share one cache length, so one compiled step serves them).
    """
    if keep is None:
        keep = max(cfg.max_seq_len // 2, 1)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < cfg.max_seq_len:
        raise ValueError(f"keep must be an int in [1, max_seq_len={cfg.max_seq_len}), got {keep!r}")
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_max_new_tokens(max_new_tokens)
    check_compile(compile, params)
    if isinstance(prompt, Tensor) and prompt.ndim and prompt.shape[-1] >= cfg.max_seq_len:
        prompt = prompt[..., -keep:]
    check_tokens(prompt, cfg, name="prompt")
    return until_stopped(_segments(params, prompt, cfg, max_new_tokens, sampling, keep, compile), stop_tokens, pad_id)


def _segments(params, prompt, cfg, max_new_tokens, sampling, keep, compile) -> Iterator[Tensor]:
    """The steps behind ``generate_stream_sliding``, on arguments it has checked: one stream per full context."""
    left, segment, context = max_new_tokens, 0, prompt
    while left:
        n = min(left, cfg.max_seq_len - context.shape[-1])
        seed = sampling.seed
        segment_seed = int(random.fold_in(random.key(seed), segment)) if segment else seed
        segment_sampling = dataclasses.replace(sampling, seed=segment_seed)
        new = []
        stream = generate_stream(params, context, cfg, max_new_tokens=n, sampling=segment_sampling, compile=compile)
        for token in stream:
            new.append(token)
            yield token
        left -= n
        context = torch.cat([context, torch.stack(new, dim=-1).to(context.dtype)], dim=-1)[..., -keep:]
        segment += 1


def _after_prompt(prompt: Tensor, new_tokens: Tensor, seq_lengths: Tensor | None, pad_id: int) -> Tensor:
    """The output rows: each row's real prompt, its new tokens right after it, then ``pad_id``."""
    if seq_lengths is None:
        return torch.cat([prompt, new_tokens], dim=-1)
    seq, steps = prompt.shape[-1], new_tokens.shape[-1]
    is_prompt = torch.arange(seq, device=prompt.device) < seq_lengths[..., None]
    out = torch.cat([prompt.masked_fill(~is_prompt, pad_id), torch.full_like(new_tokens, pad_id)], dim=-1)
    return out.scatter(-1, seq_lengths[..., None] + torch.arange(steps, device=prompt.device), new_tokens)


def _check_draft_options(seq_lengths: Tensor | None, compile, params: dict) -> None:
    check_compile(compile, params)  # a bad value is named as such before the draft's own refusal
    if seq_lengths is not None or compile:
        raise ValueError(
            f"speculative decoding (draft=...) takes neither seq_lengths nor compile; got "
            f"seq_lengths={'given' if seq_lengths is not None else None}, compile={compile!r}"
        )


def generate(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    temperature: float | int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    seq_lengths: SeqLengths = None,
    pad_id: int = 0,
    compile: bool | str = False,
    draft: tuple[dict, Config] | None = None,
    draft_tokens: int = 4,
    prompt_lengths: SeqLengths = None,
) -> Int[Tensor, "*batch _"]:
    """The prompt followed by up to ``max_new_tokens`` new tokens (see ``generate_stream`` for the options).

    With ``seq_lengths`` each row's new tokens follow its own real prompt and the rest of the row is
    ``pad_id``; the result has ``seq + steps`` columns either way.

    ``draft=(draft_params, draft_cfg)`` decodes speculatively (``ftransformer.speculative``): the draft
    proposes ``draft_tokens`` tokens per round and the target checks them in one pass. The output is
    distributed as without it (greedy: the same tokens); only the speed changes.
    """
    seq_lengths = _seq_lengths(seq_lengths, prompt_lengths)
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens, pad_id=pad_id)
    if draft is not None:
        _check_draft_options(seq_lengths, compile, params)
        return speculative_generate(params, prompt, cfg, draft=draft, draft_tokens=draft_tokens, **options)[0]
    stream = generate_stream(params, prompt, cfg, seq_lengths=seq_lengths, compile=compile, **options)
    return _after_prompt(prompt, stack_steps(stream, prompt), seq_lengths, pad_id)


__all__ = ["generate", "generate_stream", "generate_stream_sliding", "prefill"]
