"""Learning-path step 7a: optimizers as pure functions, the optax way.

An optimizer is a ``GradientTransformation``: ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``. Nothing is mutated; the state is a NamedTuple
of tensors (the step counter too), so it checkpoints, ``vmap``s and compiles like the parameters::

    opt = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(lr=1e-3, weight_decay=0.1))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = ft.optim.apply_updates(params, updates)

Learning rates are floats or schedules (``step -> lr``). Eagerly, the arithmetic runs on whole lists
of tensors at once (``torch._foreach_*``): one call per operation instead of one per tensor (on a GPU,
one kernel launch instead of dozens). ``vmap`` has no batching rule for those calls and
``torch.compile`` fuses plain code by itself, so there the same formulas run tensor by tensor.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ftransformer import random
from ftransformer import validate
from ftransformer.tracing import compiling, functorch_wrapped, is_tracing
from ftransformer.tree import PyTree, flatten, flatten_like, unflatten
from ftransformer.tree import leaves as tree_leaves

Schedule = Callable[[Any], Any]  # step (int or 0-d tensor) -> learning rate (float or 0-d tensor)


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state``, ``update(grads, state, params) -> (updates, state)``.

    ``apply_(grads, state, params) -> (params, state)`` (None where a transformation has none) is ``update``
    and ``apply_updates`` in one, written into the buffers of ``params``, ``state`` and ``grads``: for a caller
    that donates them (JAX's ``donate_argnums``) and never reads them again, e.g. ``make_train_step(donate=True)``.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    apply_: Callable[..., tuple[PyTree, Any]] | None = None


class EmptyState(NamedTuple):
    """State of a transformation that remembers nothing (gradient clipping)."""


class AdamWState(NamedTuple):
    """AdamW's memory: updates done so far, the last learning rate, and both moment estimates."""

    count: Tensor  # int64, 0-d: updates done so far
    lr: Tensor  # float32, 0-d: the learning rate of the latest update (before any: of the first)
    mu: PyTree  # first moment (running mean of gradients), shaped like params
    nu: PyTree  # second moment (running mean of squared gradients), shaped like params


class SGDState(NamedTuple):
    """SGD's memory: updates done so far, the last learning rate and the momentum buffer."""

    count: Tensor  # int64, 0-d
    lr: Tensor  # float32, 0-d
    trace: PyTree  # momentum buffer shaped like params; () when momentum is 0


# ---------------------------------------------------------------- schedules


def _step_value(step) -> int | float:
    if not validate.is_number(step):
        raise TypeError(f"step must be an int or a 0-d tensor, got {type(step).__name__}")
    return step


