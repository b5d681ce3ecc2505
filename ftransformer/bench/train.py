"""``ftransformer bench train``: one training step of the functional model against a plain ``torch.nn`` GPT.

The baseline is the GPT everyone writes first (nanoGPT's shape): ``nn.Embedding``, ``nn.Linear``,
``nn.LayerNorm``, ``F.scaled_dot_product_attention``, tied embeddings, trained with
``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW`` (torch's default implementation
for the device). It starts from a copy of the functional model's parameters, both use the same
recipe (AdamW, betas (0.9, 0.99), weight decay 0.1 on matrices, clipping at 1.0, warm-up + cosine
learning rate) and see the same batches. The steps alternate in one process -- warm-up first, then
interleaved repetitions -- so drifting machine load hits both alike; medians are reported.
"""

import statistics
import time

import torch

from ftransformer.bench import scaling
from ftransformer.bench.train_steps import (
    check_same_model,
    check_supported,
    make_functional_step,
    make_nn_step,
    nn_from_params,
    random_batches,
)
from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.params import init_params

DEFAULT_PRESET = "shakespeare-char-cpu"
TARGETS = {"functional (eager)": 1.10, "functional (compiled)": 0.90}


# ---------------------------------------------------------------- running and reporting


def format_table(times: dict, tokens_per_step: int, baseline: str) -> str:
    """Median and min ms/step, tokens/s and the ratio to ``baseline`` for every contender."""
    base = statistics.median(times[baseline])
    width = max(len(n) for n in times) + 2
    lines = [f"{'step':<{width}}{'median ms':>10}{'min ms':>9}{'tokens/s':>11}{'vs torch.nn':>13}{'target':>8}"]
    lines.append("-" * len(lines[0]))
    for name, ts in times.items():
        med = statistics.median(ts)
        target = f"<={TARGETS[name]:.2f}x" if name in TARGETS else ""
        lines.append(
            f"{name:<{width}}{med:>10.2f}{min(ts):>9.2f}{tokens_per_step / med * 1e3:>11,.0f}"
            f"{med / base:>12.2f}x{target:>8}"
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model sizes to time (default: {DEFAULT_PRESET}); dropout is set to 0")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per contender (default: 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first (default: 5)")
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per step (default: 12)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the functional step under torch.compile (the first call compiles: a minute)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a busy "
                        "machine when run with --threads 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and batches (default: 0)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's top operators for each contender")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="data-parallel scaling instead: time 1 and then N torchrun processes (each its own "
                        "--batch-size rows, --threads default 1), the functional step against DDP; "
                        "see ftransformer.bench.scaling")


def _profile(steps: dict, batches: list) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[:5]:
                step(batch)
        print(f"\nprofile of {name} (5 steps):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def run(args) -> int:
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    cfg = get_preset(args.preset).replace(dropout=0.0)
    check_supported(cfg)
    seq = cfg.max_seq_len if args.seq_len is None else args.seq_len
    if not 1 <= seq <= cfg.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, max_seq_len={cfg.max_seq_len}], got {seq}")
    if args.nproc is not None:
        if args.nproc < 2:
            raise ValueError(f"--nproc must be >= 2 (it compares N processes with one), got {args.nproc}")
        if args.profile:
            raise ValueError("--profile times one process; it does not combine with --nproc")
        scaling.run(args, seq)
        return 0
    with num_threads(args.threads):
        _run(args, cfg, seq)
    return 0


def _run(args, cfg: Config, seq: int) -> None:
    device = torch.device(args.device)
    params = init_params(cfg, seed=args.seed, device=device)
    model = nn_from_params(params, cfg).to(device)
    batches = random_batches(cfg, args.batch_size, seq, seed=args.seed, device=device)
    ours, theirs = check_same_model(params, model, cfg, batches[0])

    steps = {
        "torch.nn + AdamW": make_nn_step(model),
        "functional (eager)": make_functional_step(params, cfg, compile=False),
    }
    if args.compile:
        steps["functional (compiled)"] = make_functional_step(params, cfg, compile=True)
        # Compile before the warm-up, so the first timed repetitions do not wait on inductor.
        start = time.perf_counter()
        steps["functional (compiled)"](batches[0])
        print(f"compiled the functional step in {time.perf_counter() - start:.1f} s")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times, _ = interleaved(steps, repeats=args.steps, warmup=args.warmup, device=device, inputs=batches, clock=clock,
                           unit=1e3)
    tokens = args.batch_size * seq
    print(
        f"bench train: preset {args.preset}, batch {args.batch_size} x {seq} tokens, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} interleaved steps "
        f"after {args.warmup} warm-up, {args.clock} clock"
    )
    print(f"initial loss: functional {ours:.6f}, torch.nn {theirs:.6f}")
    print(format_table(times, tokens, "torch.nn + AdamW"))
    if args.profile:
        _profile(steps, batches)
