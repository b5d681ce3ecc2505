"""Training a stack of SAEs on a collected activation file through ``loop.fit``: batches, progress bar,
metrics.jsonl, checkpoints and exact resume, as for a model.

::

    DIR/
      latest/         a checkpoint directory (``ftransformer.checkpoint``'s format): params = the stacked SAE
                      params, opt_state = ``SAEOptState`` (AdamW state, dead-latent counters), checkpoint.json
                      holding the SAEConfig, the hyperparameters, the site and the scale
      metrics.jsonl   one JSON line per evaluation: every metric as a list, one value per member

``make_sae_step`` is the stack's ``train.TrainStep``; ``SAEData`` is ``loop.fit``'s data for it (the
activation rows, an evaluation on fixed rows, the checkpoints); ``fit_stack`` puts the two together.
Step ``s`` reads the rows drawn by ``fold_in(key(seed), s)`` (with replacement): the batches depend on
the seed and the step only, so a resumed run continues exactly as it would have. Run directories of
ftransformer 0.2 (one ``DIR/saes.safetensors`` file) are still read by ``load_stack`` and resumed.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from ftransformer import random, tree
from ftransformer.checkpoint import (
    LATEST, checkpoint_exists, load_tree, read_checkpoint_info, restore_opt_state, save_checkpoint,
)
from ftransformer.interp.sae.activations import ActivationFile
from ftransformer.interp.sae.architectures import SAEConfig, trainable
from ftransformer.interp.sae.stack import SAEState, check_hparams, init_stack, optimizer, stack_step
from ftransformer.loop import FitRun, FitSettings, FitState, check_resume, fit, refuse_overwrite
from ftransformer.train import TrainStep

CHECKPOINT_FILE, METRICS_FILE = LATEST, "metrics.jsonl"
OLD_CHECKPOINT_FILE = "saes.safetensors"  # ftransformer 0.2's run directories: one file, read by load_stack
EVAL_STREAM = 1  # the fixed rows every evaluation measures (training rows use the seed and step alone)


class SAEOptState(NamedTuple):
    """What a stack carries from step to step besides its params (a pytree: it vmaps and checkpoints)."""

    adam: Any  # optim.AdamWState over trainable(params)
    since_fired: Tensor  # training tokens since each latent last fired


def batch_rows(seed: int, step: int, n_rows: int, batch_size: int, *, stream: int | None = None) -> np.ndarray:
    """The activation rows of step ``step`` (uniform with replacement, from the seed and step alone)."""
    key = random.fold_in(random.key(seed), step)
    key = key if stream is None else random.fold_in(key, stream)
    u = random.uniform(key, (batch_size,), dtype=torch.float64)
    return (u * n_rows).to(torch.int64).clamp_max(n_rows - 1).numpy()


def make_sae_step(cfg: SAEConfig, hp: dict) -> TrainStep:
    """The stack's ``train.TrainStep``: ``step(params, SAEOptState, rows) -> (params, SAEOptState, metrics)``,
    ``stack_step`` with the hyperparameters ``hp`` (one value per member) bound."""
    check_hparams(hp, cfg)

    def init_one(params, lr):
        since = torch.zeros(cfg.d_sae, dtype=params["w_dec"].dtype, device=params["w_dec"].device)
        return SAEOptState(optimizer(lr).init(trainable(params)), since)

    def init(params: dict) -> SAEOptState:
        return torch.func.vmap(init_one, randomness="error")(params, hp["lr"])

    def step(params: dict, opt_state: SAEOptState, x: Tensor, key: Tensor | None = None):
        new, metrics = stack_step(SAEState(params, opt_state.adam, opt_state.since_fired), hp, x, cfg)
        metrics = {**metrics, "lr": hp["lr"], "tokens": torch.tensor(x.shape[0])}
        return new.params, SAEOptState(new.opt_state, new.since_fired), metrics

    return TrainStep(init, step)


def _record(step: int, metrics: dict[str, Tensor]) -> dict:
    return {"step": step, **{k: [round(x, 6) for x in v.tolist()] for k, v in metrics.items()}}


class SAEData:
    """``loop.fit``'s data for a stack of SAEs: rows of an activation file, evaluated on fixed rows (one
    record per evaluation after step 0), checkpointed to ``DIR/latest``."""

    def __init__(self, acts: ActivationFile, cfg: SAEConfig, hp: dict, *, history: list[dict] | None = None):
        if cfg.d_in != acts.data.shape[1]:
            raise ValueError(f"SAEConfig.d_in={cfg.d_in} but the activations have width {acts.data.shape[1]}")
        self.acts, self.cfg, self.hp, self.old_history = acts, cfg, hp, history

    def describe(self, seed: int, dtype: torch.dtype) -> dict:
        """What checkpoint.json says of the stack: its config, hyperparameters, site and scale."""
        return {"sae": {"config": dataclasses.asdict(self.cfg), "hp": {k: v.tolist() for k, v in self.hp.items()},
                        "hp_dtype": str(self.hp["lr"].dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
                        "members": int(self.hp["lr"].shape[0]), "site": self.acts.path, "scale": self.acts.scale,
                        "seed": seed, "activations": self.acts.meta.get("config")}}

    def rows(self, run: FitRun, step: int, stream: int | None = None) -> Tensor:
        n, size = self.acts.data.shape[0], run.settings.batch_size
        return self.acts.rows(batch_rows(run.settings.seed, step, n, size, stream=stream)).to(run.device)

    def start(self, run: FitRun, params: dict, init: Callable, resume: bool) -> FitState:
        latest = run.out / CHECKPOINT_FILE
        if not resume:
            refuse_overwrite(run, latest)
            params = tree.to(params, device=run.device)
            return FitState(params, init(params), 0, [], None, 0.0)
        if not checkpoint_exists(latest) and not (run.out / OLD_CHECKPOINT_FILE).is_file():
            raise ValueError(f"nothing to resume in {str(run.out)!r}: no checkpoint at {str(latest)!r}")
        state, _, _, meta = load_stack(run.out)
        check_resume(run, latest, meta.get("fit", {}), run.fit_state(0, 0.0, None))
        run.say(f"resuming {str(run.out)!r} at step {meta['step']}")
        history = meta.get("metrics", [])
        return FitState(tree.to(state.params, device=run.device), tree.to(SAEOptState(state.opt_state, state.since_fired),
                        device=run.device), meta["step"], history, None, float(meta.get("fit", {}).get("elapsed_s", 0.0)))

    def batch(self, run: FitRun, step: int) -> tuple[Tensor, None]:
        return self.rows(run, step), None

    def evaluate(self, run: FitRun, state: FitState, common: dict) -> FitState:
        """The stack's metrics on the fixed evaluation rows (the step they would take, not taken)."""
        if state.step == 0:
            return state
        params, opt = state.params, state.opt_state
        _, metrics = stack_step(SAEState(params, opt.adam, opt.since_fired), self.hp, self.rows(run, 0, EVAL_STREAM),
                                self.cfg)
        new = dataclasses.replace(state, history=state.history + [{**_record(state.step, metrics), **common}])
        self.save(run, new)
        run.say(f"step {state.step}: mse {float(metrics['mse'].mean()):.4g}, l0 {float(metrics['l0'].mean()):.3g}")
        return new

    def save(self, run: FitRun, state: FitState) -> None:
        if run.is_main:
            dtype = state.params["w_dec"].dtype
            save_checkpoint(run.out / CHECKPOINT_FILE, params=state.params, config=self.describe(run.settings.seed, dtype),
                            step=state.step, opt_state=state.opt_state, metrics=state.history,
                            extra={"fit": run.fit_state(state.step, state.elapsed, None)})

    def files(self, run: FitRun) -> dict[str, Path]:
        return {"latest": run.out / CHECKPOINT_FILE, "metrics": run.out / METRICS_FILE}


