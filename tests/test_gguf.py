"""GGUF in and out: ``load_gguf`` against transformers' GGUF loader and the models themselves, dequantization
bit for bit against ``gguf.quants.dequantize``, ``save_gguf`` round trips, and the errors."""

import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer.interop.gguf import load_gguf, save_gguf

import gguf_tiny
from hf_tiny import hf_logits, tokens

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def transformers_gguf(path):
    """transformers' own GGUF load of ``path`` (float32, eager attention)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(gguf_tiny.CASES))
def test_logits_equal_the_model_and_transformers_gguf_load(case, tmp_path):
    model = gguf_tiny.build_model(case)
    arch = gguf_tiny.CASES[case][1]
    path = tmp_path / f"{case}.gguf"
    gguf_tiny.write(path, model, arch, name=gguf_tiny.CASES[case][3])
    cfg, params = load_gguf(path)
    x = tokens(2, 11)
    ours = ft.forward(params, x, cfg)
    torch.testing.assert_close(ours, hf_logits(model, x), rtol=1e-5, atol=1e-5)
    if case in gguf_tiny.TRANSFORMERS_READS:
        torch.testing.assert_close(ours, hf_logits(transformers_gguf(path), x), rtol=1e-5, atol=1e-5)
