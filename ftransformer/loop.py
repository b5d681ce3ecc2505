"""Learning-path step 7c: the training loop around the pure step -- ``fit``.

``train.make_train_step`` is a function from state to state; ``fit`` is the part that touches the world:
it draws batches, calls the step, measures train and val loss, writes ``metrics.jsonl``, a loss plot
and checkpoints, and stops cleanly. Read it in the order it runs:

1. ``_start``: a fresh state, or the one in ``out_dir/latest`` (resume), checked against the settings;
2. ``_evaluate_and_record``: every ``eval_every`` steps, losses on fixed batches, one history record,
   checkpoints (``latest``, and ``best`` when the val loss improved), the metrics file and the plot;
3. ``_one_step``: the global batch for this step (a pure function of ``(seed, step)``), the step, and a
   ``NonFiniteLossError`` that leaves the last good checkpoint in place;
4. ``fit``: the loop, and Ctrl-C, which saves the current step and returns ``interrupted=True``.

With ``dist`` (a ``distributed.DistContext``, e.g. under ``torchrun``) each process trains on its share
of the same global batch, gradients are summed across processes inside the step, and only rank 0
writes files and logs: the run is the one a single process would make.
"""

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from tqdm.auto import tqdm

from ftransformer import optim, random
from ftransformer.batched import make_per_example_train_step, noise_scale
from ftransformer.checkpoint import BEST, LATEST, checkpoint_exists, load_checkpoint, read_checkpoint_info, save_checkpoint
from ftransformer.config import Config
from ftransformer.data import SplitWindows, Tokenizer, atomic_write, fixed_batches, sample_batch
from ftransformer.params import tree_to
from ftransformer.train import evaluate, loss_sums, make_train_step

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"
# Random streams of the data sampler: training batches, the fixed validation batches, and the fixed
# training batches that measure the train loss at each evaluation.
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2
# What decides the batches: a resumed run must match the saved one in all of these.
_RESUME_KEYS = ("seed", "batch_size", "seq_len", "accum_steps", "eval_batches", "train_tokens", "val_tokens")


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


# ---------------------------------------------------------------- the run's fixed settings


@dataclass
class _Run:
    """Everything about one ``fit`` call that does not change while it runs."""

    cfg: Config
    optimizer: optim.GradientTransformation
    train_ids: np.ndarray | Tensor
    val_ids: np.ndarray | Tensor
    steps: int
    batch_size: int  # the global batch (all processes together)
    seq_len: int
    accum_steps: int
    eval_every: int
    eval_batches: int | str
    seed: int
    device: torch.device
    out: Path
    tokenizer: Tokenizer | None
    extra: dict | None
    say: Callable[[str], None]
    dist: Any = None  # a distributed.DistContext, or None for one process

    @property
    def files(self) -> dict[str, Path]:
        return {"latest": self.out / LATEST, "best": self.out / BEST, "metrics": self.out / METRICS_FILE,
                "plot": self.out / PLOT_FILE}

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def fit_state(self, step: int, elapsed: float, best_val) -> dict:
        """The loop's own part of a checkpoint (``extra["fit"]``)."""
        return {
            "seed": self.seed, "next_step": step, "steps": self.steps, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "accum_steps": self.accum_steps, "eval_every": self.eval_every,
            "eval_batches": self.eval_batches, "best_val_loss": best_val, "elapsed_s": elapsed,
            "train_tokens": int(len(self.train_ids)), "val_tokens": int(len(self.val_ids)),
        }

    def save(self, path: Path, state: "_State") -> None:
        if not self.is_main:
            return
        save_checkpoint(
            path, params=state.params, config=self.cfg, step=state.step, opt_state=state.opt_state,
            tokenizer=self.tokenizer, metrics=state.history,
            extra={**(self.extra or {}), "fit": self.fit_state(state.step, state.elapsed, state.best_val)},
        )


@dataclass
class _State:
    """What a checkpoint holds. Replaced whole (never changed in place), so it is never half-updated."""

    params: dict
    opt_state: Any
    step: int
    history: list[dict]
    best_val: float | None
    elapsed: float  # seconds spent before this call (resumed runs) plus this call's so far


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_settings(cfg: Config, steps, batch_size, seq_len, accum_steps, eval_every, eval_batches, dist) -> None:
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
    world = 1 if dist is None else dist.world_size
    if batch_size % (accum_steps * world):
        procs = f" x {world} processes" if world > 1 else ""
        raise ValueError(
            f"batch_size={batch_size} must be divisible by accum_steps={accum_steps}{procs} = {accum_steps * world}"
        )


# ---------------------------------------------------------------- 1. start or resume


