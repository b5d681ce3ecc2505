"""``ftransformer finetune``: LoRA / DoRA chat fine-tuning of a Hugging Face model on a JSONL of conversations.

The base model stays frozen; only the adapters train (``peft.lora`` + ``peft.split``, ``peft.make_adapter_step``).
The data is ``data.chat``'s: each conversation rendered with the model's chat template, the loss on the assistant
turns only, several conversations packed to a row with a document mask. ``loop.fit`` runs it: progress bar,
validation on held-out conversations, ``metrics.jsonl`` and ``loss.png``, checkpoints of the adapter alone in
``RUN/latest`` and ``RUN/best`` (Ctrl-C keeps the last good one; ``--resume`` continues exactly), and at the end
the adapter in PEFT's format in ``RUN/peft`` (``PeftModel.from_pretrained(base, "RUN/peft")``).
``--qlora`` puts the adapters on an NF4-quantized base, ``--adapters SPEC`` trains a stack of adapters in one
vmapped step (``ChatMembers``: ``RUN/member-<i>/``), ``--dp-noise`` trains with DP-SGD on the adapters and prints
the epsilon (Opacus' accountant). ``ftransformer generate --hf-dir DIR --adapter RUN [--member I] --chat`` talks
to the result.
"""

import argparse
import itertools
import random as pyrandom
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ftransformer import peft, random, tree
from ftransformer.checkpoint import (
    BEST, LATEST, checkpoint_exists, load_tree, read_checkpoint_info, restore_opt_state, run_checkpoint,
    save_checkpoint,
)
from ftransformer.config import Config
from ftransformer.loop import FitRun, FitSettings, FitState, check_resume, current_lr, fit, improved, plot_history, refuse_overwrite
from ftransformer.cli.train_cmd import report
from ftransformer.recipes import TrainRecipe, optimizer_for

PEFT_DIR = "peft"  # RUN/peft: the adapter in Hugging Face PEFT's format, written when the run ends
# The fine-tuning recipe: a small learning rate with warm-up (LoRA's usual 2e-4), no weight decay on the adapters.
DEFAULTS = dict(lora_rank=16, lora_alpha=None, targets=",".join(peft.DEFAULT_TARGETS), dora=False, lora_dropout=0.0,
                steps=200, lr=2e-4, warmup=20, batch=8, seq_len=512, eval_every=50, val_fraction=0.1, seed=0,
                skip_bad=False, qlora=False, adapters=None, dp_noise=None, dp_clip=None)
