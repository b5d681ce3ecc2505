"""``ftransformer bench sae``: a stack of SAEs trained by one vmapped step against the same SAEs one by one,
and against SAELens (the reference library) training the same TopK SAEs.

Both our contenders train ``--members`` SAEs (default 8, members differing in seed, k and learning
rate) on the same activation batch: ``stack_step`` (one ``torch.func.vmap`` over the stack) against
``--members`` calls of ``sae_step`` in a row. Before timing, one step of each is checked to give the
same states (float32, to 1e-4). Timings are interleaved (every repetition runs each contender once, so
drifting machine load hits all alike); medians reported. The activations are synthetic superposition
data (``4 * d_in`` unit directions, about 4 firing per row): speed does not depend on what they are.

What vmap saves is the per-step overhead (Python, dispatch, one optimizer walk per member): the
default sizes (d_in 32, d_sae 256, 128 rows: a hyperparameter sweep's small SAEs) are where that
dominates on a CPU. Where the matmuls dominate (e.g. ``--d-in 128 --d-sae 1024 --batch-size 512``) both
contenders do the same FLOPs on the same cores and take about the same time on a CPU.

SAELens (``--architecture topk`` only; elsewhere, or where ``import sae_lens`` fails, its rows say why
they were skipped): each member becomes a ``sae_lens.TopKTrainingSAE`` (its defaults, so
``rescale_acts_by_decoder_norm=True``) with OUR member's initial weights copied in, the member's ``k``,
and an ``SAETrainer`` (Adam at the member's learning rate, our betas, a constant schedule, its dead
window set to our ``dead_tokens`` in steps). Its step is ``SAETrainer.step`` -- what its ``fit`` and its
``MultiSAETrainer`` call per SAE and batch. Timed: its step against ``sae_step`` (one SAE) and
``--members`` of its steps against one ``stack_step``. Losses: both train every member for ``--steps``
steps on the same batches of one activation tensor; the first step's MSE must agree (same weights,
same batch, same forward pass), the last step's MSE is printed side by side. The trajectories differ
afterwards because the training rules do: SAELens clips the gradient norm to 1 and keeps the decoder
norm free (dividing it out of the TopK selection), ours renormalizes decoder rows after every step; its
auxiliary loss (coefficient 1, no variance normalization) differs from ours once a latent is dead.
"""

import warnings
from types import SimpleNamespace

import torch

from ftransformer import random, tree
from ftransformer.tree import stack as stack_params, unstack as unstack_params
from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.bench.vmap import format_table
from ftransformer.interp.sae.architectures import ARCHITECTURES, SAEConfig
from ftransformer.interp.sae.stack import BETAS, init_stack, make_hparams, sae_step, stack_step
from ftransformer.interp.sae.synthetic import feature_directions, superposition_batch

VMAPPED, SEQUENTIAL, ONE = "stack_step (one vmap)", "{n} x sae_step", "sae_step (1 SAE)"
SAELENS_N, SAELENS_ONE = "{n} x SAELens SAETrainer.step", "SAELens SAETrainer.step (1 SAE)"
SAELENS_PIP = "pip install sae-lens -c <file pinning your torch>"
GOAL = 1.5  # speed-up of the vmapped step over the sequential steps, on CPU
FIRST_STEP_TOL = 1e-4  # relative: the first step's MSE of SAELens and ours (same weights, same batch)
# SAELens' parameter names for ours (same layouts: W_enc [d_in, d_sae], W_dec [d_sae, d_in])
SAELENS_NAMES = {"W_enc": "w_enc", "b_enc": "b_enc", "W_dec": "w_dec", "b_dec": "b_dec"}


def add_arguments(parser) -> None:
    parser.add_argument("--architecture", default="topk", choices=ARCHITECTURES, help="SAE kind (default: topk)")
    parser.add_argument("--d-in", type=int, default=32, help="activation width (default: 32)")
    parser.add_argument("--d-sae", type=int, default=256, help="latents per SAE (default: 256)")
    parser.add_argument("--batch-size", type=int, default=128, help="activation rows per step (default: 128)")
    parser.add_argument("--members", type=int, default=8, help="SAEs in the stack (default: 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed interleaved repetitions (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default: 3)")
    parser.add_argument("--steps", type=int, default=50,
                        help="training steps of the SAELens loss comparison (default: 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SAEs and the activations (default: 0)")


