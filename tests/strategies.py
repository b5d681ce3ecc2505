"""Hypothesis strategies shared by the property-based tests."""

from hypothesis import strategies as st

import ftransformer as ft
from ftransformer.config import ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONALS
from ftransformer.layers.attention import KERNELS


@st.composite
def configs(draw, min_seq_len: int = 4, max_seq_len: int = 12) -> ft.Config:
    """Small random configs over every architectural switch (GQA/MQA included)."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    return ft.Config.from_flat(
        vocab_size=draw(st.integers(5, 40)),
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=draw(st.integers(1, 2)),
        d_ff=draw(st.integers(3, 17)),
        max_seq_len=draw(st.integers(min_seq_len, max_seq_len)),
        bias=draw(st.booleans()),
        norm=draw(st.sampled_from(NORMS)),
        norm_position=draw(st.sampled_from(NORM_POSITIONS)),
        positional=draw(st.sampled_from(POSITIONALS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        tie_embeddings=draw(st.booleans()),
        mlp=draw(st.booleans()),
    )


# the attention kernels a property test runs on (inside ``layers.attention_kernel``)
kernels = st.sampled_from(KERNELS[1:])
