"""The axis glossary: one word per axis, used in every jaxtyping annotation and einops pattern.

==========  ===============================================================
axis        meaning
==========  ===============================================================
batch       independent sequences (any number of leading axes: ``*batch``)
seq         query positions (the tokens being processed now)
kv_seq      key/value positions (``seq`` without a cache, cache length with one)
d_model     width of the residual stream
heads       query heads
kv_heads    key/value heads (``heads`` for MHA, fewer for GQA, 1 for MQA)
head_dim    width of one head (``d_model // heads``)
d_ff        hidden width of the feed-forward layer
vocab       number of token ids
layers      transformer blocks
max_seq     rows of a position table (``max_seq_len``)
==========  ===============================================================

The aliases below are the annotations layers use; jaxtyping checks them when the import hook is on
(the test suite turns it on) and they cost nothing otherwise.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

AXES = ("batch", "seq", "kv_seq", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "vocab", "layers", "max_seq")

Tokens = Int[Tensor, "*batch seq"]
Residual = Float[Tensor, "*batch seq d_model"]
Logits = Float[Tensor, "*batch seq vocab"]
Positions = Int[Tensor, "*batch seq"]
AttnMask = Bool[Tensor, "*batch seq kv_seq"]

__all__ = ["AXES", "Tokens", "Residual", "Logits", "Positions", "AttnMask", "Bool", "Float", "Int", "Tensor"]
