"""A training step over adapters only: the ``TrainStep`` whose params are the trainable tree of ``peft.split``.

The frozen tree rides in the closure, so the loss is a function of the adapters' tensors alone:
``torch.func`` differentiates those, and the base never enters the differentiated function's inputs (no
gradient is computed for it, none is stored, none is in the optimizer state or a checkpoint of the params).
"""

from torch import Tensor

from ftransformer import optim, random, tree
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.model import loss_fn
from ftransformer.peft.adapters import dropout as drop_adapters
from ftransformer.peft.partition import combine
from ftransformer.train import TrainStep, apply_optimizer, check_batch, check_optimizer, grads_and_value, step_metrics


def adapter_loss(
    trainable: dict, frozen: dict, tokens: Tensor, targets: Tensor, cfg: Config, *,
    key: Tensor | None = None, dropout: float = 0.0, ignore_index: int = -100, view=None,
    documents: Tensor | None = None,
) -> Tensor:
    """Mean next-token loss of ``combine(trainable, frozen)`` (on packed ``documents``, if given); ``key`` drives
    the model's dropout and the adapters' input dropout at ``dropout`` (None: neither); ``view(trainable)``: the
    tensors the forward reads (e.g. ``peft.stack``'s rank mask; None: ``trainable`` itself)."""
    params = combine(trainable if view is None else view(trainable), frozen)
    if key is not None:
        key, adapter_key = random.split(key, 2)
        params = drop_adapters(params, dropout, adapter_key)
    return loss_fn(params, tokens, targets, cfg, key=key, ignore_index=ignore_index, documents=documents)


def make_adapter_step(
    cfg: Config, optimizer: optim.GradientTransformation, frozen: dict, *, dropout: float = 0.0,
    ignore_index: int = -100, view=None,
) -> TrainStep:
    """``TrainStep(optimizer.init, step)`` with ``step(trainable, opt_state, (tokens, targets), key)``: the
    gradients, the optimizer state and the returned params are trees of the adapters alone (``view``: as
    ``adapter_loss``'s, inside the differentiated function). A batch ``(tokens, targets, documents)`` trains on
    packed rows (``data.chat.pack``)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    check_optimizer(optimizer)

    def loss_of(trainable, tokens, targets, documents, key):
        return adapter_loss(trainable, frozen, tokens, targets, cfg, key=key, dropout=dropout,
                            ignore_index=ignore_index, view=view, documents=documents)

    def step(trainable, opt_state, batch, key=None):
        documents = batch[2] if isinstance(batch, (tuple, list)) and len(batch) == 3 else None
        tokens, targets = unpack_batch(batch[:2] if documents is not None else batch)
        check_batch(tokens, targets, cfg, ignore_index)
        leaves, treedef = tree.flatten(trainable)
        grads, loss = grads_and_value(lambda x: loss_of(tree.unflatten(x, treedef), tokens, targets, documents, key), leaves)
        grads = tree.unflatten(grads, treedef)
        grad_norm = optim.global_norm(grads)
        trainable, new_state = apply_optimizer(optimizer, trainable, grads, opt_state)
        n_tokens = (targets != ignore_index).sum()
        return trainable, new_state, step_metrics(loss.detach(), grad_norm, new_state, n_tokens)

    return TrainStep(optimizer.init, step, 1)
