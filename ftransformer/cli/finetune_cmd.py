"""``ftransformer finetune``: LoRA / DoRA chat fine-tuning of a Hugging Face model on a JSONL of conversations.

The base model stays frozen; only the adapters train (``peft.lora`` + ``peft.split``, ``peft.make_adapter_step``).
The data is ``data.chat``'s: each conversation rendered with the model's chat template, the loss on the assistant
turns only, several conversations packed to a row with a document mask. ``loop.fit`` runs it: progress bar,
validation on held-out conversations, ``metrics.jsonl`` and ``loss.png``, checkpoints of the adapter alone in
``RUN/latest`` and ``RUN/best`` (Ctrl-C keeps the last good one; ``--resume`` continues exactly), and at the end
the adapter in PEFT's format in ``RUN/peft`` (``PeftModel.from_pretrained(base, "RUN/peft")``).
``ftransformer generate --hf-dir DIR --adapter RUN --chat`` talks to the result.
"""

import argparse
import importlib.util
import random as pyrandom
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ftransformer import peft, random, tree
from ftransformer.checkpoint import (
    BEST, LATEST, checkpoint_exists, load_tree, read_checkpoint_info, restore_opt_state, save_checkpoint,
)
from ftransformer.config import Config
from ftransformer.loop import FitRun, FitSettings, FitState, check_resume, current_lr, fit, improved, plot_history, refuse_overwrite
from ftransformer.cli.train_cmd import report
from ftransformer.recipes import TrainRecipe, optimizer_for

PEFT_DIR = "peft"  # RUN/peft: the adapter in Hugging Face PEFT's format, written when the run ends
# The fine-tuning recipe: a small learning rate with warm-up (LoRA's usual 2e-4), no weight decay on the adapters.
DEFAULTS = dict(lora_rank=16, lora_alpha=None, targets=",".join(peft.DEFAULT_TARGETS), dora=False, lora_dropout=0.0,
                steps=200, lr=2e-4, warmup=20, batch=8, seq_len=512, eval_every=50, val_fraction=0.1, seed=0,
                skip_bad=False)
MAY_CHANGE_ON_RESUME = ("steps", "eval_every")
# Flags for pieces other parts of ftransformer.peft provide: (modules that would provide them, what they are).
HOOKS = {
    "qlora": (("ftransformer.peft.nf4", "ftransformer.peft.qlora"), "QLoRA (a 4-bit NF4 base)"),
    "adapters": (("ftransformer.peft.stack", "ftransformer.peft.stacks"), "a stack of adapters trained in one step"),
    "dp_noise": (("ftransformer.peft.private", "ftransformer.peft.dp"), "private adapters (DP-SGD on the adapters)"),
}


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
    parser.add_argument("--qlora", action="store_true", help="QLoRA: a 4-bit NF4 base (where this build has it)")
    parser.add_argument("--adapters", metavar="SPEC", default=None, help="a stack of adapters (where this build has it)")
    parser.add_argument("--dp-noise", type=float, metavar="SIGMA", default=None,
                        help="DP-SGD noise on the adapters (where this build has it)")


def check_hooks(args) -> None:
    """``--qlora``, ``--adapters``, ``--dp-noise``: refused with why (absent from this build, or not driven yet)."""
    for flag, (modules, what) in HOOKS.items():
        if getattr(args, flag, None) in (None, False):
            continue
        name = "--" + flag.replace("_", "-")
        here = [m for m in modules if importlib.util.find_spec(m) is not None]
        if not here:
            raise ValueError(f"{name}: {what} is not yet supported in this build")
        raise ValueError(f"{name}: {what} is built ({here[0]}) but `ftransformer finetune` does not drive it yet")


def resolve_settings(args) -> dict:
    """The run's settings: the flags over the defaults, or (``--resume``) the saved ones, which only
    ``--steps`` and ``--eval-every`` may change."""
    given = {k: getattr(args, k) for k in (*DEFAULTS, "hf_dir", "data") if getattr(args, k, None) is not None}
    latest = Path(args.out) / LATEST
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
    return {**saved, **{k: given[k] for k in MAY_CHANGE_ON_RESUME if k in given}}


def recipe_of(s: dict) -> TrainRecipe:
    """The optimizer recipe: AdamW (no weight decay), warm-up then cosine to a tenth of ``lr``, clipping at 1."""
    return TrainRecipe(batch_size=s["batch"], seq_len=s["seq_len"], steps=s["steps"], lr=s["lr"],
                       warmup_steps=min(s["warmup"], s["steps"]), weight_decay=0.0, eval_every=s["eval_every"])


