"""Learning-path step 7b: training as a pure function.

``make_train_step`` turns a config and an optimizer into a ``TrainStep(init, step)`` whose
``step(params, opt_state, batch, key) -> (params, opt_state, metrics)`` is pure: a ``torch.func`` transform
differentiates ``loss_fn`` with respect to the parameter tree, the optimizer turns gradients into
updates, and new trees come back -- the inputs are never touched, so a step can be replayed, compared,
``vmap``-ed over an ensemble or compiled.

Gradient accumulation splits the batch into micro-batches. Each one's loss is a *sum* over its target
tokens divided by the whole batch's token count, so the accumulated gradient is exactly the full
batch's token-weighted mean, even when padding (``ignore_index``) leaves micro-batches unequal.
Across processes (``all_reduce``, see ``distributed``) the same holds: the token count is summed first,
then each process's gradients of its share, so the update is the one a single process would compute.

Every step in the library is a ``TrainStep(init, step)``, built from the same two pieces:
``loss_and_grads`` (the loss and its gradients, with accumulation and the data-parallel sum) and
``apply_optimizer`` (the update, outside any autograd graph). ``make_train_step`` is the two in a row,
``ensemble.make_ensemble_step`` is ``vmap`` of ``make_train_step``'s step, and
``per_example.make_per_example_train_step`` feeds ``apply_optimizer`` per-example gradients. The loop
that draws batches, evaluates and checkpoints (``fit``, which runs any ``TrainStep``) is in
``ftransformer.loop``.
"""

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ftransformer import tree
from ftransformer import optim, random
from ftransformer import validate
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.model import check_ids, check_tokens, loss_fn
from ftransformer.precision import Precision
from ftransformer.tracing import compiling

class TrainStep(NamedTuple):
    """The one training-step type: a step and the optimizer state it starts from, like an optimizer's ``(init, update)``.

    ``init(params) -> opt_state``; ``step(params, opt_state, batch, key=None) -> (params, opt_state, metrics)``;
    calling the ``TrainStep`` itself calls ``step``. ``accum_steps``: the micro-batches the step splits each batch
    into, as its builder was told (None: the builder does not say); ``fit`` takes it from here. ``make_train_step``, ``ensemble.make_ensemble_step`` and
    ``per_example.make_per_example_train_step`` return one, and ``loop.fit`` runs any of them. How the step
    computes (precision, ``torch.compile``) is its builder's business.
    """

    init: Callable[[dict], Any]
    step: Callable[..., tuple[dict, Any, dict]]
    accum_steps: int | None = None

    def __call__(self, params: dict, opt_state, batch, key: Tensor | None = None) -> tuple[dict, Any, dict]:
        return self.step(params, opt_state, batch, key)


def _storages(leaves: list) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in leaves if isinstance(x, Tensor)}


def _owned(updates: list[Tensor], params: list[Tensor], *held) -> bool:
    """Whether ``updates`` are fresh tensors nobody else holds, so they may become the new params in place.

    Built-in optimizers always return such tensors; a custom one might return a view of its state, a
    tensor used twice or an expanded one, and then the step falls back to a new allocation.
    """
    if compiling() or not optim.use_foreach(updates, params):
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
    return not (seen & _storages(params)) and not any(seen & _storages(tree.leaves(h)) for h in held)


def check_optimizer(optimizer) -> None:
    """``TypeError`` unless ``optimizer`` is an ``optim.GradientTransformation``."""
    if not isinstance(optimizer, optim.GradientTransformation):
        raise TypeError(f"optimizer must be an optim.GradientTransformation, got {type(optimizer).__name__}")


def check_batch(tokens: Tensor, targets: Tensor, cfg: Config, ignore_index: int) -> None:
    """Token and target ids in range; inside a transform the model skips value checks, so check here, once."""
    check_tokens(tokens, cfg)
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)


def loss_and_grads(
    params: dict, tokens: Tensor, targets: Tensor, key: Tensor | None, cfg: Config, *, accum_steps: int = 1,
    ignore_index: int = -100, all_reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    precision: Precision | None = None,
) -> tuple[dict, Tensor, Tensor]:
    """The core of every train step: ``(gradients, token-weighted mean loss, counted targets)``.

    Pure and transform-friendly: ``ensemble.make_ensemble_step`` is ``vmap`` of it. See
    ``make_train_step`` for ``accum_steps``, ``all_reduce`` and ``precision``.
    """
    leaves, treedef = tree.flatten(params)
    n_tokens = (targets != ignore_index).sum()
    if all_reduce is not None:
        (n_tokens,) = all_reduce([n_tokens])
    # A batch of nothing but padding gives zero gradients instead of 0/0.
    denom = n_tokens.clamp(min=1).to(torch.float32)
    micro = functools.partial(_micro_grads, cfg, ignore_index, leaves, treedef, n_tokens=denom, precision=precision)
    grads, loss = _batch_grads(micro, accum_steps, tokens, targets, key)
    if all_reduce is not None:
        *grads, loss = all_reduce([*grads, loss])
    return tree.unflatten(list(grads), treedef), loss.detach(), n_tokens


