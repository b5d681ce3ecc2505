"""Learning-path step 8 (continued): generation = prefill, then decode steps, each followed by a sample.

* ``prefill`` runs the whole prompt through the model once, filling the KV-cache;
* ``decode_step`` (``ftransformer.decode_steps``) runs one new token per row against the cache;
* ``sample`` (``ftransformer.sampling``) turns the last logits into the next token: greedy, temperature,
  top-k, top-p, with an explicit random key so a seed reproduces a text exactly.

``generate_stream`` yields the new tokens as they are produced; ``generate`` collects them after the
prompt. Prompts of different lengths share a batch with right padding and ``seq_lengths``. Stop tokens
end a stream through ``ftransformer.stopping``, as they end speculative decoding (``generate(draft=...)``).

Interventions (``interventions={"blocks.3.resid_post": fn}``, the mapping ``interp.forward_with_activations``
takes) act through the KV-cache path at the prefill and at every decode step. ``fn`` sees the value of the
positions that pass computes: the whole (padded) prompt at the prefill, ``[*batch, 1, d]`` at a decode step,
so a position-wise ``fn`` (a steering vector, a clamped feature) gives what the uncached forward with the
same ``fn`` gives. The position rule ``positions``: ``"all"`` (both), ``"prompt"`` (the prefill only) or
``"generated"`` (the decode steps only: the positions of generated tokens; the first new token, read off the
prompt's last position, is then not yet affected). The cached attention does not tap its insides, so the
``attn.*`` sites are refused. The decode step is ``"eager"``, or ``"compile"`` where every intervention is a
``layers.tap.WithTensors`` (``fn(value, *tensors)``, as ``interp.steering.steer`` makes): the compiled blocks
take those tensors as arguments, so a new vector or scale runs the same compiled code (``"aot"`` is refused).
"""

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer import validate
from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.decode_steps import Stepper, decode_step_for, is_compilable, tapped_step, untie_for_decoding
from ftransformer.interp.activations import check_interventions
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.model import check_seq_lengths, check_tokens, forward_with_cache
from ftransformer.sampling import Sampling, check_sampling_arg, sample
from ftransformer.speculative import Draft, speculative_generate
from ftransformer.stopping import check_max_new_tokens, stack_steps, until_stopped
from ftransformer.tracing import is_tracing

SeqLengths = Int[Tensor, "*batch"] | None
POSITION_RULES = ("all", "prompt", "generated")  # where a generation's interventions act (see the module)


def prefill(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cache: KVCache,
    cfg: Config,
    *,
    seq_lengths: SeqLengths = None,
    tap: Tap = NO_TAP,
) -> tuple[Float[Tensor, "*batch vocab"], KVCache]:
    """Put the prompt into the cache; returns the logits after each row's last real token and the new cache.

    ``seq_lengths`` counts the real tokens of each row (the rest is right padding); None: all. ``tap``: see
    ``model.forward_with_cache``.
    """
    logits, cache = forward_with_cache(params, prompt, cache, cfg, seq_lengths=seq_lengths, tap=tap)
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


def _intervention_taps(interventions: dict | None, positions: str, cfg: Config, step: str | Stepper
                       ) -> tuple[Tap, Tap]:
    """The checked ``interventions`` as two taps: the prefill's and the decode steps' (``NO_TAP`` where the
    position rule keeps them out)."""
    validate.one_of("positions", positions, POSITION_RULES)
    interventions = check_interventions(interventions, cfg)
    if not interventions:
        return NO_TAP, NO_TAP
    inside = [path for path in interventions if ".attn." in path]
    if inside:
        raise ValueError(
            f"interventions during generation act on the residual stream, mlp.hidden, embed and final; the cached "
            f"attention does not tap its insides, got {', '.join(inside)}"
        )
    if step != "eager" and not (step == "compile" and is_compilable(interventions)):
        raise ValueError(f"interventions during generation need step='eager', or step='compile' with WithTensors "
                         f"interventions only (interp.steering.steer makes one; a compiled step would be rebuilt "
                         f"for every other function), got step={step!r}")
    return (NO_TAP if positions == "generated" else Tap(interventions, record=False),
            NO_TAP if positions == "prompt" else Tap(interventions, record=False))


