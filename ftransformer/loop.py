"""Learning-path step 7c: the training loop around the pure step -- ``fit``.

``train.make_train_step`` is a function from state to state; ``fit`` is the part that touches the world:
it draws batches, calls the step, measures train and val loss, writes ``metrics.jsonl``, a loss plot
and checkpoints, and stops cleanly. Read it in the order it runs:

1. ``SingleModel.start``: a fresh state, or the one in ``out_dir/latest`` (resume), checked against the
   settings (``check_resume``);
2. ``_evaluate_and_record``: every ``eval_every`` steps, losses on fixed batches, records, checkpoints
   (``latest``, and ``best`` when the val loss improved), the metrics file and the plot;
3. ``_one_step``: the global batch for this step (a pure function of ``(seed, step)``), the step, and a
   ``NonFiniteLossError`` that leaves the last good checkpoint in place;
4. ``fit``: the loop, and Ctrl-C, which saves the current step and returns ``interrupted=True``.

What ``fit`` trains is an *adapter*'s business: ``SingleModel`` (one parameter tree, checkpoints in
``out_dir``) by default, ``ensemble.Members`` for an ensemble or a sweep (stacked trees, one vmapped
step, per-member checkpoints, records and plot). The step itself is a ``train.TrainStep`` (``step=``):
the plain step by default, ``per_example.dp_train_step`` for DP-SGD.

With ``dist`` (a ``distributed.DistContext``, e.g. under ``torchrun``) each process trains on its share
of the same global batch, gradients are summed across processes inside the step, and only rank 0
writes files and logs: the run is the one a single process would make.
"""

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
from ftransformer.checkpoint import BEST, LATEST, checkpoint_exists, load_checkpoint, read_checkpoint_info, save_checkpoint
from ftransformer.config import Config
from ftransformer.data import SplitWindows, Tokenizer, fixed_batches, sample_batch
from ftransformer.data.batches import Prefetcher
from ftransformer.io import atomic_write, save_figure
from ftransformer.params import tree_to
from ftransformer.precision import Precision
from ftransformer.train import TrainStep, evaluate, loss_sums, train_step

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
    best_val_loss: float | list | None  # one per member for an ensemble
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
    save_figure(fig, path)


# ---------------------------------------------------------------- the run's fixed settings


@dataclass
class FitRun:
    """Everything about one ``fit`` call that does not change while it runs."""

    cfg: Config
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
    say: Callable[[str], None]
    dist: Any = None  # a distributed.DistContext, or None for one process
    precision: Precision | None = None  # the default step's compute/param dtypes (None: fp32)
    prefetcher: Prefetcher | None = None  # on CUDA: the next step's batch copied while this one computes

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

    def batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """This process's rows of the global batch of ``step`` drawn with ``seed`` (all of it for one process)."""
        if self.prefetcher is not None and seed == self.seed:
            return self.prefetcher(step)
        return self.host_batch(step, seed, to_device=True)

    def host_batch(self, step: int, seed: int, *, to_device: bool = False) -> tuple[Tensor, Tensor]:
        """``batch`` drawn on the host (``to_device``: then moved to the run's device)."""
        tokens, targets = sample_batch(self.train_ids, self.batch_size, self.seq_len, seed=seed, step=step,
                                       stream=TRAIN_STREAM)
        if self.dist is not None:
            tokens, targets = self.dist.shard(tokens), self.dist.shard(targets)
        if not to_device:
            return tokens, targets
        return tokens.to(self.device), targets.to(self.device)

    def prefetch(self, step: int) -> None:
        """Start the host-to-device copy of ``step``'s batch (CUDA runs only; elsewhere nothing to overlap)."""
        if self.prefetcher is not None and step < self.steps:
            self.prefetcher.prefetch(step)


@dataclass
class FitState:
    """What a checkpoint holds. Replaced whole (never changed in place), so it is never half-updated."""

    params: dict
    opt_state: Any
    step: int
    history: list[dict]
    best_val: Any  # the best val loss so far (None: none finite yet); one per member for an ensemble
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


def check_resume(run: FitRun, where: Path, saved: dict) -> None:
    """``ValueError`` unless a checkpoint's ``extra["fit"]`` (``saved``) drew its batches as this run does."""
    now = run.fit_state(0, 0.0, None)
    for name in _RESUME_KEYS:
        if name in saved and saved[name] != now[name]:
            raise ValueError(
                f"cannot resume {str(where)!r} with {name}={now[name]}: the run was saved with "
                f"{name}={saved[name]} (only steps and eval_every may change on resume)"
            )