MAY_CHANGE_ON_RESUME = ("steps", "eval_every")
DP_DELTA = 1e-5  # the delta the epsilon printed at the end of a --dp-noise run is for
STACK_KEYS = ("seed", "rank", "lr", "weight_decay")  # what --adapters may vary per member


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", metavar="DIR", default=None,
                        help="the Hugging Face model to adapt: config.json, model.safetensors, tokenizer.json with a "
                        "chat template (--resume: the run's)")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help='JSONL: one {"messages": [{"role", "content"}, ...]} (or {"text": ...}) per line')
    parser.add_argument("--out", metavar="RUN", required=True, help="run directory (checkpoints, metrics, loss.png, peft/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--lora-rank", type=int, metavar="R", default=None, help=f"adapter rank (default {DEFAULTS['lora_rank']})")
    parser.add_argument("--lora-alpha", type=float, metavar="A", default=None,
                        help="adapter scale numerator: the update is (alpha / rank) a @ b (default: 2 x rank)")
    parser.add_argument("--targets", metavar="PATTERNS", default=None,
                        help=f"comma-separated parameter path patterns to adapt (default: {DEFAULTS['targets']})")
    parser.add_argument("--dora", action="store_true", default=None, help="DoRA: LoRA plus a trained magnitude per output")
    parser.add_argument("--lora-dropout", type=float, metavar="P", default=None,
                        help="dropout on the adapters' input while training (default 0)")
    parser.add_argument("--steps", type=int, metavar="N", default=None, help=f"optimizer steps (default {DEFAULTS['steps']})")
    parser.add_argument("--lr", type=float, metavar="LR", default=None,
                        help=f"peak learning rate after warm-up, cosine to a tenth (default {DEFAULTS['lr']:g})")
    parser.add_argument("--warmup", type=int, metavar="N", default=None, help=f"warm-up steps (default {DEFAULTS['warmup']})")
    parser.add_argument("--batch", type=int, metavar="B", default=None, help=f"packed rows per step (default {DEFAULTS['batch']})")
    parser.add_argument("--seq-len", type=int, metavar="T", default=None,
                        help=f"tokens per packed row, at most the model's max_seq_len (default {DEFAULTS['seq_len']})")
    parser.add_argument("--eval-every", type=int, metavar="N", default=None,
                        help=f"steps between validations and checkpoints (default {DEFAULTS['eval_every']})")
    parser.add_argument("--val-fraction", type=float, metavar="F", default=None,
                        help="conversations held out for validation (default 0.1, at least one)")
    parser.add_argument("--skip-bad", action="store_true", default=None, help="skip bad rows (counted) instead of stopping")
    parser.add_argument("--seed", type=int, metavar="S", default=None, help="adapter init, split and batches (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--qlora", action="store_true", default=None,
                        help="QLoRA: the adapted matrices' base quantized to 4-bit NormalFloat (NF4)")
    parser.add_argument("--adapters", metavar="SPEC", default=None,
                        help="a stack of adapters on the one base, trained in one vmapped step: N (seeds S..S+N-1) or "
                        "KEY=V1,V2;KEY=... over seed, rank, lr, weight_decay (the grid of all combinations), e.g. "
                        "'seed=0,1,2;rank=4,8'; RUN gets member-<i>/ checkpoints")
    parser.add_argument("--dp-noise", type=float, metavar="SIGMA", default=None,
                        help="DP-SGD on the adapters: clip each conversation's gradient to --dp-clip, add Gaussian "
                        f"noise SIGMA x C; one conversation per row; prints epsilon at delta={DP_DELTA:g} (opacus)")
    parser.add_argument("--dp-clip", type=float, metavar="C", default=None,
                        help="with --dp-noise: the per-conversation gradient norm bound (default 1.0)")


def check_modes(s: dict) -> None:
    """Refuse flag combinations the modes do not support, naming the flags."""
    if s["dp_clip"] is not None and s["dp_noise"] is None:
        raise ValueError("--dp-clip needs --dp-noise SIGMA (DP-SGD)")
    if s["dp_noise"] is not None:
        if not s["dp_noise"] > 0:
            raise ValueError(f"--dp-noise must be > 0, got {s['dp_noise']}")
        if s["dp_clip"] is not None and not s["dp_clip"] > 0:
            raise ValueError(f"--dp-clip must be > 0, got {s['dp_clip']}")
    if s["adapters"] is not None:
        for flag in ("qlora", "dp_noise"):
            if s[flag]:
                raise ValueError(f"--adapters: a stack trains on a plain base without DP; leave out "
                                 f"--{flag.replace('_', '-')}")


