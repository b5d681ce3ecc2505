"""Learning-path step 7c: the training loop around the pure step -- ``fit(params, step, data, settings)``.

``train.make_train_step`` is a function from state to state; ``fit`` is the part that touches the world:
it draws batches, calls the step, measures train and val loss, writes ``metrics.jsonl``, a loss plot
and checkpoints, and stops cleanly. Read it in the order it runs:

1. ``data.start``: a fresh state, or the one in ``out_dir/latest`` (resume), checked against the
   settings (``check_resume``);
2. ``data.evaluate``: every ``eval_every`` steps, losses on fixed batches, records, checkpoints
   (``latest``, and ``best`` when the val loss improved) and the plot; then the metrics file;
3. ``_one_step``: the batch for this step (a pure function of ``(seed, step)``), the step, and a
   ``NonFiniteLossError`` that leaves the last good checkpoint in place;
4. ``fit``: the loop, and Ctrl-C, which saves the current step and returns ``interrupted=True``.

The step is any ``train.TrainStep`` (``make_train_step``, ``per_example.make_per_example_train_step``
for DP-SGD, ``ensemble.make_ensemble_step``); its builder chose its precision and compilation. What it
trains on, how that is measured and where it is saved is a ``FitData`` adapter's business (five methods):
``TokenData`` (one model on a token corpus, checkpoints in ``out_dir``), ``ensemble.Members`` (an
ensemble or a sweep: stacked trees, per-member checkpoints, records and plot).

With ``dist`` (a ``distributed.DistContext``, e.g. under ``torchrun``) each process trains on its share
of the same global batch, gradients are summed across processes inside the step (build it with
``make_train_step(..., all_reduce=dist.all_reduce_sum)``), and only rank 0
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
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ftransformer import optim, random, tree
from ftransformer import validate
from ftransformer.checkpoint import (
    BEST, LATEST, checkpoint_exists, load_checkpoint, read_checkpoint_info, restore_opt_state, save_checkpoint,
)
from ftransformer.config import Config
from ftransformer.data import SplitWindows, Tokenizer, fixed_batches, sample_batch
from ftransformer.data.batches import to_device
from ftransformer.io import atomic_write, save_figure
from ftransformer.train import TrainStep, evaluate, loss_sums

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
    best_val_loss: Any  # the best val loss (None: none finite); ensemble.Members: a list, one per member
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


def _positive_int(name: str, value) -> None:
    validate.int_at_least(name, value, 1)


@dataclass(frozen=True)
class FitSettings:
    """How long ``fit`` trains, on what batches, and how often it evaluates (what a resumed run must keep)."""

    steps: int  # optimizer steps in all (a resumed run may raise it)
    batch_size: int  # sequences per optimizer step, all processes together (the global batch)
    seq_len: int | None = None  # tokens per training window (None: the model's max_seq_len)
    # Micro-batches of evaluation and of the divisibility check. None: the step's own (TrainStep.accum_steps, as
    # make_train_step(accum_steps=...) was told), 1 where it says none; given on both, they must agree.
    accum_steps: int | None = None
    eval_every: int = 250  # steps between evaluations (also at step 0 and at the end)
    # Fixed batches of batch_size sequences (evaluated in accum_steps micro-batches) in each of the train and
    # val estimates; "all": the exact val loss over the whole val split (data.SplitWindows).
    eval_batches: int | str = 20
    seed: int = 0  # batches and dropout keys are functions of (seed, step)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            _positive_int(name, getattr(self, name))
        validate.int_at_least("accum_steps", self.accum_steps, 1, allow_none=True)
        if self.seq_len is not None:
            _positive_int("seq_len", self.seq_len)
        if self.eval_batches != "all":
            try:
                _positive_int("eval_batches", self.eval_batches)
            except ValueError:
                raise ValueError(f"eval_batches must be an int >= 1 or 'all', got {self.eval_batches!r}") from None


@dataclass
class FitRun:
    """Everything about one ``fit`` call that does not change while it runs."""

    settings: FitSettings
    device: torch.device
    out: Path
    say: Callable[[str], None]
    dist: Any = None  # a distributed.DistContext, or None for one process
    progress: bool = False  # progress bars (on the main process)

    @property
    def files(self) -> dict[str, Path]:
        return {"latest": self.out / LATEST, "best": self.out / BEST, "metrics": self.out / METRICS_FILE,
                "plot": self.out / PLOT_FILE}

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def world(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    def fit_state(self, step: int, elapsed: float, best_val, **sizes) -> dict:
        """The loop's own part of a checkpoint (``extra["fit"]``); ``sizes``: the data's (e.g. ``train_tokens``)."""
        s = self.settings
        return {
            "seed": s.seed, "next_step": step, "steps": s.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "accum_steps": s.accum_steps, "eval_every": s.eval_every, "eval_batches": s.eval_batches,
            "best_val_loss": best_val, "elapsed_s": elapsed, **sizes,
        }


@dataclass
class FitState:
    """What a checkpoint holds. Replaced whole (never changed in place), so it is never half-updated."""

    params: dict
    opt_state: Any
    step: int
    history: list[dict]
    best_val: Any  # the best val loss so far (None: none finite yet); one per member for an ensemble
    elapsed: float  # seconds spent before this call (resumed runs) plus this call's so far


@runtime_checkable
class FitData(Protocol):
    """What ``fit`` trains on, how it is measured and where it is saved: ``TokenData``, ``ensemble.Members``."""

    def start(self, run: FitRun, params: Any, init: Callable, resume: bool) -> FitState:
        """The first state: ``params`` with ``init(params)``, or the checkpoint in ``run.out`` (resume)."""

    def batch(self, run: FitRun, step: int) -> tuple[Any, Tensor | None]:
        """Step ``step``'s batch on the device and its dropout key (None: no dropout)."""

    def evaluate(self, run: FitRun, state: FitState, common: dict) -> FitState:
        """Measure ``state``, add its records (with ``common``), save checkpoints and the plot: the new state."""

    def save(self, run: FitRun, state: FitState) -> None:
        """Save ``state`` as the latest checkpoint (Ctrl-C)."""

    def files(self, run: FitRun) -> dict[str, Path]:
        """What the run writes where; ``latest`` is the checkpoint a failed or interrupted run points to."""