def refuse_overwrite(run: FitRun, latest: Path) -> None:
    """``ValueError`` if a fresh run would overwrite the checkpoint at ``latest``."""
    if checkpoint_exists(latest):
        step_there = read_checkpoint_info(latest)["step"]
        raise ValueError(
            f"{str(run.out)!r} already holds a checkpoint (step {step_there}); resume it or choose another directory"
        )


def eval_sets(run: FitRun) -> tuple[list, list]:
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


def current_lr(opt_state) -> float | None:
    """The optimizer state's learning rate as a float, or None if it keeps none."""
    try:
        return float(optim.current_lr(opt_state))
    except ValueError:
        return None


def improved(best: float | None, val_loss: float) -> bool:
    """Whether ``val_loss`` beats ``best`` (a non-finite loss never does)."""
    return math.isfinite(val_loss) and (best is None or val_loss < best)


# ---------------------------------------------------------------- the adapter for one model


class SingleModel:
    """``fit``'s adapter for one parameter tree: checkpoints ``out_dir/latest`` and ``best``, one record per evaluation."""

    def __init__(self, optimizer: optim.GradientTransformation | None = None, *, tokenizer: Tokenizer | None = None,
                 extra: dict | None = None):
        self.optimizer, self.tokenizer, self.extra = optimizer, tokenizer, extra

    def make_step(self, run: FitRun, compile: bool) -> TrainStep:
        if self.optimizer is None:
            raise ValueError("fit needs an optimizer or a step=, got neither")
        all_reduce = None if run.dist is None else run.dist.all_reduce_sum
        return train_step(run.cfg, self.optimizer, accum_steps=run.accum_steps, compile=compile,
                          all_reduce=all_reduce, precision=run.precision)

    def start(self, run: FitRun, params: dict, init: Callable, resume: bool) -> FitState:
        latest = run.files["latest"]
        if not resume:
            refuse_overwrite(run, latest)
            params = tree_to(params, device=run.device)
            return FitState(params, init(params), 0, [], None, 0.0)
        if not checkpoint_exists(latest):
            raise ValueError(f"nothing to resume in {str(run.out)!r}: no checkpoint at {str(latest)!r}")
        template = optim.GradientTransformation(init, None)  # the state's structure, for the loader
        ck = load_checkpoint(latest, config=run.cfg, optimizer=template, device=run.device)
        saved = ck.extra.get("fit", {})
        check_resume(run, latest, saved)
        run.say(f"resuming {str(latest)!r} at step {ck.step}")
        return FitState(ck.params, ck.opt_state, ck.step, ck.metrics, saved.get("best_val_loss"),
                      float(saved.get("elapsed_s", 0.0)))

    def batch(self, run: FitRun, step: int) -> tuple[Tensor, Tensor]:
        return run.batch(step, run.seed)

    def key(self, run: FitRun, step: int) -> Tensor:
        return random.fold_in(random.key(run.seed), step).to(run.device)

    def losses(self, run: FitRun, params: dict, batches: list, progress: bool, desc: str) -> float:
        """The mean loss over ``batches``; with several processes each one evaluates every world_size-th batch."""
        if run.dist is None or run.dist.world_size == 1:
            return evaluate(params, batches, run.cfg, progress=None if progress else False, desc=desc)
        total, count = loss_sums(params, batches[run.dist.rank::run.dist.world_size], run.cfg)
        total, count = run.dist.all_reduce_sum([total.to(torch.float64), count.to(torch.float64)])
        return float(total / count)

    def record(self, run: FitRun, state: FitState, train_loss: float, val_loss: float, common: dict) -> FitState:
        """The state with this evaluation's record, checkpoints saved (``best`` when the val loss improved)."""
        record = {"step": state.step, "train_loss": train_loss, "val_loss": val_loss, "lr": current_lr(state.opt_state),
                  **common}
        better = improved(state.best_val, val_loss)
        new = replace(state, history=state.history + [record], best_val=val_loss if better else state.best_val)
        if better:
            self.save(run, new, "best")
        self.save(run, new, "latest")
        run.say(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                + (" (best so far)" if better else ""))
        return new

    def save(self, run: FitRun, state: FitState, which: str = "latest") -> None:
        if not run.is_main:
            return
        save_checkpoint(
            run.files[which], params=state.params, config=run.cfg, step=state.step, opt_state=state.opt_state,
            tokenizer=self.tokenizer, metrics=state.history,
            extra={**(self.extra or {}), "fit": run.fit_state(state.step, state.elapsed, state.best_val)},
        )

    def files(self, run: FitRun) -> dict[str, Path]:
        """What the run writes where; ``latest`` is the checkpoint a failed or interrupted run points to."""
        return run.files

    def loss(self, metrics: dict) -> float:
        """The step's loss to show and to check for divergence."""
        return float(metrics["loss"])

    def val_loss(self, history: list[dict]) -> float | None:
        return history[-1]["val_loss"] if history else None

    def plot(self, path: Path, history: list[dict]) -> None:
        plot_history(path, history)