def stack_members(spec: str, s: dict) -> list[dict]:
    """``--adapters`` as member dicts: ``N`` (seeds seed..seed+N-1) or a grid over ``STACK_KEYS``."""
    from ftransformer.cli.train_ensemble import parse_sweep

    if spec.strip().isdigit():
        if int(spec) < 1:
            raise ValueError(f"--adapters N needs N >= 1, got {spec!r}")
        grid = {"seed": [s["seed"] + i for i in range(int(spec))]}
    else:
        grid = parse_sweep([x for x in spec.split(";") if x.strip()], keys=STACK_KEYS, ints=("seed", "rank"),
                           flag="--adapters")
    if not grid or any(r < 1 for r in grid.get("rank", [1])):
        raise ValueError(f"--adapters expects N or KEY=V1,V2;... with ranks >= 1, got {spec!r}")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def resolve_settings(args) -> dict:
    """The run's settings: the flags over the defaults, or (``--resume``) the saved ones, which only
    ``--steps`` and ``--eval-every`` may change."""
    given = {k: getattr(args, k) for k in (*DEFAULTS, "hf_dir", "data") if getattr(args, k, None) is not None}
    latest = latest_of(Path(args.out))
    if not args.resume:
        missing = [f"--{k.replace('_', '-')}" for k in ("hf_dir", "data") if k not in given]
        if missing:
            raise ValueError(f"finetune needs {' and '.join(missing)}")
        if checkpoint_exists(latest):
            raise ValueError(f"{args.out!r} already holds a run (step {read_checkpoint_info(latest)['step']}); "
                             "add --resume to continue it or choose another --out")
        settings = {**DEFAULTS, **given, "hf_dir": str(Path(given["hf_dir"]).resolve()),
                    "data": str(Path(given["data"]).resolve())}
        if settings["lora_alpha"] is None:
            settings["lora_alpha"] = 2.0 * settings["lora_rank"]
        if settings["dp_noise"] is not None and settings["dp_clip"] is None:
            settings["dp_clip"] = 1.0
        check_modes(settings)
        return settings
    if not checkpoint_exists(latest):
        raise ValueError(f"nothing to resume in {args.out!r}: no checkpoint at {str(latest)!r}")
    saved = read_checkpoint_info(latest).get("extra", {}).get("finetune")
    if saved is None:
        raise ValueError(f"{str(latest)!r} was not written by `ftransformer finetune`")
    for k, v in given.items():
        same = Path(v).resolve() == Path(saved[k]) if k in ("hf_dir", "data") else v == saved[k]
        if k not in MAY_CHANGE_ON_RESUME and not same:
            raise ValueError(f"--{k.replace('_', '-')} {v} differs from the run's {saved[k]}; on resume only "
                             f"{', '.join('--' + m.replace('_', '-') for m in MAY_CHANGE_ON_RESUME)} may change")
    return {**DEFAULTS, **saved, **{k: given[k] for k in MAY_CHANGE_ON_RESUME if k in given}}


def latest_of(out: Path) -> Path:
    """A run's latest checkpoint: ``RUN/latest``, or a stack's ``RUN/member-0/latest``."""
    return out / LATEST if checkpoint_exists(out / LATEST) or not checkpoint_exists(out / "member-0" / LATEST) \
        else out / "member-0" / LATEST


def recipe_of(s: dict) -> TrainRecipe:
    """The optimizer recipe: AdamW (no weight decay), warm-up then cosine to a tenth of ``lr``, clipping at 1."""
    return TrainRecipe(batch_size=s["batch"], seq_len=s["seq_len"], steps=s["steps"], lr=s["lr"],
                       warmup_steps=min(s["warmup"], s["steps"]), weight_decay=0.0, eval_every=s["eval_every"])


def adapter_spec(s: dict, cfg: Config) -> dict:
    """What a checkpoint says about the adapter (``config`` of the adapter-only checkpoint)."""
    return {"kind": "lora-adapter", "hf_dir": s["hf_dir"], "rank": s["lora_rank"], "alpha": s["lora_alpha"],
            "targets": s["targets"].split(","), "dora": s["dora"], "seed": s["seed"],
            "base": "nf4" if s.get("qlora") else None, "model": cfg.to_dict()}


def adapted_params(params: dict, cfg: Config, spec: dict) -> dict:
    """``params`` with fresh adapters as ``spec`` (``adapter_spec``) describes them."""
    return peft.lora(params, cfg, rank=spec["rank"], alpha=spec["alpha"], targets=spec["targets"],
                     key=random.key(spec["seed"]), dora=spec["dora"], base=spec.get("base"))