def check_resume(run: FitRun, where: Path, saved: dict, now: dict) -> None:
    """``ValueError`` unless a checkpoint's ``extra["fit"]`` (``saved``) drew its batches as this run does (``now``)."""
    for name in _RESUME_KEYS:
        if name in saved and name in now and saved[name] != now[name]:
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


def current_lr(opt_state) -> float | None:
    """The optimizer state's learning rate as a float, or None if it keeps none."""
    try:
        return float(optim.current_lr(opt_state))
    except ValueError:
        return None


def improved(best: float | None, val_loss: float) -> bool:
    """Whether ``val_loss`` beats ``best`` (a non-finite loss never does)."""
    return math.isfinite(val_loss) and (best is None or val_loss < best)


# ---------------------------------------------------------------- one model on a token corpus


class TokenData:
    """``fit``'s data for one model on a token corpus: checkpoints ``out_dir/latest`` and ``best``, one record
    per evaluation.

    ``tokenizer`` and ``extra`` (JSON) are saved with every checkpoint; ``record_extra``:
    ``(params, fixed train batches) -> dict`` added to every record (e.g. ``per_example.noise_scale_record``).
    On a CUDA device batches are copied from pinned memory without blocking (``fit`` draws the next
    step's while the current one runs).
    """

    def __init__(self, cfg: Config, train_ids: np.ndarray | Tensor, val_ids: np.ndarray | Tensor, *,
                 tokenizer: Tokenizer | None = None, extra: dict | None = None,
                 record_extra: Callable[[dict, list], dict] | None = None):
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
        self.cfg, self.train_ids, self.val_ids = cfg, train_ids, val_ids
        self.tokenizer, self.extra, self.record_extra = tokenizer, extra, record_extra
        self._sets = None

    # -- shared by every token-corpus adapter (ensemble.Members too)

    def seq_len(self, run: FitRun) -> int:
        return self.cfg.max_seq_len if run.settings.seq_len is None else run.settings.seq_len

    def sizes(self) -> dict:
        return {"train_tokens": int(len(self.train_ids)), "val_tokens": int(len(self.val_ids))}

    def fit_state(self, run: FitRun, step: int = 0, elapsed: float = 0.0, best_val=None) -> dict:
        """``run.fit_state`` with this data's sizes and the resolved ``seq_len``."""
        return {**run.fit_state(step, elapsed, best_val, **self.sizes()), "seq_len": self.seq_len(run)}

    def prepare(self, run: FitRun) -> None:
        """Check the settings against the model and the processes; set up the evaluation batches."""
        s, seq_len = run.settings, self.seq_len(run)
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"seq_len={seq_len} but the model's max_seq_len={self.cfg.max_seq_len}")
        if s.batch_size % (s.accum_steps * run.world):
            procs = f" x {run.world} processes" if run.world > 1 else ""
            raise ValueError(f"batch_size={s.batch_size} must be divisible by accum_steps={s.accum_steps}{procs} = "
                             f"{s.accum_steps * run.world}")
        self._sets = eval_sets(run, self.train_ids, self.val_ids, seq_len)

    def host_batch(self, run: FitRun, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """This process's rows of the global batch of ``step`` drawn with ``seed``, on the host."""
        tokens, targets = sample_batch(self.train_ids, run.settings.batch_size, self.seq_len(run), seed=seed,
                                       step=step, stream=TRAIN_STREAM)
        if run.dist is not None:
            tokens, targets = run.dist.shard(tokens), run.dist.shard(targets)
        return tokens, targets

    def draw(self, run: FitRun, step: int, seed: int) -> tuple[Tensor, Tensor]:
        """``host_batch`` on the device (on CUDA: from pinned memory, without blocking)."""
        return to_device(self.host_batch(run, step, seed), run.device)

    def dropout_key(self, run: FitRun, step: int, seed: int) -> Tensor | None:
        return random.fold_in(random.key(seed), step).to(run.device) if self.cfg.dropout > 0 else None

    def losses(self, run: FitRun, params: dict) -> tuple[Any, Any, dict]:
        """``(train loss, val loss, record_extra's fields)`` on the fixed batches."""
        train_eval, val = self._sets
        more = {} if self.record_extra is None else self.record_extra(params, train_eval)
        return self._loss(run, params, train_eval, "eval train"), self._loss(run, params, val, "eval val"), more

    def _loss(self, run: FitRun, params: dict, batches: list, desc: str) -> float:
        """The mean loss over ``batches``; with several processes each one evaluates every world_size-th batch."""
        if run.world == 1:
            return evaluate(params, batches, self.cfg, progress=None if run.progress else False, desc=desc)
        total, count = loss_sums(params, batches[run.dist.rank::run.dist.world_size], self.cfg)
        total, count = run.dist.all_reduce_sum([total.to(torch.float64), count.to(torch.float64)])
        return float(total / count)

    def latest_checkpoint(self, run: FitRun, latest: Path):
        """The checkpoint at ``latest`` loaded on the device and checked to draw the batches this run draws."""
        if not checkpoint_exists(latest):
            raise ValueError(f"nothing to resume in {str(run.out)!r}: no checkpoint at {str(latest)!r}")
        ck = load_checkpoint(latest, config=self.cfg, device=run.device)
        check_resume(run, latest, ck.extra.get("fit", {}), self.fit_state(run))
        return ck

    # -- the FitData protocol

    def start(self, run: FitRun, params: dict, init: Callable, resume: bool) -> FitState:
        self.prepare(run)
        latest = run.files["latest"]
        if not resume:
            refuse_overwrite(run, latest)
            params = tree.to(params, device=run.device)
            return FitState(params, init(params), 0, [], None, 0.0)
        ck = self.latest_checkpoint(run, latest)
        saved = ck.extra.get("fit", {})
        run.say(f"resuming {str(latest)!r} at step {ck.step}")
        opt_state = restore_opt_state(ck.opt_state, init(ck.params), where=repr(str(latest)))
        return FitState(ck.params, opt_state, ck.step, ck.metrics, saved.get("best_val_loss"),
                        float(saved.get("elapsed_s", 0.0)))

    def batch(self, run: FitRun, step: int) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        return self.draw(run, step, run.settings.seed), self.dropout_key(run, step, run.settings.seed)

    def evaluate(self, run: FitRun, state: FitState, common: dict) -> FitState:
        """The state with this evaluation's record, checkpoints saved (``best`` when the val loss improved)."""
        train_loss, val_loss, more = self.losses(run, state.params)
        record = {"step": state.step, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": current_lr(state.opt_state), **common, **more}
        better = improved(state.best_val, val_loss)
        new = replace(state, history=state.history + [record], best_val=val_loss if better else state.best_val)
        if better:
            self._save(run, new, "best")
        self._save(run, new, "latest")
        if run.is_main:
            plot_history(run.files["plot"], new.history)
        run.say(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                + (" (best so far)" if better else ""))
        return new

    def save(self, run: FitRun, state: FitState) -> None:
        self._save(run, state, "latest")

    def _save(self, run: FitRun, state: FitState, which: str) -> None:
        if run.is_main:
            save_checkpoint(run.files[which], params=state.params, config=self.cfg, step=state.step,
                            opt_state=state.opt_state, tokenizer=self.tokenizer, metrics=state.history,
                            extra={**(self.extra or {}), "fit": self.fit_state(run, state.step, state.elapsed, state.best_val)})

    def files(self, run: FitRun) -> dict[str, Path]:
        return run.files


def eval_sets(run: FitRun, train_ids, val_ids, seq_len: int) -> tuple[list, list]:
    """The fixed train batches and the val batches every evaluation uses, on the device.

    Evaluation runs micro-batch by micro-batch, like training: a batch too large for one forward pass in
    training (accum_steps > 1) is too large for one in evaluation too.
    """
    s = run.settings
    micro = s.batch_size // s.accum_steps

    def to_device(batches):
        return [(t.to(run.device), y.to(run.device)) for t, y in batches]

    if s.eval_batches == "all":
        val = to_device(SplitWindows(val_ids, seq_len, micro))
        n_eval = len(val)
    else:
        n_eval = s.eval_batches * s.accum_steps
        val = to_device(fixed_batches(val_ids, n_eval, micro, seq_len, seed=s.seed, stream=VAL_STREAM))
    train = to_device(fixed_batches(train_ids, n_eval, micro, seq_len, seed=s.seed, stream=TRAIN_EVAL_STREAM))
    return train, val


# ---------------------------------------------------------------- 3. one step


def _first_loss(metrics: dict) -> float:
    """The step's loss to show and to check for divergence: the best finite one of a stack (NaN if none is)."""
    finite = [v for v in metrics["loss"].flatten().tolist() if math.isfinite(v)]
    return min(finite) if finite else float("nan")


def _one_step(run: FitRun, data: FitData, step_fn: Callable, state: FitState, window: dict,
              ahead: dict) -> tuple[FitState, float]:
    """One optimizer step: the new state and its (global) loss. Raises ``NonFiniteLossError``.

    ``ahead`` holds the next step's batch, drawn (and, on CUDA, its copy queued) while this step runs:
    a batch depends on ``(seed, step)`` alone, so drawing it early changes nothing but the waiting.
    """
    batch, key = ahead.pop(state.step) if state.step in ahead else data.batch(run, state.step)
    t = time.perf_counter()
    params, opt_state, metrics = step_fn(state.params, state.opt_state, batch, key)
    if state.step + 1 < run.settings.steps:
        ahead[state.step + 1] = data.batch(run, state.step + 1)
    loss = _first_loss(metrics)  # also waits for the device, so the timing is honest
    window["seconds"] += time.perf_counter() - t
    if not math.isfinite(loss):
        latest = data.files(run)["latest"]
        good = read_checkpoint_info(latest)["step"] if checkpoint_exists(latest) else None
        where = f"the last good checkpoint is {str(latest)!r} (step {good})" if good is not None else (
            "no checkpoint was saved yet")
        lr = ", ".join(f"{v:.3g}" for v in metrics["lr"].flatten().tolist())
        raise NonFiniteLossError(
            f"loss became {loss} at step {state.step + 1} (lr {lr}); training stopped "
            f"and {where}; try a lower learning rate"
        )
    window["tokens"] += int(metrics["tokens"].sum())  # counted targets (rows for an SAE), all processes
    return replace(state, params=params, opt_state=opt_state, step=state.step + 1), loss


# ---------------------------------------------------------------- 4. the loop


def fit(
    params: Any, step: TrainStep, data: FitData, settings: FitSettings, *, out_dir: str | os.PathLike,
    resume: bool = False, device: str | torch.device | None = None, progress: bool = True,
    log: Callable[[str], None] | None = tqdm.write, dist: Any = None,
) -> FitResult:
    """Train for ``settings.steps`` optimizer steps of ``step`` on ``data``, evaluating and checkpointing as it goes.

    Every ``eval_every`` steps (and at step 0 and at the end) the train and val losses are measured on
    fixed batches, appended to ``out_dir/metrics.jsonl`` and plotted to ``out_dir/loss.png``, and the
    state is saved to ``out_dir/latest`` (and ``out_dir/best`` when the val loss improved). Batches and
    dropout keys depend only on ``(seed, step)``, so ``resume=True`` (from ``out_dir/latest``) reproduces
    an uninterrupted run exactly. A non-finite loss raises ``NonFiniteLossError`` and leaves the last
    good checkpoint; Ctrl-C saves the current step and returns with ``interrupted=True``.

    Args:
        params: initial parameters (with ``resume``: only the device template; the checkpoint's are used).
        step: any ``train.TrainStep``: ``make_train_step(cfg, opt, accum_steps=..., precision=..., compile=...)``,
            ``per_example.make_per_example_train_step`` (DP-SGD), ``ensemble.make_ensemble_step`` (``Members``).
        data: a ``FitData``: ``TokenData(cfg, train_ids, val_ids, tokenizer=...)``, ``ensemble.Members(...)``.
        settings: a ``FitSettings`` (steps, batch size, evaluation, seed).
        dist: a ``distributed.DistContext`` (``distributed.init_from_env()`` under torchrun): data parallel
            over its processes, same result as one process (build ``step`` with ``all_reduce=dist.all_reduce_sum``);
            None: this process alone.
    """
    if not isinstance(step, TrainStep):
        raise TypeError(f"step must be a train.TrainStep (e.g. make_train_step(cfg, optimizer)), got {type(step).__name__}")
    if not isinstance(settings, FitSettings):
        raise TypeError(f"settings must be a loop.FitSettings, got {type(settings).__name__}")
    run = _make_run(params, settle_accum_steps(settings, step), device, out_dir, log, dist, progress)
    state = data.start(run, params, step.init, resume)
    if dist is not None:
        dist.barrier()  # every process has read (or checked) out_dir before rank 0 writes to it
    return _loop(run, data, step.step, state)


def settle_accum_steps(settings: FitSettings, step: TrainStep) -> FitSettings:
    """``settings`` with ``accum_steps`` decided: the one of ``settings`` or of ``step`` that is given (``ValueError``
    when both are and disagree), 1 when neither is."""
    given, stated = settings.accum_steps, step.accum_steps
    if given is not None and stated is not None and given != stated:
        raise ValueError(
            f"FitSettings.accum_steps={given} but the step was built with accum_steps={stated}: give it once "
            "(make_train_step(..., accum_steps=...) is enough) or the same on both"
        )
    return replace(settings, accum_steps=next((n for n in (given, stated) if n is not None), 1))


def _make_run(params, settings, device, out_dir, log, dist, progress) -> FitRun:
    if device is None:
        leaves = [x for x in tree.leaves(params) if isinstance(x, Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
    main = dist is None or dist.is_main
    run = FitRun(settings, torch.device(device), Path(out_dir), log if (log is not None and main) else (lambda msg: None),
                 dist, progress and main)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
    return run


def _evaluate(run: FitRun, data: FitData, state: FitState, window: dict) -> FitState:
    """``data.evaluate`` with the window's throughput, then the metrics file."""
    common = {"tokens_per_s": window["tokens"] / window["seconds"] if window["seconds"] > 0 else None,
              "elapsed_s": round(state.elapsed, 3)}
    new = data.evaluate(run, state, common)
    # Only now is the evaluation on record: an interrupt before this point redoes it on resume.
    if run.is_main:
        write_metrics(run.files["metrics"], new.history)
    window.update(tokens=0, seconds=0.0)
    return new


def _last_val(history: list[dict]) -> float | None:
    """The best finite val loss of the latest evaluation (one record, or one per member)."""
    finite = [r["val_loss"] for r in history if r["step"] == history[-1]["step"] and "val_loss" in r
              and math.isfinite(r["val_loss"])]
    return min(finite) if history and finite else None


def _loop(run: FitRun, data: FitData, step_fn: Callable, state: FitState) -> FitResult:
    """Evaluate, step, repeat: the loop of ``fit``, with Ctrl-C saving the current step."""
    steps, every = run.settings.steps, run.settings.eval_every
    bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not run.progress,
               file=sys.stderr)
    window, ahead = {"tokens": 0, "seconds": 0.0}, {}
    t0, elapsed_before, interrupted = time.perf_counter(), state.elapsed, False
    try:
        while True:
            state = replace(state, elapsed=elapsed_before + time.perf_counter() - t0)
            last_eval = state.history[-1]["step"] if state.history else -1
            if (state.step % every == 0 or state.step == steps) and last_eval != state.step:
                state = _evaluate(run, data, state, window)
            if state.step >= steps:
                break
            state, last_loss = _one_step(run, data, step_fn, state, window, ahead)
            bar.update(1)
            bar.set_postfix(
                loss=_fmt(last_loss), val=_fmt(_last_val(state.history)),
                tok_s=f"{window['tokens'] / window['seconds']:.0f}" if window["seconds"] > 0 else "?", refresh=False,
            )
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        _save_on_interrupt(run, data, replace(state, elapsed=elapsed_before + time.perf_counter() - t0))
    finally:
        bar.close()
    return FitResult(
        params=state.params, opt_state=state.opt_state, step=state.step, history=state.history,
        best_val_loss=state.best_val, interrupted=interrupted, out_dir=run.out, files=data.files(run),
    )


def _save_on_interrupt(run: FitRun, data: FitData, state: FitState) -> None:
    data.save(run, state)
    if run.is_main:
        write_metrics(run.files["metrics"], state.history)
    run.say(f"interrupted at step {state.step}; saved {str(data.files(run)['latest'])!r} (continue with resume)")


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"
