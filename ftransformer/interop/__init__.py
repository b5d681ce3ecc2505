"""Interoperability with other libraries' checkpoints: Hugging Face models in and out, every family one
entry of ``registry.FAMILIES`` (GPT-2 through ``gpt2``; Llama, Mistral, Qwen2, Qwen3, OLMo-2, Phi-3 through
``families``; GPT-NeoX / Pythia through ``neox``; Gemma 1-3 through ``gemma``), loaded and saved by ``hf``;
llama.cpp's GGUF files in and out through ``gguf``, onto the same families."""

from ftransformer.interop.gguf import load_gguf, save_gguf
from ftransformer.interop.gguf_tokenizer import load_gguf_tokenizer
from ftransformer.interop.gpt2 import check_gpt2_compatible, config_from_hf
from ftransformer.interop.hf import config_from_hf_dir, hf_state_dict, load_hf, save_hf
from ftransformer.interop.hf_gpt2 import (
    GPT2BPETokenizer,
    config_to_hf,
    load_hf_gpt2,
    load_hf_gpt2_dir,
    load_hf_gpt2_tokenizer,
    save_hf_gpt2,
    save_vocab_merges,
    to_hf_gpt2,
)
from ftransformer.interop.registry import FAMILIES, family_of

__all__ = [
    "FAMILIES", "config_from_hf_dir", "family_of", "hf_state_dict", "load_hf", "save_hf", "load_gguf", "save_gguf",
    "load_gguf_tokenizer",
    "GPT2BPETokenizer", "check_gpt2_compatible", "config_from_hf", "config_to_hf", "load_hf_gpt2",
    "load_hf_gpt2_dir", "load_hf_gpt2_tokenizer", "save_hf_gpt2", "save_vocab_merges", "to_hf_gpt2",
]
