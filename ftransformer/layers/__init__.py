"""Pure layer functions, one file per step of the learning path."""

from ftransformer.layers.attention import (
    attend,
    attention_pattern,
    causal_mask,
    multi_head_attention,
    project_out,
    project_qkv,
    scaled_dot_product_attention,
)
from ftransformer.layers.block import block, residual
from ftransformer.layers.embedding import (
    apply_rotary,
    embed_tokens,
    learned_positions,
    rotary_angles,
    sinusoidal_positions,
)
from ftransformer.layers.feedforward import feedforward, gelu_mlp, swiglu_mlp
from ftransformer.layers.linear import linear
from ftransformer.layers.norm import layer_norm, norm, rms_norm

__all__ = [
    "apply_rotary", "attend", "attention_pattern", "block", "causal_mask", "embed_tokens", "feedforward",
    "gelu_mlp", "layer_norm", "learned_positions", "linear", "multi_head_attention", "norm", "project_out",
    "project_qkv", "residual", "rms_norm", "rotary_angles", "scaled_dot_product_attention",
    "sinusoidal_positions", "swiglu_mlp",
]
