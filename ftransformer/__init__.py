"""ftransformer: GPT-style transformers as pure functions over parameter pytrees, on PyTorch.

The whole public API is re-exported here: ``import ftransformer as ft``.
"""

from ftransformer import layers, random
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.model import cross_entropy, forward, loss_fn
from ftransformer.params import (
    count_params,
    format_breakdown,
    init_params,
    param_breakdown,
    tree_flatten_with_paths,
    tree_leaves,
    tree_map,
    tree_to,
    tree_unflatten_paths,
)

# Each area below re-exports its public names; keep one area's lines together.
# [area: cache/generate]
from ftransformer.cache import KVCache, init_cache
from ftransformer.generation import (
    Sampling,
    decode_step,
    generate,
    generate_stream,
    generate_stream_sliding,
    prefill,
    sample,
)
from ftransformer import speculative
from ftransformer.model import forward_with_cache
from ftransformer.quantization import dequantize, quantize
# [area: optim/train]
from ftransformer import optim
from ftransformer.train import evaluate, make_train_step
# [area: data/checkpoint]
from ftransformer import checkpoint, data, recipes
from ftransformer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ftransformer.data import BPETokenizer, CharTokenizer, load_dataset, load_tokenizer
from ftransformer.loop import fit
# [area: vmap]
from ftransformer import batched, ensemble, per_example
from ftransformer.ensemble import init_ensemble, stack_params, unstack_params
from ftransformer.per_example import gradient_noise_scale, per_example_grad_norms, per_example_grads
# [area: interop]
from ftransformer import interop
from ftransformer.interop.hf_gpt2 import load_hf_gpt2, to_hf_gpt2

# [area: interp]
from ftransformer import interp
from ftransformer.interp import forward_with_activations, head_ablation_sweep

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Config", "count_params", "cross_entropy", "format_breakdown", "forward", "get_preset",
    "init_params", "layers", "loss_fn", "param_breakdown", "random", "tree_flatten_with_paths", "tree_leaves",
    "tree_map", "tree_to", "tree_unflatten_paths",
    "KVCache", "decode_step", "forward_with_cache", "generate", "generate_stream", "generate_stream_sliding", "init_cache", "prefill", "sample",
    "Sampling", "speculative", "quantize", "dequantize",
    "interop", "load_hf_gpt2", "to_hf_gpt2",
    "evaluate", "make_train_step", "optim",
    "BPETokenizer", "CharTokenizer", "Checkpoint", "checkpoint", "data", "fit", "load_checkpoint", "load_dataset",
    "load_tokenizer", "recipes", "save_checkpoint",
    "forward_with_activations", "head_ablation_sweep", "interp",
    "batched", "gradient_noise_scale", "init_ensemble", "per_example_grad_norms", "per_example_grads", "stack_params",
    "unstack_params",
]