# ---------------------------------------------------------------- 2. evaluate and record


def _evaluate_and_record(run: FitRun, model, state: FitState, sets, window: dict, progress: bool,
                         record_extra: Callable | None) -> FitState:
    """Measure, add records, save checkpoints, the metrics file and the plot: the new state."""
    train_eval, val_batches = sets
    train_loss = model.losses(run, state.params, train_eval, progress, "eval train")
    val_loss = model.losses(run, state.params, val_batches, progress, "eval val")
    common = {"tokens_per_s": window["tokens"] / window["seconds"] if window["seconds"] > 0 else None,
              "elapsed_s": round(state.elapsed, 3)}
    if record_extra is not None:
        common.update(record_extra(state.params, train_eval))
    new = model.record(run, state, train_loss, val_loss, common)
    # Only now is the evaluation on record: an interrupt before this point redoes it on resume.
    if run.is_main:
        write_metrics(run.files["metrics"], new.history)
        model.plot(run.files["plot"], new.history)
    window.update(tokens=0, seconds=0.0)
    return new


# ---------------------------------------------------------------- 3. one step


def _one_step(run: FitRun, model, step_fn: Callable, state: FitState, window: dict) -> tuple[FitState, float]:
    """One optimizer step: the new state and its (global) loss. Raises ``NonFiniteLossError``."""
    batch = model.batch(run, state.step)
    key = model.key(run, state.step) if run.cfg.dropout > 0 else None
    t = time.perf_counter()
    params, opt_state, metrics = step_fn(state.params, state.opt_state, batch, key)
    run.prefetch(state.step + 1)  # queued behind the step's kernels, before waiting for them
    loss = model.loss(metrics)  # also waits for the device, so the timing is honest
    window["seconds"] += time.perf_counter() - t
    if not math.isfinite(loss):
        latest = model.files(run)["latest"]
        good = read_checkpoint_info(latest)["step"] if checkpoint_exists(latest) else None
        where = f"the last good checkpoint is {str(latest)!r} (step {good})" if good is not None else (
            "no checkpoint was saved yet")
        lr = ", ".join(f"{v:.3g}" for v in metrics["lr"].flatten().tolist())
        raise NonFiniteLossError(
            f"loss became {loss} at step {state.step + 1} (lr {lr}); training stopped "
            f"and {where}; try a lower learning rate"
        )
    window["tokens"] += batch[0].numel() * (1 if run.dist is None else run.dist.world_size)
    return replace(state, params=params, opt_state=opt_state, step=state.step + 1), loss


# ---------------------------------------------------------------- 4. the loop


