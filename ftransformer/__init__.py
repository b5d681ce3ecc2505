"""ftransformer: GPT-style transformers as pure functions over parameter pytrees, on PyTorch.

``import ftransformer as ft`` gives the everyday names (about thirty, listed in ``__all__``) and the
submodules for the rest: ``ft.layers``, ``ft.tree``, ``ft.optim``, ``ft.random``, ``ft.data``,
``ft.checkpoint``, ``ft.per_example``, ``ft.ensemble``, ``ft.precision``, ``ft.speculative``, ``ft.interp``,
``ft.interop``.
No exported function shares its name with a submodule (the functions ``ft.generate`` and ``ft.quantize``
live in ``ftransformer.generation`` and ``ftransformer.quantization``).
"""

# Submodules users reach through ``ft.``: one idea each.
from ftransformer import (
    checkpoint, data, ensemble, interop, interp, layers, optim, per_example, precision, random, recipes, speculative,
    tree,
)

# Model: config, parameters, the forward pass.
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.params import count_params, init_params
from ftransformer.model import forward, forward_with_cache, loss_fn
from ftransformer.interp import forward_with_activations

# Generation: explicit KV-cache, sampling, the decode loop.
from ftransformer.cache import KVCache, init_cache
from ftransformer.sampling import Sampling, sample
from ftransformer.decode_steps import decode_step
from ftransformer.generation import generate, generate_stream, prefill
from ftransformer.quantization import dequantize, quantize

# Training: the pure step, the loop, checkpoints, data.
from ftransformer.train import evaluate, make_train_step
from ftransformer.loop import fit
from ftransformer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ftransformer.data import load_dataset, load_tokenizer

# Pretrained weights and tokenizers.
from ftransformer.interop.hf import load_hf, save_hf
from ftransformer.interop.gguf import load_gguf, save_gguf
from ftransformer.interop.hf_gpt2 import load_hf_gpt2, to_hf_gpt2
from ftransformer.interop.hf_tokenizer import load_hf_tokenizer
from ftransformer.interop.gguf_tokenizer import load_gguf_tokenizer

__version__ = "0.1.0"

__all__ = [
    # submodules
    "checkpoint", "data", "ensemble", "interop", "interp", "layers", "loop", "optim", "per_example", "precision",
    "random", "recipes", "speculative", "tree",
    # model
    "PRESETS", "Config", "get_preset", "count_params", "init_params", "forward", "forward_with_cache", "loss_fn",
    "forward_with_activations",
    # generation
    "KVCache", "init_cache", "Sampling", "sample", "decode_step", "generate", "generate_stream", "prefill",
    "quantize", "dequantize",
    # training
    "evaluate", "make_train_step", "fit", "Checkpoint", "load_checkpoint", "save_checkpoint", "load_dataset",
    "load_tokenizer",
    # pretrained
    "load_hf", "save_hf", "load_gguf", "save_gguf", "load_hf_gpt2", "to_hf_gpt2", "load_hf_tokenizer",
    "load_gguf_tokenizer",
]