def adapter_spec(s: dict, cfg: Config) -> dict:
    """What a checkpoint says about the adapter (``config`` of the adapter-only checkpoint)."""
    return {"kind": "lora-adapter", "hf_dir": s["hf_dir"], "rank": s["lora_rank"], "alpha": s["lora_alpha"],
            "targets": s["targets"].split(","), "dora": s["dora"], "seed": s["seed"], "model": cfg.to_dict()}


def adapted_params(params: dict, cfg: Config, spec: dict) -> dict:
    """``params`` with fresh adapters as ``spec`` (``adapter_spec``) describes them."""
    return peft.lora(params, cfg, rank=spec["rank"], alpha=spec["alpha"], targets=spec["targets"],
                     key=random.key(spec["seed"]), dora=spec["dora"])


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

    def __init__(self, cfg: Config, frozen: dict, train, val, *, spec: dict, extra: dict, dropout: float):
        self.cfg, self.frozen, self.train, self.val = cfg, frozen, train, val
        self.spec, self.extra, self.dropout = spec, extra, dropout

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
        return tuple(x[index].to(device) for x in (packed.tokens, packed.targets, packed.documents))

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
                tokens, targets, documents = self.rows(packed, slice(start, start + size), run.device)
                total += float(loss_fn(params, tokens, targets, self.cfg, reduction="sum", documents=documents))
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


# ---------------------------------------------------------------- the command


def _device(name: str | None) -> torch.device:
    """``--device``, checked (default: cuda where there is one)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_chat_data(s: dict, tokenizer, cfg: Config, say):
    """The packed train and val rows of the run's JSONL, and the sequence length used."""
    from ftransformer.data.chat import pack, read_chat_jsonl

    seq_len = s["seq_len"]
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} but the model's max_seq_len={cfg.max_seq_len}")
    data = read_chat_jsonl(s["data"], tokenizer, max_len=seq_len, skip_bad=s["skip_bad"])
    train, val = split_examples(data.examples, s["val_fraction"], s["seed"])
    pad = (list(getattr(tokenizer, "stop_tokens", ())) or [0])[0]
    say(f"data: {s['data']}: {len(train)} train / {len(val)} val conversations"
        + (f" ({data.skipped} bad rows skipped)" if data.skipped else ""))
    return pack(train, seq_len, pad_id=pad), pack(val, seq_len, pad_id=pad)


def run(args) -> int:
    from ftransformer.interop.hf import load_hf
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer

    check_hooks(args)
    s = resolve_settings(args)
    say = print
    device = _device(args.device)
    cfg, params = load_hf(s["hf_dir"], dtype=torch.float32, device=device)
    tokenizer = load_hf_tokenizer(s["hf_dir"])
    train, val = load_chat_data(s, tokenizer, cfg, say)
    spec = adapter_spec(s, cfg)
    trainable, frozen = peft.split(adapted_params(params, cfg, spec))
    n_adapter = sum(x.numel() for x in tree.leaves(trainable))
    recipe = recipe_of(s)
    step = peft.make_adapter_step(cfg, optimizer_for(recipe), frozen, dropout=s["lora_dropout"])
    say(f"model: {s['hf_dir']}; {'DoRA' if s['dora'] else 'LoRA'} rank {s['lora_rank']}, alpha {s['lora_alpha']:g} on "
        f"{s['targets']}: {n_adapter:,} trainable parameters")
    say(f"training: {s['steps']} steps of {s['batch']} x {train.tokens.shape[1]} packed tokens "
        f"({train.tokens.shape[0]} train rows), lr {s['lr']:g} (warm-up {recipe.warmup_steps}), on {device}, into {args.out!r}")
    data = ChatRows(cfg, frozen, train, val, spec=spec, extra={"finetune": s}, dropout=s["lora_dropout"])
    settings = FitSettings(steps=s["steps"], batch_size=s["batch"], seq_len=train.tokens.shape[1],
                           eval_every=s["eval_every"], seed=s["seed"])
    result = fit(trainable, step, data, settings, out_dir=args.out, resume=args.resume, device=device,
                 progress=not args.quiet)
    out = Path(args.out)
    peft.save_peft(out / PEFT_DIR, peft.combine(result.params, frozen), cfg, base_model=s["hf_dir"])
    say(f"adapter in PEFT's format: {out / PEFT_DIR}")
    say(f"chat with it: ftransformer generate --hf-dir {s['hf_dir']} --adapter {out} --chat --prompt '...'")
    return report(result, out, say, command="finetune")


# ---------------------------------------------------------------- used by `generate --adapter`


def load_adapter(directory: str, params: dict, cfg: Config) -> dict:
    """``params`` with the adapter in ``directory``: a PEFT adapter directory, or a finetune run (its best/,
    else latest/ checkpoint; else its peft/)."""
    from ftransformer.peft.peft_format import CONFIG_FILE

    d = Path(directory)
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
