"""``vmap`` over whole models: per-example gradients, DP-SGD, the gradient noise scale, ensembles and sweeps.

A model here is a function of a parameter pytree, so ``torch.func.vmap`` can batch it three ways:

* over **examples** -- ``per_example_grads`` gives every example's gradient in one call (what Opacus
  hooks into ``nn.Module``s to get), which DP-SGD (``optim.dp_aggregate``) and the gradient noise
  scale (``gradient_noise_scale``) are made of;
* over **models** -- ``stack_params`` puts N parameter trees on a leading ``member`` axis and
  ``make_ensemble_step`` trains all N in one vmapped step, each on its own batch with its own dropout
  key;
* over **hyperparameters** -- the same step with a per-member learning rate or weight decay is a
  sweep in one call (``fit_ensemble`` and ``ftransformer train --ensemble N`` / ``--sweep lr=...``).

Why the einsum attention path by default: PyTorch's fused ``scaled_dot_product_attention`` has had no
``vmap`` batching rule for its backward pass (``vmap`` then falls back to a slow per-example loop, and
on some versions and devices refuses), while the written-out einsum path is made of ops that all batch.
``attn_impl=None`` keeps the config's own path (``bench vmap`` times both on the running torch).
"""

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from ftransformer import optim, random
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.model import check_ids, check_tokens, loss_fn
from ftransformer.params import init_params

PyTree = Any


def _vmap_cfg(cfg: Config, attn_impl: str | None) -> Config:
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    if attn_impl is None or attn_impl == cfg.attn_impl:
        return cfg
    return cfg.replace(attn_impl=attn_impl)


def _check_batch(tokens: Tensor, targets: Tensor, cfg: Config, ignore_index: int, *, name: str = "tokens") -> None:
    check_tokens(tokens, cfg, name=name)
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got {tuple(tokens.shape)}")
    if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must have the shape of {name} {tuple(tokens.shape)}, got {got}")
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)


def _example_loss(cfg: Config, treedef, ignore_index: int):
    """``(leaves, tokens[seq], targets[seq], key) -> that one example's mean loss`` over its counted targets."""

    def loss_of(leaves, tokens, targets, key):
        params = optim._unflatten(leaves, treedef)
        total = loss_fn(params, tokens, targets, cfg, key=key, ignore_index=ignore_index, reduction="sum")
        # An example of nothing but padding gives a zero gradient instead of 0/0.
        return total / (targets != ignore_index).sum().clamp(min=1).to(total.dtype)

    return loss_of


# ---------------------------------------------------------------- per-example gradients


def per_example_grads(
    params: dict,
    tokens: Tensor,
    targets: Tensor,
    cfg: Config,
    *,
    key: Tensor | None = None,
    ignore_index: int = -100,
    attn_impl: str | None = "einsum",
    chunk_size: int | None = None,
) -> dict:
    """The gradient of each example's mean loss: every leaf of ``params`` gains a leading ``batch`` axis.

    ``tokens`` and ``targets`` are ``(batch, seq)``; example ``i``'s gradient is that of
    ``loss_fn(params, tokens[i], targets[i], cfg)``, computed for all ``i`` at once by
    ``vmap(grad(...))``. Attention runs on the einsum path (``attn_impl``): SDPA's backward has had no
    ``vmap`` batching rule, so ``vmap`` would fall back to a per-example loop there (``None`` keeps
    ``cfg.attn_impl``). ``key`` gives every example its own dropout key (split from it);
    ``chunk_size`` bounds how many examples are in flight at once (memory), as in ``vmap``.
    """
    _check_batch(tokens, targets, cfg, ignore_index)
    cfg_v = _vmap_cfg(cfg, attn_impl)
    leaves, treedef = optim._leaves(params)
    grad_fn = torch.func.grad(_example_loss(cfg_v, treedef, ignore_index))
    keys = None if key is None else random.split(key, tokens.shape[0])
    batched = torch.func.vmap(grad_fn, in_dims=(None, 0, 0, None if keys is None else 0), chunk_size=chunk_size)
    grads = batched(leaves, tokens, targets, keys)
    return optim._unflatten(list(grads), treedef)