def _check_lr(name: str, value) -> None:
    if not validate.is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def constant(lr: float) -> Schedule:
    """The schedule that is ``lr`` at every step."""
    _check_lr("lr", lr)
    lr = float(lr)

    def schedule(step):
        if isinstance(step, Tensor):
            return torch.full((), lr, dtype=torch.float32, device=step.device)
        _step_value(step)
        return lr

    return schedule


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> Schedule:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, cosine decay to ``final_lr`` at
    ``total_steps``, then ``final_lr`` for good.

    The schedule takes the number of updates done so far (0 for the first update): an int gives a
    float, a 0-d tensor gives a 0-d float32 tensor (no host sync, no recompiles under ``torch.compile``).
    """
    _check_lr("peak_lr", peak_lr)
    _check_lr("final_lr", final_lr)
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        validate.non_negative_int(name, value)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps={total_steps} must be >= warmup_steps={warmup_steps}")
    peak, final = float(peak_lr), float(final_lr)
    rise, span = peak / max(warmup_steps, 1), max(total_steps - warmup_steps, 1)

    def schedule(step):
        if isinstance(step, Tensor):
            s = step.to(torch.float32)
            progress = ((s - warmup_steps) / span).clamp(0.0, 1.0)
            decay = final + 0.5 * (peak - final) * (1.0 + torch.cos(math.pi * progress))
            return torch.where(s < warmup_steps, s * rise, decay)
        s = float(_step_value(step))
        if s < warmup_steps:
            return s * rise
        progress = min((s - warmup_steps) / span, 1.0)
        return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))

    return schedule


def _as_schedule(lr) -> Schedule:
    """A schedule for ``lr``; a plain float stays a float, so the update multiplies by a Python number.

    A 0-d tensor is used as it is at every step: under ``vmap`` it can differ per ensemble member.
    """
    if callable(lr):
        return lr
    if isinstance(lr, Tensor):
        return lambda step: lr
    _check_lr("lr", lr)
    lr = float(lr)
    return lambda step: lr


# ---------------------------------------------------------------- multi-tensor arithmetic


def use_foreach(*lists: list[Tensor]) -> bool:
    """Whether to call the ``_foreach`` kernels: eagerly, yes; not under ``vmap``/``grad``, whose wrappers
    lack them, and not under ``torch.compile``, which fuses plain per-tensor code itself (and would
    break the graph on a ``_foreach`` call with a tensor scalar)."""
    if compiling():
        return False
    # A transform wraps every tensor it maps over, so the first of each list tells.
    return not any(functorch_wrapped(xs[0]) for xs in lists if xs)


class _Foreach:
    """List arithmetic with one ``torch._foreach_*`` call per operation.

    The in-place forms (trailing ``_``) are only ever applied to lists this module has just created:
    on a CPU every fresh tensor is a trip through the allocator and cold memory, so each update makes
    as few as it can -- and no caller's tensor is ever written to.
    """

    @staticmethod
    def lerp(xs, ys, w):
        return list(torch._foreach_lerp(xs, ys, w))

    @staticmethod
    def mul(xs, s):
        return list(torch._foreach_mul(xs, s))

    @staticmethod
    def add(xs, ys):
        return list(torch._foreach_add(xs, ys))

    @staticmethod
    def div(xs, ys):
        return list(torch._foreach_div(xs, ys))

    @staticmethod
    def sqrt(xs):
        return list(torch._foreach_sqrt(xs))

    @staticmethod
    def norms(xs):
        return list(torch._foreach_norm(xs, 2))

    @staticmethod
    def mul_(xs, s):
        torch._foreach_mul_(xs, s)

    @staticmethod
    def add_(xs, s, alpha: float = 1.0):
        if isinstance(s, list):
            torch._foreach_add_(xs, s, alpha=alpha)
        else:
            torch._foreach_add_(xs, s)

    @staticmethod
    def addcmul_(xs, ys, zs, value: float):
        torch._foreach_addcmul_(xs, ys, zs, value=value)


class _PerTensor:
    """The same arithmetic one tensor at a time (works under every ``torch.func`` transform)."""

    @staticmethod
    def lerp(xs, ys, w):
        return [x.lerp(y, w) for x, y in zip(xs, ys)]

    @staticmethod
    def mul(xs, s):
        return [x * s for x in xs]

    @staticmethod
    def add(xs, ys):
        return [x + y for x, y in zip(xs, ys)]

    @staticmethod
    def div(xs, ys):
        return [x / y for x, y in zip(xs, ys)]

    @staticmethod
    def sqrt(xs):
        return [x.sqrt() for x in xs]

    @staticmethod
    def norms(xs):
        return [torch.linalg.vector_norm(x) for x in xs]

    @staticmethod
    def mul_(xs, s):
        for x, y in zip(xs, s) if isinstance(s, list) else ((x, s) for x in xs):
            x.mul_(y)

    @staticmethod
    def add_(xs, s, alpha: float = 1.0):
        if isinstance(s, list):
            for x, y in zip(xs, s):
                x.add_(y, alpha=alpha)
        else:
            for x in xs:
                x.add_(s)

    @staticmethod
    def addcmul_(xs, ys, zs, value: float):
        # Spelled out: vmap has no batching rule for addcmul_.
        for x, y, z in zip(xs, ys, zs):
            x.add_(y * z, alpha=value)


def _host_int(count: Tensor) -> int | None:
    """The step counter as a Python int when reading it is free (an eager CPU tensor), else None.

    Reading a CUDA tensor would wait for the device, and reading under ``torch.compile`` or a
    ``torch.func`` transform would break the graph; those keep the arithmetic on tensors.
    """
    if is_tracing(count) or count.device.type != "cpu":
        return None
    return int(count)


def tensor_ops(*lists: list[Tensor]):
    """The list-of-tensors kernels to use here: the ``_foreach`` ones or the per-tensor loop."""
    return _Foreach if use_foreach(*lists) else _PerTensor


# ---------------------------------------------------------------- tree helpers


def _device_of(leaves: list) -> torch.device | None:
    return leaves[0].device if leaves else None


def global_norm(tree: PyTree) -> Tensor:
    """The L2 norm of all leaves together, as if concatenated into one vector (0-d tensor)."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    norms = tensor_ops(leaves).norms(leaves)
    return torch.linalg.vector_norm(torch.stack(norms))


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf: a new tree; the inputs are left as they were."""
    p, spec = flatten(params)
    u = flatten_like(updates, spec, "updates")
    u = [x.to(y.dtype) for x, y in zip(u, p)]
    return unflatten(tensor_ops(p, u).add(p, u), spec)


# ---------------------------------------------------------------- transformations


def _decay_mask(mask, params: PyTree, p_leaves: list, spec) -> list[bool]:
    if mask is None:
        return [x.ndim >= 2 for x in p_leaves]
    if callable(mask):
        mask = mask(params)
    flags = flatten_like(mask, spec, "mask")
    for flag in flags:
        validate.boolean("mask leaves", flag, expected="bools (True = decay this tensor)", error=TypeError)
    return flags


def _check_adamw_args(b1: float, b2: float, eps: float, weight_decay) -> None:
    for name, value in (("betas[0]", b1), ("betas[1]", b2)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not isinstance(weight_decay, Tensor):
        _check_lr("weight_decay", weight_decay)


def _log_beta(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _bias_corrections(count: Tensor, schedule: Schedule, b1: float, b2: float, dtype: torch.dtype = torch.float32):
    """``(lr, 1 - b1^t, sqrt(1 - b2^t))`` for the update ``t = count + 1``: Python numbers where the count is
    free to read (exact float64, cheaper scalar kernels), else 0-d tensors of ``dtype`` (float64 for float64
    params, so a vmapped float64 update equals the eager one to the last bits)."""
    step = _host_int(count)
    if step is not None:
        return schedule(step), 1.0 - b1 ** (step + 1), math.sqrt(1.0 - b2 ** (step + 1))
    # log(beta) in float64 here, expm1 in float32 there, so 1 - beta**t stays accurate to the last bit
    # even for beta2 = 0.999, where beta**t in float32 would lose four digits.
    t = (count + 1).to(dtype)
    return schedule(count), -torch.expm1(t * _log_beta(b1)), torch.sqrt(-torch.expm1(t * _log_beta(b2)))


def _adam_moments(ops, g: list, m: list, v: list, b1: float, b2: float) -> tuple[list, list]:
    m = ops.lerp(m, g, 1.0 - b1)
    v = ops.mul(v, b2)
    ops.addcmul_(v, g, g, 1.0 - b2)
    return m, v


def _adam_direction(ops, m: list, v: list, eps: float, sqrt_bias2) -> list:
    # torch's update is -lr/bias1 * m / (sqrt(v)/sqrt_bias2 + eps) - lr*wd*p. Multiplying through
    # by sqrt_bias2 gives the same number in fewer passes over memory:
    #     -(lr*sqrt_bias2/bias1) * (m / (sqrt(v) + eps*sqrt_bias2) + wd*bias1/sqrt_bias2 * p).
    denom = ops.sqrt(v)
    ops.add_(denom, eps * sqrt_bias2)
    return ops.div(m, denom)


def _add_decay(ops, updates: list, p: list, flags: list[bool], scale) -> None:
    """``updates[i] += scale * p[i]`` for the decayed tensors (``updates`` is this step's own list)."""
    idx = [i for i, f in enumerate(flags) if f]
    if not idx:
        return
    decayed, p_decayed = [updates[i] for i in idx], [p[i] for i in idx]
    if isinstance(scale, Tensor):
        ops.add_(decayed, ops.mul(p_decayed, scale))
    else:
        ops.add_(decayed, p_decayed, alpha=scale)


def _adamw_init(schedule: Schedule):
    def init(params):
        values, spec = flatten(params)
        device = _device_of(values)
        zeros = [torch.zeros_like(x) for x in values]
        count = torch.zeros((), dtype=torch.int64, device=device)
        return AdamWState(
            count=count,
            lr=torch.as_tensor(schedule(count), dtype=torch.float32, device=device),
            mu=unflatten(zeros, spec),
            nu=unflatten([z.clone() for z in zeros], spec),
        )

    return init


def _adamw_update(schedule: Schedule, b1: float, b2: float, eps: float, weight_decay, mask):
    def update(grads, state, params=None):
        g, spec = flatten(grads)
        m = flatten_like(state.mu, spec, "opt_state.mu")
        v = flatten_like(state.nu, spec, "opt_state.nu")
        ops = tensor_ops(g, m, v)
        wide = torch.float64 if any(x.dtype == torch.float64 for x in g) else torch.float32
        lr_t, bias1, sqrt_bias2 = _bias_corrections(state.count, schedule, b1, b2, wide)
        m, v = _adam_moments(ops, g, m, v, b1, b2)
        updates = _adam_direction(ops, m, v, eps, sqrt_bias2)
        if isinstance(weight_decay, Tensor) or weight_decay:
            if params is None:
                raise ValueError("adamw with weight_decay > 0 needs params: call update(grads, state, params)")
            p = flatten_like(params, spec, "params")
            _add_decay(ops, updates, p, _decay_mask(mask, params, p, spec), weight_decay * bias1 / sqrt_bias2)
        ops.mul_(updates, -lr_t * sqrt_bias2 / bias1)
        count = state.count + 1
        lr_saved = torch.as_tensor(lr_t, dtype=torch.float32, device=count.device)
        return unflatten(updates, spec), AdamWState(count=count, lr=lr_saved, mu=unflatten(m, spec),
                                                    nu=unflatten(v, spec))

    return update


def _same_layout(*xs: Tensor) -> bool:
    """Whether the tensors share dtype, device and strides and each covers its memory densely: then
    ``torch._fused_adamw_`` may walk them as flat arrays side by side."""
    first = xs[0]
    dense = first.is_contiguous() or first.t().is_contiguous() if first.ndim == 2 else first.is_contiguous()
    return dense and all(x.stride() == first.stride() and x.dtype == first.dtype and x.device == first.device
                         for x in xs)


def _adamw_step_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, hyper: dict, decay: float) -> None:
    """``torch.optim.AdamW``'s single-tensor update, in place, for tensors of different layouts."""
    m.lerp_(g, 1.0 - hyper["beta1"])
    v.mul_(hyper["beta2"]).addcmul_(g, g, value=1.0 - hyper["beta2"])
    if decay:
        p.mul_(1.0 - hyper["lr"] * decay)
    denom = (v.sqrt() / hyper["sqrt_bias2"]).add_(hyper["eps"])
    p.addcdiv_(m, denom, value=-hyper["lr"] / hyper["bias1"])


