"""The one timing harness of the benchmarks: interleaved repetitions, medians, and a scoped thread count.

Contenders alternate repetition by repetition (warm-up first), so drifting machine load hits all of
them alike; each call is timed between device synchronizations; medians are reported.
"""

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from ftransformer import validate


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved(
    fns: dict[str, Callable],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    inputs: Sequence | None = None,
    clock: Callable[[], float] = time.perf_counter,
    unit: float = 1.0,
) -> tuple[dict[str, list[float]], dict]:
    """Time every contender ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Repetition ``i`` calls each ``fn(inputs[i % len(inputs)])`` (or ``fn()`` when ``inputs`` is None).
    Returns the times of each contender (``clock`` seconds times ``unit``: ``1e3`` gives ms) and its
    last output.
    """
    def call(fn, i):
        return fn() if inputs is None else fn(inputs[i % len(inputs)])

    outputs = {}
    for i in range(warmup):
        for name, fn in fns.items():
            outputs[name] = call(fn, i)
    sync(device)
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = clock()
            outputs[name] = call(fn, i)
            sync(device)
            times[name].append((clock() - start) * unit)
    return times, outputs


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each contender's times."""
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads (None: as they are); the old count is restored on
    exit, also on an error. Yields the count in use."""
    if n is not None and (not validate.is_int(n) or n < 1):
        raise ValueError(f"--threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


__all__ = ["interleaved", "medians", "num_threads", "sync"]
