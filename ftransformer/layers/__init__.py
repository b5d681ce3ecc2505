"""Pure layer functions, one file per step of the learning path."""

from ftransformer.layers.attention import (
    attend,
    attention_kernel,
    attention_pattern,
    multi_head_attention,
    project_out,
    project_qkv,
    kernel_here,
    scaled_dot_product_attention,
)
from ftransformer.layers.block import block, residual
from ftransformer.layers.embedding import (
    apply_rotary,
    embed_tokens,
    learned_positions,
    rotary_angles,
    rotary_tables,
    sinusoidal_positions,
)
from ftransformer.layers.feedforward import feedforward, gelu_mlp, swiglu_mlp
from ftransformer.layers.linear import linear
from ftransformer.layers.masks import Mask, cache_mask, causal_mask, self_mask
from ftransformer.layers.norm import layer_norm, norm, rms_norm

__all__ = [
    "Mask", "apply_rotary", "attend", "attention_kernel", "attention_pattern", "block", "cache_mask", "causal_mask", "embed_tokens",
    "feedforward", "gelu_mlp", "kernel_here", "layer_norm", "learned_positions", "linear", "multi_head_attention", "norm",
    "project_out", "project_qkv", "residual", "rms_norm", "rotary_angles", "rotary_tables",
    "scaled_dot_product_attention", "self_mask", "sinusoidal_positions", "swiglu_mlp",
]
