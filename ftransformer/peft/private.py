"""Private adapters: DP-SGD on the adapter tensors alone, the frozen base shared by every example.

``adapter_per_example_grads`` is ``per_example.per_example_grads`` over the trainable tree of ``peft.split``
with the frozen tree joined inside the differentiated function (closed over, so ``vmap`` over examples never
batches the base and ``grad`` never differentiates it); ``make_private_adapter_step`` is the DP-SGD step over
it, clipped and noised by ``optim.dp_aggregate`` (``private_optimizer`` chains it with AdamW). ``dp_epsilon``
asks Opacus' RDP accountant (when ``opacus`` is installed) what epsilon a run guarantees.
"""

import math

from torch import Tensor

from ftransformer import optim, validate
from ftransformer.config import Config
from ftransformer.peft.partition import combine
from ftransformer.per_example import make_per_example_train_step, per_example_grads
from ftransformer.train import TrainStep


def _joined(frozen: dict):
    def params_of(trainable: dict) -> dict:
        return combine(trainable, frozen)

    return params_of


def adapter_per_example_grads(
    trainable: dict, frozen: dict, tokens: Tensor, targets: Tensor, cfg: Config, **options
) -> dict:
    """Every example's gradient of the adapter tensors alone (leaves of ``trainable`` gain a ``batch`` axis).

    ``options``: ``per_example_grads``' keywords (``key``, ``ignore_index``, ``chunk_size``).
    """
    return per_example_grads(trainable, tokens, targets, cfg, params_of=_joined(frozen), **options)


def make_private_adapter_step(
    cfg: Config, optimizer: optim.GradientTransformation, frozen: dict, *, ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TrainStep:
    """``make_per_example_train_step`` over the trainable tree: ``step(trainable, opt_state, batch, key)``.

    ``optimizer`` must reduce the per-example axis: start it with ``optim.dp_aggregate`` (``private_optimizer``).
    """
    return make_per_example_train_step(cfg, optimizer, ignore_index=ignore_index, chunk_size=chunk_size,
                                       params_of=_joined(frozen))


def private_optimizer(
    clip_norm: float, noise_multiplier: float, *, key: Tensor, lr: float, weight_decay: float = 0.0
) -> optim.GradientTransformation:
    """DP-SGD with AdamW: ``chain(dp_aggregate(clip_norm, noise_multiplier, key=key), adamw(lr, weight_decay))``."""
    return optim.chain(optim.dp_aggregate(clip_norm, noise_multiplier, key=key),
                       optim.adamw(lr, weight_decay=weight_decay))


def dp_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon of ``steps`` DP-SGD steps at ``delta``, from Opacus' RDP accountant (ImportError without opacus)."""
    validate.positive_number("noise_multiplier", noise_multiplier)
    validate.positive_int("steps", steps)
    for name, value in (("sample_rate", sample_rate), ("delta", delta)):
        if not (validate.is_number(value) and 0 < value < 1 and math.isfinite(value)):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as e:
        raise ImportError("dp_epsilon needs opacus (pip install opacus) for its RDP accountant") from e
    accountant = RDPAccountant()
    for _ in range(steps):  # the accountant merges equal steps into one history entry
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=delta))


__all__ = [
    "adapter_per_example_grads", "dp_epsilon", "make_private_adapter_step", "private_optimizer",
]
