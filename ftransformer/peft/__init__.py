"""Parameter-efficient fine-tuning: low-rank adapters (LoRA, DoRA) as parameter leaves.

``lora`` wraps matrices of a parameter tree in adapters, ``merge`` folds them back into plain matrices,
``split`` / ``combine`` separate what trains from the frozen base, ``dropout`` drops the adapters' inputs for
one training forward, ``save_peft`` / ``load_peft`` read and write Hugging Face PEFT's adapter format, and
``make_adapter_step`` is a ``TrainStep`` over the trainable tree alone.
"""

from ftransformer.layers.adapter import DoRAWeight, LoRAWeight
from ftransformer.peft.adapters import DEFAULT_TARGETS, dropout, lora, merge
from ftransformer.peft.peft_format import load_peft, save_peft
from ftransformer.peft.partition import FrozenAdapter, combine, split
from ftransformer.peft.step import adapter_loss, make_adapter_step

__all__ = [
    "DEFAULT_TARGETS", "DoRAWeight", "FrozenAdapter", "LoRAWeight", "adapter_loss", "combine", "dropout", "load_peft",
    "lora", "make_adapter_step", "merge", "save_peft", "split",
]