def _start(run: _Run, params: dict, resume: bool) -> _State:
    latest = run.files["latest"]
    if resume:
        if not checkpoint_exists(latest):
            raise ValueError(f"nothing to resume in {str(run.out)!r}: no checkpoint at {str(latest)!r}")
        ck = load_checkpoint(latest, config=run.cfg, optimizer=run.optimizer, device=run.device)
        saved = ck.extra.get("fit", {})
        now = run.fit_state(ck.step, 0.0, None)
        for name in _RESUME_KEYS:
            if name in saved and saved[name] != now[name]:
                raise ValueError(
                    f"cannot resume {str(latest)!r} with {name}={now[name]}: the run was saved with "
                    f"{name}={saved[name]} (only steps and eval_every may change on resume)"
                )
        run.say(f"resuming {str(latest)!r} at step {ck.step}")
        return _State(ck.params, ck.opt_state, ck.step, ck.metrics, saved.get("best_val_loss"),
                      float(saved.get("elapsed_s", 0.0)))
    if checkpoint_exists(latest):
        step_there = read_checkpoint_info(latest)["step"]
        raise ValueError(
            f"{str(run.out)!r} already holds a checkpoint (step {step_there}); resume it or choose another directory"
        )
    params = tree_to(params, device=run.device)
    return _State(params, run.optimizer.init(params), 0, [], None, 0.0)


def _make_step_fn(run: _Run, *, per_example_grads: bool, compile: bool):
    if per_example_grads:
        if compile:
            raise ValueError("per_example_grads (DP-SGD) does not run compiled; leave compile off")
        if run.dist is not None and run.dist.world_size > 1:
            raise ValueError("per_example_grads (DP-SGD) runs in one process; launch without torchrun")
        chunk = run.batch_size // run.accum_steps if run.accum_steps > 1 else None
        return make_per_example_train_step(run.cfg, run.optimizer, chunk_size=chunk)
    all_reduce = None if run.dist is None else run.dist.all_reduce_sum
    return make_train_step(run.cfg, run.optimizer, accum_steps=run.accum_steps, compile=compile,
                           all_reduce=all_reduce)


# ---------------------------------------------------------------- 2. evaluate and record


def _eval_sets(run: _Run) -> tuple[list, list]:
    """The fixed train batches and the val batches every evaluation uses, on the device.

    Evaluation runs micro-batch by micro-batch, like training: a batch too large for one forward pass in
    training (accum_steps > 1) is too large for one in evaluation too.
    """
    micro = run.batch_size // run.accum_steps

    def to_device(batches):
        return [(t.to(run.device), y.to(run.device)) for t, y in batches]

    if run.eval_batches == "all":
        val = to_device(SplitWindows(run.val_ids, run.seq_len, micro))
        n_eval = len(val)
    else:
        n_eval = run.eval_batches * run.accum_steps
        val = to_device(fixed_batches(run.val_ids, n_eval, micro, run.seq_len, seed=run.seed, stream=VAL_STREAM))
    train = to_device(fixed_batches(run.train_ids, n_eval, micro, run.seq_len, seed=run.seed,
                                    stream=TRAIN_EVAL_STREAM))
    return train, val


def _eval_loss(run: _Run, params: dict, batches: list, progress: bool, desc: str) -> float:
    """The mean loss over ``batches``; with several processes each one evaluates every world_size-th batch."""
    if run.dist is None or run.dist.world_size == 1:
        return evaluate(params, batches, run.cfg, progress=None if progress else False, desc=desc)
    total, count = loss_sums(params, batches[run.dist.rank::run.dist.world_size], run.cfg)
    total, count = run.dist.all_reduce_sum([total.to(torch.float64), count.to(torch.float64)])
    return float(total / count)


def _evaluate_and_record(run: _Run, state: _State, eval_sets, window: dict, *, progress: bool,
                         log_noise_scale: bool) -> _State:
    """Measure, append a record, save checkpoints, the metrics file and the plot: the new state."""
    train_eval, val_batches = eval_sets
    train_loss = _eval_loss(run, state.params, train_eval, progress, "eval train")
    val_loss = _eval_loss(run, state.params, val_batches, progress, "eval val")
    record = {
        "step": state.step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "lr": _current_lr(state.opt_state),
        "tokens_per_s": window["tokens"] / window["seconds"] if window["seconds"] > 0 else None,
        "elapsed_s": round(state.elapsed, 3),
    }
    if log_noise_scale:
        record["noise_scale"] = float(noise_scale(state.params, train_eval[:4], run.cfg).b_simple)
    improved = math.isfinite(val_loss) and (state.best_val is None or val_loss < state.best_val)
    new = replace(state, history=state.history + [record], best_val=val_loss if improved else state.best_val)
    if improved:
        run.save(run.files["best"], new)
    run.save(run.files["latest"], new)
    # Only now is the evaluation on record: an interrupt before this point redoes it on resume.
    if run.is_main:
        write_metrics(run.files["metrics"], new.history)
        plot_history(run.files["plot"], new.history)
    window.update(tokens=0, seconds=0.0)
    run.say(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
            + (" (best so far)" if improved else ""))
    return new


def _current_lr(opt_state) -> float | None:
    try:
        return float(optim.current_lr(opt_state))
    except ValueError:
        return None