def per_example_grad_norms(
    params: dict,
    tokens: Tensor,
    targets: Tensor,
    cfg: Config,
    *,
    key: Tensor | None = None,
    ignore_index: int = -100,
    attn_impl: str | None = "einsum",
    chunk_size: int | None = None,
) -> Float[Tensor, " batch"]:
    """The L2 norm of each example's gradient (all parameters together): which sequences pull hardest."""
    grads = per_example_grads(
        params, tokens, targets, cfg, key=key, ignore_index=ignore_index, attn_impl=attn_impl, chunk_size=chunk_size
    )
    return optim.per_example_norms(grads)


def make_per_example_train_step(
    cfg: Config,
    optimizer: optim.GradientTransformation,
    *,
    ignore_index: int = -100,
    attn_impl: str | None = "einsum",
    chunk_size: int | None = None,
):
    """A training step like ``make_train_step``'s whose optimizer receives per-example gradients.

    ``step(params, opt_state, (tokens, targets), key) -> (params, opt_state, metrics)``. The optimizer must
    reduce the batch axis -- start its chain with ``optim.dp_aggregate`` (DP-SGD). ``metrics`` holds
    ``loss`` (token-weighted mean, as ``make_train_step``), ``grad_norm`` (norm of the plain mean of the
    per-example gradients, before any clipping), ``mean_example_grad_norm`` (the average example's
    gradient norm: compare it with the clip norm), ``lr`` and ``tokens``.
    """
    if not isinstance(optimizer, optim.GradientTransformation):
        raise TypeError(f"optimizer must be an optim.GradientTransformation, got {type(optimizer).__name__}")

    def step(params, opt_state, batch, key=None):
        tokens, targets = unpack_batch(batch)
        grads = per_example_grads(
            params, tokens, targets, cfg, key=key, ignore_index=ignore_index, attn_impl=attn_impl,
            chunk_size=chunk_size,
        )
        with torch.no_grad():
            n_tokens = (targets != ignore_index).sum()
            loss = loss_fn(params, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
            loss = loss / n_tokens.clamp(min=1)
            norms = optim.per_example_norms(grads)
            grad_norm = optim.global_norm([x.mean(0) for x in optim._leaves_only(grads)])
            updates, new_state = optimizer.update(grads, opt_state, params)
            u, p = optim._leaves_only(updates), optim._leaves_only(params)
            for x, y in zip(u, p):
                if x.shape != y.shape:
                    raise ValueError(
                        f"the optimizer returned an update of shape {tuple(x.shape)} for a parameter of shape "
                        f"{tuple(y.shape)}: with per-example gradients, start the chain with optim.dp_aggregate"
                    )
            params = optim.apply_updates(params, updates)
        lr = optim._find_lr(new_state)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "mean_example_grad_norm": norms.mean(),
            "lr": torch.full((), float("nan")) if lr is None else lr, "tokens": n_tokens,
        }
        return params, new_state, metrics

    return step


# ---------------------------------------------------------------- gradient noise scale


class NoiseScale(NamedTuple):
    """The simple gradient noise scale and the two unbiased estimates it is the ratio of (0-d tensors)."""

    b_simple: Tensor  # tr(Sigma) / |G|^2: the batch size around which larger batches stop paying off
    trace_cov: Tensor  # tr(Sigma): total variance of one example's gradient
    grad_sq_norm: Tensor  # |G|^2: squared norm of the true (expected) gradient