def _setup(args) -> tuple:
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture=args.architecture, k_max=min(32, args.d_sae))
    n = args.members
    ks = [float(min(cfg.k_max, 4 * (i % 8 + 1))) for i in range(n)]
    hp = make_hparams(n, k=ks, l1=[1e-3 * (i + 1) for i in range(n)], lr=[1e-4 * (i + 1) for i in range(n)])
    state = init_stack(random.split(random.key(args.seed), n), hp, cfg)
    return cfg, hp, state, _activations(args)


def _activations(args) -> torch.Tensor:
    """``[steps, batch_size, d_in]``: sparse combinations of ``4 * d_in`` unit directions (about 4 per row)."""
    k_dirs, k_acts = random.split(random.key(args.seed + 1), 2)
    directions = feature_directions(k_dirs, 4 * args.d_in, args.d_in)
    rows = superposition_batch(k_acts, directions, args.steps * args.batch_size, p=1 / args.d_in)
    return rows.reshape(args.steps, args.batch_size, args.d_in)


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


def load_saelens(architecture: str = "topk") -> tuple[SimpleNamespace | None, str | None]:
    """SAELens' TopK training classes, or ``None`` and why they are not used."""
    if architecture != "topk":
        return None, f"the SAELens comparison trains TopK SAEs (--architecture topk), got {architecture}"
    try:
        with warnings.catch_warnings():
            # transformer_lens, which sae_lens imports, warns about its own deprecated modules on import
            warnings.simplefilter("ignore")
            from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
            from sae_lens.config import SAETrainerConfig
            from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as error:
        if error.name == "sae_lens":
            return None, f"sae_lens is not installed ({SAELENS_PIP})"
        return None, f"import sae_lens failed: {error} ({SAELENS_PIP})"
    return SimpleNamespace(sae=TopKTrainingSAE, config=TopKTrainingSAEConfig, trainer=SAETrainer,
                           trainer_config=SAETrainerConfig), None


