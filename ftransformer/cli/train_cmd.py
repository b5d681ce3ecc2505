"""``ftransformer train``: tokenize a corpus, build a preset's model and optimizer, and run ``fit``.

With no arguments it trains the shakespeare-char-cpu model on the built-in corpus (the running Python's
standard library source) for a short run, into ``./runs/<preset>-<corpus>``.
"""

import argparse
import dataclasses
import types
from pathlib import Path

import torch

from ftransformer import distributed, precision, tree
from ftransformer.checkpoint import BEST, LATEST, checkpoint_exists, read_checkpoint_info
from ftransformer.config import PRESETS, Config, field_types, get_preset
from ftransformer.data import TOKENIZER_KINDS, load_dataset, load_tokenizer
from ftransformer.loop import TokenData, fit
from ftransformer.params import count_params, init_params
from ftransformer.per_example import make_per_example_train_step, noise_scale_record
from ftransformer.recipes import (
    QUICKSTART_PRESET, QUICKSTART_STEPS, RECIPES, TrainRecipe, fit_settings, get_recipe, optimizer_for,
)
from ftransformer.train import TrainStep, make_train_step

RUNS_DIR = "runs"
DEVICES = ("cpu", "cuda", "mps")


def _recipes_table() -> str:
    lines = ["training defaults per preset (change any with --set field=value):"]
    for name, r in RECIPES.items():
        lines.append(
            f"  {name:<22} {r.tokenizer:<4} batch {r.batch_size:<4} seq {r.seq_len:<5} steps {r.steps:<7} "
            f"lr {r.lr:g} (warmup {r.warmup_steps}, cosine to {r.lr * r.min_lr_ratio:g})"
        )
    fields = ", ".join(f.name for f in dataclasses.fields(TrainRecipe))
    lines += [
        "",
        f"recipe fields for --set: {fields}",
        "model fields for --set: any Config field, e.g. d_model, n_layers, dropout, bias, positional",
        "",
        "files written to --out DIR: latest/ and best/ (checkpoints: params, optimizer state, config,",
        "tokenizer, step, metrics), metrics.jsonl (one line per evaluation), loss.png, cache/ (token ids).",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _recipes_table()
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None,
        help=f"model preset and its training recipe (default: {QUICKSTART_PRESET}, shortened to "
        f"{QUICKSTART_STEPS} steps unless --steps is given)",
    )
    parser.add_argument(
        "--data", metavar="FILE", default=None,
        help="UTF-8 text file to train on (default: the built-in corpus, the source of this Python's standard library)",
    )
    parser.add_argument(
        "--tokenizer", choices=TOKENIZER_KINDS, default=None,
        help="char: one id per character; bpe: byte-level BPE trained on the corpus (default: the preset's)",
    )
    parser.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
        help="change a model (Config) or recipe field, e.g. --set n_layers=2 --set warmup_steps=50; repeatable",
    )
    parser.add_argument("--steps", type=int, metavar="N", default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument(
        "--batch-size", type=int, metavar="B", default=None, help="sequences per step (default: the preset's)"
    )
    parser.add_argument(
        "--accum", type=int, metavar="K", default=None,
        help="gradient accumulation: split each batch into this many micro-batches (same update, less memory)",
    )
    parser.add_argument(
        "--lr", type=float, metavar="LR", default=None, help="peak learning rate (default: the preset's)"
    )
    parser.add_argument(
        "--eval-every", type=int, metavar="N", default=None,
        help="steps between evaluations and checkpoints (default: the preset's)",
    )
    parser.add_argument(
        "--eval-batches", type=_eval_batches, metavar="N|all", default=None,
        help="fixed batches in each loss estimate, or 'all': the exact val loss over the whole val split "
        "in non-overlapping seq_len windows (default: the preset's)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None,
        help=f"run directory (default: {RUNS_DIR}/<preset>-<corpus>, with -2, -3, ... if that one is taken)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out DIR from its latest checkpoint, with its saved settings (default --out: "
        "the newest default run directory of this preset and corpus)",
    )
    parser.add_argument(
        "--init-from-hf", metavar="DIR", default=None,
        help="fine-tune a Hugging Face model directory (any supported family: its weights, config and tokenizer.json; "
        "full fine-tuning) instead of training the preset's model from scratch: the preset's recipe with a "
        f"fine-tuning lr {FINETUNE_LR:g}, warm-up over {FINETUNE_WARMUP:.0%}% of the steps and weight decay "
        f"{FINETUNE_WEIGHT_DECAY:g}, unless --lr / --set give them",
    )
    parser.add_argument(
        "--init-from-gguf", metavar="FILE", default=None,
        help="like --init-from-hf, from a GGUF file (llama.cpp's format: weights dequantized to float32, its "
        "tokenizer from the file's metadata)",
    )
    parser.add_argument("--compile", action="store_true", help="compile the train step with torch.compile")
    parser.add_argument(
        "--dtype", choices=precision.CHOICES, default="auto",
        help="compute dtype: bf16 runs the forward and backward in bfloat16 with float32 master weights, optimizer "
        "state and checkpoints; auto (default): bf16 on a CUDA device that supports it, else fp32",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default=None, help="where to train (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", default=None,
        help="seed of the initial parameters, batches and dropout (default: 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from ftransformer.cli import train_ensemble  # --ensemble, --sweep, --dp-clip, --dp-noise, --log-noise-scale

    train_ensemble.add_arguments(parser)


def _eval_batches(raw: str) -> int | str:
    if raw == "all":
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'all', got {raw!r}")
    return value


# ---------------------------------------------------------------- --set parsing


def _parse_value(key: str, raw: str, annotation) -> object:
    """``raw`` converted to the field's type (``int``, ``float``, ``bool``, ``str`` or ``X | None``)."""
    options = [a for a in getattr(annotation, "__args__", (annotation,))]
    if isinstance(annotation, types.UnionType) and type(None) in options and raw.lower() in ("none", "null"):
        return None
    kinds = [a for a in options if a is not type(None)]
    kind = kinds[0] if kinds else str
    if kind is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            if str in kinds:  # e.g. eval_batches: an int or "all"
                return raw
            raise ValueError(f"--set {key}={raw}: expected an int") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected a number") from None
    return raw


def parse_overrides(items: list[str]) -> tuple[dict, dict]:
    """``--set`` items split into ``(config changes, recipe changes)``, each value converted to its field's type."""
    config_fields = field_types()
    recipe_fields = {f.name: f.type for f in dataclasses.fields(TrainRecipe)}
    config_changes, recipe_changes = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key in config_fields:
            config_changes[key] = _parse_value(key, raw.strip(), config_fields[key])
        elif key in recipe_fields:
            recipe_changes[key] = _parse_value(key, raw.strip(), recipe_fields[key])
        else:
            raise ValueError(
                f"--set {key}: unknown field; model fields: {', '.join(config_fields)}; "
                f"recipe fields: {', '.join(recipe_fields)}"
            )
    return config_changes, recipe_changes


# ---------------------------------------------------------------- run directory


def _corpus_tag(data: str | None) -> str:
    return "stdlib" if data is None else (Path(data).stem or "data")


def _default_out(preset: str, data: str | None, *, resume: bool) -> Path:
    """``runs/<preset>-<corpus>``; a fresh run takes the first free ``-2``, ``-3``...; resume takes the newest taken."""
    base = Path(RUNS_DIR) / f"{preset}-{_corpus_tag(data)}"
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    taken = [c for c in candidates if _saved_run(c) is not None]
    if resume:
        if not taken:
            raise ValueError(f"nothing to resume: no checkpoint in {str(base)!r} (pass --out DIR)")
        return taken[-1]
    return next(c for c in candidates if _saved_run(c) is None)


def _saved_run(out: Path) -> Path | None:
    """The checkpoint that holds a run's settings: ``out/latest``, or an ensemble's ``out/member-0/latest``."""
    for latest in (out / LATEST, out / "member-0" / LATEST):
        if checkpoint_exists(latest):
            return latest
    return None


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps: the MPS backend is not available to torch")
    return torch.device(name)


# ---------------------------------------------------------------- the command


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything ``ftransformer train`` will do, decided from the flags (and a resumed run's saved settings)."""

    preset: str
    recipe: TrainRecipe
    data: str | None  # absolute path of the corpus; None: the built-in one
    out: Path
    seed: int
    resume: bool
    tokenizer: str | Path  # a tokenizer kind, or (resume) the checkpoint to load it from
    config: Config | None  # resume: the saved config with --set changes; None: the preset's, sized to the vocab
    config_changes: dict
    device: str | None
    compile: bool
    quiet: bool
    dp_clip: float | None = None
    dp_noise: float | None = None
    log_noise_scale: bool = False
    members: list | None = None  # --ensemble / --sweep: one dict per member
    init_from_hf: str | None = None  # a Hugging Face model directory to fine-tune instead of the preset's model
    init_from_gguf: str | None = None  # or a GGUF file to fine-tune
    dtype: str = "auto"  # --dtype: the compute dtype (precision.resolve); weights and checkpoints stay float32

    def settings(self) -> dict:
        """What a checkpoint keeps of the run (``extra["train"]``), so ``--resume`` can rebuild it."""
        return {"preset": self.preset, "data": self.data, "seed": self.seed, "recipe": self.recipe.to_dict(),
                "dp_clip": self.dp_clip, "dp_noise": self.dp_noise, "log_noise_scale": self.log_noise_scale,
                "init_from_hf": self.init_from_hf, "init_from_gguf": self.init_from_gguf}

    @property
    def pretrained(self) -> str | None:
        """The pretrained model the run fine-tunes (a Hugging Face directory or a GGUF file), if any."""
        return self.init_from_hf or self.init_from_gguf


def run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process runs this; they join one group and train as one."""
    ctx = distributed.init_from_env(device=args.device)
    try:
        spec = resolve_run(args)
        if ctx is not None and (spec.members is not None or spec.dp_clip is not None):
            raise ValueError("--ensemble, --sweep and --dp-clip run in one process; launch without torchrun")
        return execute(spec, ctx)
    finally:
        distributed.shutdown()


# A pretrained model (--init-from-hf / --init-from-gguf) is fine-tuned, not trained from scratch: a preset's
# from-scratch rate (1e-3 for tiny models) makes the validation loss of a pretrained model rise.
FINETUNE_LR = 5e-5  # peak learning rate (Hugging Face Trainer's default)
FINETUNE_WARMUP = 0.1  # linear warm-up over this fraction of the steps (at least one step)
FINETUNE_WEIGHT_DECAY = 0.0  # no decay towards zero of weights that were trained to be where they are


def finetune_recipe(recipe: TrainRecipe, changes: dict) -> TrainRecipe:
    """``recipe`` with the fine-tuning defaults (lr, warm-up, weight decay) where ``changes`` (--lr, --set) sets none."""
    defaults = {"lr": FINETUNE_LR, "warmup_steps": max(1, round(recipe.steps * FINETUNE_WARMUP)),
                "weight_decay": FINETUNE_WEIGHT_DECAY}
    return recipe.replace(**{k: v for k, v in defaults.items() if k not in changes})


def _flag_changes(args) -> dict:
    flags = (("steps", args.steps), ("batch_size", args.batch_size), ("accum_steps", args.accum), ("lr", args.lr),
             ("eval_every", args.eval_every), ("tokenizer", args.tokenizer), ("eval_batches", args.eval_batches))
    return {k: v for k, v in flags if v is not None}


def resolve_run(args) -> RunSpec:
    """The run the flags describe: preset, recipe, data, out dir, seed, DP and ensemble settings.

    Reads (never writes) the run directory: which default ``--out`` is free, and with ``--resume`` the
    saved settings of ``out/latest``. Loads no data, builds no model, trains nothing.
    """
    from ftransformer.cli import train_ensemble

    train_ensemble.check_flags(args)
    init = {"init_from_hf": getattr(args, "init_from_hf", None), "init_from_gguf": getattr(args, "init_from_gguf", None)}
    given = ["--" + k.replace("_", "-") for k, v in init.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one pretrained model: {' or '.join(given)}, not both")
    if given and (args.resume or args.ensemble is not None or args.sweep):
        raise ValueError(f"{given[0]} starts one fresh run: it does not go with --resume, --ensemble or --sweep")
    config_changes, recipe_changes = parse_overrides(args.overrides)
    changes = {**recipe_changes, **_flag_changes(args)}  # a flag wins over --set
    common = dict(config_changes=config_changes, device=args.device, compile=args.compile, quiet=args.quiet,
                  dtype=getattr(args, "dtype", "auto"))
    if args.resume:
        spec = _resolve_resume(args, changes, common)
    else:
        spec = _resolve_fresh(args, changes, common)
    if given:
        spec = dataclasses.replace(spec, recipe=finetune_recipe(spec.recipe, changes), **init)
    if spec.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {spec.seed}")
    if (args.ensemble is not None or args.sweep) and args.resume:
        raise ValueError("--ensemble/--sweep cannot change when resuming; the members are saved with the run")
    if args.ensemble is not None or args.sweep:
        spec = dataclasses.replace(spec, members=train_ensemble.members_for(args.ensemble, args.sweep, spec.recipe,
                                                                            spec.seed))
    return spec


def _resolve_fresh(args, changes: dict, common: dict) -> RunSpec:
    preset = args.preset or QUICKSTART_PRESET
    recipe = get_recipe(preset)
    if args.preset is None and args.steps is None:
        recipe = recipe.replace(steps=QUICKSTART_STEPS)
    recipe = recipe.replace(**changes)
    out = Path(args.out) if args.out else _default_out(preset, args.data, resume=False)
    if _saved_run(out) is not None:
        step = read_checkpoint_info(_saved_run(out))["step"]
        raise ValueError(
            f"{str(out)!r} already holds a run (checkpoint at step {step}); add --resume to continue it "
            f"or choose another --out"
        )
    dp_noise = None if args.dp_clip is None else (1.0 if args.dp_noise is None else args.dp_noise)
    return RunSpec(preset=preset, recipe=recipe, data=None if args.data is None else str(Path(args.data).resolve()),
                   out=out, seed=0 if args.seed is None else args.seed, resume=False, tokenizer=recipe.tokenizer,
                   config=None, dp_clip=args.dp_clip, dp_noise=dp_noise, log_noise_scale=args.log_noise_scale,
                   **common)


def _resolve_resume(args, changes: dict, common: dict) -> RunSpec:
    out = Path(args.out) if args.out else _default_out(args.preset or QUICKSTART_PRESET, args.data, resume=True)
    latest = _saved_run(out)
    if latest is None:
        raise ValueError(f"nothing to resume in {str(out)!r}: no checkpoint at {str(out / LATEST)!r}")
    info = read_checkpoint_info(latest)
    # An ensemble's members each keep their own settings under "train"; the run's are under "ensemble".
    saved = info.get("extra", {}).get("ensemble" if latest != out / LATEST else "train")
    if saved is None:
        raise ValueError(f"{str(latest)!r} was not written by `ftransformer train`; it has no run settings")
    if args.preset is not None and args.preset != saved["preset"]:
        raise ValueError(f"--preset {args.preset} but the run in {str(out)!r} uses preset {saved['preset']}")
    if "tokenizer" in changes and changes["tokenizer"] != saved["recipe"]["tokenizer"]:
        raise ValueError("--tokenizer cannot change when resuming; the run's tokenizer is saved with it")
    cfg = Config.from_dict(info["config"])
    config_changes = common["config_changes"]
    dp_clip = saved.get("dp_clip") if args.dp_clip is None else args.dp_clip  # a DP run stays one
    dp_noise = saved.get("dp_noise") if args.dp_noise is None else args.dp_noise
    if dp_clip is not None and dp_noise is None:
        dp_noise = 1.0
    return RunSpec(
        preset=saved["preset"], recipe=TrainRecipe.from_dict(saved["recipe"]).replace(**changes),
        data=str(Path(args.data).resolve()) if args.data is not None else saved["data"], out=out,
        seed=saved["seed"] if args.seed is None else args.seed, resume=True, tokenizer=latest,
        config=cfg.replace(**config_changes) if config_changes else cfg, dp_clip=dp_clip, dp_noise=dp_noise,
        log_noise_scale=args.log_noise_scale or saved.get("log_noise_scale", False), members=saved.get("members"),
        **common,
    )


def _load_data(spec: RunSpec, ctx, say):
    """The dataset and the model's config (sized to the tokenizer's vocabulary)."""
    where = "the built-in corpus (Python standard library source)" if spec.data is None else repr(spec.data)
    say(f"data: {where}")
    main = ctx is None or ctx.is_main
    if not main:
        ctx.barrier()  # rank 0 builds the tokenizer and the token cache; the others then read the cache
    if spec.pretrained is not None:
        tokenizer = _pretrained_tokenizer(spec)  # the corpus in the model's own ids
    else:
        tokenizer = load_tokenizer(spec.tokenizer) if isinstance(spec.tokenizer, Path) else spec.tokenizer
    recipe = spec.recipe
    dataset = load_dataset(spec.data, tokenizer=tokenizer, seq_len=recipe.seq_len, val_fraction=recipe.val_fraction,
                           bpe_vocab_size=recipe.bpe_vocab_size, cache_dir=spec.out / "cache")
    if main and ctx is not None:
        ctx.barrier()
    cfg = spec.config
    if cfg is None:
        cfg = get_preset(spec.preset).replace(vocab_size=dataset.tokenizer.vocab_size, **spec.config_changes)
    elif cfg.vocab_size < dataset.tokenizer.vocab_size or (
        cfg.vocab_size != dataset.tokenizer.vocab_size and spec.pretrained is None
    ):
        # A Hugging Face model's embedding table may have rows past its tokenizer's ids (padding); never fewer.
        raise ValueError(
            f"the {'checkpoint' if spec.pretrained is None else 'model'}'s vocab_size={cfg.vocab_size} but its "
            f"tokenizer has {dataset.tokenizer.vocab_size}"
        )
    if recipe.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"seq_len={recipe.seq_len} but the model's max_seq_len={cfg.max_seq_len}; "
            f"add --set max_seq_len={recipe.seq_len} or a smaller --set seq_len"
        )
    return dataset, cfg


def _step_for(spec: RunSpec, cfg: Config, optimizer, say, policy: precision.Precision, ctx) -> TrainStep:
    """The step ``fit`` runs: DP-SGD's with ``--dp-clip``, else ``make_train_step`` (compiled, in ``policy``)."""
    r = spec.recipe
    if spec.dp_clip is None:
        all_reduce = None if ctx is None else ctx.all_reduce_sum
        # fit never reads a state twice, so the step may update it in place (one copy of the params and moments).
        return make_train_step(cfg, optimizer, accum_steps=r.accum_steps, compile=spec.compile,
                               all_reduce=all_reduce, precision=policy, donate=True)
    if spec.compile:
        raise ValueError("--dp-clip does not run compiled; leave out --compile")
    from ftransformer.cli import train_ensemble

    say(f"DP-SGD: per-example clipping to {spec.dp_clip:g}, noise multiplier {spec.dp_noise:g} "
        "(privacy accounting not done here; use e.g. Opacus's RDP accountant)")
    dp = train_ensemble.dp_optimizer(optimizer, spec.dp_clip, spec.dp_noise, spec.seed)
    return make_per_example_train_step(cfg, dp, chunk_size=r.batch_size // r.accum_steps if r.accum_steps > 1 else None)


def _precision(spec: RunSpec, device: torch.device) -> precision.Precision:
    """``--dtype`` resolved for ``device``; the ensemble and DP-SGD steps compute in float32 only."""
    if spec.members is None and spec.dp_clip is None:
        return precision.resolve(spec.dtype, device)
    if spec.dtype == "bf16":
        raise ValueError("--dtype bf16 applies to the plain train step; --ensemble, --sweep and --dp-clip run in fp32")
    return precision.FP32


def execute(spec: RunSpec, ctx=None) -> int:
    """Load the data, build the model, optimizer and step, and run ``fit`` (0, or 130 when interrupted)."""
    main = ctx is None or ctx.is_main
    say = print if main else (lambda *a, **k: None)  # rank 0 speaks for the group
    device = ctx.device if ctx is not None else _device(spec.device)
    policy = _precision(spec, device)
    precision.allow_tf32(device)  # a CUDA run starts here; elsewhere nothing changes
    hf_params = None
    if spec.pretrained is not None:
        hf_cfg, hf_params = _pretrained_model(spec, device)
        spec = dataclasses.replace(spec, config=hf_cfg)
    dataset, cfg = _load_data(spec, ctx, say)
    if spec.members is not None:
        from ftransformer.cli import train_ensemble

        return train_ensemble.run_members(spec, cfg=cfg, dataset=dataset, device=device)
    recipe = spec.recipe
    params = init_params(cfg, seed=spec.seed, device=device) if hf_params is None else hf_params
    model = f"preset {spec.preset}" if hf_params is None else spec.pretrained
    say(f"model: {model}, {count_params(params):,} parameters, vocab {cfg.vocab_size} "
        f"({dataset.tokenizer.kind} tokenizer), {len(dataset.train):,} train / {len(dataset.val):,} val tokens")
    say(
        f"training: {recipe.steps} steps of {recipe.batch_size} x {recipe.seq_len} tokens"
        + (f" in {recipe.accum_steps} micro-batches" if recipe.accum_steps > 1 else "")
        + f", lr {recipe.lr:g}, on {device}{' (compiled)' if spec.compile else ''}, {policy.name} compute"
        + f", into {str(spec.out)!r}"
        + (f"; {ctx.world_size} processes ({ctx.backend}), {recipe.batch_size // ctx.world_size} sequences each"
           if ctx is not None else "")
    )
    optimizer = optimizer_for(recipe)
    step = _step_for(spec, cfg, optimizer, say, policy, ctx)
    if spec.log_noise_scale and recipe.batch_size // recipe.accum_steps < 2:
        raise ValueError("--log-noise-scale needs micro-batches of at least 2 sequences (batch_size / accum_steps)")
    data = TokenData(cfg, dataset.train, dataset.val, tokenizer=dataset.tokenizer, extra={"train": spec.settings()},
                     record_extra=noise_scale_record(cfg) if spec.log_noise_scale else None)
    result = fit(params, step, data, fit_settings(recipe, spec.seed), out_dir=spec.out, resume=spec.resume,
                 device=device, progress=not spec.quiet, dist=ctx)
    return report(result, spec.out, say)


def report(result, out: Path, say, command: str = "train") -> int:
    """The end of a run of ``fit``: last and best losses, the files, and how to resume an interrupted run
    (130), else 0."""
    last = result.history[-1] if result.history else None
    if last is not None:
        say(f"step {last['step']}: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}; "
            f"best val loss {result.best_val_loss:.4f}")
    say(f"checkpoints: {out / LATEST}, {out / BEST}")
    say(f"metrics: {result.files['metrics']}; plot: {result.files['plot']}")
    if result.interrupted:
        say(f"interrupted at step {result.step}; continue with: ftransformer {command} --resume --out {_quote(out)}")
        return 130
    return 0


def _pretrained_tokenizer(spec: RunSpec):
    """The tokenizer of the pretrained model: a Hugging Face directory's, or a GGUF file's metadata."""
    if spec.init_from_gguf is not None:
        from ftransformer.interop.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(spec.init_from_gguf)
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(spec.init_from_hf)


def _pretrained_model(spec: RunSpec, device: torch.device) -> tuple[Config, dict]:
    """The pretrained model's config and float32 params on ``device``; ``--set`` may change training-only
    fields (e.g. dropout), never a shape."""
    from ftransformer.checkpoint import expected_param_shapes

    if spec.init_from_gguf is not None:
        from ftransformer.interop.gguf import load_gguf

        cfg, params = load_gguf(spec.init_from_gguf, dtype=torch.float32)
        params = tree.to(params, device=device)
    else:
        from ftransformer.interop.hf import load_hf

        cfg, params = load_hf(spec.init_from_hf, dtype=torch.float32, device=device)
    changes = spec.config_changes
    changed = cfg.replace(**changes) if changes else cfg
    if expected_param_shapes(changed) != expected_param_shapes(cfg):
        raise ValueError(f"--set {', '.join(changes)} would change the shapes of the model in {spec.pretrained}")
    return changed, params


def _quote(path: Path) -> str:
    s = str(path)
    return s if s and all(c.isalnum() or c in "-_./" for c in s) else repr(s)


__all__ = ["RunSpec", "add_arguments", "execute", "parse_overrides", "report", "resolve_run", "run"]