def _adamw_in_place(p: list, g: list, m: list, v: list, flags: list[bool], hyper: dict, weight_decay: float) -> None:
    """One AdamW update written into ``p``, ``m`` and ``v`` (``g`` may be overwritten): torch's fused CPU kernel
    (one pass over memory) for tensors of one layout, grouped by decay, and the single-tensor update for the rest."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(p)):
        if _same_layout(p[i], g[i], m[i], v[i]) and p[i].device.type == "cpu":
            groups.setdefault((flags[i], p[i].dtype), []).append(i)
        else:
            _adamw_step_(p[i], g[i], m[i], v[i], hyper, weight_decay if flags[i] else 0.0)
    fused = {k: hyper[k] for k in ("lr", "beta1", "beta2", "eps")}
    for (flag, dtype), idx in groups.items():
        steps = [torch.full((), float(hyper["step"]), dtype=torch.float32)] * len(idx)
        torch._fused_adamw_(
            [p[i] for i in idx], [g[i] for i in idx], [m[i] for i in idx], [v[i] for i in idx], [], steps,
            weight_decay=weight_decay if flag else 0.0, amsgrad=False, maximize=False, **fused,
        )


def _adamw_apply(schedule: Schedule, b1: float, b2: float, eps: float, weight_decay, mask, update):
    """AdamW's ``apply_``: eagerly with a float weight decay, in place; otherwise ``update`` + ``apply_updates``."""

    def apply_(grads, state, params):
        p, spec = flatten(params)
        g = flatten_like(grads, spec, "grads")
        step = _host_int(state.count)
        lr = None if step is None else schedule(step)
        if step is None or isinstance(weight_decay, Tensor) or isinstance(lr, Tensor) or not use_foreach(p, g):
            updates, new_state = update(grads, state, params)
            return apply_updates(params, updates), new_state
        m = flatten_like(state.mu, spec, "opt_state.mu")
        v = flatten_like(state.nu, spec, "opt_state.nu")
        flags = _decay_mask(mask, params, p, spec) if weight_decay else [False] * len(p)
        hyper = dict(lr=float(lr), beta1=b1, beta2=b2, eps=eps, step=step + 1, bias1=1.0 - b1 ** (step + 1),
                     sqrt_bias2=math.sqrt(1.0 - b2 ** (step + 1)))
        _adamw_in_place(p, g, m, v, flags, hyper, float(weight_decay))
        count = state.count + 1
        lr_saved = torch.as_tensor(lr, dtype=torch.float32, device=count.device)
        return params, AdamWState(count=count, lr=lr_saved, mu=state.mu, nu=state.nu)

    return apply_