def fit_stack(
    acts: ActivationFile, cfg: SAEConfig, hp: dict, directory: str | os.PathLike, *, steps: int,
    batch_size: int = 1024, seed: int = 0, resume: bool = False, log_every: int = 10, progress: bool = True,
) -> SAEState:
    """Train a stack of SAEs (``hp``: one value per member) for ``steps`` steps of ``batch_size`` rows through
    ``loop.fit``: ``make_sae_step`` on ``SAEData``, evaluated and checkpointed every ``log_every`` steps and at
    the end. ``resume=True`` continues the stack saved in ``DIR`` (its config and hyperparameters)."""
    directory = Path(directory)
    if resume and (checkpoint_exists(directory / CHECKPOINT_FILE) or (directory / OLD_CHECKPOINT_FILE).is_file()):
        _, hp, cfg, _ = load_stack(directory)
    data, step = SAEData(acts, cfg, hp), make_sae_step(cfg, hp)
    params = init_stack(random.split(random.key(seed), hp["lr"].shape[0]), hp, cfg).params
    settings = FitSettings(steps=steps, batch_size=batch_size, eval_every=log_every, seed=seed)
    result = fit(params, step, data, settings, out_dir=directory, resume=resume, progress=progress, log=None)
    return SAEState(result.params, result.opt_state.adam, result.opt_state.since_fired)


