"""What a steering vector costs while generating: greedy tok/s without and with it, measured in one run.

``steering_overhead`` times ``generate`` (batch 1, ``step="eager"`` or ``"compile"``) plain and with
``interp.steering.steer`` at the middle layer's ``resid_post`` (``positions="all"``), interleaved repetition by
repetition; the overhead is ``1 - steered / plain`` tok/s. ``nnsight_overhead`` does the same for the same model
as a Hugging Face ``GPT2LMHeadModel``: ``model.generate`` plain against nnsight's generation-time intervention
(``tracer.iter[:]`` adding the vector to ``transformer.h[L].output`` at every step), which gives the same tokens.
Both produce the same number of tokens (no stop tokens). The default clock is the process's CPU time (one
thread): on a CPU shared with other work, wall time swings by more than the overhead.

``ftransformer bench steering [--preset P] [--new-tokens N] [--repeats R]`` prints the table for the README.
"""

import time
from collections.abc import Callable

import torch

from ftransformer.bench.timing import interleaved, medians, num_threads
from ftransformer.config import Config, PRESETS, get_preset
from ftransformer.generation import generate
from ftransformer.interp.steering import steer
from ftransformer.params import init_params
from ftransformer.sampling import GREEDY

CONTENDERS = ("eager", "compile", "nnsight")  # the rows of the table: our two decode steps, nnsight on HF


def _setup(preset: str, prompt_len: int, seed: int) -> tuple[Config, dict, torch.Tensor, torch.Tensor]:
    """The preset as a GPT-2 (tanh GELU, so that Hugging Face runs the same model), a prompt and a vector."""
    cfg = get_preset(preset).replace(activation="gelu_tanh", dropout=0.0)
    params = init_params(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
    return cfg, params, prompt, torch.randn(cfg.d_model, generator=gen)


def _rates(fns: dict, new_tokens: int, repeats: int, warmup: int, threads, clock) -> dict[str, float]:
    """``{"plain_tok_s", "steered_tok_s", "overhead"}`` of the two contenders ``fns`` timed interleaved."""
    with num_threads(threads):
        times, _ = interleaved(fns, repeats=repeats, warmup=warmup, device=torch.device("cpu"), clock=clock)
    tok_s = {name: new_tokens / t for name, t in medians(times).items()}
    return {"plain_tok_s": tok_s["plain"], "steered_tok_s": tok_s["steered"],
            "overhead": 1 - tok_s["steered"] / tok_s["plain"]}


def steering_overhead(
    preset: str = "seed", *, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
    threads: int | None = 1, seed: int = 0, clock: Callable[[], float] = time.process_time, step: str = "eager",
) -> dict[str, float]:
    """``{"plain_tok_s", "steered_tok_s", "overhead"}`` (medians; ``overhead`` a fraction) for ``preset``'s
    ``generate(step=step)``; ``"compile"`` runs the steered blocks compiled with the vector as an argument."""
    cfg, params, prompt, vector = _setup(preset, prompt_len, seed)
    interventions = steer(vector, f"blocks.{cfg.n_layers // 2}.resid_post", 4.0)
    options = dict(max_new_tokens=new_tokens, sampling=GREEDY, step=step)
    fns = {
        "plain": lambda: generate(params, prompt, cfg, **options),
        "steered": lambda: generate(params, prompt, cfg, interventions=interventions, **options),
    }
    return _rates(fns, new_tokens, repeats, max(warmup, step != "eager"), threads, clock)


def _hf_model(params: dict, cfg: Config):
    """The same model as a ``transformers.GPT2LMHeadModel`` and nnsight's wrapper of it (a word-level tokenizer of
    the ids, which nnsight asks for and the benchmark never uses: it passes ids)."""
    import transformers
    from nnsight.modeling.transformers import TransformersModel
    from tokenizers import Tokenizer, models

    from ftransformer.interop.hf_gpt2 import config_to_hf, to_hf_gpt2

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg))).eval()
    hf.load_state_dict(to_hf_gpt2(params, cfg), strict=True)
    words = Tokenizer(models.WordLevel({str(i): i for i in range(cfg.vocab_size)}, unk_token="0"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="0", pad_token="0", eos_token="0")
    return hf, TransformersModel(hf, tokenizer=tok, task="text-generation")


def nnsight_generate(lm, prompt: torch.Tensor, layer: int, vector: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``new_tokens`` tokens with ``vector`` added to ``transformer.h[layer]``'s output at every step, by
    nnsight's generation-time intervention; the prompt and the new tokens."""
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with lm.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     pad_token_id=0) as tracer:
        for _ in tracer.iter[:new_tokens]:
            out = lm.transformer.h[layer].output
            (out[0] if isinstance(out, tuple) else out)[:] += vector
        ids = tracer.result.save()
    return ids


def nnsight_overhead(
    preset: str = "seed", *, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
    threads: int | None = 1, seed: int = 0, clock: Callable[[], float] = time.process_time,
) -> dict[str, float]:
    """``steering_overhead`` for Hugging Face's ``generate`` plain against nnsight's steered generation of the
    same model, vector and layer. Raises ``ImportError`` without nnsight."""
    import nnsight  # noqa: F401  (the message below names it)

    cfg, params, prompt, vector = _setup(preset, prompt_len, seed)
    hf, lm = _hf_model(params, cfg)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    layer = cfg.n_layers // 2
    with torch.no_grad():
        fns = {
            "plain": lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), **options),
            "steered": lambda: nnsight_generate(lm, prompt, layer, 4.0 * vector, new_tokens),
        }
        return _rates(fns, new_tokens, repeats, warmup, threads, clock)


def format_overhead(result: dict[str, float], preset: str) -> str:
    """One line for the README: both speeds and the overhead in percent."""
    return (f"{preset}: plain {result['plain_tok_s']:.0f} tok/s, steered {result['steered_tok_s']:.0f} tok/s, "
            f"overhead {100 * result['overhead']:+.1f}%")


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="model sizes (default: seed)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved repetitions (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the process's CPU time (default; steady on a shared machine); wall: elapsed time")
    parser.add_argument("--only", choices=CONTENDERS, action="append", default=None,
                        help="run only these rows (repeatable; default: all)")


def run(args) -> int:
    """Print one row per contender: plain and steered tok/s at batch 1 and the overhead."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    kw = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
              clock=clock)
    print(f"steering overhead, {args.preset} (GPT-2 shape, tanh GELU), batch 1, {args.prompt_len} + "
          f"{args.new_tokens} tokens, greedy, {args.threads} thread(s), {args.clock} clock, median of {args.repeats}")
    print(f"| {'decoding':<36} | plain tok/s | steered tok/s | overhead |\n|{'-' * 38}|------------:|--------------:|---------:|")
    for name in args.only or CONTENDERS:
        label = {"eager": "ftransformer generate, eager step", "compile": "ftransformer generate, step=compile",
                 "nnsight": "HF generate vs nnsight tracer.iter"}[name]
        try:
            r = nnsight_overhead(args.preset, **kw) if name == "nnsight" else steering_overhead(args.preset, step=name, **kw)
        except ImportError as e:
            print(f"| {label:<36} | skipped: nnsight or transformers does not import ({e})")
            continue
        print(f"| {label:<36} | {r['plain_tok_s']:11.0f} | {r['steered_tok_s']:13.0f} | {100 * r['overhead']:+7.1f}% |",
              flush=True)
    return 0


__all__ = ["format_overhead", "nnsight_generate", "nnsight_overhead", "steering_overhead"]
