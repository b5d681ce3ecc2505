"""Hugging Face GPT-2 interop: exact parity with transformers on random local models (nothing downloaded)."""

import json

import pytest
import torch

import ftransformer as ft
from ftransformer.config import flat_path
from ftransformer.interop import (
    GPT2BPETokenizer,
    config_from_hf,
    config_to_hf,
    load_hf_gpt2_dir,
    load_hf_gpt2_tokenizer,
    save_hf_gpt2,
    save_vocab_merges,
)
from ftransformer.sampling import GREEDY

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

# Every axis a different size within a config (vocab, positions, width, layers, heads, d_ff), and the
# configs differ from each other in tying, activation and epsilon.
HF_CONFIGS = {
    "tied-gelu_new": dict(vocab_size=97, n_positions=23, n_embd=40, n_layer=2, n_head=5, n_inner=56),
    "untied-gelu-eps": dict(
        vocab_size=131, n_positions=37, n_embd=48, n_layer=3, n_head=4, n_inner=None,
        activation_function="gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    ),
    "one-layer-pytorch_tanh": dict(
        vocab_size=61, n_positions=19, n_embd=24, n_layer=1, n_head=2, n_inner=72,
        activation_function="gelu_pytorch_tanh",
    ),
}


def make_hf_model(seed: int = 0, **overrides) -> "GPT2LMHeadModel":
    """A random GPT2LMHeadModel in eval mode, with LayerNorm and bias values far from their 1/0 init."""
    torch.manual_seed(seed)
    kwargs = dict(bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides})).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        # Larger output weights spread the logits, so greedy decoding has no near-ties for rounding to flip.
        model.transformer.wte.weight.mul_(20.0)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.mul_(20.0)
    return model


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def random_tokens(cfg: ft.Config, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_bin(model, directory, *, legacy_buffers: bool = True):
    """The older pytorch_model.bin layout, with the attention buffers old transformers versions saved."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = dict(model.state_dict())
    if legacy_buffers:
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(model.config.to_json_string())


def ft_config(**changes) -> ft.Config:
    """A GPT-2-compatible ftransformer config with every axis a different size."""
    base = ft.Config(
        vocab_size=53, d_model=36, n_heads=3, n_layers=2, d_ff=44, max_seq_len=29, activation="gelu_tanh"
    )
    return base.replace(**changes)


def perturbed_params(cfg: ft.Config, seed: int = 0) -> dict:
    """init_params with every leaf moved by noise (so zero biases and unit scales cannot hide a mix-up)."""
    gen = torch.Generator().manual_seed(seed)
    return ft.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=gen), ft.init_params(cfg, seed=seed))


def assert_trees_equal(a, b):
    fa, fb = ft.tree.flatten_with_paths(a), ft.tree.flatten_with_paths(b)
    assert list(fa) == list(fb)
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        assert torch.equal(fa[path], fb[path]), path


# ---------------------------------------------------------------- load: logits parity


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_logits_match_transformers(name, fmt, tmp_path):
    hf_cfg = HF_CONFIGS[name]
    model = make_hf_model(**hf_cfg)
    if fmt == "safetensors":
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        save_bin(model, tmp_path)
    cfg, params = ft.load_hf_gpt2(tmp_path)

    assert (cfg.vocab_size, cfg.max_seq_len) == (hf_cfg["vocab_size"], hf_cfg["n_positions"])
    assert cfg.d_model == hf_cfg["n_embd"]
    assert (cfg.n_layers, cfg.n_heads) == (hf_cfg["n_layer"], hf_cfg["n_head"])
    assert cfg.d_ff == (hf_cfg["n_inner"] or 4 * hf_cfg["n_embd"])
    assert cfg.embeddings.tie == hf_cfg.get("tie_word_embeddings", True)
    assert cfg.activation == ("gelu" if hf_cfg.get("activation_function") == "gelu" else "gelu_tanh")
    assert cfg.norm.eps == hf_cfg.get("layer_norm_epsilon", 1e-5)
    assert ("unembed" in params) == (not cfg.embeddings.tie)

    # A full-length batch, and a short single sequence (the leading-batch-free path).
    tokens = random_tokens(cfg, 3, cfg.max_seq_len)
    torch.testing.assert_close(ft.forward(params, tokens, cfg), hf_logits(model, tokens), atol=1e-5, rtol=0)
    short = tokens[1, :7]
    torch.testing.assert_close(ft.forward(params, short, cfg), hf_logits(model, short[None])[0], atol=1e-5, rtol=0)


def test_load_state_dict_with_or_without_prefix_and_inferred_config():
    # 64-wide heads, so the head count can be inferred from a bare state dict.
    model = make_hf_model(vocab_size=53, n_positions=11, n_embd=128, n_layer=2, n_head=2, n_inner=80)
    tokens = random_tokens(ft.Config(vocab_size=53, d_model=8, n_heads=1, n_layers=1, d_ff=8, max_seq_len=11), 2, 11)
    expected = hf_logits(model, tokens)
    for sd in (model.state_dict(), model.transformer.state_dict()):
        cfg, params = ft.load_hf_gpt2(sd)
        assert cfg == ft.Config(
            vocab_size=53, d_model=128, n_heads=2, n_layers=2, d_ff=80, max_seq_len=11, activation="gelu_tanh"
        )
        torch.testing.assert_close(ft.forward(params, tokens, cfg), expected, atol=1e-5, rtol=0)


def test_inferred_config_detects_untied_head():
    model = make_hf_model(
        vocab_size=53, n_positions=11, n_embd=64, n_layer=1, n_head=1, n_inner=24, tie_word_embeddings=False
    )
    cfg, params = ft.load_hf_gpt2(model.state_dict())
    assert not cfg.embeddings.tie
    assert torch.equal(params["unembed"]["w"], model.lm_head.weight.detach().T)


def test_explicit_config_kinds_agree(tmp_path):
    hf_cfg = HF_CONFIGS["untied-gelu-eps"]
    model = make_hf_model(**hf_cfg)
    model.save_pretrained(tmp_path)
    from_dir = ft.load_hf_gpt2(tmp_path)
    from_cfg_object = ft.load_hf_gpt2(model.state_dict(), config=model.config)
    from_json_dict = ft.load_hf_gpt2(model.state_dict(), config=json.loads((tmp_path / "config.json").read_text()))
    from_ft_config = ft.load_hf_gpt2(model.state_dict(), config=from_dir[0])
    for cfg, params in (from_cfg_object, from_json_dict, from_ft_config):
        assert cfg == from_dir[0]
        assert_trees_equal(params, from_dir[1])


def test_load_dtype_and_sharded_index(tmp_path):
    model = make_hf_model(**HF_CONFIGS["one-layer-pytorch_tanh"])
    # A hand-made two-shard checkpoint with an index, the layout large checkpoints use; keys without the
    # "transformer." prefix and with the causal-mask buffers, like the files on the Hugging Face hub.
    from safetensors.torch import save_file

    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    del sd["lm_head.weight"]
    n = model.config.n_positions
    sd["h.0.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(model.config.to_json_string())

    cfg, params = ft.load_hf_gpt2(tmp_path, dtype=torch.float64)
    assert all(x.dtype == torch.float64 for x in ft.tree.leaves(params))
    tokens = random_tokens(cfg, 2, 9)
    torch.testing.assert_close(ft.forward(params, tokens, cfg).float(), hf_logits(model, tokens), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- greedy generation parity (exercises the KV-cache)

GEN_CONFIGS = {
    "tied": dict(vocab_size=97, n_positions=75, n_embd=40, n_layer=2, n_head=5, n_inner=56),
    "untied-gelu": dict(
        vocab_size=131, n_positions=83, n_embd=48, n_layer=3, n_head=4, activation_function="gelu",
        layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("name", list(GEN_CONFIGS))
def test_greedy_generation_matches_transformers_token_for_token(name, tmp_path):
    model = make_hf_model(seed=7, **GEN_CONFIGS[name])
    model.save_pretrained(tmp_path)
    cfg, params = ft.load_hf_gpt2(tmp_path)
    prompt = random_tokens(cfg, 2, 7, seed=5)
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=64, min_new_tokens=64,
            pad_token_id=0,
        )
    got = ft.generate(params, prompt, cfg, max_new_tokens=64, sampling=GREEDY)
    assert got.shape == expected.shape == (2, 7 + 64)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- export and round trips


@pytest.mark.parametrize(
    "changes", [{}, {"tie_embeddings": False}, {"activation": "gelu", "norm_eps": 1e-6}], ids=["tied", "untied", "gelu"]
)
def test_to_hf_loads_strictly_and_matches(changes):
    cfg = ft_config(**changes)
    params = perturbed_params(cfg)
    sd = ft.to_hf_gpt2(params, cfg)
    model = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg))).eval()
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = random_tokens(cfg, 2, cfg.max_seq_len, seed=3)
    torch.testing.assert_close(hf_logits(model, tokens), ft.forward(params, tokens, cfg), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_ft_hf_ft_is_exact(tie):
    cfg = ft_config(tie_embeddings=tie)
    params = perturbed_params(cfg, seed=1)
    cfg2, params2 = ft.load_hf_gpt2(ft.to_hf_gpt2(params, cfg), config=cfg)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    # ... and through a transformers model, so nothing relies on sharing tensors with the input.
    model = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg)))
    model.load_state_dict(ft.to_hf_gpt2(params, cfg), strict=True)
    cfg3, params3 = ft.load_hf_gpt2({k: v.clone() for k, v in model.state_dict().items()}, config=config_to_hf(cfg))
    assert cfg3 == cfg
    assert_trees_equal(params3, params)


def test_save_hf_gpt2_directory_round_trip(tmp_path):
    cfg = ft_config(tie_embeddings=False, activation="gelu", dropout=0.1, init_std=0.03, norm_eps=1e-6)
    params = perturbed_params(cfg, seed=2)
    save_hf_gpt2(params, cfg, tmp_path)
    cfg2, params2 = ft.load_hf_gpt2(tmp_path)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = random_tokens(cfg, 2, 13, seed=4)
    torch.testing.assert_close(hf_logits(model, tokens), ft.forward(params, tokens, cfg), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("positional", "rope"),
        ("positional", "sinusoidal"),
        ("norm", "rmsnorm"),
        ("norm_position", "post"),
        ("activation", "swiglu"),
        ("n_kv_heads", 1),
        ("bias", False),
    ],
)
def test_export_refuses_what_gpt2_cannot_express(field, value):
    cfg = ft_config(**{field: value})
    params = ft.init_params(cfg)
    with pytest.raises(ValueError, match=f"Config.{flat_path(field)}="):
        ft.to_hf_gpt2(params, cfg)
    with pytest.raises(ValueError, match=f"Config.{flat_path(field)}="):
        config_to_hf(cfg)


def test_export_errors_name_the_param():
    cfg = ft_config()
    params = ft.init_params(cfg)
    del params["blocks"][1]["mlp"]["b_in"]
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.b_in'.*h\.1\.mlp\.c_fc\.bias"):
        ft.to_hf_gpt2(params, cfg)
    params = ft.init_params(cfg)
    params["embed"]["positions"] = torch.zeros(cfg.max_seq_len + 1, cfg.d_model)
    with pytest.raises(ValueError, match=r"'embed\.positions' has shape \(30, 36\) but the config expects \(29, 36\)"):
        ft.to_hf_gpt2(params, cfg)
    with pytest.raises(ValueError, match="unembed"):
        ft.to_hf_gpt2(ft.init_params(cfg.replace(tie_embeddings=False)), cfg)


# ---------------------------------------------------------------- load errors


@pytest.fixture(scope="module")
def small_sd():
    model = make_hf_model(**HF_CONFIGS["one-layer-pytorch_tanh"])
    return model.config, dict(model.state_dict())


def test_missing_key_is_named(small_sd):
    hf_config, sd = small_sd
    sd = {k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing 1 .*'h\.0\.mlp\.c_fc\.bias' \(expected shape \(72,\)\)"):
        ft.load_hf_gpt2(sd, config=hf_config)


def test_misshaped_key_names_both_shapes(small_sd):
    hf_config, sd = small_sd
    sd = {**sd, "transformer.h.0.attn.c_attn.weight": torch.zeros(72, 24)}
    expected = r"'h\.0\.attn\.c_attn\.weight' has shape \(72, 24\) but the config expects \(24, 72\)"
    with pytest.raises(ValueError, match=expected):
        ft.load_hf_gpt2(sd, config=hf_config)


def test_unexpected_key_and_untied_head_mismatch(small_sd):
    hf_config, sd = small_sd
    with pytest.raises(ValueError, match=r"'h\.1\.ln_1\.weight'"):
        ft.load_hf_gpt2({**sd, "transformer.h.1.ln_1.weight": torch.ones(24)}, config=hf_config)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        ft.load_hf_gpt2({**sd, "lm_head.weight": torch.zeros(61, 24)}, config=hf_config)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"model_type": "llama"}, "model_type='llama'"),
    ],
)
def test_hf_configs_gpt2_features_ftransformer_lacks(small_sd, change, match):
    hf_config, sd = small_sd
    with pytest.raises(ValueError, match=match):
        ft.load_hf_gpt2(sd, config={**hf_config.to_dict(), **change})


def test_directory_errors(tmp_path, small_sd):
    with pytest.raises(ValueError, match="not a directory"):
        ft.load_hf_gpt2(tmp_path / "nope")
    with pytest.raises(ValueError, match="no weights: expected one of model.safetensors"):
        ft.load_hf_gpt2(tmp_path)
    torch.save(small_sd[1], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no config.json"):
        ft.load_hf_gpt2(tmp_path)
    # A bare state dict whose width is not a multiple of 64 needs an explicit config.
    with pytest.raises(ValueError, match="cannot infer n_heads: d_model=24"):
        ft.load_hf_gpt2(small_sd[1])
    # The message is beartype's with the test suite's type-check hook on, ours without it.
    with pytest.raises(TypeError, match="path_or_state_dict|state dict"):
        ft.load_hf_gpt2([1, 2, 3])


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_damaged_weights_file_is_a_value_error_naming_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x01 this is not a weights file")
    with pytest.raises(ValueError, match=f"{name} is not a readable weights file"):
        ft.load_hf_gpt2(tmp_path)


def test_config_from_hf_defaults():
    cfg = config_from_hf({"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12})
    assert cfg == ft.PRESETS["gpt2"].replace(dropout=0.1)
    assert config_to_hf(cfg)["eos_token_id"] == 50256
    with pytest.raises(ValueError, match=r"missing \['n_head'\]"):
        config_from_hf({"vocab_size": 5, "n_positions": 4, "n_embd": 8, "n_layer": 1})


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE trained here, saved as GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False,
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
              "naïve café, 東京 and 🙂 emoji", "def f(x):\n    return x + 1\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.model.save(str(directory))
    return directory


TEXTS = ["Hello  world", " leading space and trailing ", "naïve café — 東京 🙂\n\ttabs", "x<|endoftext|>y", ""]


def test_tokenizer_round_trip_and_matches_transformers(bpe_dir):
    tok = GPT2BPETokenizer.load(bpe_dir)
    reference = transformers.GPT2Tokenizer.from_pretrained(bpe_dir)
    assert tok.vocab_size == len(reference) == 300
    assert tok.eos_id == 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=300\\)"):
        tok.decode([300])
    with pytest.raises(TypeError, match="must be a str|parameter 'text'"):
        tok.encode(b"bytes")


def test_tokenizer_found_automatically_in_model_dir(tmp_path, bpe_dir):
    model = make_hf_model(vocab_size=300, n_positions=17, n_embd=20, n_layer=1, n_head=4, n_inner=28)
    model.save_pretrained(tmp_path)
    cfg, params, tok = load_hf_gpt2_dir(tmp_path)
    assert tok is None and load_hf_gpt2_tokenizer(tmp_path) is None
    save_vocab_merges(GPT2BPETokenizer.load(bpe_dir), tmp_path)
    cfg, params, tok = load_hf_gpt2_dir(tmp_path)
    assert isinstance(tok, GPT2BPETokenizer) and tok.vocab_size == 300
    assert tok.decode(tok.encode("the fox")) == "the fox"
    # A tokenizer with more ids than the model has rows is refused.
    small = tmp_path / "small"
    make_hf_model(vocab_size=200, n_positions=17, n_embd=20, n_layer=1, n_head=4, n_inner=28).save_pretrained(small)
    save_vocab_merges(GPT2BPETokenizer.load(bpe_dir), small)
    with pytest.raises(ValueError, match="tokenizer has vocab_size=300 but the model has vocab_size=200"):
        load_hf_gpt2_dir(small)


def test_tokenizer_fits_ftransformer_checkpoints_and_hf_export(tmp_path, bpe_dir):
    from ftransformer.data import BPETokenizer, CharTokenizer, load_tokenizer

    tok = GPT2BPETokenizer.load(bpe_dir)
    # Saved with a checkpoint it is a tokenizer.json that ftransformer.data reads back as the same BPE.
    tok.save(tmp_path / "ckpt")
    again = load_tokenizer(tmp_path / "ckpt")
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    # A BPE trained by ftransformer.data exports into a GPT-2 directory transformers reads.
    trained = BPETokenizer.train("the cat sat on the mat; the dog sat on the log. " * 30, vocab_size=270)
    cfg = ft_config(vocab_size=270)
    save_hf_gpt2(perturbed_params(cfg), cfg, tmp_path / "hf", tokenizer=trained)
    reference = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    assert reference("the dog sat")["input_ids"] == trained.encode("the dog sat")
    assert load_hf_gpt2_dir(tmp_path / "hf")[2].encode("the dog sat") == trained.encode("the dog sat")
    with pytest.raises(ValueError, match="byte-level BPE tokenizer"):
        save_vocab_merges(CharTokenizer.from_text("abc"), tmp_path)


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GPT2BPETokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="cannot read GPT-2 BPE files"):
        GPT2BPETokenizer.load(tmp_path)


# ---------------------------------------------------------------- CLI


def test_cli_generate_from_hf_dir(tmp_path, bpe_dir, capsys):
    from ftransformer.cli import main

    model = make_hf_model(seed=3, vocab_size=300, n_positions=41, n_embd=20, n_layer=2, n_head=4, n_inner=28)
    model.save_pretrained(tmp_path)
    tok = GPT2BPETokenizer.load(bpe_dir)
    save_vocab_merges(tok, tmp_path)
    prompt_text = "the quick fox"
    prompt = torch.tensor([tok.encode(prompt_text)])
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12, min_new_tokens=12,
            pad_token_id=0,
        )
    capsys.readouterr()
    code = main(["generate", "--hf-dir", str(tmp_path), "--prompt", prompt_text, "--max-new-tokens", "12",
                 "--temperature", "0"])
    assert code == 0
    assert capsys.readouterr().out == prompt_text + tok.decode(expected[0, prompt.shape[1]:]) + "\n"


def test_cli_generate_hf_dir_errors(tmp_path, capsys):
    from ftransformer.cli import main

    make_hf_model(vocab_size=300, n_positions=17, n_embd=20, n_layer=1, n_head=4, n_inner=28).save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--hf-dir", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has no vocab.json + merges.txt" in err and err.count("\n") == 1
    assert main(["generate", "--hf-dir", str(tmp_path), "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--hf-dir", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "is not a directory" in capsys.readouterr().err
