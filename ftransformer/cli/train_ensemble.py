"""``ftransformer train --ensemble N`` / ``--sweep KEY=V1,V2,...`` / ``--dp-clip`` / ``--log-noise-scale``.

The flags are added by ``train_cmd.add_arguments``; an ensemble or sweep run trains every member in one
vmapped step (``ensemble.make_ensemble_step``) through the same ``fit``, with the ``ensemble.Members`` adapter.
"""

import argparse
import itertools

from ftransformer import optim, random
from ftransformer.recipes import TrainRecipe, fit_settings

# What a sweep can vary per member inside one vmapped step: values that are numbers in the step, not
# shapes (the model's sizes fix the stacked tensors' shapes, so they cannot differ between members).
SWEEP_KEYS = ("lr", "weight_decay", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vmap: ensembles, sweeps, per-example gradients")
    group.add_argument(
        "--ensemble", type=int, metavar="N", default=None,
        help="train N models (seeds S, S+1, ...) together in one vmapped step; out DIR gets member-<i>/ "
        "checkpoints, one metrics.jsonl (with a member field), one loss.png and a ranking by val loss",
    )
    group.add_argument(
        "--sweep", metavar="KEY=V1,V2,...", action="append", default=[],
        help=f"train one member per value in one vmapped step; keys: {', '.join(SWEEP_KEYS)}; repeat the flag "
        "for a grid over several keys (e.g. --sweep lr=3e-4,1e-3,3e-3 --sweep weight_decay=0,0.1)",
    )
    group.add_argument(
        "--dp-clip", type=float, metavar="C", default=None,
        help="DP-SGD: clip each example's gradient to norm C, sum, add noise, average (per-example "
        "gradients by vmap; privacy accounting is not done here: use e.g. Opacus's RDP accountant)",
    )
    group.add_argument(
        "--dp-noise", type=float, metavar="SIGMA", default=None,
        help="DP-SGD noise multiplier: Gaussian noise of std SIGMA*C on the summed clipped gradients "
        "(default with --dp-clip: 1.0)",
    )
    group.add_argument(
        "--log-noise-scale", action="store_true",
        help="add the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018), from "
        "per-example gradients, to metrics.jsonl at every evaluation",
    )


def parse_sweep(items: list[str], keys: tuple = SWEEP_KEYS, ints: tuple = ("seed",),
                flag: str = "--sweep") -> dict[str, list]:
    """``["lr=1e-3,3e-3", "seed=0,1"]`` -> ``{"lr": [0.001, 0.003], "seed": [0, 1]}`` (``keys``: those allowed,
    ``ints``: those whose values are ints; ``flag`` names the option in errors)."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not raw.strip():
            raise ValueError(f"{flag} expects KEY=V1,V2,..., got {item!r}")
        if key not in keys:
            raise ValueError(f"{flag} {key}: can sweep only {', '.join(keys)} (model sizes differ in shape)")
        if key in grid:
            raise ValueError(f"{flag} {key} given twice; put all its values in one comma list")
        values = []
        for v in raw.split(","):
            v = v.strip()
            try:
                values.append(int(v) if key in ints else float(v))
            except ValueError:
                raise ValueError(f"{flag} {key}={raw}: {v!r} is not {'an int' if key in ints else 'a number'}") from None
        if any(x < 0 for x in values):
            raise ValueError(f"{flag} {key} values must be >= 0, got {values}")
        grid[key] = values
    return grid


def members_for(ensemble: int | None, sweep: list[str], recipe: TrainRecipe, seed: int) -> list[dict]:
    """One dict per member: the grid of ``--sweep`` values, times ``--ensemble`` seeds."""
    if ensemble is not None and ensemble < 1:
        raise ValueError(f"--ensemble must be >= 1, got {ensemble}")
    grid = parse_sweep(sweep)
    if ensemble is not None and "seed" in grid:
        raise ValueError("--ensemble N sets the seeds; do not also --sweep seed")
    if ensemble is not None:
        grid["seed"] = [seed + i for i in range(ensemble)]
    # lr and weight_decay always travel as per-member values, so every member's step is the same code.
    grid.setdefault("lr", [recipe.lr])
    grid.setdefault("weight_decay", [recipe.weight_decay])
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def sweep_optimizer(recipe: TrainRecipe, steps: int):
    """``(lr, weight_decay) -> optimizer``: the recipe's optimizer (clip, AdamW, warm-up + cosine) with a
    per-member peak lr and weight decay (0-d tensors under vmap)."""
    from ftransformer.recipes import schedule_for

    # The recipe's schedule is linear in its peak: schedule(peak) == peak * schedule(1). The shape is
    # shared, the peak is per member.
    unit = schedule_for(recipe, steps, peak=1.0)

    def make(lr, weight_decay):
        adamw = optim.adamw(lambda step: lr * unit(step), betas=(recipe.beta1, recipe.beta2), eps=recipe.eps,
                            weight_decay=weight_decay)
        if recipe.grad_clip > 0:
            return optim.chain(optim.clip_by_global_norm(recipe.grad_clip), adamw)
        return adamw

    return make


def dp_optimizer(base: optim.GradientTransformation, clip: float, noise: float, seed: int):
    """DP-SGD: per-example clipping and noise first, then the recipe's optimizer."""
    # The noise key is derived from the run's seed but apart from the parameters' and the batches' streams.
    key = random.fold_in(random.key(seed), 0xD15C)
    return optim.chain(optim.dp_aggregate(clip, noise, key=key), base)


def check_flags(args) -> None:
    """Refuse combinations the vmapped paths do not support, naming the flags."""
    many = args.ensemble is not None or bool(args.sweep)
    if args.dp_noise is not None and args.dp_clip is None:
        raise ValueError("--dp-noise needs --dp-clip C (the noise is SIGMA * C)")
    if args.dp_clip is not None and not args.dp_clip > 0:
        raise ValueError(f"--dp-clip must be > 0, got {args.dp_clip}")
    if args.dp_noise is not None and args.dp_noise < 0:
        raise ValueError(f"--dp-noise must be >= 0, got {args.dp_noise}")
    if many:
        for flag, on in (("--compile", args.compile), ("--dp-clip", args.dp_clip is not None),
                         ("--log-noise-scale", args.log_noise_scale)):
            if on:
                raise ValueError(f"{flag} is not supported with --ensemble/--sweep")
    if args.dp_clip is not None and args.compile:
        raise ValueError("--dp-clip does not run compiled; leave out --compile")


def run_members(spec, *, cfg, dataset, device) -> int:
    """Train an ensemble or a sweep (``spec.members``, a ``train_cmd.RunSpec``) through ``fit`` in one vmapped
    step, and print the members ranked by val loss."""
    from ftransformer.ensemble import Members, format_ranking
    from ftransformer.loop import fit
    from ftransformer.params import count_params, init_params

    recipe, members = spec.recipe, spec.members
    n_params = count_params(init_params(cfg, seed=0, device="meta"))
    print(
        f"model: preset {spec.preset}, {n_params:,} parameters x {len(members)} members, vocab {cfg.vocab_size} "
        f"({dataset.tokenizer.kind} tokenizer), {len(dataset.train):,} train / {len(dataset.val):,} val tokens"
    )
    print(f"training: {len(members)} members in one vmapped step, {recipe.steps} steps of {recipe.batch_size} x "
          f"{recipe.seq_len} tokens each"
          + (f" in {recipe.accum_steps} micro-batches" if recipe.accum_steps > 1 else "")
          + f", on {device}, into {str(spec.out)!r}")

    def extra(i: int) -> dict:
        m = members[i]
        member_recipe = recipe.replace(lr=float(m["lr"]), weight_decay=float(m["weight_decay"]))
        return {"train": {"preset": spec.preset, "data": spec.data, "seed": int(m.get("seed", spec.seed)),
                          "recipe": member_recipe.to_dict()},
                "ensemble": {**spec.settings(), "members": members}}

    model = Members(cfg, dataset.train, dataset.val, sweep_optimizer(recipe, recipe.steps), members, seed=spec.seed,
                    tokenizer=dataset.tokenizer, extra=extra)
    result = fit(model.init_params(device), model.train_step(accum_steps=recipe.accum_steps), model,
                 fit_settings(recipe, spec.seed), out_dir=spec.out, resume=spec.resume, device=device,
                 progress=not spec.quiet)
    print(format_ranking(model.summary(result)))
    print(f"metrics: {result.files['metrics']}; plot: {result.files['plot']}")
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: ftransformer train --resume --out {spec.out}")
        return 130
    return 0


__all__ = [
    "SWEEP_KEYS", "add_arguments", "check_flags", "dp_optimizer", "members_for", "parse_sweep", "run_members",
    "sweep_optimizer",
]
