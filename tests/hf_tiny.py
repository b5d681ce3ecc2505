"""Tiny random Hugging Face checkpoints of every supported Llama-like family, written by ``transformers``.

Every parameter is re-randomized after construction (default init leaves biases at zero and norms at
one, which would hide a missing bias or a swapped norm), attention is eager, and the model is written
with ``save_pretrained``. Every size differs from the others, so a swapped axis fails.
"""

import torch

VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# family -> the features its test model switches on (windows shorter than the test sequences)
FAMILY_OPTIONS = {
    "llama": dict(rope_parameters=LLAMA3_ROPE),
    "mistral": dict(sliding_window=5, head_dim=10),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(head_dim=10, tie_word_embeddings=True),
}


# The families of issue 21 (layouts other than Llama's), with their sizes: head_dim 8, so a rotated
# fraction of it is a whole even number of channels.
SIZES_II = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
FAMILY_II_OPTIONS = {
    "olmo2": dict(num_key_value_heads=2),
    "phi3": dict(num_key_value_heads=2, sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   attn_logit_softcapping=5.0, final_logit_softcapping=4.0),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention"], rope_parameters={
                            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "gpt_neox": dict(use_parallel_residual=True, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
}


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids below ``VOCAB``, the same for the same seed."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    """A transformers model's logits for ``x``, without gradients."""
    with torch.no_grad():
        return model(x).logits


def assert_chunked_cache_equals_forward(params: dict, cfg, x: torch.Tensor) -> None:
    """``forward_with_cache`` over ``x`` in four uneven chunks (a cache two slots longer than used: those
    are masked) gives ``forward``'s logits."""
    import ftransformer as ft

    seq = x.shape[-1]
    cache = ft.init_cache(cfg, batch_size=x.shape[0], max_len=seq + 2)
    chunks = []
    for start, stop in ((0, 3), (3, 9), (9, 10), (10, seq)):
        logits, cache = ft.forward_with_cache(params, x[:, start:stop], cache, cfg)
        chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, dim=1), ft.forward(params, x, cfg), rtol=1e-5, atol=1e-5)


def assert_bfloat16_within_rounding(model, directory, x: torch.Tensor) -> None:
    """``load_hf(directory, dtype=bfloat16)``'s logits and transformers' bfloat16 model's differ by less
    than bfloat16 rounding moves either of them from ``model``'s float32 logits."""
    import ftransformer as ft
    from ftransformer.interop.hf import load_hf
    from transformers import AutoModelForCausalLM

    model16 = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.bfloat16).eval()
    cfg16, params16 = load_hf(directory, dtype=torch.bfloat16)
    exact = hf_logits(model, x)
    theirs = hf_logits(model16, x).float()
    ours = ft.forward(params16, x, cfg16)
    assert ours.dtype == torch.bfloat16
    rounding = (theirs - exact).abs().max()
    assert rounding > 0  # bf16 did round
    assert (ours.float() - theirs).abs().max() <= 2 * rounding
    assert (ours.float() - exact).abs().max() <= 2 * rounding


def hf_config(family: str, **changes):
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gpt_neox": transformers.GPTNeoXConfig, "gemma": transformers.GemmaConfig,
               "gemma2": transformers.Gemma2Config, "olmo2": transformers.Olmo2Config,
               "phi3": transformers.Phi3Config, "gemma3_text": transformers.Gemma3TextConfig}
    if family in FAMILY_II_OPTIONS:
        return classes[family](**{**SIZES_II, **FAMILY_II_OPTIONS[family], **changes})
    return classes[family](**{**SIZES, **FAMILY_OPTIONS[family], **changes})


# Families whose norms scale by 1 + w: their norm weights are drawn around 0.
UNIT_OFFSET_NORMS = ("gemma", "gemma2", "gemma3_text")


def randomize_(model, seed: int = 0, *, norm_center: float = 1.0) -> None:
    """Every parameter drawn anew: weights ~ N(0, 0.3^2), norm scales ~ norm_center + N(0, 1), biases ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.3 if p.ndim > 1 else noise + (norm_center if "norm" in name else 0.0))


def build(family: str, directory, *, seed: int = 0, **changes):
    """A random ``family`` model saved to ``directory``; returns the model (eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(family, **changes), attn_implementation="eager")
    randomize_(model, seed, norm_center=0.0 if family in UNIT_OFFSET_NORMS else 1.0)
    model.eval()
    model.save_pretrained(directory)
    return model
