"""``ftransformer bench train --nproc N``: data-parallel scaling from 1 to N processes, against DDP.

Weak scaling: every process trains on its own batch of ``--batch-size`` rows, so N processes step
through N times the tokens of one. Each process count is one ``torchrun`` job (``python -m
torch.distributed.run --standalone``) whose processes time, interleaved as ``bench train`` does:

* ``functional``: the library's pure step with ``all_reduce=`` (``ftransformer.distributed``: the
  gradient pytree summed in flat buckets) -- what ``torchrun ... -m ftransformer train`` runs;
* ``DDP + AdamW``: ``bench train``'s ``torch.nn`` GPT wrapped in
  ``torch.nn.parallel.DistributedDataParallel`` (bucketed all-reduce overlapped with the backward pass).

The one-process rows are plain single-process steps (no process group, no collective), so the
efficiency -- tokens/s per process at N processes over tokens/s of one process -- charges data
parallelism with everything it costs. Each process gets ``--threads`` intra-op threads (default 1); on
a CPU the processes share the cores and the memory bandwidth, so keep ``N x threads <= cores``.
"""

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ftransformer import distributed
from ftransformer.bench import train_steps
from ftransformer.bench.timing import interleaved, medians, num_threads
from ftransformer.config import get_preset
from ftransformer.params import init_params
from ftransformer.tree import flatten_with_paths

FUNCTIONAL, NN, DDP = "functional (eager)", "torch.nn + AdamW", "DDP + AdamW"
COMPILED = "functional (compiled)"
WORKER_MODULE = "ftransformer.bench.scaling"  # what each process of the torchrun job runs


# ---------------------------------------------------------------- one process of the torchrun job


class _ReduceClock:
    """Wraps an ``all_reduce`` hook and adds up the milliseconds spent inside it."""

    def __init__(self, reduce):
        self.reduce, self.ms = reduce, 0.0

    def __call__(self, tensors):
        start = time.perf_counter()
        out = self.reduce(tensors)
        self.ms += (time.perf_counter() - start) * 1e3
        return out


def _same_everywhere(params: dict, ctx) -> bool:
    """Whether every process holds the same parameters (a sum and a max-abs checksum, compared exactly)."""
    leaves = list(flatten_with_paths(params).values())
    mine = torch.stack([sum(x.double().sum() for x in leaves), max(x.abs().max().double() for x in leaves)])
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return all(torch.equal(e, everyone[0]) for e in everyone)


def _contenders(params, cfg, ctx, *, compile: bool) -> tuple[dict, list]:
    """The steps to time (name -> step) and the all-reduce clocks of the functional ones."""
    clocks = []

    def functional(compiled: bool):
        hook = None
        if ctx is not None:
            hook = _ReduceClock(ctx.all_reduce_sum)
            clocks.append((COMPILED if compiled else FUNCTIONAL, hook))
        return train_steps.make_functional_step(params, cfg, compile=compiled, all_reduce=hook)

    model = train_steps.nn_from_params(params, cfg).to(ctx.device if ctx else "cpu")
    if ctx is not None:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    steps = {NN if ctx is None else DDP: train_steps.make_nn_step(model), FUNCTIONAL: functional(False)}
    if compile:
        steps[COMPILED] = functional(True)
    return steps, clocks


