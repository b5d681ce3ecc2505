"""Tiny GGUF files written from tiny random Hugging Face models with ``gguf.GGUFWriter``, the way llama.cpp's
``convert_hf_to_gguf.py`` writes them (independent of ``ft.save_gguf``): names from ``gguf``'s tensor-name map,
q/k rows permuted for ``llama``, Gemma's norms stored as ``1 + w``, GPT-2's matrices as ``[d_out, d_in]``,
GPT-NeoX's q/k/v as ``[q; k; v]``.
"""

import numpy as np
import torch
from einops import rearrange

from hf_tiny import VOCAB, hf_config, randomize_, UNIT_OFFSET_NORMS

# test name -> (HF family, GGUF architecture, config changes, general.name): sizes transformers' GGUF loader reads
# back as they are (it ignores some metadata: Qwen3's key_length, Phi-3's rotary fraction and window, Gemma's
# soft-caps and query scale, so those keep transformers' defaults here).
CASES = {
    "llama": ("llama", "llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e4}), "tiny"),
    "mistral": ("mistral", "llama", dict(sliding_window=None, head_dim=10), "tiny mistral"),
    "qwen2": ("qwen2", "qwen2", dict(use_sliding_window=False), "tiny"),
    "qwen3": ("qwen3", "qwen3", dict(head_dim=128, tie_word_embeddings=True), "tiny"),
    "phi3": ("phi3", "phi3", dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "tiny"),
    "gemma2": ("gemma2", "gemma2", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0), "tiny"),
    "gemma3": ("gemma3_text", "gemma3", dict(head_dim=256, query_pre_attn_scalar=256, layer_types=None, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "tiny"),
    "gemma": ("gemma", "gemma", {}, "tiny"),
    "olmo2": ("olmo2", "olmo2", {}, "tiny"),
    "gptneox": ("gpt_neox", "gptneox", {}, "tiny"),
    "gpt2": ("gpt2", "gpt2", {}, "tiny"),
}
# transformers' GGUF loader gives GPT-2 its default 1024 positions and 4 * n_embd MLP (it reads neither)
GPT2 = dict(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=1024)
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2")  # its GGUF loader knows these


def gguf_module():
    import gguf

    return gguf


def build_model(case: str, seed: int = 0, **changes):
    """A random transformers model of ``case`` (eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    family, _, options, _ = CASES[case]
    if family == "gpt2":
        from transformers import GPT2Config

        config = GPT2Config(**{**GPT2, **changes})
    else:
        config = hf_config(family, **{**options, **changes})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed, norm_center=0.0 if family in UNIT_OFFSET_NORMS else 1.0)
    return model.eval()


def _metadata(writer, arch: str, c) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch != "gpt2":
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    elif arch == "gptneox":
        writer.add_layer_norm_eps(c.layer_norm_eps)
        writer.add_parallel_residual(c.use_parallel_residual)
    else:
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "sliding_window", None) is not None and arch in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_pad_token_id(0)  # in the vocabulary (transformers' Phi-3 default, 32000, is not)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _as_written(name: str, w: torch.Tensor, arch: str, c) -> torch.Tensor:
    """What llama.cpp's converter stores for the HF tensor ``w`` named (in GGUF) ``name``."""
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
        return rearrange(w, "(heads two half) ... -> (heads half two) ...", heads=heads, two=2)
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        return w + 1
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
        return w.T  # HF's Conv1D is [d_in, d_out]
    if arch == "gptneox" and ".attn_qkv." in name:
        return rearrange(w, "(heads qkv hd) ... -> (qkv heads hd) ...", qkv=3, heads=c.num_attention_heads)
    return w


def hf_names(model, arch: str) -> dict[str, str]:
    """``{GGUF name: HF name}`` of the tensors llama.cpp's converter writes for ``model``."""
    gguf = gguf_module()
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    out = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and model.config.tie_word_embeddings and arch != "gpt2":
            continue  # llama.cpp writes GPT-2's tied head out as output.weight; the others it leaves out
        if key.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
            continue
        stem, _, suffix = key.rpartition(".")
        out[f"{names.get_name(stem)}.{suffix}"] = key
    return out


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """``{GGUF name: float32 array}`` of ``model`` as llama.cpp's converter names and lays them out."""
    sd = model.state_dict()
    return {name: _as_written(name, sd[key].detach().float(), arch, model.config).contiguous().numpy()
            for name, key in hf_names(model, arch).items()}


def write(path, model, arch: str, *, name: str = "tiny", types=None, tensors=None, writer=None) -> None:
    """Write ``model`` (or ``tensors``: ``{GGUF name: float array, or (raw bytes, type)}``) as a GGUF file;
    ``types``: ``{GGUF name: GGMLQuantizationType}`` for the float arrays (F32 where not named); ``writer``:
    a ``GGUFWriter`` for ``path`` holding extra metadata already."""
    gguf = gguf_module()
    writer = writer or gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _metadata(writer, arch, model.config)
    for tname, data in (tensors or gguf_tensors(model, arch)).items():
        if isinstance(data, tuple):  # (raw bytes, their type)
            packed, qtype = data
        else:
            qtype = (types or {}).get(tname, gguf.GGMLQuantizationType.F32)
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(tname, packed, raw_dtype=qtype if packed.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(rows: int, cols: int, qtype, seed: int = 0) -> np.ndarray:
    """Random bytes of a ``[rows, cols]`` tensor of the block type ``qtype`` with small finite f16 scales."""
    gguf = gguf_module()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    T = gguf.GGMLQuantizationType
    scale_at = {T.Q4_K: (0, 4), T.Q5_K: (0, 4), T.Q6_K: (size - 2, size)}.get(qtype, (0, 2))
    lo, hi = scale_at
    scales = (rng.random((rows, cols // block, (hi - lo) // 2)) * 0.01).astype(np.float16)
    data[..., lo:hi] = scales.view(np.uint8).reshape(rows, cols // block, hi - lo)
    return data.reshape(rows, cols // block * size)