def generate_stream(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    seq_lengths: SeqLengths = None,
    pad_id: int = 0,
    step: str | Stepper = "eager",
    interventions: dict | None = None,
    positions: str = "all",
) -> Iterator[Int[Tensor, "*batch"]]:
    """Yield the next token of every row, one step at a time, as soon as it is sampled.

    ``sampling`` says how a token is chosen (default: temperature 1), ``seed`` drives the draws. A row that
    produced one of ``stop_tokens`` yields ``pad_id`` afterwards; the stream ends after ``max_new_tokens``
    steps or once every row has stopped. ``step`` picks the decode step (``decode_steps.decode_step_for``):
    ``"eager"``, ``"compile"`` (``torch.compile``, one graph for every block of every step, a CUDA graph on CUDA;
    worth it for long generations), ``"aot"`` (AOTInductor: faster per token, float params only, ~15-40 s to build
    once per shape) or a ``decode_steps.Stepper``. ``interventions`` act at the ``positions`` the module states
    (``"all"``, ``"prompt"`` or ``"generated"``; the eager step, or ``"compile"`` for ``WithTensors`` ones).
    """
    # Checked here, at the call; the generator below starts working at the first next().
    prompt_tap, step_tap = _intervention_taps(interventions, positions, cfg, step)  # before an "aot" build
    stepper = decode_step_for(step, params)
    stepper = tapped_step(step_tap, stepper.kind) if step_tap.active else stepper
    check_sampling_arg(sampling)
    key = random.key(seed)
    max_len = _check_generate_args(prompt, cfg, max_new_tokens, seq_lengths)
    steps = _decode_loop(params, prompt, cfg, max_len, max_new_tokens, sampling, key, seq_lengths, stepper,
                         tap=prompt_tap)
    return until_stopped(steps, stop_tokens, pad_id)


def _decode_loop(
    params: dict,
    prompt: Tensor,
    cfg: Config,
    max_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    key: Tensor,
    seq_lengths: Tensor | None,
    stepper: Stepper,
    *,
    tap: Tap = NO_TAP,
) -> Iterator[Tensor]:
    """The one decode loop: prefill (through ``tap``), then ``max_new_tokens`` times: sample a token, yield it,
    run it through ``stepper``'s step."""
    if max_new_tokens == 0:
        return
    dtype = params["embed"]["tokens"].dtype
    params, cfg = untie_for_decoding(params, cfg)
    max_len = stepper.cache_length(max_len, cfg)
    cache = init_cache(cfg, tuple(prompt.shape[:-1]), max_len=max_len, dtype=dtype, device=prompt.device)
    # Gradients are never wanted here: without no_grad, params that require grad would make every step
    # record a graph (and keep the cache alive through it). Entered per step, never across a yield,
    # so the caller's grad mode is untouched while the stream is paused.
    with torch.no_grad():
        logits, cache = prefill(params, prompt, cache, cfg, seq_lengths=seq_lengths, tap=tap)
    key = key.to(prompt.device)
    for i in range(max_new_tokens):
        # Greedy decoding draws nothing, so it skips deriving the step's key (a dozen ops per token).
        token = sample(logits, None if sampling.greedy else random.fold_in(key, i), sampling)
        yield token
        if i + 1 == max_new_tokens:
            return
        with torch.no_grad(), stepper.guards(i):
            logits, cache = stepper.step(params, token, cache, cfg)


