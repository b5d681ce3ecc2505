"""Parity with transformers for the families of issue 21 (layouts other than Llama's), every feature on.

``gpt_neox``: parallel residual, rotary on half of each head, fused per-head-interleaved q/k/v, untied
unembedding. ``gemma``: (1 + w) norms, scaled embeddings, GeGLU, head_dim != d_model / n_heads, GQA.
``gemma2``: also sandwich norms, attention and final soft-caps, query_pre_attn_scalar, a window (5) on one
layer of two. ``gemma3_text``: also q/k norms and a rope per layer type (local base 1e4; global 1e6 with
linear scaling). Every parameter re-randomized (Gemma's norm weights around 0), eager attention (``hf_tiny``).
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import ftransformer as ft
from ftransformer.config import Attention, Positional
from ftransformer.params import param_breakdown
from ftransformer.interop.hf import config_from_hf_dir, load_hf, save_hf
from ftransformer.sampling import GREEDY
from hf_tiny import FAMILY_II_OPTIONS, assert_chunked_cache_equals_forward, build, hf_logits, tokens
from ftransformer.layers import attention_kernel

transformers = pytest.importorskip("transformers")

FAMILIES = list(FAMILY_II_OPTIONS)
SEQ = 14


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (transformers model, cfg, params, directory) for each family's tiny random model."""
    root = tmp_path_factory.mktemp("families2")
    return {f: (build(f, root / f, seed=1), *load_hf(root / f), root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits_equal_transformers(models, family, kernel):
    model, cfg, params, _ = models[family]
    x = tokens(2, SEQ)
    torch.testing.assert_close(ft.forward(params, x, cfg), hf_logits(model, x), rtol=1e-5, atol=1e-5)


# family -> {feature: the Config change that switches it off}
FEATURES_OFF = {
    "gemma": {"norm 1 + w": dict(norm_unit_offset=False), "embedding scale": dict(embed_scale=False),
              "GeGLU": dict(activation="swiglu")},
    "gemma2": {"sandwich norms": dict(norm_position="pre"), "attention soft-cap": {"attention": {"softcap": None}},
               "logit soft-cap": dict(logit_softcap=None), "query_pre_attn_scalar": {"attention": {"scale": None}},
               "windows": {"attention": {"window": None}}},
    "phi3": {"partial rotary": {"positional": {"rotary_dim": None}}, "window": {"attention": {"window": None}}},
    "olmo2": {"norms after the sublayers": dict(norm_position="pre"),
              "q/k norm over the projection": {"attention": {"qk_norm": False}}},
    "gemma3_text": {"q/k norm": {"attention": {"qk_norm": False}}, "local rope base": dict(window_rope_base=None),
                    "linear rope scaling (global layers)": dict(rope_scaling=None)},
    "gpt_neox": {"partial rotary": {"positional": {"rotary_dim": None}}, "parallel residual": dict(residual="sequential")},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_feature_changes_the_logits(models, family):
    """The parity above would hold vacuously if a feature did nothing on these models: each one does."""
    _, cfg, params, _ = models[family]
    x = tokens(2, SEQ)
    base = ft.forward(params, x, cfg)
    for feature, off in FEATURES_OFF[family].items():
        for spec in ("attention", "positional"):
            if isinstance(off.get(spec), dict):  # that spec's fields to change
                off = {spec: getattr(cfg, spec).replace(**off[spec])}
        assert (ft.forward(params, x, cfg.replace(**off)) - base).abs().max() > 1e-3, feature


def test_gpt_neox_config_becomes_features(models):
    cfg = models["gpt_neox"][1]
    assert (cfg.layout.residual, cfg.rotary_dim, cfg.head_dim, cfg.norm.kind, cfg.bias, cfg.activation, cfg.embeddings.tie) == (
        "parallel", 4, 8, "layernorm", True, "gelu", False)


def test_gpt_neox_older_config_keys_are_read(models, tmp_path):
    """Pythia's own config.json predates rope_parameters: ``rotary_pct`` and ``rotary_emb_base``."""
    hf = json.loads((models["gpt_neox"][3] / "config.json").read_text())
    del hf["rope_parameters"]
    hf.update(rotary_pct=0.25, rotary_emb_base=500.0)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = config_from_hf_dir(tmp_path)
    assert (cfg.rotary_dim, cfg.positional.base) == (2, 500.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_transformers(models, family):
    model, cfg, params, _ = models[family]
    prompt = tokens(2, 4, seed=1)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=SEQ, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert expected.shape == (2, 4 + SEQ)
    assert torch.equal(ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_cache_in_chunks_equals_forward(models, family):
    _, cfg, params, _ = models[family]
    x = tokens(2, SEQ, seed=2)
    assert_chunked_cache_equals_forward(params, cfg, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_then_transformers_gives_the_same_logits(models, family, tmp_path):
    model, cfg, params, directory = models[family]
    save_hf(params, cfg, tmp_path)
    theirs, ours = load_file(directory / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # the fused q/k/v interleaved again, bit for bit
        assert torch.equal(ours[key], theirs[key]), key
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = tokens(2, SEQ, seed=3)
    assert torch.equal(hf_logits(again, x), hf_logits(model, x))
    cfg2, params2 = load_hf(tmp_path)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(params2), ft.tree.leaves(params)))


@attention_kernel("einsum")
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_are_the_bits_transformers_computes(models, family):
    """Every cast where transformers puts it (norms, embedding scale, rotary, the parallel sum's order): on
    the einsum path, which multiplies and softmaxes as eager attention does, the bfloat16 logits are equal."""
    _, _, _, directory = models[family]
    model16 = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                                dtype=torch.bfloat16).eval()
    cfg16, params16 = load_hf(directory, dtype=torch.bfloat16)
    x = tokens(2, SEQ, seed=4)
    ours = ft.forward(params16, x, cfg16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, hf_logits(model16, x))


def test_parallel_activations_say_what_each_site_is(models):
    """Parallel layout: ``resid_mid`` is the block input plus the attention's write alone, and
    ``resid_post`` adds the MLP's write, computed from the block input (not from ``resid_mid``)."""
    _, cfg, params, _ = models["gpt_neox"]
    x = tokens(1, SEQ, seed=5)
    logits, acts = ft.forward_with_activations(params, x, cfg)
    assert torch.equal(logits, ft.forward(params, x, cfg))
    b, p = acts["blocks"][1], params["blocks"][1]
    attn_write = b["attn"]["head_out"].sum(-3) + p["attn"]["b_o"]
    torch.testing.assert_close(b["resid_mid"], b["resid_pre"] + attn_write, rtol=1e-5, atol=1e-5)
    from ftransformer.layers.feedforward import feedforward
    from ftransformer.layers.norm import norm
    mlp_write = feedforward(p["mlp"], norm(p["ln2"], b["resid_pre"], cfg.norm), cfg)
    torch.testing.assert_close(b["resid_post"], b["resid_mid"] + mlp_write, rtol=1e-5, atol=1e-5)


def test_shared_norm_parallel_residual_is_parallel_with_ln2_equal_to_ln1(models):
    """GPT-J / Phi-2's one-norm layout: no ``ln2`` in the tree, and the numbers of ``parallel`` with ln2 := ln1."""
    _, cfg, params, _ = models["gpt_neox"]
    shared = cfg.replace(residual="parallel_shared_norm")
    assert "ln2" not in ft.init_params(shared)["blocks"][0]
    assert ft.count_params(ft.init_params(shared)) == param_breakdown(shared)["total"]
    no_ln2 = {**params, "blocks": [{k: v for k, v in b.items() if k != "ln2"} for b in params["blocks"]]}
    ln2_is_ln1 = {**params, "blocks": [{**b, "ln2": b["ln1"]} for b in params["blocks"]]}
    x = tokens(2, SEQ, seed=6)
    torch.testing.assert_close(ft.forward(no_ln2, x, shared), ft.forward(ln2_is_ln1, x, cfg), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual='parallel_shared_norm' cannot be expressed in gpt_neox"):
        save_hf(no_ln2, shared, "unused")


@pytest.mark.parametrize(("change", "message"), [
    (dict(attention_bias=False), "attention_bias=False; supported: True"),
    (dict(hidden_act="relu"), "hidden_act='relu'; supported: 'gelu'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.4}),
     r"rotates int\(head_dim=8 \* 0.4\) = 3 channels; expected an even number"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope type 'yarn'"),
])
def test_gpt_neox_refuses_what_it_cannot_express(models, tmp_path, change, message):
    hf = {**json.loads((models["gpt_neox"][3] / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        config_from_hf_dir(tmp_path)


def test_config_validates_the_new_choices():
    base = dict(vocab_size=11, d_model=16, n_heads=2, n_layers=1, d_ff=8, max_seq_len=8)
    with pytest.raises(ValueError, match="rotary_dim=3 needs an even number of channels <= head_dim=8"):
        ft.Config.from_flat(**base, positional=Positional("rope", rotary_dim=3))
    with pytest.raises(ValueError, match="Positional.rotary_dim=4 needs kind='rope', got kind='learned'"):
        ft.Config.from_flat(**base, positional=Positional(rotary_dim=4))
    with pytest.raises(ValueError, match="residual='parallel' needs norm_position='pre'"):
        ft.Config.from_flat(**base, residual="parallel", norm_position="post")
    with pytest.raises(ValueError, match="Layout.residual='both' is not one of"):
        ft.Config.from_flat(**base, residual="both")
    with pytest.raises(ValueError, match="norm_scale_in_float32=True needs norm_upcast=True"):
        ft.Config.from_flat(**base, norm="rmsnorm", norm_scale_in_float32=True)
    with pytest.raises(ValueError, match="Norm.unit_offset=True needs kind='rmsnorm'"):
        ft.Config.from_flat(**base, norm_unit_offset=True)
    with pytest.raises(ValueError, match="Positional.window_base=10000.0 needs kind='rope'"):
        ft.Config.from_flat(**base, window_rope_base=1e4)
    with pytest.raises(ValueError, match="positional.window_base=10000.0 needs sliding windows"):
        ft.Config.from_flat(**base, positional="rope", window_rope_base=1e4)
    with pytest.raises(ValueError, match="Embeddings.logit_softcap=0.0 must be a positive number"):
        ft.Config.from_flat(**base, logit_softcap=0.0)


def test_an_intervention_on_resid_mid_flows_on_in_the_parallel_layout(models):
    _, cfg, params, _ = models["gpt_neox"]
    x = tokens(1, SEQ, seed=8)
    logits, acts = ft.forward_with_activations(params, x, cfg)
    zeroed, acts0 = ft.forward_with_activations(params, x, cfg, interventions={"blocks.1.resid_mid": torch.zeros_like})
    b = acts["blocks"][1]
    torch.testing.assert_close(acts0["blocks"][1]["resid_post"], b["resid_post"] - b["resid_mid"], rtol=1e-5, atol=1e-5)
    assert (zeroed - logits).abs().max() > 1e-3


def test_gemma_configs_become_features(models):
    g1, g2 = models["gemma"][1], models["gemma2"][1]
    for cfg in (g1, g2):
        assert (cfg.norm.unit_offset, cfg.embeddings.scale, cfg.activation, cfg.head_dim, cfg.n_kv_heads) == (
            True, True, "geglu_tanh", 16, 2)
    assert (g1.layout.norm_position, g1.attention.scale, g1.attention.softcap, g1.embeddings.logit_softcap) == ("pre", None, None, None)
    assert (g2.layout.norm_position, g2.attention.scale, g2.attention.softcap, g2.embeddings.logit_softcap) == ("sandwich", 12**-0.5, 5.0, 4.0)
    assert g2.attention.window == (5, None)  # sliding first, then global, alternating
    assert set(ft.init_params(g2)["blocks"][0]) == {"ln1", "attn", "ln1_post", "ln2", "mlp", "ln2_post"}


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_bfloat16_embedding_and_norms_round_as_transformers(models, family, tmp_path):
    """sqrt(d_model) rounded to bfloat16 before the multiply, and the (1 + w) norm in float32 then cast: the
    bfloat16 embedding and first norm are the very bits transformers computes."""
    model, cfg, params, directory = models[family]
    model16 = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                                dtype=torch.bfloat16).eval()
    cfg16, params16 = load_hf(directory, dtype=torch.bfloat16)
    x = tokens(2, SEQ, seed=7)
    from ftransformer.layers.norm import norm
    from ftransformer.model import embed
    ours = embed(params16, x, cfg16, positions=torch.arange(SEQ))
    with torch.no_grad():
        theirs = model16.model.embed_tokens(x)
        assert torch.equal(ours, theirs)
        assert torch.equal(norm(params16["blocks"][0]["ln1"], ours, cfg16.norm), model16.model.layers[0].input_layernorm(theirs))
    assert not torch.equal(ours, params16["embed"]["tokens"][x] * cfg.d_model**0.5)  # the rounding shows


def test_gemma3_config_becomes_features(models, tmp_path):
    cfg = models["gemma3_text"][1]
    assert (cfg.attention.qk_norm, cfg.positional.window_base, cfg.positional.base, cfg.positional.scaling.kind, cfg.positional.scaling.factor) == (
        True, 1e4, 1e6, "linear", 8.0)
    assert (cfg.attention.window, cfg.layout.norm_position, cfg.attention.scale) == ((5, None), "sandwich", 12**-0.5)
    # transformers 4's spelling: rope_theta, rope_local_base_freq and rope_scaling beside each other
    hf = json.loads((models["gemma3_text"][3] / "config.json").read_text())
    del hf["rope_parameters"]
    hf.update(rope_theta=5e5, rope_local_base_freq=2e3, rope_scaling={"rope_type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    old = config_from_hf_dir(tmp_path)
    assert (old.positional.base, old.positional.window_base, old.positional.scaling.factor) == (5e5, 2e3, 4.0)


def test_gemma3_multimodal_checkpoints_are_refused_by_name(models, tmp_path):
    hf = {**json.loads((models["gemma3_text"][3] / "config.json").read_text()),
          "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="model_type='gemma3'.*supported model_type: .*gemma3_text"):
        config_from_hf_dir(tmp_path)


def test_gemma2_softcaps_and_windows_show_in_the_activations(models):
    _, cfg, params, _ = models["gemma2"]
    x = tokens(1, SEQ, seed=5)
    logits, acts = ft.forward_with_activations(params, x, cfg)
    assert torch.equal(logits, ft.forward(params, x, cfg))
    assert logits.abs().max() < cfg.embeddings.logit_softcap
    pattern = acts["blocks"][0]["attn"]["pattern"][0]
    assert torch.all(pattern[:, 10, :6] == 0) and torch.all(pattern[:, 10, 6:11] > 0)  # window 5
    # sandwich: resid_mid is resid_pre plus the attention output after its own norm (ln1_post)
    from ftransformer.layers.norm import norm
    b, p = acts["blocks"][1], params["blocks"][1]
    attn_out = norm(p["ln1_post"], b["attn"]["head_out"].sum(-3), cfg.norm)
    torch.testing.assert_close(b["resid_mid"], b["resid_pre"] + attn_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "change", "message"), [
    ("gemma2", dict(hidden_activation="relu"), "hidden activation 'relu'; supported: 'gelu_pytorch_tanh'"),
    ("gemma", dict(attention_bias=True), "attention_bias=True; supported: False"),
    ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types=\\['sliding_attention'\\]; expected 2 of"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
     "scales the sliding layers' rope"),
])
def test_gemma_refuses_what_it_cannot_express(models, tmp_path, family, change, message):
    hf = {**json.loads((models[family][3] / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        config_from_hf_dir(tmp_path)


def test_save_hf_refuses_a_gemma_it_cannot_write(models, tmp_path):
    _, cfg, params, _ = models["gemma"]
    with pytest.raises(ValueError, match="cannot be expressed in gemma \\(pre-norm, no scale"):
        save_hf(params, cfg.replace(logit_softcap=3.0), tmp_path)
    with pytest.raises(ValueError, match="Config.embeddings.scale=False cannot be expressed in gemma"):
        save_hf(params, cfg.replace(embed_scale=False), tmp_path)
    llama_like = cfg.replace(norm_unit_offset=False, activation="swiglu", embed_scale=False, logit_softcap=3.0)
    with pytest.raises(ValueError, match="Config.embeddings.logit_softcap=3.0 has no Hugging Face family here"):
        save_hf(params, llama_like, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["compile", "aot"])
def test_compiled_decoding_keeps_softcaps_windows_and_sandwich_norms(models, step, no_typecheck):
    """The compiled decode steps (torch.compile, AOTInductor) cap the scores and logits and mask the windows."""
    model, cfg, params, _ = models["gemma2"]
    prompt = tokens(2, 4, seed=1)
    eager = ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY)
    assert torch.equal(ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY, step=step), eager)


def test_olmo2_config_becomes_features(models):
    cfg, params = models["olmo2"][1], models["olmo2"][2]
    a = cfg.attention
    assert (cfg.layout.norm_position, a.qk_norm, a.qk_norm_over, (cfg.norm.float32 != "none")) == ("output", True, "projection", True)
    attn = params["blocks"][0]["attn"]
    assert attn["q_norm"]["scale"].shape == (cfg.n_heads * cfg.head_dim,)
    assert attn["k_norm"]["scale"].shape == (cfg.n_kv_heads * cfg.head_dim,)
    assert ft.count_params(params) == param_breakdown(cfg)["total"]


def test_olmo2_refusals(models, tmp_path):
    _, cfg, params, _ = models["olmo2"]
    with pytest.raises(ValueError, match="Config.attention=.*cannot be expressed in olmo2"):
        save_hf(params, cfg.replace(attention=dataclasses.replace(cfg.attention, window=4)), tmp_path)
    with pytest.raises(ValueError, match="Attention.qk_norm_over='heads' is not one of 'head', 'projection'"):
        Attention(qk_norm=True, qk_norm_over="heads")


def test_phi3_config_becomes_features_and_fused_tensors_split(models):
    model, cfg, params, _ = models["phi3"]
    assert (cfg.rotary_dim, cfg.attention.window, cfg.activation, (cfg.norm.float32 != "none")) == (4, 5, "swiglu", True)
    sd, b = model.state_dict(), params["blocks"][1]
    assert torch.equal(b["attn"]["w_qkv"], sd["model.layers.1.self_attn.qkv_proj.weight"].T)
    gate, up = sd["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    assert torch.equal(b["mlp"]["w_gate"], gate.T) and torch.equal(b["mlp"]["w_in"], up.T)


@pytest.mark.parametrize(("rope", "message"), [
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 2, "long_factor": [2.0] * 2,
      "original_max_position_embeddings": 32}, "rope type 'longrope', which is not implemented yet"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.4},
     r"phi3 config.json rotates int\(head_dim=8 \* 0.4\) = 3 channels"),
])
def test_phi3_refuses_longrope_by_name(models, tmp_path, rope, message):
    hf = {**json.loads((models["phi3"][3] / "config.json").read_text()), "rope_parameters": rope}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        config_from_hf_dir(tmp_path)


def test_partial_rotary_is_refused_where_the_family_has_none(models, tmp_path):
    hf = {**json.loads((models["olmo2"][3] / "config.json").read_text()), "partial_rotary_factor": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="olmo2 config.json has partial_rotary_factor=0.5; supported: 1.0"):
        config_from_hf_dir(tmp_path)
    _, cfg, params, _ = models["phi3"]
    with pytest.raises(ValueError, match="rotary_dim=4 needs phi3, which cannot express bias=True"):
        save_hf(params, cfg.replace(bias=True), tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_cli_generate_runs_the_new_families_from_their_directory(family, tmp_path, capsys):
    """``generate --hf-dir`` on a soft-capped, windowed Gemma 2 and a parallel-residual GPT-NeoX prints
    what ``ft.generate`` makes (the checkpoint's own tokenizer beside it)."""
    from ftransformer.cli import main
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer
    from test_hf_tokenizer import byte_level_backend
    from test_hf_tokenizer import save_hf as save_tokenizer

    backend = byte_level_backend()
    build(family, tmp_path, seed=3, vocab_size=backend.get_vocab_size())
    save_tokenizer(tmp_path, backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok = load_hf_tokenizer(tmp_path)
    cfg, params = load_hf(tmp_path)
    text = "Hello there"
    ids = tok.encode(text)
    out = ft.generate(params, torch.tensor([ids]), cfg, max_new_tokens=8, sampling=GREEDY, stop_tokens=tok.stop_tokens)
    reply = out[0, len(ids):].tolist()
    reply = reply[: next((i for i, t in enumerate(reply) if t in tok.stop_tokens), len(reply))]
    assert main(["generate", "--hf-dir", str(tmp_path), "--prompt", text, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text + tok.decode(reply) + "\n"
