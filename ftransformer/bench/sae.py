"""``ftransformer bench sae``: a stack of SAEs trained by one vmapped step against the same SAEs one by one.

Both contenders train ``--members`` SAEs (default 8, TopK, members differing in seed, k and learning
rate) on the same activation batch: ``stack_step`` (one ``torch.func.vmap`` over the stack) against
``--members`` calls of ``sae_step`` in a row. Before timing, one step of each is checked to give the
same states (float32, to 1e-4). Timings are interleaved (every repetition runs each contender once, so
drifting machine load hits both alike); medians reported. The activations are Gaussian: speed does
not depend on what they are.

What vmap saves is the per-step overhead (Python, dispatch, one optimizer walk per member): the
default sizes (d_in 32, d_sae 256, 128 rows: a hyperparameter sweep's small SAEs) are where that
dominates on a CPU. Where the matmuls dominate (e.g. ``--d-in 128 --d-sae 1024 --batch-size 512``) both
contenders do the same FLOPs on the same cores and take about the same time on a CPU.

SAELens (the reference library) is compared only where ``import sae_lens`` works; otherwise its row
says it was skipped.
"""

import torch

from ftransformer import random, tree
from ftransformer.tree import stack as stack_params, unstack as unstack_params
from ftransformer.bench.timing import interleaved
from ftransformer.bench.vmap import format_table
from ftransformer.interp.sae.architectures import ARCHITECTURES, SAEConfig
from ftransformer.interp.sae.stack import init_stack, make_hparams, sae_step, stack_step

VMAPPED, SEQUENTIAL, SAELENS = "stack_step (one vmap)", "{n} x sae_step", "SAELens"
GOAL = 1.5  # speed-up of the vmapped step over the sequential steps, on CPU


def add_arguments(parser) -> None:
    parser.add_argument("--architecture", default="topk", choices=ARCHITECTURES, help="SAE kind (default: topk)")
    parser.add_argument("--d-in", type=int, default=32, help="activation width (default: 32)")
    parser.add_argument("--d-sae", type=int, default=256, help="latents per SAE (default: 256)")
    parser.add_argument("--batch-size", type=int, default=128, help="activation rows per step (default: 128)")
    parser.add_argument("--members", type=int, default=8, help="SAEs in the stack (default: 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed interleaved repetitions (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SAEs and the batch (default: 0)")


def _setup(args) -> tuple:
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=args.architecture, k_max=min(32, args.d_sae))
    n = args.members
    ks = [float(min(cfg.k_max, 4 * (i % 8 + 1))) for i in range(n)]
    hp = make_hparams(n, k=ks, l1=[1e-3 * (i + 1) for i in range(n)], lr=[1e-4 * (i + 1) for i in range(n)])
    state = init_stack(random.split(random.key(args.seed), n), hp, cfg)
    x = random.normal(random.key(args.seed + 1), (args.batch_size, args.d_in))
    return cfg, hp, state, x


def _check_same(cfg, hp, state, x) -> float:
    """Largest difference between one vmapped step and the members' steps one by one."""
    stacked, _ = stack_step(state, hp, x, cfg)
    hps = unstack_params(hp)
    alone = stack_params([sae_step(s, h, x, cfg)[0] for s, h in zip(unstack_params(state), hps)])
    diff = max(float((a - b).abs().max()) for a, b in zip(tree.leaves(stacked),
                                                          tree.leaves(alone)))
    if diff > 1e-4:
        raise ValueError(f"the vmapped step and the sequential steps disagree by {diff:.3g} (expected < 1e-4)")
    return diff


def _saelens_missing() -> str | None:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return "sae_lens is not installed (pip install sae-lens)"
    return "the SAELens comparison is not wired up in this version"


def run(args) -> int:
    for name in ("d_in", "d_sae", "batch_size", "members", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg, hp, state, x = _setup(args)
    diff = _check_same(cfg, hp, state, x)
    members, hps = unstack_params(state), unstack_params(hp)
    sequential = SEQUENTIAL.format(n=args.members)
    fns = {VMAPPED: lambda: stack_step(state, hp, x, cfg),
           sequential: lambda: [sae_step(s, h, x, cfg) for s, h in zip(members, hps)]}
    times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=torch.device("cpu"), unit=1e3)
    print(f"{args.members} {args.architecture} SAEs, d_in={args.d_in}, d_sae={args.d_sae}, batch {args.batch_size} rows, "
          f"{torch.get_num_threads()} threads; {args.repeats} interleaved repetitions after {args.warmup} warm-up, medians")
    print(f"one vmapped step equals the sequential steps to {diff:.2g}\n")
    print(format_table("contender", times, VMAPPED, {}, {SAELENS: _saelens_missing()}))
    print(f"\nspeed-up: this row's median time / the vmapped row's (goal for {sequential}: >= {GOAL:g}x on a CPU)")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m ftransformer.bench.sae", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
