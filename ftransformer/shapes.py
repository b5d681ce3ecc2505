"""The axis glossary: one word per axis, used in every jaxtyping annotation and einops pattern.

=============  ===============================================================
axis           meaning
=============  ===============================================================
batch          independent sequences (any number of leading axes: ``*batch``)
seq            query positions (the tokens being processed now)
kv_seq         key/value positions (``seq`` without a cache, cache length with one)
d_model        width of the residual stream
heads          query heads
kv_heads       key/value heads (``heads`` for MHA, fewer for GQA, 1 for MQA)
group          query heads per key/value head (``heads // kv_heads``)
head_dim       width of one head (``d_model // heads``)
half           one rotary angle per pair of rotated channels (``rotary_dim // 2``: ``head_dim // 2`` unless partial)
pair           the two channels one rotary angle turns (llama.cpp stores them side by side, Hugging Face half apart)
width          the feature width of an activation site (d_model, d_ff, ...: whatever the site holds)
rank           the rank of a low-rank adapter or edit (LoRA, DoRA, LoReFT)
k              the size of a chosen subset: top-k eigenvalues, a DAS subspace, one-hot choices of a sweep
cols           the columns of a matrix parameter that need not be square (checked by the function itself)
scales         the scale values of a steering sweep
probes         the random probe vectors of a stochastic estimate (Hutchinson, stochastic Lanczos quadrature)
iters          the steps of a Lanczos run
grid           the points a spectral density is evaluated at
d_ff           hidden width of the feed-forward layer
d_in, d_out    input and output width of one ``linear``
vocab          number of token ids
layers         transformer blocks
layers_plus_1  the residual stream's read-outs: the embedding, then after each block
max_seq        rows of a position table (``max_seq_len``)
member         models of an ensemble (stacked params, one per member; also a stack of SAEs)
rows           activation vectors laid flat (tokens of many sequences, one row each)
d_sae          latents of a sparse autoencoder
features       known directions of synthetic superposition data
qkv            the three parts of a fused projection: queries, keys, values (GPT-NeoX's interleaved layout)
writers        nodes of the edge graph that write to the residual stream: the embedding, every head, every MLP
readers        nodes of the edge graph that read it: every head's q/k/v input, every MLP input, the logits
edges          a stack of edge masks or edge runs, one per edge (or per circuit size)
steps          the points of an integrated-gradients path (EAP-IG's alphas)
blocks         the quantization blocks of a 4-bit matrix (each weight's block shares one absmax)
block          the weights of one quantization block (64 for NF4)
superblocks    groups of 256 blocks whose absmax values share one float32 scale (NF4's double quantization)
code           the entries of a quantization code book (bitsandbytes' 8-bit dynamic map)
queries        query sequences of an influence computation (rows of a score matrix)
=============  ===============================================================

The aliases below are the annotations layers use; jaxtyping checks them when the import hook is on
(the test suite turns it on) and they cost nothing otherwise.
"""

import string

from jaxtyping import Bool, Float, Int
from torch import Tensor

AXES = (
    "batch", "seq", "kv_seq", "d_model", "heads", "kv_heads", "group", "head_dim", "half", "d_ff", "d_in", "d_out",
    "vocab", "layers", "layers_plus_1", "max_seq", "member", "rows", "d_sae", "features", "qkv", "pair", "width", "rank", "k", "cols", "scales", "probes", "iters", "grid",
    "writers", "readers", "edges", "steps", "blocks", "block", "superblocks", "code", "queries",
)

Tokens = Int[Tensor, "*batch seq"]
Residual = Float[Tensor, "*batch seq d_model"]
Logits = Float[Tensor, "*batch seq vocab"]
Positions = Int[Tensor, "*batch seq"]
# Which keys each query may see: Bool (True: may attend), or the same as an additive bias (0 / -inf).
AttnMask = Bool[Tensor, "*#batch seq kv_seq"]
AttnBias = Float[Tensor, "*#batch seq kv_seq"]
# A random key (``ftransformer.random``): an int64 scalar; ``random.split`` gives a vector of them.
Key = Int[Tensor, ""]



def einsum_equation(pattern: str) -> str:
    """A ``torch.einsum`` equation from one written in the glossary's words.

    ``"... heads seq head_dim, heads head_dim d_model -> ... heads seq d_model"`` becomes
    ``"...ebh,ehd->...ebd"``. Translate once, at import: einops' own ``einsum`` parses its pattern on
    every call, which one-token decoding would pay in every layer.
    """
    letters = dict(zip(AXES, string.ascii_letters))
    sides = []
    for side in pattern.replace("->", ",->,").split(","):
        words = side.split()
        unknown = [w for w in words if w not in letters and w not in ("...", "->")]
        if unknown:
            raise ValueError(f"einsum pattern {pattern!r} uses {unknown}, not in the glossary {AXES}")
        sides.append("".join(w if w in ("...", "->") else letters[w] for w in words))
    return ",".join(sides).replace(",->,", "->")


__all__ = [
    "AXES", "Tokens", "Residual", "Logits", "Positions", "AttnMask", "AttnBias", "Key", "einsum_equation",
    "Bool", "Float", "Int", "Tensor",
]
