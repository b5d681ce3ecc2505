"""What a steering vector costs while generating: greedy tok/s without and with it, measured in one run.

``steering_overhead`` times ``generate`` (eager step, batch 1) plain and with ``interp.steering.steer`` at the
middle layer's ``resid_post`` (``positions="all"``), interleaved repetition by repetition; the overhead is
``1 - steered / plain`` tok/s. Both produce the same number of tokens (no stop tokens). The default clock is the
process's CPU time (one thread): on a CPU shared with other work, wall time swings by more than the overhead.
"""

import time
from collections.abc import Callable

import torch

from ftransformer.bench.timing import interleaved, medians, num_threads
from ftransformer.config import get_preset
from ftransformer.generation import generate
from ftransformer.interp.steering import steer
from ftransformer.params import init_params
from ftransformer.sampling import GREEDY


def steering_overhead(
    preset: str = "seed", *, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
    threads: int | None = 1, seed: int = 0, clock: Callable[[], float] = time.process_time,
) -> dict[str, float]:
    """``{"plain_tok_s", "steered_tok_s", "overhead"}`` (medians; ``overhead`` a fraction) for ``preset``."""
    cfg = get_preset(preset)
    params = init_params(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
    vector = torch.randn(cfg.d_model, generator=gen)
    interventions = steer(vector, f"blocks.{cfg.n_layers // 2}.resid_post", 4.0)
    options = dict(max_new_tokens=new_tokens, sampling=GREEDY)
    fns = {
        "plain": lambda: generate(params, prompt, cfg, **options),
        "steered": lambda: generate(params, prompt, cfg, interventions=interventions, **options),
    }
    with num_threads(threads):
        times, _ = interleaved(fns, repeats=repeats, warmup=warmup, device=prompt.device, clock=clock)
    tok_s = {name: new_tokens / t for name, t in medians(times).items()}
    return {"plain_tok_s": tok_s["plain"], "steered_tok_s": tok_s["steered"],
            "overhead": 1 - tok_s["steered"] / tok_s["plain"]}


def format_overhead(result: dict[str, float], preset: str) -> str:
    """One line for the README: both speeds and the overhead in percent."""
    return (f"{preset}: plain {result['plain_tok_s']:.0f} tok/s, steered {result['steered_tok_s']:.0f} tok/s, "
            f"overhead {100 * result['overhead']:+.1f}%")


__all__ = ["format_overhead", "steering_overhead"]
