"""Learning-path step 7b: training as a pure function.

``make_train_step`` turns a config and an optimizer into
``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``: a ``torch.func`` transform
differentiates ``loss_fn`` with respect to the parameter tree, the optimizer turns gradients into
updates, and new trees come back -- the inputs are never touched, so a step can be replayed, compared,
``vmap``-ed over an ensemble or compiled.

Gradient accumulation splits the batch into micro-batches. Each one's loss is a *sum* over its target
tokens divided by the whole batch's token count, so the accumulated gradient is exactly the full
batch's token-weighted mean, even when padding (``ignore_index``) leaves micro-batches unequal.
"""

from collections.abc import Callable, Iterable

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ftransformer import optim, random
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.model import check_ids, check_tokens, loss_fn

StepFn = Callable[..., tuple[dict, object, dict]]


def _storages(leaves: list) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in leaves if isinstance(x, Tensor)}


def _owned(updates: list[Tensor], params: list[Tensor], *held) -> bool:
    """Whether ``updates`` are fresh tensors nobody else holds, so they may become the new params in place.

    Built-in optimizers always return such tensors; a custom one might return a view of its state, a
    tensor used twice or an expanded one, and then the step falls back to a new allocation.
    """
    if torch.compiler.is_compiling() or not optim._use_foreach(updates, params):
        return False
    seen = set()
    for u, p in zip(updates, params):
        if u.shape != p.shape or u.dtype != p.dtype or u.device != p.device or u.requires_grad:
            return False
        if not u.is_contiguous():
            return False
        seen.add(u.untyped_storage().data_ptr())
    if len(seen) != len(updates):
        return False
    return not (seen & _storages(params)) and not any(seen & _storages(optim._leaves_only(h)) for h in held)