def gradient_noise_scale(grads: PyTree) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

    ``grads`` are per-example gradients (leading batch axis of size B >= 2). With ``g_i`` the examples'
    gradients and ``g`` their mean, both estimates are unbiased:

        tr(Sigma) = sum_i |g_i - g|^2 / (B - 1)        |G|^2 = |g|^2 - tr(Sigma) / B

    (the paper's Appendix A with B_small = 1, B_big = B). The ratio is not unbiased and is noisy for one
    batch: average ``trace_cov`` and ``grad_sq_norm`` over several batches first (``noise_scale`` does).
    """
    leaves = optim._leaves_only(grads)
    if not leaves or leaves[0].ndim == 0 or leaves[0].shape[0] < 2:
        raise ValueError("gradient_noise_scale needs per-example gradients of at least 2 examples")
    b = leaves[0].shape[0]
    sq_each = optim.per_example_norms(grads).square()
    mean_sq = sum(x.to(torch.float32).mean(0).square().sum() for x in leaves)
    trace = (sq_each.sum() - b * mean_sq) / (b - 1)
    g2 = mean_sq - trace / b
    return NoiseScale(b_simple=trace / g2, trace_cov=trace, grad_sq_norm=g2)


def noise_scale(
    params: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100, attn_impl: str | None = "einsum"
) -> NoiseScale:
    """``gradient_noise_scale`` over several ``(tokens, targets)`` batches: both estimates averaged, then divided."""
    traces, g2s = [], []
    for batch in batches:
        tokens, targets = unpack_batch(batch)
        grads = per_example_grads(params, tokens, targets, cfg, ignore_index=ignore_index, attn_impl=attn_impl)
        est = gradient_noise_scale(grads)
        traces.append(est.trace_cov)
        g2s.append(est.grad_sq_norm)
        del grads
    if not traces:
        raise ValueError("noise_scale needs at least one batch, got none")
    trace, g2 = torch.stack(traces).mean(), torch.stack(g2s).mean()
    return NoiseScale(b_simple=trace / g2, trace_cov=trace, grad_sq_norm=g2)


# ---------------------------------------------------------------- ensembles


def stack_params(trees: Sequence[PyTree]) -> PyTree:
    """One tree whose every leaf is the members' leaves stacked on a new leading ``member`` axis.

    Works for any trees of the same structure: parameters, optimizer states, metrics.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack_params needs at least one tree, got none")
    first, treedef = optim._leaves(trees[0])
    columns = [first] + [optim._matching_leaves(f"trees[{i}]", t, treedef) for i, t in enumerate(trees[1:], 1)]
    for i, leaves in enumerate(columns[1:], 1):
        for a, b in zip(first, leaves):
            if isinstance(a, Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
                raise ValueError(
                    f"trees[{i}] has a leaf of shape {tuple(b.shape)} ({b.dtype}) where trees[0] has "
                    f"{tuple(a.shape)} ({a.dtype}): only models of the same config stack"
                )
    return optim._unflatten([torch.stack(list(col)) for col in zip(*columns)], treedef)


def unstack_params(stacked: PyTree) -> list[PyTree]:
    """The inverse of ``stack_params``: one tree per member (views into ``stacked``)."""
    leaves, treedef = optim._leaves(stacked)
    if not leaves:
        raise ValueError("unstack_params needs a tree with at least one tensor")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every leaf must share one leading member axis, got leading sizes {sorted(map(str, sizes))}")
    columns = [x.unbind(0) for x in leaves]
    return [optim._unflatten([c[i] for c in columns], treedef) for i in range(leaves[0].shape[0])]


def init_ensemble(cfg: Config, seeds: Sequence[int], *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> dict:
    """``init_params`` for every seed, stacked: leaves of shape ``(len(seeds), *param)``."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("init_ensemble needs at least one seed, got none")
    kwargs = {} if dtype is None else {"dtype": dtype}
    return stack_params([init_params(cfg, seed=s, device=device, **kwargs) for s in seeds])


def _members(stacked: PyTree) -> int:
    leaves = optim._leaves_only(stacked)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError("stacked params must have a leading member axis (ft.stack_params / ft.init_ensemble)")
    return leaves[0].shape[0]


def make_ensemble_step(
    cfg: Config,
    optimizer: optim.GradientTransformation | Callable[..., optim.GradientTransformation],
    *,
    ignore_index: int = -100,
    attn_impl: str | None = "einsum",
):
    """ONE vmapped step that trains every member of an ensemble at once.

    ``step(stacked_params, stacked_opt_state, (tokens, targets), keys=None, hparams=None)
    -> (stacked_params, stacked_opt_state, metrics)``: ``tokens``/``targets`` are
    ``(members, batch, seq)`` (each member its own batch), ``keys`` are ``(members,)`` dropout keys (or
    None), and every metric (``loss``, ``grad_norm``, ``lr``, ``tokens``) has one value per member. Each
    member's update equals what ``make_train_step(cfg, optimizer)`` would do to it alone.

    ``optimizer`` is a ``GradientTransformation`` shared by all members, or, for a sweep, a factory
    called inside the vmapped step with ``hparams``' values for that member as 0-d tensors::

        def make_opt(lr, weight_decay):
            return optim.adamw(lr, weight_decay=weight_decay)
        step = make_ensemble_step(cfg, make_opt)
        state = step.init(stacked, hparams)   # hparams: {"lr": tensor([3e-4, 1e-3]), "weight_decay": ...}

    ``step.init(stacked_params, hparams=None)`` builds the stacked optimizer state.
    """
    cfg_v = _vmap_cfg(cfg, attn_impl)
    factory = not isinstance(optimizer, optim.GradientTransformation)
    if factory and not callable(optimizer):
        raise TypeError(f"optimizer must be a GradientTransformation or a factory of one, got {type(optimizer).__name__}")

    def member_opt(hp: dict | None) -> optim.GradientTransformation:
        opt = optimizer(**hp) if factory else optimizer
        if not isinstance(opt, optim.GradientTransformation):
            raise TypeError(f"the optimizer factory must return a GradientTransformation, got {type(opt).__name__}")
        return opt

    def check_hparams(hparams, members: int) -> dict:
        if hparams is None or not hparams:
            if factory:
                raise ValueError("an optimizer factory needs hparams: {name: tensor of one value per member}")
            return {}
        if not factory:
            raise ValueError("hparams need an optimizer factory (a function of them returning a GradientTransformation)")
        out = {}
        for name, value in hparams.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != (members,):
                raise ValueError(f"hparams[{name!r}] must hold one value per member ({members}), got shape {tuple(value.shape)}")
            out[name] = value
        return out

    def init(stacked_params, hparams=None):
        members = _members(stacked_params)
        hp = check_hparams(hparams, members)
        each = [{k: v[i] for k, v in hp.items()} for i in range(members)]
        return stack_params([member_opt(h).init(p) for h, p in zip(each, unstack_params(stacked_params))])

    treedef_box: dict = {}

    def member_step(leaves, opt_state, tokens, targets, key, hp):
        treedef = treedef_box["def"]
        opt = member_opt(hp)
        n_tokens = (targets != ignore_index).sum()
        denom = n_tokens.clamp(min=1).to(torch.float32)

        def loss_of(leaves):
            params = optim._unflatten(leaves, treedef)
            total = loss_fn(params, tokens, targets, cfg_v, key=key, ignore_index=ignore_index, reduction="sum")
            return total / denom

        grads, loss = torch.func.grad_and_value(loss_of)(leaves)
        grads = optim._unflatten(list(grads), treedef)
        params = optim._unflatten(leaves, treedef)
        with torch.no_grad():
            grad_norm = optim.global_norm(grads)
            updates, new_state = opt.update(grads, opt_state, params)
            new_params = optim.apply_updates(params, updates)
        lr = optim._find_lr(new_state)
        lr = torch.full((), float("nan"), device=loss.device) if lr is None else lr
        return new_params, new_state, {"loss": loss.detach(), "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens}

    def step(stacked_params, opt_state, batch, keys=None, hparams=None):
        tokens, targets = unpack_batch(batch)
        members = _members(stacked_params)
        if tokens.ndim != 3 or tokens.shape[0] != members:
            raise ValueError(
                f"ensemble tokens must have shape (members={members}, batch, seq), got {tuple(tokens.shape)}"
            )
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)} but tokens has shape {tuple(tokens.shape)}")
        check_tokens(tokens, cfg)
        check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
        if keys is not None and (not isinstance(keys, Tensor) or keys.shape != (members,)):
            raise ValueError(f"keys must be a tensor of one key per member ({members},), got {keys!r}")
        hp = {k: v.to(tokens.device) for k, v in check_hparams(hparams, members).items()}
        leaves, treedef = optim._leaves(stacked_params)
        treedef_box["def"] = treedef
        in_dims = (0, 0, 0, 0, None if keys is None else 0, 0 if hp else None)
        vmapped = torch.func.vmap(member_step, in_dims=in_dims, randomness="error")
        return vmapped(leaves, opt_state, tokens, targets, keys, hp if hp else None)

    step.init = init
    return step


def evaluate_ensemble(
    stacked: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100, attn_impl: str | None = "einsum"
) -> Tensor:
    """Every member's token-weighted mean loss over ``batches``, in one vmapped forward per batch.

    A batch's ``tokens``/``targets`` are ``(batch, seq)`` (all members see them) or
    ``(members, batch, seq)`` (each member its own). Returns one loss per member. (SDPA's CPU kernel
    has no ``vmap`` batching rule even forward, hence the einsum path by default.)
    """
    members = _members(stacked)
    cfg = _vmap_cfg(cfg, attn_impl)
    total, count = None, None

    def member_sum(params, tokens, targets):
        s = loss_fn(params, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
        return s, (targets != ignore_index).sum()

    with torch.no_grad():
        for batch in batches:
            tokens, targets = unpack_batch(batch)
            check_tokens(tokens, cfg)
            check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
            if tokens.ndim == 3:
                if tokens.shape[0] != members:
                    raise ValueError(f"per-member tokens must have members={members} first, got {tuple(tokens.shape)}")
                s, n = torch.func.vmap(member_sum, in_dims=(0, 0, 0))(stacked, tokens, targets)
            else:
                s, n = torch.func.vmap(member_sum, in_dims=(0, None, None))(stacked, tokens, targets)
            total = s if total is None else total + s
            count = n if count is None else count + n
    if count is None:
        raise ValueError("evaluate_ensemble needs at least one batch, got none")
    if bool((count == 0).any()):
        raise ValueError(f"evaluate_ensemble needs target tokens to count, got only ignore_index={ignore_index}")
    return total / count


# ---------------------------------------------------------------- training an ensemble or a sweep


@dataclass
class EnsembleFitResult:
    """What ``fit_ensemble`` leaves behind."""

    params: dict  # stacked: every leaf has a leading member axis
    opt_state: Any  # stacked likewise
    step: int
    history: list[dict]  # one record per member per evaluation (the lines of metrics.jsonl)
    members: list[dict]  # per member: member, name, seed, hparams, best_val_loss, best_step, dir
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def member_name(spec: dict) -> str:
    """``lr=0.001,seed=2``: a member's settings, for tables, legends and records."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.items())


def plot_members(path: Path, history: list[dict], names: list[str]) -> None:
    """Every member's val loss (solid) and train loss (dashed) against step, one colour per member, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ftransformer.data import atomic_write

    fig = Figure(figsize=(7.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        rows = [r for r in history if r["member"] == i]
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["val_loss"] for r in rows], color=color, marker="o", ms=3, label=f"{name} val")
        ax.plot(steps, [r["train_loss"] for r in rows], color=color, ls="--", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (solid: val, dashed: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def fit_ensemble(
    cfg: Config,
    make_optimizer: Callable[..., optim.GradientTransformation],
    train_ids,
    val_ids,
    *,
    members: Sequence[dict],
    steps: int,
    batch_size: int,
    out_dir: str | os.PathLike,
    seq_len: int | None = None,
    eval_every: int = 250,
    eval_batches: int | str = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    tokenizer=None,
    extra: Callable[[int], dict] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EnsembleFitResult:
    """Train every member of ``members`` together, one vmapped step (``make_ensemble_step``) per step.

    Each member is a dict: ``seed`` (its initial parameters, batches and dropout keys; default ``seed``)
    and hyperparameters passed to ``make_optimizer(**hparams)`` as 0-d tensors, one value per member
    (e.g. ``{"lr": 1e-3, "weight_decay": 0.1}``); with none, ``make_optimizer()`` is shared. All members
    are evaluated on the same fixed batches (seeded by ``seed``), so their losses compare.
    ``out_dir`` gets ``metrics.jsonl`` (records with a ``member`` field), one ``loss.png`` with every
    member's curves, and ``member-<i>/latest`` and ``member-<i>/best`` checkpoints (each loadable on its
    own, e.g. by ``ftransformer generate --checkpoint out_dir/member-0``). A member whose loss turns
    non-finite keeps training in the stack (the others are independent of it) and is reported as diverged.
    ``extra(i)`` gives member ``i``'s JSON extra for its checkpoints.
    """
    from tqdm.auto import tqdm

    from ftransformer.checkpoint import BEST, LATEST, checkpoint_exists, save_checkpoint
    from ftransformer.data import fixed_batches, sample_batch
    from ftransformer.loop import METRICS_FILE, PLOT_FILE, TRAIN_EVAL_STREAM, TRAIN_STREAM, VAL_STREAM, write_metrics

    members = [dict(m) for m in members]
    if not members:
        raise ValueError("fit_ensemble needs at least one member, got none")
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if eval_batches != "all" and (isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1):
        raise ValueError(f"eval_batches must be an int >= 1 or 'all', got {eval_batches!r}")
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} but the model's max_seq_len={cfg.max_seq_len}")
    hp_names = sorted({k for m in members for k in m if k != "seed"})
    for i, m in enumerate(members):
        missing = [k for k in hp_names if k not in m]
        if missing:
            raise ValueError(f"member {i} ({m}) lacks {missing}: every member needs the same hyperparameters")
    seeds = [int(m.get("seed", seed)) for m in members]
    names = [member_name(m) for m in members]
    say = log if log is not None else (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = [out / f"member-{i}" for i in range(len(members))]
    for d in dirs:
        if checkpoint_exists(d / LATEST):
            raise ValueError(f"{str(d)!r} already holds a checkpoint; choose another directory")
    device = torch.device("cpu" if device is None else device)
    files = {"metrics": out / METRICS_FILE, "plot": out / PLOT_FILE}

    hparams = {k: torch.tensor([float(m[k]) for m in members], dtype=torch.float32, device=device) for k in hp_names}
    step_fn = make_ensemble_step(cfg, make_optimizer if hp_names else make_optimizer())
    params = init_ensemble(cfg, seeds, device=device)
    opt_state = step_fn.init(params, hparams or None)

    def to_device(batches):
        return [(t.to(device), y.to(device)) for t, y in batches]

    if eval_batches == "all":
        from ftransformer.data import SplitWindows

        val_batches = to_device(SplitWindows(val_ids, seq_len, batch_size))
    else:
        val_batches = to_device(fixed_batches(val_ids, eval_batches, batch_size, seq_len, seed=seed, stream=VAL_STREAM))
    train_eval = to_device(fixed_batches(train_ids, len(val_batches) if eval_batches == "all" else eval_batches,
                                         batch_size, seq_len, seed=seed, stream=TRAIN_EVAL_STREAM))
    base_keys = [random.key(s) for s in seeds]
    best = [None] * len(members)
    best_step = [None] * len(members)
    history: list[dict] = []
    t0 = time.perf_counter()
    window_t, window_tokens = 0.0, 0
    bar = tqdm(total=steps, desc=f"train x{len(members)}", unit="step", dynamic_ncols=True, disable=not progress,
               file=sys.stderr)
    done = 0
    try:
        while True:
            if done % eval_every == 0 or done == steps:
                train_loss = evaluate_ensemble(params, train_eval, cfg).tolist()
                val_loss = evaluate_ensemble(params, val_batches, cfg).tolist()
                lrs = optim._find_lr(opt_state)
                elapsed = time.perf_counter() - t0
                per_member, states = unstack_params(params), unstack_params(opt_state)
                for i in range(len(members)):
                    record = {
                        "step": done, "member": i, "name": names[i], "seed": seeds[i],
                        "hparams": {k: members[i][k] for k in hp_names},
                        "train_loss": train_loss[i], "val_loss": val_loss[i],
                        "lr": None if lrs is None else float(lrs[i]),
                        "tokens_per_s": window_tokens / window_t if window_t > 0 else None,
                        "elapsed_s": round(elapsed, 3),
                    }
                    history.append(record)
                    mine = [r for r in history if r["member"] == i]
                    improved = math.isfinite(val_loss[i]) and (best[i] is None or val_loss[i] < best[i])
                    if improved:
                        best[i], best_step[i] = val_loss[i], done
                    meta = dict(params=per_member[i], config=cfg, step=done, opt_state=states[i], tokenizer=tokenizer,
                                metrics=mine, extra={**(extra(i) if extra else {}),
                                                     "member": {"member": i, "name": names[i], **members[i],
                                                                "seed": seeds[i], "best_val_loss": best[i]}})
                    if improved:
                        save_checkpoint(dirs[i] / BEST, **meta)
                    save_checkpoint(dirs[i] / LATEST, **meta)
                write_metrics(files["metrics"], history)
                plot_members(files["plot"], history, names)
                window_t, window_tokens = 0.0, 0
                finite = [v for v in val_loss if math.isfinite(v)]
                say(f"step {done}: val loss " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, val_loss)))
                bar.set_postfix(best_val=f"{min(finite):.4f}" if finite else "nan", refresh=False)
            if done >= steps:
                break
            batches = [sample_batch(train_ids, batch_size, seq_len, seed=s, step=done, stream=TRAIN_STREAM) for s in seeds]
            tokens = torch.stack([b[0] for b in batches]).to(device)
            targets = torch.stack([b[1] for b in batches]).to(device)
            keys = torch.stack([random.fold_in(k, done) for k in base_keys]).to(device) if cfg.dropout > 0 else None
            t_step = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, (tokens, targets), keys, hparams or None)
            losses = metrics["loss"].tolist()  # waits for the device: the timing is honest
            window_t += time.perf_counter() - t_step
            window_tokens += tokens.numel()
            done += 1
            bar.update(1)
            finite = [v for v in losses if math.isfinite(v)]
            bar.set_postfix(loss=f"{min(finite):.4f}" if finite else "nan",
                            tok_s=f"{window_tokens / window_t:.0f}" if window_t > 0 else "?", refresh=False)
    finally:
        bar.close()
    summary = [
        {"member": i, "name": names[i], "seed": seeds[i], "hparams": {k: members[i][k] for k in hp_names},
         "best_val_loss": best[i], "best_step": best_step[i],
         "final_val_loss": [r for r in history if r["member"] == i][-1]["val_loss"], "dir": dirs[i]}
        for i in range(len(members))
    ]
    return EnsembleFitResult(params=params, opt_state=opt_state, step=done, history=history, members=summary,
                             out_dir=out, files=files)


def format_ranking(result: EnsembleFitResult) -> str:
    """The members ranked by best val loss (diverged members last), as a text table."""
    order = sorted(result.members, key=lambda m: (m["best_val_loss"] is None, m["best_val_loss"] or 0.0))
    width = max(8, *(len(m["name"]) for m in order)) + 2
    lines = [f"{'rank':<6}{'member':<8}{'settings':<{width}}{'best val':>10}{'at step':>9}{'final val':>11}  checkpoint"]
    lines.append("-" * (len(lines[0]) + 10))
    for rank, m in enumerate(order, 1):
        b = "diverged" if m["best_val_loss"] is None else f"{m['best_val_loss']:.4f}"
        final = m["final_val_loss"]
        lines.append(
            f"{rank:<6}{m['member']:<8}{m['name']:<{width}}{b:>10}{str(m['best_step']):>9}"
            f"{final:>11.4f}  {m['dir']}"
        )
    return "\n".join(lines)


__all__ = [
    "EnsembleFitResult", "NoiseScale", "evaluate_ensemble", "fit_ensemble", "format_ranking", "member_name",
    "plot_members", "gradient_noise_scale", "init_ensemble", "make_ensemble_step",
    "make_per_example_train_step", "noise_scale", "per_example_grad_norms", "per_example_grads", "stack_params",
    "unstack_params",
]
