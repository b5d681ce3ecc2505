"""Training steps: one SAE, and a stack of SAEs in ONE ``torch.func.vmap``-ed step.

A member's state is ``SAEState(params, opt_state, since_fired)``; its hyperparameters are the tensors of
``hp`` (``architectures.HPARAMS``). A stack is the same trees with a leading ``members`` axis on every
leaf: ``stack_step`` maps ``sae_step`` over it, every member reading the same activation batch, so a
sweep over seeds, sparsity coefficients, ``k`` and learning rates costs one step's Python overhead.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import optim
from ftransformer.interp.sae.architectures import HPARAMS, SAEConfig, init_sae, sae_loss, trainable, unit_rows

BETAS = (0.9, 0.999)


class SAEState(NamedTuple):
    """Everything one SAE's training carries from step to step (a pytree: it vmaps and checkpoints)."""

    params: dict
    opt_state: Any  # optim.AdamWState over trainable(params)
    since_fired: Tensor  # float, [d_sae]: training tokens since each latent last fired


def optimizer(lr: Tensor) -> optim.GradientTransformation:
    """AdamW without weight decay (an SAE's sparsity penalty is its regularizer) at a per-member ``lr``."""
    return optim.adamw(lr=lr, betas=BETAS, weight_decay=0.0)


def make_hparams(members: int | None = None, *, dtype: torch.dtype = torch.float32, **values) -> dict:
    """``hp`` as tensors: one value each (0-d) or, with ``members``, one per member (lists or scalars)."""
    unknown = set(values) - set(HPARAMS)
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}; valid: {HPARAMS}")
    defaults = {"l1": 0.0, "k": 1.0, "lr": 1e-3}
    hp = {}
    for name in HPARAMS:
        value = torch.as_tensor(values.get(name, defaults[name]), dtype=dtype)
        if members is not None:
            if value.ndim == 0:
                value = value.expand(members).clone()
            elif value.shape != (members,):
                raise ValueError(f"hp[{name!r}] must be a scalar or have members={members} values, got {tuple(value.shape)}")
        elif value.ndim != 0:
            raise ValueError(f"hp[{name!r}] must be a scalar for one SAE, got shape {tuple(value.shape)}")
        hp[name] = value
    return hp


def check_hparams(hp: dict, cfg: SAEConfig) -> None:
    """``ValueError`` for a ``k`` outside ``[1, k_max]`` or a negative ``l1``/``lr`` (read eagerly, once)."""
    if set(hp) != set(HPARAMS):
        raise ValueError(f"hp must have the keys {HPARAMS}, got {sorted(hp)}")
    k = hp["k"]
    if cfg.architecture in ("topk", "batchtopk") and bool(((k < 1) | (k > cfg.k_max) | (k != k.round())).any()):
        raise ValueError(f"hp['k'] must hold integers in [1, k_max={cfg.k_max}], got {k.tolist()}")
    for name in ("l1", "lr"):
        if bool((hp[name] < 0).any()):
            raise ValueError(f"hp[{name!r}] must be >= 0, got {hp[name].tolist()}")


def init_state(key: Tensor, hp: dict, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32) -> SAEState:
    """A fresh SAE (``init_sae``) with its optimizer state and no latent counted dead."""
    params = init_sae(key, cfg, dtype=dtype)
    since = torch.zeros(cfg.d_sae, dtype=dtype, device=key.device)
    return SAEState(params, optimizer(hp["lr"]).init(trainable(params)), since)


def init_stack(keys: Int[Tensor, " member"], hp: dict, cfg: SAEConfig, *,
               dtype: torch.dtype = torch.float32) -> SAEState:
    """A stack of fresh SAEs, one per key (``ft.random.split(ft.random.key(seed), members)``)."""
    check_hparams(hp, cfg)
    return torch.func.vmap(partial(init_state, cfg=cfg, dtype=dtype), randomness="error")(keys, hp)


def sae_step(state: SAEState, hp: dict, x: Float[Tensor, "batch d_in"], cfg: SAEConfig) -> tuple[SAEState, dict]:
    """One AdamW step of one SAE on one activation batch; decoder rows renormalized after it.

    Returns the new state and the step's metrics (0-d tensors: ``loss mse sparsity aux l0 dead``).
    """
    params = state.params
    dead = state.since_fired >= cfg.dead_tokens
    loss_and_grad = torch.func.grad_and_value(lambda p: sae_loss({**params, **p}, x, hp, dead, cfg), has_aux=True)
    grads, (loss, parts) = loss_and_grad(trainable(params))
    updates, opt_state = optimizer(hp["lr"]).update(grads, state.opt_state, trainable(params))
    new = optim.apply_updates(trainable(params), updates)
    new["w_dec"] = unit_rows(new["w_dec"])
    if "threshold" in params:
        m = cfg.threshold_momentum
        first = state.opt_state.count == 0
        new["threshold"] = torch.where(first, parts["cut"], m * params["threshold"] + (1 - m) * parts["cut"])
    since = torch.where(parts["fired"], torch.zeros_like(state.since_fired), state.since_fired + x.shape[0])
    metrics = {"loss": loss.detach(), "mse": parts["mse"], "sparsity": parts["sparsity"], "aux": parts["aux"],
               "l0": parts["l0"], "dead": (dead.to(x.dtype)).sum()}
    return SAEState(new, opt_state, since), metrics


def stack_step(state: SAEState, hp: dict, x: Float[Tensor, "batch d_in"], cfg: SAEConfig) -> tuple[SAEState, dict]:
    """``sae_step`` for every member of a stack at once: ONE vmapped call on the shared batch ``x``."""
    return torch.func.vmap(partial(sae_step, cfg=cfg), in_dims=(0, 0, None), randomness="error")(state, hp, x)