def _parse_worker_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for flag in ("--preset", "--json"):
        parser.add_argument(flag, required=True)
    for flag in ("--steps", "--warmup", "--batch-size", "--seq-len", "--threads", "--seed"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    return parser.parse_args(argv)


def _measure(args: argparse.Namespace, ctx) -> dict:
    """Time the contenders in this process; the DDP model and the steps die when this returns."""
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    device = ctx.device if ctx else torch.device(args.device)
    cfg = get_preset(args.preset).replace(dropout=0.0)
    params = init_params(cfg, seed=args.seed, device=device)
    # weak scaling: each process its own rows
    batches = train_steps.random_batches(cfg, args.batch_size, args.seq_len, seed=args.seed * 1000 + rank, device=device)
    steps, clocks = _contenders(params, cfg, ctx, compile=args.compile)
    train_steps.check_same_model(params, train_steps.nn_from_params(params, cfg).to(device), cfg, batches[0])
    compile_s = None
    if args.compile:
        start = time.perf_counter()
        steps[COMPILED](batches[0])
        compile_s = time.perf_counter() - start
    interleaved(steps, repeats=args.warmup, warmup=0, device=device, inputs=batches)
    for _, clock in clocks:
        clock.ms = 0.0
    times, _ = interleaved(steps, repeats=args.steps, warmup=0, device=device, inputs=batches, unit=1e3)
    return {
        "world_size": world, "backend": ctx.backend if ctx else None, "threads": torch.get_num_threads(),
        "median_ms": medians(times),
        "all_reduce_ms": {name: clock.ms / args.steps for name, clock in clocks},
        "same_params_everywhere": _same_everywhere(steps[FUNCTIONAL].state["params"], ctx) if ctx else True,
        "compile_s": compile_s,
    }


def worker(argv: list[str] | None = None) -> None:
    """Time the contenders in this process of the job; rank 0 writes the medians to ``--json``.

    Each process first writes its pid beside ``--json`` (``<json>.pid.<rank>``), so the launcher can
    kill it if the job stalls: torchrun starts its workers in sessions of their own, out of reach of a
    signal to the launcher's process group.
    """
    args = _parse_worker_args(argv)
    Path(f"{args.json}.pid.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    with num_threads(args.threads):
        ctx = distributed.init_from_env(device=args.device)
        result = _measure(args, ctx)
    # The DDP model's reducer holds the process group: it must be gone before the group is destroyed
    # (a DDP object freed after destroy_process_group intermittently blocked its process at exit).
    gc.collect()
    if ctx is not None:
        ctx.barrier()
    if ctx is None or ctx.is_main:
        Path(args.json).write_text(json.dumps(result))
    distributed.shutdown()


# ---------------------------------------------------------------- the launcher and the table


def _launch(nproc: int, args, seq: int, out: Path, *, timeout_s: float) -> dict:
    """Run one torchrun job of ``nproc`` worker processes; its rank 0's result."""
    threads = args.threads or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", WORKER_MODULE, "--preset", args.preset, "--json", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--seq-len", str(seq), "--threads", str(threads), "--seed", str(args.seed), "--device", args.device]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:  # the single-process baseline: no process group at all
        cmd[1:5] = []
    log = out.with_suffix(".log")
    with open(log, "w") as sink:  # a file, not a pipe: a stray worker cannot keep the reader waiting
        job = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            returncode = job.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(job, out)
            raise RuntimeError(
                f"bench train --nproc: the {nproc}-process job ran past {timeout_s:.0f} s and was stopped; "
                f"its output:\n{_tail(log)}"
            ) from None
    if returncode != 0:
        raise RuntimeError(f"bench train --nproc: the {nproc}-process job failed (exit {returncode}):\n{_tail(log)}")
    return json.loads(out.read_text())


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _stop(job: subprocess.Popen, out: Path, grace_s: float = 20.0) -> None:
    """Stop a stalled job: SIGTERM lets torchrun stop its workers; then kill whatever is left, the
    workers found by the pid files they wrote (they run in sessions of their own)."""
    job.terminate()
    try:
        job.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
    for pid_file in out.parent.glob(f"{out.name}.pid.*"):
        try:
            pid = int(pid_file.read_text())
            # Only a process whose command line names this job's output is one of its workers (a pid may
            # have been reused); where /proc cannot tell (not Linux), nothing is killed by pid.
            if str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # already gone, unreadable, or the file was caught half-written


def format_scaling_table(results: dict, tokens_per_process: int) -> str:
    """One row per (processes, contender): median ms/step, all-reduce ms, tokens/s in all and per
    process, and efficiency against the same contender (DDP: against torch.nn) in one process."""
    one = results[1]["median_ms"]
    head = (f"{'procs':>5}  {'step':<22}{'median ms':>10}{'all-reduce ms':>15}{'tokens/s':>11}"
            f"{'per proc':>10}{'efficiency':>12}")
    lines = [head, "-" * len(head)]
    for nproc, result in sorted(results.items()):
        for name, ms in result["median_ms"].items():
            base = one[NN if name == DDP else name]
            reduce_ms = result["all_reduce_ms"].get(name)
            per_proc = tokens_per_process / ms * 1e3
            lines.append(
                f"{nproc:>5}  {name:<22}{ms:>10.2f}{'-' if reduce_ms is None else f'{reduce_ms:.2f}':>15}"
                f"{per_proc * nproc:>11,.0f}{per_proc:>10,.0f}{base / ms:>11.0%}"
            )
    return "\n".join(lines)


def run(args, seq: int) -> None:
    """``bench train --nproc N``: a 1-process job, then an N-process job, then the table."""
    cores = os.cpu_count() or 1
    threads = args.threads or 1
    if args.device == "cpu" and args.nproc * threads > cores:
        print(f"warning: {args.nproc} processes x {threads} threads exceed this machine's {cores} cores: "
              "the processes will compete for cores and the efficiency will say so", file=sys.stderr)
    results = {}
    timeout_s = 120.0 + 5.0 * (args.steps + args.warmup) + (300.0 if args.compile else 0.0)
    with tempfile.TemporaryDirectory(prefix="ft-bench-scaling-") as tmp:
        for nproc in sorted({1, args.nproc}):
            results[nproc] = _launch(nproc, args, seq, Path(tmp) / f"{nproc}.json", timeout_s=timeout_s)
    many = results[args.nproc]
    print(
        f"bench train --nproc {args.nproc}: preset {args.preset}, {args.batch_size} x {seq} tokens per process "
        f"(weak scaling), device {args.device}, backend {many['backend'] or 'none'}, {threads} thread(s) per "
        f"process, {cores} cores, torch {torch.__version__}, {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    print(format_scaling_table(results, args.batch_size * seq))
    if not many["same_params_everywhere"]:
        raise RuntimeError("the processes ended with different parameters: the all-reduce is broken")
    print(f"after the timed steps all {args.nproc} processes hold identical parameters (checked exactly)")


if __name__ == "__main__":
    worker()