def apply_optimizer(
    optimizer: optim.GradientTransformation, params: dict, grads, opt_state, *, donate: bool = False
) -> tuple[dict, object]:
    """The optimizer's update applied: ``(new params, new optimizer state)``, outside any autograd graph.

    An update whose shape is not its parameter's (e.g. per-example gradients not reduced) is refused.
    ``donate``: ``params``, ``grads`` and ``opt_state`` are the caller's to give away, so an optimizer with an
    ``apply_`` writes the new values into their buffers (eagerly; compiled or transformed, as without it).
    """
    leaves, treedef = tree.flatten(params)
    # Parameters that arrive with requires_grad=True must not drag the update into an autograd graph.
    with torch.no_grad():
        if donate and optimizer.apply_ is not None and not compiling() and optim.use_foreach(leaves):
            return optimizer.apply_(grads, opt_state, params)
        updates, new_state = optimizer.update(grads, opt_state, params)
        u = tree.leaves(updates)
        if len(u) == len(leaves) and _owned(u, leaves, opt_state, new_state):
            torch._foreach_add_(u, leaves)
            return tree.unflatten(u, treedef), new_state
        for x, p in zip(u, leaves):
            if x.shape != p.shape:
                raise ValueError(
                    f"the optimizer returned an update of shape {tuple(x.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}: with per-example gradients, start the chain with optim.dp_aggregate"
                )
        return optim.apply_updates(params, updates), new_state


def step_metrics(loss: Tensor, grad_norm: Tensor, opt_state, n_tokens: Tensor, **more: Tensor) -> dict:
    """The one metrics schema of every step: ``loss``, ``grad_norm``, ``lr`` (NaN if none), ``tokens``, + ``more``."""
    lr = optim.find_lr(opt_state)
    lr = torch.full((), float("nan"), device=loss.device) if lr is None else lr
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens, **more}


def make_train_step(
    cfg: Config,
    optimizer: optim.GradientTransformation,
    *,
    accum_steps: int = 1,
    compile: bool = False,
    ignore_index: int = -100,
    all_reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    precision: Precision | None = None,
    donate: bool = False,
) -> TrainStep:
    """``TrainStep(optimizer.init, step)``: ``step(params, opt_state, (tokens, targets), key) -> (params, opt_state, metrics)``.

    Args:
        cfg: the model's config.
        optimizer: e.g. ``optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr))``.
        accum_steps: micro-batches per step, split along the first batch axis; the update equals the
            full batch's.
        compile: wrap the step in ``torch.compile`` (the first call compiles, once per device type).
        ignore_index: target id that counts for nothing (padding).
        all_reduce: for data parallelism, a function that sums a list of tensors over all processes
            (e.g. ``DistContext.all_reduce_sum``); each process passes its share of the global batch and
            gets the global batch's update. Called twice a step: the token count, then the gradients
            with the loss, once per step whatever ``accum_steps`` is.
        precision: a ``precision.Precision`` (None: fp32 throughout). ``precision.BF16`` keeps the params,
            gradients and optimizer state fp32 and runs the forward and backward in bf16: the weights are
            cast inside the differentiated function, so the gradients come back fp32.
        donate: the step may write the new params and optimizer state into the buffers of those passed in
            (JAX's buffer donation): the caller must not use them again. Eagerly, with ``optim.adamw`` (alone
            or last in a ``chain``), that saves a copy of the params and two of the optimizer state, and makes
            the update one pass over memory (``fit`` never reads a state twice: give it a step with donation).

    ``key`` drives dropout (None: no dropout). ``metrics`` holds 0-d tensors, so reading them is the
    caller's choice of when to synchronise: ``loss`` (token-weighted mean), ``grad_norm`` (before any
    clipping), ``lr`` (of this update; NaN if the optimizer keeps none) and ``tokens`` (counted targets).
    """
    _check_step_args(cfg, optimizer, accum_steps, precision, donate)
    core = dict(accum_steps=accum_steps, ignore_index=ignore_index, all_reduce=all_reduce, precision=precision)

    def step(params, opt_state, batch, key=None):
        tokens, targets = unpack_batch(batch)
        check_batch(tokens, targets, cfg, ignore_index)
        grads, loss, n_tokens = loss_and_grads(params, tokens, targets, key, cfg, **core)
        grad_norm = optim.global_norm(grads)
        params, new_state = apply_optimizer(optimizer, params, grads, opt_state, donate=donate)
        return params, new_state, step_metrics(loss, grad_norm, new_state, n_tokens)

    return TrainStep(optimizer.init, _compiled_per_device(step) if compile else step, accum_steps)