def adamw(
    lr: float | Tensor | Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Tensor = 0.01,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter); matches ``torch.optim.AdamW`` step for step.

    Args:
        lr: a float, a 0-d tensor (e.g. one per ensemble member under ``vmap``), or a schedule called
            with the number of updates done so far.
        betas: decay rates of the first and second moment estimates.
        eps: added to the denominator's square root, for stability.
        weight_decay: each update also shrinks decayed tensors by ``lr * weight_decay`` of their value
            (a float, or a 0-d tensor: e.g. one per ensemble member under ``vmap``).
        mask: which tensors decay: a tree of bools shaped like params, or ``params -> tree of bools``.
            None decays tensors with ``ndim >= 2`` (matrices, embeddings) and spares norms and biases.
    """
    schedule = _as_schedule(lr)
    b1, b2 = betas
    _check_adamw_args(b1, b2, eps, weight_decay)
    update = _adamw_update(schedule, b1, b2, eps, weight_decay, mask)
    apply_ = _adamw_apply(schedule, b1, b2, eps, weight_decay, mask, update)
    return GradientTransformation(_adamw_init(schedule), update, apply_)


def sgd(lr: float | Schedule, momentum: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent with optional heavy-ball momentum (as ``torch.optim.SGD``, no dampening)."""
    schedule = _as_schedule(lr)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def init(params):
        leaves, spec = flatten(params)
        device = _device_of(leaves)
        count = torch.zeros((), dtype=torch.int64, device=device)
        trace = unflatten([torch.zeros_like(x) for x in leaves], spec) if momentum else ()
        lr0 = torch.as_tensor(schedule(count), dtype=torch.float32, device=device)
        return SGDState(count=count, lr=lr0, trace=trace)

    def update(grads, state, params=None):
        g, spec = flatten(grads)
        lr_t = schedule(state.count)
        trace = state.trace
        if momentum:
            buf = flatten_like(state.trace, spec, "opt_state.trace")
            ops = tensor_ops(g, buf)
            # buf starts at zero, so the first step's buffer is the gradient itself, as in torch.
            direction = ops.mul(buf, momentum)
            ops.add_(direction, g)
            trace = unflatten(direction, spec)
        else:
            ops, direction = tensor_ops(g), g
        updates = ops.mul(direction, -lr_t)
        count = state.count + 1
        lr_saved = torch.as_tensor(lr_t, dtype=torch.float32, device=count.device)
        return unflatten(updates, spec), SGDState(count=count, lr=lr_saved, trace=trace)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients down together when their global norm exceeds ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``: factor ``min(1, max_norm / (norm + 1e-6))``)."""
    if not validate.is_number(max_norm) or not max_norm > 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        g, spec = flatten(grads)
        if not g:
            return grads, state
        ops = tensor_ops(g)
        norm = torch.linalg.vector_norm(torch.stack(ops.norms(g)))
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return unflatten(ops.mul(g, factor), spec), state

    return GradientTransformation(init, update)


class DPState(NamedTuple):
    """DP-SGD's memory: the noise key and the number of aggregations done (each draws fresh noise)."""

    key: Tensor  # int64, 0-d: the explicit key all noise derives from
    count: Tensor  # int64, 0-d: aggregations done so far


