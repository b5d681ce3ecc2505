"""Parameter-efficient fine-tuning: low-rank adapters (LoRA, DoRA) as parameter leaves.

``lora`` wraps matrices of a parameter tree in adapters, ``merge`` folds them back into plain matrices,
``split`` / ``combine`` separate what trains from the frozen base, ``dropout`` drops the adapters' inputs for
one training forward, ``save_peft`` / ``load_peft`` read and write Hugging Face PEFT's adapter format, and
``make_adapter_step`` is a ``TrainStep`` over the trainable tree alone. ``stack_adapters``
/ ``make_stack_step`` / ``AdapterMembers`` train many adapters on one base in one vmapped step (``forward_rows``: an
adapter per batch row); ``make_private_adapter_step`` is DP-SGD on the adapters alone.
"""

from ftransformer.layers.adapter import DoRAWeight, LoRAWeight
from ftransformer.peft.adapters import DEFAULT_TARGETS, dropout, lora, merge
from ftransformer.peft.peft_format import load_peft, save_peft
from ftransformer.peft.partition import FrozenAdapter, combine, split
from ftransformer.peft.private import (
    adapter_per_example_grads, dp_epsilon, make_private_adapter_step, private_optimizer,
)
from ftransformer.peft.stack import (
    AdapterMembers, AdapterStack, forward_rows, load_member, make_stack_step, member_adapters, stack_adapters,
)
from ftransformer.peft.step import adapter_loss, make_adapter_step

__all__ = [
    "DEFAULT_TARGETS", "AdapterMembers", "AdapterStack", "DoRAWeight", "FrozenAdapter", "LoRAWeight",
    "adapter_loss", "adapter_per_example_grads", "combine", "dp_epsilon", "dropout", "forward_rows", "load_member",
    "load_peft", "lora", "make_adapter_step", "make_private_adapter_step", "make_stack_step", "member_adapters",
    "merge", "private_optimizer", "save_peft", "split", "stack_adapters",
]