def _check_step_args(cfg, optimizer, accum_steps, precision, donate) -> None:
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    check_optimizer(optimizer)
    validate.int_at_least("accum_steps", accum_steps, 1)
    validate.boolean("donate", donate)
    if precision is not None and not isinstance(precision, Precision):
        raise TypeError(f"precision must be a precision.Precision or None, got {type(precision).__name__}")


def _micro_grads(cfg, ignore_index, leaves, treedef, tokens, targets, key, *, n_tokens, precision=None):
    """Gradients (a list like ``leaves``) and value of one micro-batch's share of the mean loss."""

    def loss_of(leaves):
        if precision is not None:  # the cast's backward returns the gradients in the master weights' dtype
            leaves = precision.cast(leaves)
        params = tree.unflatten(leaves, treedef)
        total = loss_fn(params, tokens, targets, cfg, key=key, ignore_index=ignore_index, reduction="sum")
        return total / n_tokens

    return grads_and_value(loss_of, leaves)


def grads_and_value(loss_of: Callable, leaves: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """First-order gradients (a list like ``leaves``) and value of ``loss_of(leaves)``, a 0-d loss."""
    if not compiling() and optim.use_foreach(leaves) and all(x.is_floating_point() for x in leaves):
        return _autograd_grads(loss_of, leaves)
    # Transformed (vmap for ensembles, grad of grad) or compiled: torch.func.vjp rather than grad_and_value:
    # the same transform underneath, but grad_and_value always asks autograd for create_graph=True (so that
    # it can nest), and recording the backward pass for a second derivative nobody takes costs ~8% of a
    # CPU step. The step never differentiates through itself (the update runs under no_grad), so a
    # first-order pullback is all it needs. Differentiating a flat list of leaves spares torch.func a walk
    # of the nested tree per call; the tree's definition rides in the closure, out of those walks.
    loss, pullback = torch.func.vjp(loss_of, leaves)
    (grads,) = pullback(torch.ones_like(loss), retain_graph=False, create_graph=False)
    return grads, loss


def _autograd_grads(loss_of: Callable, leaves: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``loss_of(leaves)``'s gradients by plain autograd, for eager untransformed leaves.

    torch.func.vjp's pullback leaves its gradients in a reference cycle (through functorch's frames) that
    only the cyclic garbage collector frees: a set of gradients held until its next run. ``torch.autograd.grad``
    on detached copies of the leaves has no cycle (and records no functorch wrappers: ~75 MB less at the peak
    of a SmolLM2-135M step)."""
    inputs = [x.detach().requires_grad_() for x in leaves]
    with torch.enable_grad():
        loss = loss_of(inputs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)], loss.detach()


def _batch_grads(micro: Callable, accum_steps: int, tokens: Tensor, targets: Tensor, key):
    """The whole batch's gradients and loss: one ``micro`` call, or the sum over ``accum_steps`` splits."""
    if accum_steps == 1:
        return micro(tokens, targets, key)
    if tokens.ndim < 2 or tokens.shape[0] < accum_steps:
        got = "no batch axis" if tokens.ndim < 2 else f"batch={tokens.shape[0]}"
        raise ValueError(f"accum_steps={accum_steps} needs tokens with batch >= {accum_steps}, got {got}")
    keys = None if key is None else random.split(key, accum_steps)
    grads, loss = None, None
    for i, (t, y) in enumerate(zip(tokens.tensor_split(accum_steps), targets.tensor_split(accum_steps))):
        g, part = micro(t, y, None if keys is None else keys[i])
        if grads is None:
            grads, loss = g, part
        else:
            # The first micro-batch's gradients are ours alone: summing into them is safe.
            optim.tensor_ops(grads, g).add_(grads, g)
            loss = loss + part
    return grads, loss


def _compiled_per_device(step: Callable) -> Callable:
    """``step`` under ``torch.compile``, compiled once per device type on first use."""
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


def loss_sums(
    params: dict, batches: Iterable, cfg: Config, *, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """The summed loss and the number of counted targets over ``batches`` (both 0-d; zeros for no batches)."""
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for batch in batches:
            tokens, targets = unpack_batch(batch)
            s = loss_fn(params, tokens, targets, cfg, ignore_index=ignore_index, reduction="sum")
            n = (targets != ignore_index).sum()
            total, count = total.to(s.device) + s, count.to(n.device) + n
    return total, count


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
        batches = tqdm(batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
    seen = 0

    def counted():  # streams the batches (a generator stays one) while counting them
        nonlocal seen
        for batch in batches:
            seen += 1
            yield batch

    total, count = loss_sums(params, counted(), cfg, ignore_index=ignore_index)
    if seen == 0:
        raise ValueError("evaluate needs at least one batch, got none")
    if int(count) == 0:
        raise ValueError(f"evaluate needs target tokens to count, got only ignore_index={ignore_index}")
    return float(total / count)