def fit(
    params: dict, cfg: Config, optimizer: optim.GradientTransformation | None, train_ids: np.ndarray | Tensor,
    val_ids: np.ndarray | Tensor, *, steps: int, batch_size: int, out_dir: str | os.PathLike,
    seq_len: int | None = None, accum_steps: int = 1, eval_every: int = 250, eval_batches: int | str = 20,
    seed: int = 0, resume: bool = False, compile: bool = False, device: str | torch.device | None = None,
    tokenizer: Tokenizer | None = None, extra: dict | None = None, progress: bool = True,
    log: Callable[[str], None] | None = tqdm.write, step: TrainStep | None = None, model: Any = None,
    record_extra: Callable[[dict, list], dict] | None = None, dist: Any = None, precision: Precision | None = None,
) -> FitResult:
    """Train for ``steps`` optimizer steps, evaluating and checkpointing as it goes.

    Every ``eval_every`` steps (and at step 0 and at the end) the train and val losses are measured on
    fixed batches, appended to ``out_dir/metrics.jsonl`` and plotted to ``out_dir/loss.png``, and the
    state is saved to ``out_dir/latest`` (and ``out_dir/best`` when the val loss improved). Batches and
    dropout keys depend only on ``(seed, step)``, so ``resume=True`` (from ``out_dir/latest``) reproduces
    an uninterrupted run exactly. A non-finite loss raises ``NonFiniteLossError`` and leaves the last
    good checkpoint; Ctrl-C saves the current step and returns with ``interrupted=True``.

    Args:
        params: initial parameters (with ``resume``: only the device template; the checkpoint's are used).
        optimizer: builds the default step and its state (None: ``step`` and ``model`` bring their own).
        batch_size: sequences per optimizer step, all processes together (the global batch).
        seq_len: tokens per training window (default ``cfg.max_seq_len``).
        accum_steps: micro-batches per step (same update as the whole batch, less memory).
        eval_batches: fixed batches (of ``batch_size`` sequences, evaluated in ``accum_steps`` micro-batches)
            in each of the train and val estimates; ``"all"``: the exact val loss over the whole val split
            (``data.SplitWindows``), and the train loss on as many fixed random windows.
        tokenizer, extra: saved with every checkpoint (``extra`` must be JSON).
        step: the ``train.TrainStep`` to run (default ``train.train_step(cfg, optimizer, accum_steps=...,
            compile=...)``); e.g. ``per_example.dp_train_step(cfg, optimizer)`` for DP-SGD.
        model: the adapter for what is trained (default ``SingleModel(optimizer, tokenizer=, extra=)``);
            ``ensemble.Members(...)`` trains an ensemble or a sweep, with per-member checkpoints.
        record_extra: ``(params, fixed train batches) -> dict`` added to every evaluation's records,
            e.g. ``per_example.noise_scale_record(cfg)``.
        dist: a ``distributed.DistContext`` (``distributed.init_from_env()`` under torchrun): data parallel
            over its processes, same result as one process; None: this process alone.
        precision: the default step's ``precision.Precision`` (e.g. ``precision.BF16``: bf16 compute, fp32
            master weights, optimizer state and checkpoints); None: fp32. On a CUDA device the next
            step's batch is copied from pinned memory while the current step runs.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    _check_settings(cfg, steps, batch_size, seq_len, accum_steps, eval_every, eval_batches, dist)
    model = SingleModel(optimizer, tokenizer=tokenizer, extra=extra) if model is None else model
    run = _make_run(params, cfg, train_ids, val_ids, steps, batch_size, seq_len, accum_steps, eval_every,
                    eval_batches, seed, device, out_dir, log, dist, precision)
    step = model.make_step(run, compile) if step is None else step
    state = model.start(run, params, step.init, resume)
    if dist is not None:
        dist.barrier()  # every process has read (or checked) out_dir before rank 0 writes to it
    return _loop(run, model, step.step, state, eval_sets(run), progress and run.is_main, record_extra)


def _make_run(params, cfg, train_ids, val_ids, steps, batch_size, seq_len, accum_steps, eval_every, eval_batches,
              seed, device, out_dir, log, dist, precision=None) -> FitRun:
    if device is None:
        leaves = [x for x in pytree.tree_leaves(params) if isinstance(x, Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
    main = dist is None or dist.is_main
    run = FitRun(cfg, train_ids, val_ids, steps, batch_size, seq_len, accum_steps, eval_every, eval_batches, seed,
               torch.device(device), Path(out_dir), log if (log is not None and main) else (lambda msg: None), dist,
               precision)
    if run.device.type == "cuda":  # only there is a copy worth overlapping with the step
        run.prefetcher = Prefetcher(lambda s: run.host_batch(s, run.seed), run.device)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
    return run


def _loop(run: FitRun, model, step_fn: Callable, state: FitState, sets, show: bool, record_extra) -> FitResult:
    """Evaluate, step, repeat: the loop of ``fit``, with Ctrl-C saving the current step."""
    bar = tqdm(total=run.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not show,
               file=sys.stderr)
    window = {"tokens": 0, "seconds": 0.0}
    t0, elapsed_before, last_loss, interrupted = time.perf_counter(), state.elapsed, None, False
    try:
        while True:
            state = replace(state, elapsed=elapsed_before + time.perf_counter() - t0)
            last_eval = state.history[-1]["step"] if state.history else -1
            if (state.step % run.eval_every == 0 or state.step == run.steps) and last_eval != state.step:
                state = _evaluate_and_record(run, model, state, sets, window, show, record_extra)
            if state.step >= run.steps:
                break
            state, last_loss = _one_step(run, model, step_fn, state, window)
            bar.update(1)
            bar.set_postfix(
                loss=_fmt(last_loss), val=_fmt(model.val_loss(state.history)),
                tok_s=f"{window['tokens'] / window['seconds']:.0f}" if window["seconds"] > 0 else "?", refresh=False,
            )
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        _save_on_interrupt(run, model, replace(state, elapsed=elapsed_before + time.perf_counter() - t0))
    finally:
        bar.close()
    return FitResult(
        params=state.params, opt_state=state.opt_state, step=state.step, history=state.history,
        best_val_loss=state.best_val, interrupted=interrupted, out_dir=run.out, files=model.files(run),
    )


def _save_on_interrupt(run: FitRun, model, state: FitState) -> None:
    model.save(run, state, "latest")
    if run.is_main:
        write_metrics(run.files["metrics"], state.history)
    run.say(f"interrupted at step {state.step}; saved {str(model.files(run)['latest'])!r} (continue with resume)")


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"
