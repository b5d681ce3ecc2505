"""Learning-path step 8 (continued): generation = prefill, then decode steps, each followed by a sample.

* ``prefill`` runs the whole prompt through the model once, filling the KV-cache;
* ``decode_step`` runs one new token per row against the cache;
* ``sample`` turns the last logits into the next token: greedy, temperature, top-k, top-p, with an
  explicit random key (``ftransformer.random``) so a seed reproduces a text exactly.

``generate_stream`` yields the new tokens as they are produced; ``generate`` collects them after the
prompt. Prompts of different lengths share a batch with right padding and ``prompt_lengths``.
"""

import contextlib
import functools
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer import aot
from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.model import _forward_with_cache_in_place, check_tokens, forward_with_cache, is_tracing
from ftransformer.layers.int8 import memo_by_tensor
from ftransformer.quantize import is_quantized, quantize_matrix

_INT8_UNEMBED: dict = {}  # embedding table -> its int8 [d_model, vocab] copy (see untie_for_decoding)


def prefill(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cache: KVCache,
    cfg: Config,
    *,
    prompt_lengths: Int[Tensor, "*batch"] | None = None,
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """Put the prompt into the cache; returns the logits after each row's last real token and the new cache.

    ``prompt_lengths`` counts the real tokens of each row (the rest is right padding); None: all.
    """
    logits, cache = forward_with_cache(params, prompt, cache, cfg, seq_lengths=prompt_lengths)
    if prompt_lengths is None:
        return logits[..., -1, :], cache
    last = (prompt_lengths - 1).clamp(min=0)[..., None, None].expand(*prompt_lengths.shape, 1, logits.shape[-1])
    return logits.gather(-2, last).squeeze(-2), cache


def decode_step(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """One new token per row through the model; returns its next-token logits and the new cache."""
    logits, cache = forward_with_cache(params, token[..., None], cache, cfg)
    return logits[..., 0, :], cache


def _owned_decode_step(
    params: dict, token: Int[Tensor, "*batch"], cache: KVCache, cfg: Config
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """``decode_step`` for the generation loop, which owns its cache: it writes the buffers in place.

    The loop checked the prompt and the room in the cache once, and samples ids in range by
    construction, so the per-step checks (ops and host syncs on every token) are skipped too.
    Copying the buffers every step costs more than the rest of the step's non-matmul work together.
    """
    logits, cache = _forward_with_cache_in_place(params, token[..., None], cache, cfg)
    return logits[..., 0, :], cache


@functools.cache
def compiled_decode_step():
    """The generation loop's decode step compiled with static shapes: every step reuses one graph.

    Built on first use (no compile work at import). Run it with jaxtyping checking off: a checked
    function graph-breaks.

    Inductor's C++ wrapper calls the step's ~50 kernels and products from C++ instead of generated
    Python: measured on the seed preset, 2.35 against 2.69 ms a step (1 thread), the same logits to the
    bit, for ~10 s more compile time once (the compiled code is cached on disk).
    """
    return torch.compile(_owned_decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def untie_for_decoding(params: dict, cfg: Config) -> tuple[dict, Config]:
    """The same model with a tied unembedding stored apart as ``[d_model, vocab]``: same logits, faster decode.

    One token per step makes the unembedding a matrix-vector product over the largest matrix. CPU
    kernels stream a ``[d_model, vocab]`` matrix (x @ W) about 3x faster than the transposed view of
    the ``[vocab, d_model]`` embedding table once the weights no longer sit in cache (measured: 0.33 vs
    1.1 ms for the seed preset). The copy is made once per generation; the caller's params are untouched.
    Of an int8 tree (``ftransformer.quantize``) the copy is int8 as well, made once per embedding table
    (quantizing and packing it takes longer than a short generation).
    """
    if not cfg.tie_embeddings:
        return params, cfg
    table = params["embed"]["tokens"]
    if is_quantized(params):  # an int8 model reads its largest matrix as int8 too
        w = memo_by_tensor(_INT8_UNEMBED, table, lambda: quantize_matrix(table.detach().t().contiguous()))
    else:
        with torch.no_grad():
            w = table.t().contiguous()
    return {**params, "unembed": {"w": w}}, cfg.replace(tie_embeddings=False)


def _check_compile(compile, params: dict) -> None:
    if not (isinstance(compile, bool) or compile == "aot"):
        raise ValueError(f'compile must be False, True (torch.compile) or "aot" (AOTInductor), got {compile!r}')
    if compile == "aot":
        aot.check_params(params)  # here, at the call: the step itself is made inside the generator


def check_sampling(temperature: float | int, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` on sampling settings outside their ranges."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: one validated home for the options every generation function takes.

    ``generate(..., sampling=Sampling(temperature=0.8, top_k=40))`` and the keyword form
    ``generate(..., temperature=0.8, top_k=40)`` mean the same; give one or the other.
    """

    temperature: float | int = 1.0  # softmax temperature; 0 is greedy
    top_k: int | None = None  # sample among the k likeliest tokens only
    top_p: float | None = None  # sample among the likeliest tokens holding probability p only (nucleus)
    seed: int = 0  # the random key's seed: the same seed gives the same text

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax (no random numbers are drawn)."""
        return self.temperature == 0 or self.top_k == 1


def resolve_sampling(sampling: "Sampling | None", **keywords) -> Sampling:
    """``sampling``, or a ``Sampling`` from the keyword options that were given (None means not given)."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if sampling is None:
        return Sampling(**given)
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if given:
        raise ValueError(f"give the sampling options either as sampling=Sampling(...) or as keywords, not both ({', '.join(given)})")
    return sampling


def restrict_logits(
    logits: Float[Tensor, "*batch vocab"], *, top_k: int | None = None, top_p: float | None = None
) -> Float[Tensor, "*batch vocab"]:
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set holding ``top_p`` of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p: the most likely one always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: Float[Tensor, "*batch vocab"],
    key: Tensor | None,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Tensor, " *batch"]:
    """The next token of each row: greedy when ``temperature == 0``, else a draw driven by ``key``.

    The draw is the Gumbel-max trick: argmax(logits / temperature + Gumbel noise) is a sample from
    softmax(logits / temperature), and needs only uniform numbers, which ``key`` makes reproducible.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    if key is None:
        raise ValueError(f"sampling with temperature={temperature} needs a random key, got None")
    logits = restrict_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return (logits + gumbel_noise(key, logits)).argmax(dim=-1)


def gumbel_noise(key: Tensor, like: Tensor) -> Tensor:
    """Gumbel(0, 1) noise shaped like ``like``, from ``key``: argmax(log-weights + noise) samples the weights."""
    u = random.uniform(key, like.shape).to(like.device)
    # Keep u away from 0 so log(u) is finite; 2**-25 is below the smallest nonzero uniform (2**-24).
    return -torch.log(-torch.log(u.clamp(min=2.0**-25)))


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def _hide_stopped(token: Tensor, done: Tensor, stop: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """What each row shows (``pad_id`` once it has stopped) and the rows stopped after this token."""
    return token.masked_fill(done, pad_id), done | torch.isin(token, stop)


def stop_after(
    tokens: Int[Tensor, "*batch seq"], n_prompt: int, stop_tokens: Sequence[int], pad_id: int
) -> Int[Tensor, "*batch _"]:
    """What ``generate`` shows for ``tokens`` generated without stopping: ``pad_id`` after each row's first
    stop token, and the columns after the step where every row had stopped cut off."""
    if not len(stop_tokens) or tokens.shape[-1] == n_prompt:
        return tokens
    new = tokens[..., n_prompt:]
    is_stop = torch.isin(new, torch.tensor(list(stop_tokens), dtype=new.dtype, device=new.device))
    seen = is_stop.long().cumsum(-1)
    shown = new.masked_fill(seen - is_stop.long() > 0, pad_id)
    all_done = (seen > 0).reshape(-1, new.shape[-1]).all(0)
    steps = int(all_done.nonzero()[0]) + 1 if bool(all_done.any()) else new.shape[-1]
    return torch.cat([tokens[..., :n_prompt], shown[..., :steps]], -1)


def _check_generate_args(
    prompt: Tensor, cfg: Config, max_new_tokens: int, prompt_lengths: Tensor | None
) -> int:
    """Validate a generation request; returns the cache length it needs."""
    check_tokens(prompt, cfg, name="prompt")
    _check_max_new_tokens(max_new_tokens)
    longest = prompt.shape[-1]
    if prompt_lengths is not None:
        if isinstance(prompt_lengths, Tensor) and (
            prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype == torch.bool
        ):
            raise TypeError(f"prompt_lengths must be an integer tensor, got dtype {prompt_lengths.dtype}")
        if not isinstance(prompt_lengths, Tensor) or prompt_lengths.shape != prompt.shape[:-1]:
            got = tuple(prompt_lengths.shape) if isinstance(prompt_lengths, Tensor) else type(prompt_lengths).__name__
            raise ValueError(f"prompt_lengths must have shape (*batch,) = {tuple(prompt.shape[:-1])}, got {got}")
        if not is_tracing(prompt_lengths):
            if bool(((prompt_lengths < 1) | (prompt_lengths > prompt.shape[-1])).any()):
                raise ValueError(
                    f"prompt_lengths must lie in [1, seq={prompt.shape[-1]}], got {prompt_lengths.tolist()}"
                )
            longest = int(prompt_lengths.max()) if prompt_lengths.numel() else longest
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
    prompt_lengths: Int[Tensor, "*batch"] | None = None,
    pad_id: int = 0,
    compile: bool | str = False,
) -> Iterator[Int[Tensor, "*batch"]]:
    """Yield the next token of every row, one step at a time, as soon as it is sampled.

    The sampling options come as ``sampling=Sampling(...)`` or as the keywords ``temperature`` (default
    1.0), ``top_k``, ``top_p`` and ``seed`` (default 0). A row that produced one of ``stop_tokens``
    yields ``pad_id`` afterwards; the stream ends after ``max_new_tokens`` steps or once every row has
    stopped. ``compile=True`` runs the decode step through ``torch.compile`` (one graph for all steps;
    worth it for long generations); ``compile="aot"`` runs it compiled ahead of time by AOTInductor
    (``ftransformer.aot``: faster per token, float params only, ~15-40 s to build once per shape).
    ``generate_stream_sliding`` decodes eagerly.
    """
    # Checked here, at the call; the generator below starts working at the first next().
    _check_compile(compile, params)
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    max_len = _check_generate_args(prompt, cfg, max_new_tokens, prompt_lengths)
    return _stream(params, prompt, cfg, max_len, max_new_tokens, sampling, stop_tokens, prompt_lengths, pad_id, compile)


def _stream(
    params: dict,
    prompt: Tensor,
    cfg: Config,
    max_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    stop_tokens: Sequence[int],
    prompt_lengths: Tensor | None,
    pad_id: int,
    compile: bool | str,
) -> Iterator[Tensor]:
    """The work behind ``generate_stream``, on arguments it has checked."""
    if max_new_tokens == 0:
        return
    dtype = params["embed"]["tokens"].dtype
    params, cfg = untie_for_decoding(params, cfg)
    if compile == "aot":  # nearby lengths share one built step
        max_len = aot.cache_length(max_len, cfg)
    cache = init_cache(cfg, tuple(prompt.shape[:-1]), max_len=max_len, dtype=dtype, device=prompt.device)
    # Gradients are never wanted here: without no_grad, params that require grad would make every step
    # record a graph (and keep the cache alive through it). Entered per step, never across a yield,
    # so the caller's grad mode is untouched while the stream is paused.
    with torch.no_grad():
        logits, cache = prefill(params, prompt, cache, cfg, prompt_lengths=prompt_lengths)
    if compile == "aot":
        step = aot.aot_decode_step(params)
    else:
        step = compiled_decode_step() if compile else _owned_decode_step
    greedy = sampling.greedy
    key = random.key(sampling.seed).to(prompt.device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=prompt.device)
    done = torch.zeros(prompt.shape[:-1], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        # Greedy decoding draws nothing, so it skips deriving the step's key (a dozen ops per token).
        step_key = None if greedy else random.fold_in(key, i)
        token = sample(logits, step_key, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if len(stop_tokens):
            # A stopped row still feeds its sampled (valid) token to the model; only what it shows is padding.
            shown, done = _hide_stopped(token, done, stop, pad_id)
            yield shown
        else:
            yield token
        # Reading `done` costs a host sync per step, so only generations with stop tokens pay it.
        if i + 1 == max_new_tokens or (len(stop_tokens) and bool(done.all())):
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
) -> Iterator[Int[Tensor, "*batch"]]:
    """``generate_stream`` that may run past ``max_seq_len``: whenever the context is full it starts a fresh
    cache from the last ``keep`` tokens (default: half of ``max_seq_len``) and goes on.

    The model never sees more than ``max_seq_len`` tokens, as in training; re-filling only when full
    (rather than cropping and recomputing every step) keeps the KV-cache's speed. Each segment samples
    with its own key derived from ``seed``. A row that produced one of ``stop_tokens`` yields ``pad_id``
    afterwards; the stream ends once every row has stopped.
    """
    if keep is None:
        keep = max(cfg.max_seq_len // 2, 1)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < cfg.max_seq_len:
        raise ValueError(f"keep must be an int in [1, max_seq_len={cfg.max_seq_len}), got {keep!r}")
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_max_new_tokens(max_new_tokens)
    if isinstance(prompt, Tensor) and prompt.ndim and prompt.shape[-1] >= cfg.max_seq_len:
        prompt = prompt[..., -keep:]
    check_tokens(prompt, cfg, name="prompt")
    return _sliding(params, prompt, cfg, max_new_tokens, sampling, stop_tokens, pad_id, keep)


def _sliding(params, prompt, cfg, max_new_tokens, sampling, stop_tokens, pad_id, keep):
    """The work behind ``generate_stream_sliding``, on arguments it has checked."""
    left, segment, context = max_new_tokens, 0, prompt
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=prompt.device)
    # Carried across segments: a row that stopped stays stopped (each segment's own stream starts afresh).
    done = torch.zeros(prompt.shape[:-1], dtype=torch.bool, device=prompt.device)
    while left:
        n = min(left, cfg.max_seq_len - context.shape[-1])
        seed = sampling.seed
        segment_seed = int(random.fold_in(random.key(seed), segment)) if segment else seed
        new = []
        for token in generate_stream(
            params, context, cfg, max_new_tokens=n, sampling=dataclasses.replace(sampling, seed=segment_seed)
        ):
            new.append(token)
            if len(stop_tokens):
                shown, done = _hide_stopped(token, done, stop, pad_id)
                yield shown
                if bool(done.all()):
                    return
            else:
                yield token
        left -= n
        context = torch.cat([context, torch.stack(new, dim=-1).to(context.dtype)], dim=-1)[..., -keep:]
        segment += 1


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
    prompt_lengths: Int[Tensor, "*batch"] | None = None,
    pad_id: int = 0,
    compile: bool | str = False,
    draft: tuple[dict, Config] | None = None,
    draft_tokens: int = 4,
) -> Int[Tensor, "*batch _"]:
    """The prompt followed by up to ``max_new_tokens`` new tokens (see ``generate_stream`` for the options).

    With ``prompt_lengths`` each row's new tokens follow its own real prompt and the rest of the row is
    ``pad_id``; the result has ``seq + steps`` columns either way.

    ``draft=(draft_params, draft_cfg)`` decodes speculatively (``ftransformer.speculative``): the draft
    proposes ``draft_tokens`` tokens per round and the target checks them in one pass. The output is
    distributed as without it (greedy: the same tokens); only the speed changes.
    """
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if draft is not None:
        _check_compile(compile, params)  # without a draft, generate_stream checks it
        if prompt_lengths is not None or compile:
            raise ValueError(
                f"speculative decoding (draft=...) takes neither prompt_lengths nor compile; got "
                f"prompt_lengths={'given' if prompt_lengths is not None else None}, compile={compile!r}"
            )
        # speculative builds on this module's sampling helpers, so it is imported here, not at the top.
        from ftransformer.speculative import speculative_generate

        tokens, _ = speculative_generate(
            params, prompt, cfg, draft=draft, draft_tokens=draft_tokens, max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
        return stop_after(tokens, prompt.shape[-1], stop_tokens, pad_id)
    new = list(
        generate_stream(
            params, prompt, cfg, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
            prompt_lengths=prompt_lengths, pad_id=pad_id, compile=compile,
        )
    )
    if new:
        new_tokens = torch.stack(new, dim=-1).to(prompt.dtype)
    else:
        new_tokens = prompt.new_empty((*prompt.shape[:-1], 0))
    if prompt_lengths is None:
        return torch.cat([prompt, new_tokens], dim=-1)
    seq, steps = prompt.shape[-1], new_tokens.shape[-1]
    is_prompt = torch.arange(seq, device=prompt.device) < prompt_lengths[..., None]
    out = torch.cat([prompt.masked_fill(~is_prompt, pad_id), torch.full_like(new_tokens, pad_id)], dim=-1)
    return out.scatter(-1, prompt_lengths[..., None] + torch.arange(steps, device=prompt.device), new_tokens)

