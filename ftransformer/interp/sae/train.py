"""Training a stack of SAEs on a collected activation file: batches, progress bar, metrics.jsonl,
safetensors checkpoints and exact resume.

::

    DIR/
      saes.safetensors   the stacked SAEState (params, AdamW state, dead-latent counters) and, in its
                         metadata, the SAEConfig, the hyperparameters, the step and the site
      metrics.jsonl      one JSON line per logged step: every metric as a list, one value per member

Step ``s`` reads the rows drawn by ``fold_in(key(seed), s)`` (with replacement): the batches depend on
the seed and the step only, so a run resumed from its checkpoint continues exactly as it would have.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from ftransformer import random, tree
from ftransformer.checkpoint import restore_opt_state
from ftransformer.io import atomic_write
from ftransformer.interp.sae.activations import ActivationFile
from ftransformer.interp.sae.architectures import SAEConfig
from ftransformer.interp.sae.stack import SAEState, check_hparams, init_stack, stack_step

CHECKPOINT_FILE, METRICS_FILE = "saes.safetensors", "metrics.jsonl"


def batch_rows(seed: int, step: int, n_rows: int, batch_size: int) -> np.ndarray:
    """The activation rows of step ``step`` (uniform with replacement, from the seed and step alone)."""
    u = random.uniform(random.fold_in(random.key(seed), step), (batch_size,), dtype=torch.float64)
    return (u * n_rows).to(torch.int64).clamp_max(n_rows - 1).numpy()


def save_stack(path: str | os.PathLike, state: SAEState, hp: dict, cfg: SAEConfig, step: int, extra: dict) -> Path:
    """One safetensors file (written atomically) holding the stack's state and everything to rebuild it."""
    flat = {k: v for k, v in tree.flatten_with_paths({"state": state, "hp": hp}).items() if isinstance(v, Tensor)}
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in flat.items()}  # clones: safetensors refuses shared memory
    meta = {"config": dataclasses.asdict(cfg), "step": step, "members": int(hp["lr"].shape[0]), **extra}
    return atomic_write(path, safetensors_bytes(tensors, metadata={"sae": json.dumps(meta)}))


def load_stack(path: str | os.PathLike) -> tuple[SAEState, dict, SAEConfig, dict]:
    """``(state, hp, cfg, meta)`` from ``save_stack``'s file (``meta["step"]``: steps done)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sae"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    cfg = SAEConfig(**meta["config"])
    hp = {k[len("hp."):]: v for k, v in flat.items() if k.startswith("hp.")}
    dtype = flat["state.params.w_dec"].dtype
    template = init_stack(random.split(random.key(0), meta["members"]), hp, cfg, dtype=dtype)
    state = restore_opt_state({k: v for k, v in flat.items() if k.startswith("state.")}, {"state": template},
                              where=str(path))["state"]
    return state, hp, cfg, meta


def _log_line(step: int, metrics: dict[str, Tensor]) -> str:
    return json.dumps({"step": step, **{k: [round(x, 6) for x in v.tolist()] for k, v in metrics.items()}})


def _start(directory: Path, acts: ActivationFile, cfg: SAEConfig, hp: dict, seed: int, resume: bool):
    ckpt = directory / CHECKPOINT_FILE
    if resume and ckpt.exists():
        state, hp, cfg, meta = load_stack(ckpt)
        return state, hp, cfg, meta["step"]
    if cfg.d_in != acts.data.shape[1]:
        raise ValueError(f"SAEConfig.d_in={cfg.d_in} but the activations have width {acts.data.shape[1]}")
    check_hparams(hp, cfg)
    (directory / METRICS_FILE).unlink(missing_ok=True)
    members = hp["lr"].shape[0]
    return init_stack(random.split(random.key(seed), members), hp, cfg), hp, cfg, 0


def fit_stack(
    acts: ActivationFile, cfg: SAEConfig, hp: dict, directory: str | os.PathLike, *, steps: int,
    batch_size: int = 1024, seed: int = 0, resume: bool = False, log_every: int = 10, save_every: int = 200,
    progress: bool = True,
) -> SAEState:
    """Train a stack of SAEs (``hp``: one value per member) for ``steps`` steps of ``batch_size`` rows,
    logging to ``DIR/metrics.jsonl`` and checkpointing to ``DIR/saes.safetensors`` (also at the end).
    ``resume=True`` continues from the checkpoint in ``DIR`` when there is one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, hp, cfg, done = _start(directory, acts, cfg, hp, seed, resume)
    extra = {"site": acts.path, "scale": acts.scale, "seed": seed, "activations": acts.meta.get("config")}
    bar = tqdm(total=steps, initial=done, desc=f"sae x{hp['lr'].shape[0]}", unit="step", disable=not progress)
    with open(directory / METRICS_FILE, "a") as log:
        for step in range(done, steps):
            x = acts.rows(batch_rows(seed, step, acts.data.shape[0], batch_size))
            state, metrics = stack_step(state, hp, x, cfg)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.write(_log_line(step + 1, metrics) + "\n")
                bar.set_postfix(mse=f"{float(metrics['mse'].mean()):.4g}", l0=f"{float(metrics['l0'].mean()):.3g}")
            if (step + 1) % save_every == 0:
                log.flush()
                save_stack(directory / CHECKPOINT_FILE, state, hp, cfg, step + 1, extra)
            bar.update(1)
    bar.close()
    save_stack(directory / CHECKPOINT_FILE, state, hp, cfg, max(steps, done), extra)
    return state