def make_train_step(
    cfg: Config,
    optimizer: optim.GradientTransformation,
    *,
    accum_steps: int = 1,
    compile: bool = False,
    ignore_index: int = -100,
) -> StepFn:
    """A pure training step ``step(params, opt_state, (tokens, targets), key) -> (params, opt_state, metrics)``.

    Args:
        cfg: the model's config.
        optimizer: e.g. ``optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr))``.
        accum_steps: micro-batches per step, split along the first batch axis; the update equals the
            full batch's.
        compile: wrap the step in ``torch.compile`` (the first call compiles).
        ignore_index: target id that counts for nothing (padding).

    ``key`` drives dropout (None: no dropout). ``metrics`` holds 0-d tensors, so reading them is the
    caller's choice of when to synchronise: ``loss`` (token-weighted mean), ``grad_norm`` (before any
    clipping), ``lr`` (of this update; NaN if the optimizer keeps none) and ``tokens`` (counted targets).
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    if not isinstance(optimizer, optim.GradientTransformation):
        raise TypeError(f"optimizer must be an optim.GradientTransformation, got {type(optimizer).__name__}")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be an int >= 1, got {accum_steps!r}")

    def grad_and_loss(leaves, treedef, tokens, targets, key, n_tokens):
        """Gradients (a list like ``leaves``) and value of one micro-batch's share of the mean loss."""

        def loss_of(leaves):
            params = optim._unflatten(leaves, treedef)
            total = loss_fn(params, tokens, targets, cfg, key=key, ignore_index=ignore_index, reduction="sum")
            return total / n_tokens

        # torch.func.vjp rather than grad_and_value: the same transform underneath, but grad_and_value
        # always asks autograd for create_graph=True (so that it can nest), and recording the backward
        # pass for a second derivative nobody takes costs ~8% of a CPU step. The step never
        # differentiates through itself (the update runs under no_grad), so a first-order pullback is
        # all it needs. Differentiating a flat list of leaves spares torch.func a walk of the nested
        # tree per call; the tree's definition rides in the closure, out of those walks.
        loss, pullback = torch.func.vjp(loss_of, leaves)
        (grads,) = pullback(torch.ones_like(loss), retain_graph=False, create_graph=False)
        return grads, loss

    def step(params, opt_state, batch, key=None):
        tokens, targets = unpack_batch(batch)
        # Inside the transform the batch is wrapped and the model skips value checks; check here, once.
        check_tokens(tokens, cfg)
        check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
        leaves, treedef = optim._leaves(params)
        n_tokens = (targets != ignore_index).sum()
        # A batch of nothing but padding gives zero gradients instead of 0/0.
        denom = n_tokens.clamp(min=1).to(torch.float32)
        if accum_steps == 1:
            grads, loss = grad_and_loss(leaves, treedef, tokens, targets, key, denom)
        else:
            if tokens.ndim < 2 or tokens.shape[0] < accum_steps:
                got = "no batch axis" if tokens.ndim < 2 else f"batch={tokens.shape[0]}"
                raise ValueError(f"accum_steps={accum_steps} needs tokens with batch >= {accum_steps}, got {got}")
            keys = None if key is None else random.split(key, accum_steps)
            grads, loss = None, None
            for i, (t, y) in enumerate(zip(tokens.tensor_split(accum_steps), targets.tensor_split(accum_steps))):
                g, part = grad_and_loss(leaves, treedef, t, y, None if keys is None else keys[i], denom)
                if grads is None:
                    grads, loss = g, part
                else:
                    # The first micro-batch's gradients are ours alone: summing into them is safe.
                    optim._ops(grads, g).add_(grads, g)
                    loss = loss + part
        grads = optim._unflatten(grads, treedef)
        # Parameters that arrive with requires_grad=True must not drag the update into an autograd graph.
        with torch.no_grad():
            grad_norm = optim.global_norm(grads)
            updates, new_state = optimizer.update(grads, opt_state, params)
            u = optim._leaves_only(updates)
            if len(u) == len(leaves) and _owned(u, leaves, opt_state, new_state):
                torch._foreach_add_(u, leaves)
                params = optim._unflatten(u, treedef)
            else:
                params = optim.apply_updates(params, updates)
        lr = optim._find_lr(new_state)
        metrics = {
            "loss": loss.detach(),
            "grad_norm": grad_norm,
            "lr": torch.full((), float("nan")) if lr is None else lr,
            "tokens": n_tokens,
        }
        return params, new_state, metrics

    if not compile:
        return step
    compiled: dict[str, Callable] = {}

    def compiled_step(params, opt_state, batch, key=None):
        device = unpack_batch(batch)[0].device.type
        if device not in compiled:
            # On a CPU, a C++ wrapper around inductor's kernels saves the Python that would call them
            # one by one: ~2% of a small model's step. Elsewhere the default wrapper is the safe choice.
            compiled[device] = torch.compile(step, options={"cpp_wrapper": True} if device == "cpu" else None)
        return compiled[device](params, opt_state, batch, key)

    return compiled_step


EVAL_PROGRESS_MIN_BATCHES = 50  # progress=None shows a bar from this many batches (a whole split, not 20 batches)


def evaluate(
    params: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100, progress: bool | None = None,
    desc: str = "eval",
) -> float:
    """Token-weighted mean loss over ``batches`` of ``(tokens, targets)``, without dropout or gradients.

    For the exact loss of a whole split, pass ``data.SplitWindows(ids, seq_len, batch_size)``: every
    target once, in non-overlapping windows. ``progress``: a tqdm bar on stderr (None: only when
    ``batches`` has a length of at least ``EVAL_PROGRESS_MIN_BATCHES``).
    """
    if progress is None:
        progress = hasattr(batches, "__len__") and len(batches) >= EVAL_PROGRESS_MIN_BATCHES
    if progress:
        import sys

        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
    total, count = None, None
    with torch.no_grad():
        for batch in batches:
            tokens, targets = unpack_batch(batch)
            s = loss_fn(params, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
            n = (targets != ignore_index).sum()
            total = s if total is None else total + s
            count = n if count is None else count + n
    if count is None:
        raise ValueError("evaluate needs at least one batch, got none")
    if int(count) == 0:
        raise ValueError(f"evaluate needs target tokens to count, got only ignore_index={ignore_index}")
    return float(total / count)


# ====================================================================================================
# Fit loop (written by the data/checkpoint area): everything below this line belongs to `fit`.
# ====================================================================================================

import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ftransformer.checkpoint import (
    BEST,
    LATEST,
    checkpoint_exists,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from ftransformer.data import SplitWindows, Tokenizer, atomic_write, fixed_batches, sample_batch
from ftransformer.params import tree_to

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"
# Random streams of the data sampler: training batches, the fixed validation batches, and the fixed
# training batches that measure the train loss at each evaluation.
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was left in place."""


@dataclass
class FitResult:
    """What ``fit`` leaves behind."""

    params: dict
    opt_state: Any
    step: int  # optimizer steps done
    history: list[dict]  # one record per evaluation (the lines of metrics.jsonl)
    best_val_loss: float | None
    interrupted: bool  # stopped by Ctrl-C (a checkpoint of the current step was saved)
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # what was written where


def write_metrics(path: Path, history: list[dict]) -> None:
    """Write the evaluation history as JSON lines (rewritten whole, so it always matches the checkpoint)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in history))