# ---------------------------------------------------------------- 3. one step


def _global_batch_share(run: _Run, step: int) -> tuple[Tensor, Tensor]:
    """This process's rows of the global batch of ``step`` (all of it for a single process)."""
    tokens, targets = sample_batch(run.train_ids, run.batch_size, run.seq_len, seed=run.seed, step=step,
                                   stream=TRAIN_STREAM)
    if run.dist is not None:
        tokens, targets = run.dist.shard(tokens), run.dist.shard(targets)
    return tokens.to(run.device), targets.to(run.device)


def _one_step(run: _Run, step_fn, state: _State, base_key, window: dict) -> tuple[_State, float]:
    """One optimizer step: the new state and its (global) loss. Raises ``NonFiniteLossError``."""
    batch = _global_batch_share(run, state.step)
    key = random.fold_in(base_key, state.step) if run.cfg.dropout > 0 else None
    t = time.perf_counter()
    params, opt_state, metrics = step_fn(state.params, state.opt_state, batch, key)
    loss = float(metrics["loss"])  # also waits for the device, so the timing is honest
    window["seconds"] += time.perf_counter() - t
    if not math.isfinite(loss):
        latest = run.files["latest"]
        good = read_checkpoint_info(latest)["step"] if checkpoint_exists(latest) else None
        where = f"the last good checkpoint is {str(latest)!r} (step {good})" if good is not None else (
            "no checkpoint was saved yet")
        raise NonFiniteLossError(
            f"loss became {loss} at step {state.step + 1} (lr {float(metrics['lr']):.3g}); training stopped "
            f"and {where}; try a lower learning rate"
        )
    window["tokens"] += run.batch_size * run.seq_len
    return replace(state, params=params, opt_state=opt_state, step=state.step + 1), loss


# ---------------------------------------------------------------- 4. the loop


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
    dist: Any = None,
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
        batch_size: sequences per optimizer step, all processes together (the global batch).
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
        dist: a ``distributed.DistContext`` (``distributed.init_from_env()`` under torchrun): data parallel
            over its processes, same result as one process; None: this process alone.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _check_settings(cfg, steps, batch_size, seq_len, accum_steps, eval_every, eval_batches, dist)
    if device is None:
        leaves = [x for x in pytree.tree_leaves(params) if isinstance(x, Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
    main = dist is None or dist.is_main
    run = _Run(cfg, optimizer, train_ids, val_ids, steps, batch_size, seq_len, accum_steps, eval_every,
               eval_batches, seed, torch.device(device), Path(out_dir), tokenizer, extra,
               log if (log is not None and main) else (lambda msg: None), dist)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
    if log_noise_scale and batch_size // accum_steps < 2:
        raise ValueError("log_noise_scale needs micro-batches of at least 2 sequences (batch_size / accum_steps)")
    state = _start(run, params, resume)
    if dist is not None:
        dist.barrier()  # every process has read (or checked) out_dir before rank 0 writes to it
    step_fn = _make_step_fn(run, per_example_grads=per_example_grads, compile=compile)
    eval_sets = _eval_sets(run)
    base_key = random.key(seed).to(run.device)
    show = progress and main
    bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not show,
               file=sys.stderr)
    window = {"tokens": 0, "seconds": 0.0}
    t0, elapsed_before, last_loss = time.perf_counter(), state.elapsed, None
    interrupted = False
    try:
        while True:
            state = replace(state, elapsed=elapsed_before + time.perf_counter() - t0)
            last_eval = state.history[-1]["step"] if state.history else -1
            if (state.step % eval_every == 0 or state.step == steps) and last_eval != state.step:
                state = _evaluate_and_record(run, state, eval_sets, window, progress=show,
                                             log_noise_scale=log_noise_scale)
                bar.set_postfix(loss=_fmt(last_loss), val=_fmt(state.history[-1]["val_loss"]), refresh=False)
            if state.step >= steps:
                break
            state, last_loss = _one_step(run, step_fn, state, base_key, window)
            bar.update(1)
            bar.set_postfix(
                loss=_fmt(last_loss), val=_fmt(state.history[-1]["val_loss"] if state.history else None),
                tok_s=f"{window['tokens'] / window['seconds']:.0f}" if window["seconds"] > 0 else "?", refresh=False,
            )
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        _save_on_interrupt(run, replace(state, elapsed=elapsed_before + time.perf_counter() - t0))
    finally:
        bar.close()
    return FitResult(
        params=state.params, opt_state=state.opt_state, step=state.step, history=state.history,
        best_val_loss=state.best_val, interrupted=interrupted, out_dir=run.out, files=run.files,
    )


def _save_on_interrupt(run: _Run, state: _State) -> None:
    run.save(run.files["latest"], state)
    if run.is_main:
        write_metrics(run.files["metrics"], state.history)
    run.say(f"interrupted at step {state.step}; saved {str(run.files['latest'])!r} (continue with resume)")


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"