# ---------------------------------------------------------------- the data fit trains on


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle of the conversations, ``fraction`` of them (at least one) held out for validation."""
    if len(examples) < 2:
        raise ValueError(f"need at least 2 conversations (one to train on, one to validate), got {len(examples)}")
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    pyrandom.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(examples)))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


class ChatRows:
    """``fit``'s data for one adapter on packed chat rows: batches drawn by ``(seed, step)``, the train and val
    losses on fixed rows, checkpoints of the adapter alone (``save_checkpoint`` with the adapter's spec)."""

    def __init__(self, cfg: Config, frozen: dict, train, val, *, spec: dict, extra: dict, dropout: float,
                 documents: bool = True):
        self.cfg, self.frozen, self.train, self.val = cfg, frozen, train, val
        self.spec, self.extra, self.dropout, self.documents = spec, extra, dropout, documents

    def sizes(self) -> dict:
        return {"train_tokens": int(self.train.tokens.numel()), "val_tokens": int(self.val.tokens.numel())}

    def fit_state(self, run: FitRun, step: int = 0, elapsed: float = 0.0, best_val=None) -> dict:
        return run.fit_state(step, elapsed, best_val, **self.sizes())

    def start(self, run: FitRun, params: dict, init, resume: bool) -> FitState:
        latest = run.files["latest"]
        if not resume:
            refuse_overwrite(run, latest)
            return FitState(params, init(params), 0, [], None, 0.0)
        ck = load_tree(latest, like=params, device=run.device)
        check_resume(run, latest, ck.extra.get("fit", {}), self.fit_state(run))
        saved = ck.extra.get("fit", {})
        run.say(f"resuming {str(latest)!r} at step {ck.step}")
        opt_state = restore_opt_state(ck.opt_state, init(ck.params), where=repr(str(latest)))
        return FitState(ck.params, opt_state, ck.step, ck.metrics, saved.get("best_val_loss"),
                        float(saved.get("elapsed_s", 0.0)))

    def rows(self, packed, index, device) -> tuple:
        """Rows ``index`` of ``packed`` on ``device``: ``(tokens, targets, documents)``, or without the document
        mask when every row is one conversation (``documents=False``: DP-SGD's per-example rows)."""
        parts = (packed.tokens, packed.targets, packed.documents) if self.documents else (packed.tokens, packed.targets)
        return tuple(x[index].to(device) for x in parts)

    def batch(self, run: FitRun, step: int):
        n = self.train.tokens.shape[0]
        index = torch.from_numpy(np.random.default_rng([run.settings.seed, 0, step]).integers(0, n, run.settings.batch_size))
        key = random.fold_in(random.key(run.settings.seed), step).to(run.device) if self.dropout > 0 else None
        return self.rows(self.train, index, run.device), key

    def loss(self, run: FitRun, trainable: dict, packed) -> float:
        """The token-weighted mean loss over every row of ``packed`` (no dropout, no gradients)."""
        from ftransformer.model import loss_fn

        params = peft.combine(trainable, self.frozen)
        total, count, size = 0.0, 0, run.settings.batch_size
        with torch.no_grad():
            for start in range(0, packed.tokens.shape[0], size):
                tokens, targets, *documents = self.rows(packed, slice(start, start + size), run.device)
                total += float(loss_fn(params, tokens, targets, self.cfg, reduction="sum",
                                       documents=documents[0] if documents else None))
                count += int((targets != -100).sum())
        return total / max(count, 1)

    def evaluate(self, run: FitRun, state: FitState, common: dict) -> FitState:
        n_val = self.val.tokens.shape[0]
        train_loss = self.loss(run, state.params, replace_rows(self.train, n_val))
        val_loss = self.loss(run, state.params, self.val)
        record = {"step": state.step, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": current_lr(state.opt_state), **common}
        better = improved(state.best_val, val_loss)
        new = replace(state, history=state.history + [record], best_val=val_loss if better else state.best_val)
        if better:
            self._save(run, new, "best")
        self._save(run, new, "latest")
        plot_history(run.files["plot"], new.history)
        run.say(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}" + (" (best so far)" if better else ""))
        return new

    def save(self, run: FitRun, state: FitState) -> None:
        self._save(run, state, "latest")

    def _save(self, run: FitRun, state: FitState, which: str) -> None:
        save_checkpoint(run.files[which], params=state.params, config=self.spec, step=state.step,
                        opt_state=state.opt_state, metrics=state.history,
                        extra={**self.extra, "fit": self.fit_state(run, state.step, state.elapsed, state.best_val)})

    def files(self, run: FitRun) -> dict:
        return run.files


def replace_rows(packed, n: int):
    """The first ``n`` rows of ``packed`` (the fixed rows the train loss is measured on)."""
    return type(packed)(*(x[:n] for x in packed))


class ChatMembers(peft.AdapterMembers):
    """``peft.AdapterMembers`` on chat rows (one conversation per row, the loss on assistant tokens): each
    member draws its rows by ``(its seed, step)``; every member is evaluated on the same fixed rows."""

    def __init__(self, params: dict, cfg: Config, train, val, make_optimizer, members: list, **options):
        super().__init__(params, cfg, train.tokens.flatten(), val.tokens.flatten(), make_optimizer, members, **options)
        self.train_rows, self.val_rows = train, val

    def sizes(self) -> dict:
        return {"train_tokens": int(self.train_rows.tokens.numel()), "val_tokens": int(self.val_rows.tokens.numel())}

    def prepare(self, run: FitRun) -> None:
        size, n_val = run.settings.batch_size, self.val_rows.tokens.shape[0]

        def batches(packed) -> list:
            return [(packed.tokens[i:i + size].to(run.device), packed.targets[i:i + size].to(run.device))
                    for i in range(0, min(n_val, packed.tokens.shape[0]), size)]

        self._sets = (batches(self.train_rows), batches(self.val_rows))

    def host_batch(self, run: FitRun, step: int, seed: int) -> tuple:
        n = self.train_rows.tokens.shape[0]
        index = torch.from_numpy(np.random.default_rng([seed, 0, step]).integers(0, n, run.settings.batch_size))
        return self.train_rows.tokens[index], self.train_rows.targets[index]


# ---------------------------------------------------------------- the command


def _device(name: str | None) -> torch.device:
    """``--device``, checked (default: cuda where there is one)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def one_per_row(examples: list, seq_len: int, pad_id: int):
    """``pack`` with every conversation alone in its row (DP-SGD's unit, and a stack's rows: no document mask)."""
    from ftransformer.data.chat import pack

    rows = [pack([e], seq_len, pad_id=pad_id) for e in examples]
    return type(rows[0])(*(torch.cat(parts) for parts in zip(*rows)))


def load_chat_data(s: dict, tokenizer, cfg: Config, say, *, packed: bool = True):
    """The train and val rows of the run's JSONL: packed, or (``packed=False``) one conversation per row."""
    from ftransformer.data.chat import pack, read_chat_jsonl

    seq_len = s["seq_len"]
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} but the model's max_seq_len={cfg.max_seq_len}")
    data = read_chat_jsonl(s["data"], tokenizer, max_len=seq_len, skip_bad=s["skip_bad"])
    train, val = split_examples(data.examples, s["val_fraction"], s["seed"])
    pad = (list(getattr(tokenizer, "stop_tokens", ())) or [0])[0]
    say(f"data: {s['data']}: {len(train)} train / {len(val)} val conversations"
        + (f" ({data.skipped} bad rows skipped)" if data.skipped else ""))
    if not packed:
        return one_per_row(train, seq_len, pad), one_per_row(val, seq_len, pad)
    return pack(train, seq_len, pad_id=pad), pack(val, seq_len, pad_id=pad)


def adapter_step(s: dict, cfg: Config, recipe: TrainRecipe, frozen: dict):
    """The run's ``TrainStep`` over the adapters: plain, or DP-SGD (per-conversation clipping and noise first)."""
    if s["dp_noise"] is None:
        return peft.make_adapter_step(cfg, optimizer_for(recipe), frozen, dropout=s["lora_dropout"])
    from ftransformer.cli.train_ensemble import dp_optimizer

    if s["lora_dropout"]:
        raise ValueError("--dp-noise trains without adapter dropout; leave out --lora-dropout")
    return peft.make_private_adapter_step(cfg, dp_optimizer(optimizer_for(recipe), s["dp_clip"], s["dp_noise"],
                                                            s["seed"]), frozen)


def privacy_line(s: dict, steps: int, n_rows: int) -> str:
    """What (epsilon, delta) the run's DP-SGD steps guarantee (Opacus' RDP accountant), or why it is not said."""
    rate = s["batch"] / n_rows
    if steps < 1 or rate >= 1:
        return f"privacy: epsilon not computed ({steps} steps, {s['batch']} of {n_rows} conversations per batch)"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eps = peft.dp_epsilon(noise_multiplier=s["dp_noise"], sample_rate=rate, steps=steps, delta=DP_DELTA)
    except ImportError as e:
        return f"privacy: epsilon not computed: {e}"
    said = "".join(f"; the accountant warns: {w.message}" for w in caught)
    return (f"privacy: epsilon {eps:.3g} at delta {DP_DELTA:g} after {steps} steps at sample rate {rate:.3g} "
            f"(Opacus' RDP accountant, which assumes Poisson sampling; batches here draw {s['batch']} "
            f"conversations uniformly with replacement{said})")


def describe(s: dict) -> str:
    """``QLoRA (NF4 base) DoRA rank 16, alpha 32``: the adapter the run trains, for the start-of-run lines."""
    kind = ("QLoRA (NF4 base) " if s["qlora"] else "") + ("DoRA" if s["dora"] else "LoRA")
    dp = f", DP-SGD noise {s['dp_noise']:g} clip {s['dp_clip']:g}" if s["dp_noise"] is not None else ""
    return f"{kind} rank {s['lora_rank']}, alpha {s['lora_alpha']:g}{dp}"


def run(args) -> int:
    from ftransformer.interop.hf import load_hf
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer

    s = resolve_settings(args)
    say = print
    device = _device(args.device)
    cfg, params = load_hf(s["hf_dir"], dtype=torch.float32, device=device)
    tokenizer = load_hf_tokenizer(s["hf_dir"])
    private = s["dp_noise"] is not None
    train, val = load_chat_data(s, tokenizer, cfg, say, packed=not private and s["adapters"] is None)
    recipe = recipe_of(s)
    settings = FitSettings(steps=s["steps"], batch_size=s["batch"], seq_len=train.tokens.shape[1],
                           eval_every=s["eval_every"], seed=s["seed"])
    if s["adapters"] is not None:
        return run_stack(args, s, cfg, params, (train, val), recipe, settings, device)
    spec = adapter_spec(s, cfg)
    trainable, frozen = peft.split(adapted_params(params, cfg, spec))
    n_adapter = sum(x.numel() for x in tree.leaves(trainable))
    step = adapter_step(s, cfg, recipe, frozen)
    say(f"model: {s['hf_dir']}; {describe(s)} on {s['targets']}: {n_adapter:,} trainable parameters")
    say(f"training: {s['steps']} steps of {s['batch']} x {train.tokens.shape[1]} {'' if private else 'packed '}tokens "
        f"({train.tokens.shape[0]} train rows), lr {s['lr']:g} (warm-up {recipe.warmup_steps}), on {device}, into {args.out!r}")
    data = ChatRows(cfg, frozen, train, val, spec=spec, extra={"finetune": s}, dropout=s["lora_dropout"],
                    documents=not private)
    result = fit(trainable, step, data, settings, out_dir=args.out, resume=args.resume, device=device,
                 progress=not args.quiet)
    out = Path(args.out)
    peft.save_peft(out / PEFT_DIR, peft.combine(result.params, frozen), cfg, base_model=s["hf_dir"])
    say(f"adapter in PEFT's format: {out / PEFT_DIR}")
    if private:
        say(privacy_line(s, result.step, train.tokens.shape[0]))
    say(f"chat with it: ftransformer generate --hf-dir {s['hf_dir']} --adapter {out} --chat --prompt '...'")
    return report(result, out, say, command="finetune")


def run_stack(args, s: dict, cfg: Config, params: dict, rows: tuple, recipe: TrainRecipe, settings, device) -> int:
    """``--adapters``: every member trained in one vmapped step (``ChatMembers``), ranked at the end; each
    member's adapter in PEFT's format in ``RUN/member-<i>/peft``."""
    from ftransformer.cli.train_ensemble import sweep_optimizer
    from ftransformer.ensemble import format_ranking

    members, make = stack_members(s["adapters"], s), sweep_optimizer(recipe, recipe.steps)

    def optimizer(lr=s["lr"], weight_decay=0.0):  # what a member does not set is the run's
        return make(lr, weight_decay)

    task = ChatMembers(params, cfg, *rows, optimizer, members, alpha=s["lora_alpha"],
                       rank=s["lora_rank"], targets=s["targets"].split(","), dora=s["dora"],
                       dropout=s["lora_dropout"], seed=s["seed"])
    task.member_extra = lambda i: {"finetune": s}
    print(f"model: {s['hf_dir']}; a stack of {len(members)} {describe(s)} adapters on {s['targets']} "
          f"({', '.join(task.names)})")
    print(f"training: {len(members)} members in one vmapped step, {s['steps']} steps of {s['batch']} x "
          f"{settings.seq_len} tokens each, on {device}, into {args.out!r}")
    result = fit(task.init_params(device), task.train_step(), task, settings, out_dir=args.out, resume=args.resume,
                 device=device, progress=not args.quiet)
    stack = task.stack._replace(trainable=result.params)
    for i, d in enumerate(task.dirs(Path(args.out))):
        peft.save_peft(d / PEFT_DIR, peft.member_adapters(stack, i), cfg, base_model=s["hf_dir"])
    print(format_ranking(task.summary(result)))
    print(f"metrics: {result.files['metrics']}; plot: {result.files['plot']}; each member's adapter in PEFT's "
          f"format: {Path(args.out)}/member-<i>/{PEFT_DIR}")
    print(f"chat with member I: ftransformer generate --hf-dir {s['hf_dir']} --adapter {args.out} --member I --chat "
          "--prompt '...'")
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: ftransformer finetune --resume --out {args.out}")
        return 130
    return 0


# ---------------------------------------------------------------- used by `generate --adapter`


def load_member(d: Path, member: int, params: dict, cfg: Config) -> dict:
    """``params`` with member ``member`` of the stack run ``d`` (its best/, else latest/ checkpoint)."""
    n = sum(1 for _ in itertools.takewhile(lambda i: (d / f"member-{i}").is_dir(), itertools.count()))
    if not 0 <= member < n:
        raise ValueError(f"--member must be in [0, {n}) for {str(d)!r} ({n} members), got {member}")
    return peft.load_member(run_checkpoint(d / f"member-{member}"), params, cfg)


def load_adapter(directory: str, params: dict, cfg: Config, member: int | None = None) -> dict:
    """``params`` with the adapter in ``directory``: a PEFT adapter directory, a finetune run (its best/, else
    latest/ checkpoint; else its peft/), or member ``member`` of a stack run (``--adapters``). A QLoRA adapter
    comes on its NF4 base (``peft.merge`` dequantizes it)."""
    from ftransformer.peft.peft_format import CONFIG_FILE

    d = Path(directory)
    if member is not None or (d / "member-0").is_dir():
        if member is None:
            raise ValueError(f"{str(d)!r} is a stack of adapters (--adapters): choose one with --member I")
        return load_member(d, member, params, cfg)
    if (d / CONFIG_FILE).is_file():
        return peft.load_peft(d, params, cfg)
    for name in (BEST, LATEST):
        if checkpoint_exists(d / name):
            spec = read_checkpoint_info(d / name)["config"]
            if not isinstance(spec, dict) or spec.get("kind") != "lora-adapter":
                raise ValueError(f"{str(d / name)!r} is not an adapter checkpoint of `ftransformer finetune`")
            if Config.from_dict(spec["model"]).to_dict() != cfg.to_dict():
                raise ValueError(f"the adapter in {str(d)!r} was trained on another model ({spec['hf_dir']})")
            trainable, frozen = peft.split(adapted_params(params, cfg, spec))
            return peft.combine(load_tree(d / name, like=trainable, device=tree.leaves(params)[0].device).params, frozen)
    if (d / PEFT_DIR / CONFIG_FILE).is_file():
        return peft.load_peft(d / PEFT_DIR, params, cfg)
    raise ValueError(f"no adapter in {str(d)!r}: expected {CONFIG_FILE} (PEFT), or a finetune run (best/, latest/)")


__all__ = ["add_arguments", "load_adapter", "run"]