def per_example_norms(grads: PyTree) -> Tensor:
    """The L2 norm of each example's gradient (all leaves together), for leaves with a leading batch axis."""
    leaves = tree_leaves(grads)
    if not leaves:
        raise ValueError("per_example_norms needs at least one gradient tensor, got an empty tree")
    squares = [x.reshape(x.shape[0], -1).to(torch.float32).square().sum(1) for x in leaves]
    return torch.stack(squares).sum(0).sqrt()


def dp_aggregate(clip_norm: float, noise_multiplier: float, *, key: Tensor) -> GradientTransformation:
    """DP-SGD's aggregation (Abadi et al. 2016): per-example gradients in, one noisy mean gradient out.

    ``update`` takes gradients whose every leaf has a leading batch axis (``ft.per_example.per_example_grads``),
    scales each example's gradient to global norm at most ``clip_norm`` (C), sums them, adds Gaussian
    noise ``N(0, (noise_multiplier * C)^2)`` to every coordinate and divides by the batch size. Put it
    first in a chain: ``chain(dp_aggregate(1.0, 1.1, key=ft.random.key(0)), adamw(1e-3))``, and train with
    ``ft.per_example.make_per_example_train_step``. The noise of step ``t`` is drawn from
    ``fold_in(key, t)``: the same key gives the same noise.

    Privacy accounting -- what (epsilon, delta) a run with this noise, batch size, dataset size and number
    of steps guarantees -- is out of scope here; use an accountant such as Opacus's
    (``opacus.accountants.RDPAccountant``). With ``noise_multiplier=0`` this is per-example clipping only
    (no privacy).
    """
    _check_dp_args(clip_norm, noise_multiplier, key)
    std = float(noise_multiplier) * float(clip_norm)

    def init(params):
        device = _device_of(tree_leaves(params))
        return DPState(key=key.to(device), count=torch.zeros((), dtype=torch.int64, device=device))

    def update(grads, state, params=None):
        g, spec = flatten(grads)
        if not g:
            return grads, state
        _check_per_example(g, None if params is None else flatten_like(params, spec, "params"))
        # Abadi et al.'s g / max(1, |g| / C), written as a factor <= 1 (exactly 1 for small gradients).
        factor = torch.clamp(clip_norm / (per_example_norms(grads) + 1e-6), max=1.0)
        means = _clipped_means(g, factor)
        if std > 0:
            keys = random.split(random.fold_in(state.key, state.count), len(g))
            means = [x + random.normal(k, x.shape, dtype=x.dtype) * (std / g[0].shape[0]) for x, k in zip(means, keys)]
        return unflatten(means, spec), DPState(key=state.key, count=state.count + 1)

    return GradientTransformation(init, update)