def plot_history(path: Path, history: list[dict]) -> None:
    """Train and val loss against step, as a PNG (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["train_loss"] for r in history], marker="o", ms=3, label="train")
    ax.plot(steps, [r["val_loss"] for r in history], marker="o", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def _current_lr(opt_state) -> float | None:
    try:
        return float(optim.current_lr(opt_state))
    except ValueError:
        return None


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def fit(
    params: dict,
    cfg: Config,
    optimizer: optim.GradientTransformation,
    train_ids: np.ndarray | Tensor,
    val_ids: np.ndarray | Tensor,
    *,
    steps: int,
    batch_size: int,
    out_dir: str | os.PathLike,
    seq_len: int | None = None,
    accum_steps: int = 1,
    eval_every: int = 250,
    eval_batches: int | str = 20,
    seed: int = 0,
    resume: bool = False,
    compile: bool = False,
    device: str | torch.device | None = None,
    tokenizer: Tokenizer | None = None,
    extra: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = tqdm.write,
    per_example_grads: bool = False,
    log_noise_scale: bool = False,
) -> FitResult:
    """Train for ``steps`` optimizer steps, evaluating and checkpointing as it goes.

    Every ``eval_every`` steps (and at step 0 and at the end) the train and val losses are measured on
    fixed batches, appended to ``out_dir/metrics.jsonl`` and plotted to ``out_dir/loss.png``, and the
    state is saved to ``out_dir/latest`` (and to ``out_dir/best`` when the val loss improved).
    Batches and dropout keys depend only on ``(seed, step)``, so ``resume=True`` (which continues from
    ``out_dir/latest``) reproduces an uninterrupted run exactly. A non-finite loss raises
    ``NonFiniteLossError`` and leaves the last good checkpoint; Ctrl-C saves the current step and returns
    with ``interrupted=True``.

    Args:
        params: initial parameters (with ``resume``: only the device template; the checkpoint's are used).
        train_ids: training token ids (e.g. ``ftransformer.data.load_dataset(...).train``).
        val_ids: validation token ids (``load_dataset(...).val``).
        seq_len: tokens per training window (default ``cfg.max_seq_len``).
        accum_steps: micro-batches per step (same update as the whole batch, less memory).
        eval_batches: number of fixed batches (of ``batch_size`` sequences, evaluated in ``accum_steps``
            micro-batches) in each of the train and val estimates; ``"all"``: the val loss is exact, over
            the whole val split in non-overlapping ``seq_len`` windows (``data.SplitWindows``), and the
            train loss is estimated on as many fixed random windows.
        tokenizer: saved with every checkpoint, so ``ftransformer generate`` can encode text.
        extra: saved with every checkpoint (must be JSON).
        log: where progress messages go (None: silent).
        per_example_grads: hand the optimizer per-example gradients (``batched.make_per_example_train_step``):
            for DP-SGD, with ``optim.dp_aggregate`` first in its chain.
        log_noise_scale: add the gradient noise scale ``noise_scale`` (B_simple, McCandlish et al. 2018,
            from per-example gradients of up to 4 of the fixed train batches) to every evaluation record.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("accum_steps", accum_steps), ("eval_every", eval_every)):
        _positive_int(name, value)
    if eval_batches != "all":
        try:
            _positive_int("eval_batches", eval_batches)
        except ValueError:
            raise ValueError(f"eval_batches must be an int >= 1 or 'all', got {eval_batches!r}") from None
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} but the model's max_seq_len={cfg.max_seq_len}")
    if batch_size % accum_steps:
        raise ValueError(f"batch_size={batch_size} must be divisible by accum_steps={accum_steps}")
    say = log if log is not None else (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latest, best_path = out / LATEST, out / BEST
    files = {"latest": latest, "best": best_path, "metrics": out / METRICS_FILE, "plot": out / PLOT_FILE}
    if device is None:
        leaves = _tensor_leaves(params)
        device = leaves[0].device if leaves else torch.device("cpu")
    device = torch.device(device)

    if resume:
        if not checkpoint_exists(latest):
            raise ValueError(f"nothing to resume in {str(out)!r}: no checkpoint at {str(latest)!r}")
        ck = load_checkpoint(latest, config=cfg, optimizer=optimizer, device=device)
        params, opt_state, start, history = ck.params, ck.opt_state, ck.step, ck.metrics
        state_extra = ck.extra.get("fit", {})
        # Exact resume needs the same batches: everything that decides them must match the saved run.
        now = {"seed": seed, "batch_size": batch_size, "seq_len": seq_len, "accum_steps": accum_steps,
               "eval_batches": eval_batches, "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))}
        for name, value in now.items():
            if name in state_extra and state_extra[name] != value:
                raise ValueError(
                    f"cannot resume {str(latest)!r} with {name}={value}: the run was saved with "
                    f"{name}={state_extra[name]} (only steps and eval_every may change on resume)"
                )
        best_val = state_extra.get("best_val_loss")
        elapsed_before = float(state_extra.get("elapsed_s", 0.0))
        say(f"resuming {str(latest)!r} at step {start}")
    else:
        if checkpoint_exists(latest):
            step_there = read_checkpoint_info(latest)["step"]
            raise ValueError(
                f"{str(out)!r} already holds a checkpoint (step {step_there}); resume it or choose another directory"
            )
        params = tree_to(params, device=device)
        opt_state = optimizer.init(params)
        start, history, best_val, elapsed_before = 0, [], None, 0.0

    if per_example_grads:
        if compile:
            raise ValueError("per_example_grads (DP-SGD) does not run compiled; leave compile off")
        from ftransformer.batched import make_per_example_train_step

        chunk = batch_size // accum_steps if accum_steps > 1 else None
        step_fn = make_per_example_train_step(cfg, optimizer, chunk_size=chunk)
    else:
        step_fn = make_train_step(cfg, optimizer, accum_steps=accum_steps, compile=compile)
    if log_noise_scale and batch_size // accum_steps < 2:
        raise ValueError("log_noise_scale needs micro-batches of at least 2 sequences (batch_size / accum_steps)")

    def to_device(batches):
        return [(t.to(device), y.to(device)) for t, y in batches]

    # Evaluation runs micro-batch by micro-batch, like training: a batch too large for one forward
    # pass in training (accum_steps > 1) is too large for one in evaluation too.
    micro = batch_size // accum_steps
    if eval_batches == "all":
        val_batches = to_device(SplitWindows(val_ids, seq_len, micro))
        n_eval = len(val_batches)
    else:
        n_eval = eval_batches * accum_steps
        val_batches = to_device(fixed_batches(val_ids, n_eval, micro, seq_len, seed=seed, stream=VAL_STREAM))
    train_eval = to_device(fixed_batches(train_ids, n_eval, micro, seq_len, seed=seed, stream=TRAIN_EVAL_STREAM))
    base_key = random.key(seed).to(device)
    use_dropout = cfg.dropout > 0

    def save(path: Path, params, opt_state, step: int, elapsed: float, history: list, best_val) -> None:
        fit_state = {
            "seed": seed, "next_step": step, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "accum_steps": accum_steps, "eval_every": eval_every, "eval_batches": eval_batches,
            "best_val_loss": best_val, "elapsed_s": elapsed,
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
        }
        save_checkpoint(
            path, params=params, config=cfg, step=step, opt_state=opt_state, tokenizer=tokenizer,
            metrics=history, extra={**(extra or {}), "fit": fit_state},
        )

    # Everything that must stay consistent for a checkpoint changes in one assignment: (params, opt_state, step).
    state = (params, opt_state, start)
    t0 = time.perf_counter()
    window_t, window_tokens = 0.0, 0
    last_loss = None
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not progress,
               file=sys.stderr)
    interrupted = False
    try:
        while True:
            params, opt_state, done = state
            last_eval = history[-1]["step"] if history else -1
            if (done % eval_every == 0 or done == steps) and last_eval != done:
                eval_bar = None if progress else False  # a bar of its own only when the evaluation is long
                train_loss = evaluate(params, train_eval, cfg, progress=eval_bar, desc="eval train")
                val_loss = evaluate(params, val_batches, cfg, progress=eval_bar, desc="eval val")
                elapsed = elapsed_before + time.perf_counter() - t0
                record = {
                    "step": done,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": _current_lr(opt_state),
                    "tokens_per_s": window_tokens / window_t if window_t > 0 else None,
                    "elapsed_s": round(elapsed, 3),
                }
                if log_noise_scale:
                    from ftransformer.batched import noise_scale

                    record["noise_scale"] = float(noise_scale(params, train_eval[:4], cfg).b_simple)
                new_history = history + [record]
                improved = math.isfinite(val_loss) and (best_val is None or val_loss < best_val)
                new_best = val_loss if improved else best_val
                if improved:
                    save(best_path, params, opt_state, done, elapsed, new_history, new_best)
                save(latest, params, opt_state, done, elapsed, new_history, new_best)
                # Only now is the evaluation on record: an interrupt before this point redoes it on resume.
                history, best_val = new_history, new_best
                write_metrics(files["metrics"], history)
                plot_history(files["plot"], history)
                window_t, window_tokens = 0.0, 0
                bar.set_postfix(loss=_fmt(last_loss), val=_fmt(val_loss), refresh=False)
                say(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                    + (" (best so far)" if improved else ""))
            if done >= steps:
                break
            tokens, targets = sample_batch(train_ids, batch_size, seq_len, seed=seed, step=done, stream=TRAIN_STREAM)
            key = random.fold_in(base_key, done) if use_dropout else None
            t_step = time.perf_counter()
            batch = (tokens.to(device), targets.to(device))
            new_params, new_opt_state, metrics = step_fn(params, opt_state, batch, key)
            loss = float(metrics["loss"])  # also waits for the device, so the timing below is honest
            window_t += time.perf_counter() - t_step
            if not math.isfinite(loss):
                good = read_checkpoint_info(latest)["step"] if checkpoint_exists(latest) else None
                where = f"the last good checkpoint is {str(latest)!r} (step {good})" if good is not None else (
                    "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"loss became {loss} at step {done + 1} (lr {float(metrics['lr']):.3g}); training stopped "
                    f"and {where}; try a lower learning rate"
                )
            state = (new_params, new_opt_state, done + 1)
            window_tokens += tokens.numel()
            last_loss = loss
            bar.update(1)
            bar.set_postfix(
                loss=_fmt(loss), val=_fmt(history[-1]["val_loss"] if history else None),
                tok_s=f"{window_tokens / window_t:.0f}" if window_t > 0 else "?", refresh=False,
            )
    except KeyboardInterrupt:
        interrupted = True
        params, opt_state, done = state
        bar.close()
        save(latest, params, opt_state, done, elapsed_before + time.perf_counter() - t0, history, best_val)
        write_metrics(files["metrics"], history)
        say(f"interrupted at step {done}; saved {str(latest)!r} (continue with resume)")
    finally:
        bar.close()
    params, opt_state, done = state
    return FitResult(
        params=params, opt_state=opt_state, step=done, history=history, best_val_loss=best_val,
        interrupted=interrupted, out_dir=out, files=files,
    )


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"


def _tensor_leaves(tree) -> list:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, Tensor)]


# One vmapped step over an ensemble (per-member batches, keys and hyperparameters) lives with the other
# vmap tools; it is re-exported here because it is a train step.
from ftransformer.batched import make_ensemble_step  # noqa: E402