def saelens_trainers(sl: SimpleNamespace, state, hp: dict, cfg: SAEConfig, batches: torch.Tensor) -> list:
    """One ``SAETrainer`` per member of the stack ``state``: our member's weights, ``k`` and ``lr``."""
    steps, rows = batches.shape[:2]
    dead_window = -(-cfg.dead_tokens // rows) - 1  # ours: dead at >= dead_tokens tokens; SAELens: > window steps
    trainers = []
    for params, k, lr in zip(unstack_params(state.params), hp["k"].tolist(), hp["lr"].tolist()):
        sae = sl.sae(sl.config(d_in=cfg.d_in, d_sae=cfg.d_sae, k=int(k), dtype="float32", device="cpu"))
        with torch.no_grad():
            for theirs, ours in SAELENS_NAMES.items():
                getattr(sae, theirs).copy_(params[ours])
        tcfg = sl.trainer_config(total_training_samples=steps * rows, train_batch_size_samples=rows, lr=lr,
                                 lr_end=lr, adam_beta1=BETAS[0], adam_beta2=BETAS[1], dead_feature_window=dead_window)
        trainers.append(sl.trainer(tcfg, sae, data_provider=iter(batches)))
    return trainers


def saelens_step(trainer, x: torch.Tensor) -> torch.Tensor:
    """One SAELens training step (as its ``fit`` takes it); returns the step's MSE."""
    out = trainer.step(x)
    trainer.n_training_steps += 1
    return out.losses["mse_loss"].detach()


def compare_losses(sl: SimpleNamespace, cfg: SAEConfig, hp: dict, state, batches: torch.Tensor) -> list[dict]:
    """Train every member ``len(batches)`` steps with both libraries from the same weights on the same
    batches. Per member: ``k``, ``lr`` and the MSE of the first and the last step of each. ``ValueError``
    if the first steps' MSEs (same weights, same batch) differ by more than ``FIRST_STEP_TOL``."""
    trainers = saelens_trainers(sl, state, hp, cfg, batches)
    theirs = torch.stack([torch.stack([saelens_step(t, x) for x in batches]) for t in trainers], 1)
    ours = []
    for x in batches:
        state, metrics = stack_step(state, hp, x, cfg)
        ours.append(metrics["mse"])
    ours = torch.stack(ours)  # [steps, members], as theirs
    gap = float(((ours[0] - theirs[0]).abs() / theirs[0].abs().clamp_min(1e-12)).max())
    if gap > FIRST_STEP_TOL:
        raise ValueError(f"the first step's MSE of SAELens and ours differ by {gap:.3g} relative "
                         f"(expected < {FIRST_STEP_TOL:g}: same weights, same batch)")
    return [{"k": int(k), "lr": lr, "first": float(ours[0, i]), "first_saelens": float(theirs[0, i]),
             "last": float(ours[-1, i]), "last_saelens": float(theirs[-1, i])}
            for i, (k, lr) in enumerate(zip(hp["k"].tolist(), hp["lr"].tolist()))]


def format_losses(rows: list[dict], steps: int) -> str:
    """One row per member: the MSE after step 1 and after the last step, ours and SAELens'."""
    head = (f"{'member':>6}{'k':>4}{'lr':>9}{'MSE step 1':>12}{'SAELens':>10}"
            f"{f'MSE step {steps}':>{max(12, len(str(steps)) + 10)}}{'SAELens':>10}{'ours/SAELens':>14}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        lines.append(f"{i:>6}{r['k']:>4}{r['lr']:>9.1e}{r['first']:>12.4f}{r['first_saelens']:>10.4f}"
                     f"{r['last']:>{max(12, len(str(steps)) + 10)}.4f}{r['last_saelens']:>10.4f}"
                     f"{r['last'] / r['last_saelens']:>14.3f}")
    return "\n".join(lines)


def _contenders(args, cfg, hp, state, x, sl) -> dict:
    members, hps = unstack_params(state), unstack_params(hp)
    fns = {VMAPPED: lambda: stack_step(state, hp, x, cfg),
           SEQUENTIAL.format(n=args.members): lambda: [sae_step(s, h, x, cfg) for s, h in zip(members, hps)],
           ONE: lambda: sae_step(members[0], hps[0], x, cfg)}
    if sl is not None:
        trainers = saelens_trainers(sl, state, hp, cfg, x[None])
        fns[SAELENS_N.format(n=args.members)] = lambda: [saelens_step(t, x) for t in trainers]
        fns[SAELENS_ONE] = lambda: saelens_step(trainers[0], x)
    return fns


def run(args) -> int:
    for name in ("d_in", "d_sae", "batch_size", "members", "repeats", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with num_threads(args.threads) as threads:
        sl, why = load_saelens(args.architecture)
        cfg, hp, state, batches = _setup(args)
        diff = _check_same(cfg, hp, state, batches[0])
        losses = None if sl is None else compare_losses(sl, cfg, hp, state, batches)
        fns = _contenders(args, cfg, hp, state, batches[0], sl)
        times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=torch.device("cpu"), unit=1e3)
    n = args.members
    print(f"{n} {args.architecture} SAEs, d_in={args.d_in}, d_sae={args.d_sae}, batch {args.batch_size} rows, "
          f"{threads} threads; {args.repeats} interleaved repetitions after {args.warmup} warm-up, medians")
    print(f"one vmapped step equals the sequential steps to {diff:.2g}\n")
    group = [VMAPPED, SEQUENTIAL.format(n=n), SAELENS_N.format(n=n)]
    missing = {} if sl is not None else {SAELENS_N.format(n=n): why}
    print(format_table(f"{n} SAEs, one step", {k: times[k] for k in group if k in times}, VMAPPED, {}, missing))
    print(f"\nspeed-up: this row's median time / the vmapped row's (goal for {group[1]}: >= {GOAL:g}x on a CPU)\n")
    missing = {} if sl is not None else {SAELENS_ONE: why}
    print(format_table("1 SAE, one step", {k: times[k] for k in (ONE, SAELENS_ONE) if k in times}, ONE, {}, missing))
    print(f"\nspeed-up: this row's median time / the {ONE} row's")
    if losses is None:
        print(f"\nloss comparison with SAELens skipped: {why}")
    else:
        print(f"\nloss after the same {args.steps} steps on the same batches (training MSE of that step's batch; "
              f"step 1 agrees: same weights, same architecture)")
        print(format_losses(losses, args.steps))
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m ftransformer.bench.sae", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