def _check_dp_args(clip_norm: float, noise_multiplier: float, key: Tensor) -> None:
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if not validate.is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.ndim != 0:
        raise TypeError(f"key must be a 0-d int64 tensor (ft.random.key(seed)), got {key!r}")


def _check_per_example(g: list, p: list | None) -> None:
    """Every gradient leaf has one leading batch axis, and (given params) the parameter's shape after it."""
    if any(x.ndim == 0 for x in g) or len({x.shape[0] for x in g}) != 1:
        raise ValueError(
            "dp_aggregate needs per-example gradients (every leaf with the same leading batch axis), got "
            f"shapes {sorted({tuple(x.shape) for x in g})[:3]}"
        )
    for x, y in zip(g, p or ()):
        if tuple(x.shape[1:]) != tuple(y.shape):
            raise ValueError(
                f"dp_aggregate needs per-example gradients shaped (batch, *param), got {tuple(x.shape)} "
                f"for a parameter of shape {tuple(y.shape)}"
            )


def _clipped_means(g: list, factor: Tensor) -> list:
    """The batch mean of each leaf with example ``b`` scaled by ``factor[b]``."""
    batch = factor.shape[0]
    return [(x * factor.to(x.dtype).reshape((batch,) + (1,) * (x.ndim - 1))).mean(0) for x in g]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order, each to the previous one's updates; the state is a tuple of theirs."""
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain argument {i} must be a GradientTransformation, got {type(t).__name__}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transformations expected a state tuple of that length")
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    def apply_(grads, state, params):
        # The transformations before the last update the gradients as usual; the last applies them in place.
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transformations expected a state tuple of that length")
        new_state = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        params, s = transforms[-1].apply_(grads, state[-1], params)
        return params, (*new_state, s)

    return GradientTransformation(init, update, apply_ if transforms and transforms[-1].apply_ else None)


def find_lr(state) -> Tensor | None:
    """The learning rate stored in an optimiser state (searched through nested states), or None."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        if "lr" in state._fields:
            return state.lr
    if isinstance(state, (tuple, list)):
        for s in state:
            found = find_lr(s)
            if found is not None:
                return found
    return None


def current_lr(opt_state) -> Tensor:
    """The learning rate of the latest update (before any update: of the first), read from the state."""
    lr = find_lr(opt_state)
    if lr is None:
        raise ValueError(f"opt_state of type {type(opt_state).__name__} holds no learning rate")
    return lr


__all__ = [
    "AdamWState", "DPState", "EmptyState", "GradientTransformation", "SGDState", "Schedule", "adamw", "apply_updates",
    "chain", "clip_by_global_norm", "constant", "current_lr", "dp_aggregate", "global_norm", "per_example_norms",
    "sgd", "warmup_cosine",
]