# ---------------------------------------------------------------- reading a run back


def _template(cfg: SAEConfig, hp: dict, dtype: torch.dtype) -> SAEState:
    return init_stack(random.split(random.key(0), hp["lr"].shape[0]), hp, cfg, dtype=dtype)


def _load_old(path: Path) -> tuple[SAEState, dict, SAEConfig, dict]:
    """ftransformer 0.2's ``saes.safetensors``: the stacked state and hp as tensors, the rest as metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sae"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    cfg = SAEConfig(**meta["config"])
    hp = {k[len("hp."):]: v for k, v in flat.items() if k.startswith("hp.")}
    template = _template(cfg, hp, flat["state.params.w_dec"].dtype)
    state = restore_opt_state({k: v for k, v in flat.items() if k.startswith("state.")}, {"state": template},
                              where=str(path))["state"]
    metrics = path.parent / METRICS_FILE
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return state, hp, cfg, {**meta, "metrics": [r for r in history if r["step"] <= meta["step"]]}


def _load_new(path: Path) -> tuple[SAEState, dict, SAEConfig, dict]:
    """A checkpoint directory written by ``SAEData``."""
    info = read_checkpoint_info(path)["config"]["sae"]
    cfg = SAEConfig(**info["config"])
    hp = {k: torch.tensor(v, dtype=getattr(torch, info["hp_dtype"])) for k, v in info["hp"].items()}
    template = _template(cfg, hp, getattr(torch, info["dtype"]))
    ck = load_tree(path, template.params)
    opt = restore_opt_state(ck.opt_state, SAEOptState(template.opt_state, template.since_fired), where=repr(str(path)))
    meta = {**info, "step": ck.step, "metrics": ck.metrics, "fit": ck.extra.get("fit", {})}
    return SAEState(ck.params, opt.adam, opt.since_fired), hp, cfg, meta


def load_stack(path: str | os.PathLike) -> tuple[SAEState, dict, SAEConfig, dict]:
    """``(state, hp, cfg, meta)`` of a run directory, its checkpoint, or a 0.2 ``saes.safetensors`` file
    (``meta["step"]``: steps done; ``meta["site"]``, ``meta["scale"]``: the activations')."""
    p = Path(path)
    if p.is_file():
        return _load_old(p)
    if checkpoint_exists(p / CHECKPOINT_FILE):
        p = p / CHECKPOINT_FILE
    elif (p / OLD_CHECKPOINT_FILE).is_file():
        return _load_old(p / OLD_CHECKPOINT_FILE)
    if not checkpoint_exists(p):
        raise ValueError(f"no SAE checkpoint at {str(path)!r} (neither {CHECKPOINT_FILE}/ nor {OLD_CHECKPOINT_FILE})")
    return _load_new(p)
