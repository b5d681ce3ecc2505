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
# [area: optim/train]
# [area: data/checkpoint]
# [area: interop]

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Config", "count_params", "cross_entropy", "format_breakdown", "forward", "get_preset",
    "init_params", "layers", "loss_fn", "param_breakdown", "random", "tree_flatten_with_paths", "tree_leaves",
    "tree_map", "tree_to", "tree_unflatten_paths",
]