def generate_stream_sliding(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    keep: int | None = None,
    step: str | Stepper = "eager",
) -> Iterator[Int[Tensor, "*batch"]]:
    """``generate_stream`` that may run past ``max_seq_len``: whenever the context is full it starts a fresh
    cache from the last ``keep`` tokens (default: half of ``max_seq_len``) and goes on.

    The model never sees more than ``max_seq_len`` tokens, as in training; re-filling only when full
    (rather than cropping and recomputing every step) keeps the KV-cache's speed. Each segment samples
    with its own key derived from ``seed``. A row that produced one of ``stop_tokens`` yields ``pad_id``
    afterwards; the stream ends once every row has stopped. ``step`` picks the decode step as in
    ``generate_stream`` (the full segments share one cache length, so one compiled step serves them).
    """
    if keep is None:
        keep = max(cfg.max_seq_len // 2, 1)
    validate.int_in("keep", keep, 1, cfg.max_seq_len, high_name="max_seq_len")
    check_sampling_arg(sampling)
    random.key(seed)  # checks the seed at the call
    check_max_new_tokens(max_new_tokens)
    decode_step_for(step, params)  # checks the kind at the call; each segment builds its own (its shapes)
    if isinstance(prompt, Tensor) and prompt.ndim and prompt.shape[-1] >= cfg.max_seq_len:
        prompt = prompt[..., -keep:]
    check_tokens(prompt, cfg, name="prompt")
    segments = _segments(params, prompt, cfg, max_new_tokens, sampling, seed, keep, step)
    return until_stopped(segments, stop_tokens, pad_id)


def _segments(params, prompt, cfg, max_new_tokens, sampling, seed, keep, step) -> Iterator[Tensor]:
    """The steps behind ``generate_stream_sliding``, on arguments it has checked: one decode loop per full context."""
    left, segment, context = max_new_tokens, 0, prompt
    while left:
        n = min(left, cfg.max_seq_len - context.shape[-1])
        key = random.key(int(random.fold_in(random.key(seed), segment)) if segment else seed)
        new = []
        loop = _decode_loop(params, context, cfg, context.shape[-1] + n, n, sampling, key, None,
                            decode_step_for(step, params))
        for token in loop:
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


def _check_draft_options(seq_lengths: Tensor | None, step: str | Stepper, params: dict) -> None:
    decode_step_for(step, params)  # a bad kind is named as such before the draft's own refusal
    if seq_lengths is not None or step != "eager":
        raise ValueError(
            f"speculative decoding (draft=...) takes neither seq_lengths nor a step other than 'eager'; got "
            f"seq_lengths={'given' if seq_lengths is not None else None}, step={step!r}"
        )


def generate(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    seq_lengths: SeqLengths = None,
    pad_id: int = 0,
    step: str | Stepper = "eager",
    draft: Draft | None = None,
    interventions: dict | None = None,
    positions: str = "all",
) -> Int[Tensor, "*batch _"]:
    """The prompt followed by up to ``max_new_tokens`` new tokens (see ``generate_stream`` for the options).

    With ``seq_lengths`` each row's new tokens follow its own real prompt and the rest of the row is
    ``pad_id``; the result has ``seq + steps`` columns either way.

    ``draft=speculative.Draft(draft_params, draft_cfg, tokens=4)`` decodes speculatively
    (``ftransformer.speculative``): the draft proposes ``tokens`` tokens per round and the target checks them
    in one pass. The output is distributed as without it (greedy: the same tokens); only the speed changes.
    ``interventions`` / ``positions``: see the module (not with ``draft``).
    """
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id)
    if draft is not None:
        _check_draft_options(seq_lengths, step, params)
        if interventions:
            raise ValueError("speculative decoding (draft=...) takes no interventions; got interventions for "
                             f"{', '.join(interventions)}")
        return speculative_generate(params, prompt, cfg, draft=draft, **options)[0]
    stream = generate_stream(params, prompt, cfg, seq_lengths=seq_lengths, step=step, interventions=interventions,
                             positions=positions, **options)
    return _after_prompt(prompt, stack_steps(stream, prompt), seq_lengths, pad_id)


__all__ = ["POSITION_RULES", "generate", "generate_stream", "generate_stream_sliding", "prefill"]
