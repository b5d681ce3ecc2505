"""load_hf / save_hf: names, shapes and values against transformers' own checkpoints, round trips, errors."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ftransformer as ft
from ftransformer.config import Attention, RopeScaling
from ftransformer.interop.hf import config_from_hf_dir, load_hf, save_hf
from ftransformer.interop.safetensors_io import parse_size, plan_shards
from hf_tiny import FAMILY_OPTIONS, build

pytest.importorskip("transformers")

FAMILIES = list(FAMILY_OPTIONS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, transformers model) for each family's tiny random model."""
    root = tmp_path_factory.mktemp("hf")
    return {family: (root / family, build(family, root / family)) for family in FAMILIES}


def flat(params):
    return ft.tree.flatten_with_paths(params)


def assert_same_tree(a, b):
    fa, fb = flat(a), flat(b)
    assert list(fa) == list(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), k


EXPECTED = {
    "llama": dict(head_dim=6, window=None, qkv_bias=False, qk_norm=False, tie=False,
                  rope_scaling=RopeScaling("llama3", 8.0, original_max_seq_len=16), rope_base=500000.0),
    "mistral": dict(head_dim=10, window=5, qkv_bias=False, qk_norm=False, tie=False, rope_scaling=None, rope_base=1e4),
    "qwen2": dict(head_dim=6, window=(None, 5), qkv_bias=True, qk_norm=False, tie=False, rope_scaling=None, rope_base=1e4),
    "qwen3": dict(head_dim=10, window=None, qkv_bias=False, qk_norm=True, tie=True, rope_scaling=None, rope_base=1e4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_becomes_the_features_of_the_family(saved, family):
    cfg = config_from_hf_dir(saved[family][0])
    e = EXPECTED[family]
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.d_ff) == (61, 24, 4, 2, 2, 40)
    assert (cfg.norm.kind, cfg.positional.kind, cfg.activation, cfg.bias, (cfg.norm.float32 != "none")) == ("rmsnorm", "rope", "swiglu", False, True)
    assert (cfg.head_dim, cfg.attention.window, cfg.attention.qkv_bias, cfg.attention.qk_norm) == (
        e["head_dim"], e["window"], e["qkv_bias"], e["qk_norm"])
    assert (cfg.embeddings.tie, cfg.positional.scaling, cfg.positional.base) == (e["tie"], e["rope_scaling"], e["rope_base"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_lands_where_the_model_uses_it(saved, family):
    directory, model = saved[family]
    cfg, params = load_hf(directory)
    sd = model.state_dict()
    b = params["blocks"][1]
    attn = model.model.layers[1].self_attn
    w_q, w_k, w_v = b["attn"]["w_qkv"].split([cfg.n_heads * cfg.head_dim, *[cfg.n_kv_heads * cfg.head_dim] * 2], dim=1)
    assert torch.equal(w_q, attn.q_proj.weight.T) and torch.equal(w_k, attn.k_proj.weight.T)
    assert torch.equal(w_v, attn.v_proj.weight.T) and torch.equal(b["attn"]["w_o"], attn.o_proj.weight.T)
    mlp = model.model.layers[1].mlp
    assert torch.equal(b["mlp"]["w_gate"], mlp.gate_proj.weight.T) and torch.equal(b["mlp"]["w_in"], mlp.up_proj.weight.T)
    assert torch.equal(b["mlp"]["w_out"], mlp.down_proj.weight.T)
    assert torch.equal(b["ln1"]["scale"], sd["model.layers.1.input_layernorm.weight"])
    assert torch.equal(b["ln2"]["scale"], sd["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(params["ln_f"]["scale"], sd["model.norm.weight"])
    assert torch.equal(params["embed"]["tokens"], sd["model.embed_tokens.weight"])
    if family == "qwen2":
        b_qkv = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        assert torch.equal(b["attn"]["b_qkv"], b_qkv) and "b_o" not in b["attn"]
    if family == "qwen3":
        assert torch.equal(b["attn"]["q_norm"]["scale"], attn.q_norm.weight)
        assert torch.equal(b["attn"]["k_norm"]["scale"], attn.k_norm.weight)
    if not cfg.embeddings.tie:
        assert torch.equal(params["unembed"]["w"], sd["lm_head.weight"].T)
    # The tree is exactly the one init_params builds for the config: same paths, same order, same shapes.
    expected = {k: v.shape for k, v in flat(ft.init_params(cfg)).items()}
    assert {k: v.shape for k, v in flat(params).items()} == expected and list(flat(params)) == list(expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_writes_transformers_names_shapes_and_values_and_reads_back_bit_for_bit(saved, family, tmp_path):
    directory, model = saved[family]
    cfg, params = load_hf(directory)
    save_hf(params, cfg, tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    original = load_file(directory / "model.safetensors")
    assert set(written) == set(original)
    for key in original:
        assert written[key].shape == original[key].shape and torch.equal(written[key], original[key]), key
    cfg2, params2 = load_hf(tmp_path)
    assert cfg2 == cfg
    assert_same_tree(params2, params)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == family and hf["head_dim"] == cfg.head_dim


def test_a_large_model_is_written_in_shards_with_an_index_and_read_back(saved, tmp_path):
    cfg, params = load_hf(saved["qwen2"][0])
    save_hf(params, cfg, tmp_path, max_shard_size="4KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in flat(params).values())
    assert_same_tree(load_hf(tmp_path)[1], params)
    # Saving again unsharded removes the shards, which would otherwise be read beside the new file.
    save_hf(params, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_checkpoint_sharded_by_transformers_loads(saved, tmp_path):
    directory, model = saved["llama"]
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_tree(load_hf(tmp_path)[1], load_hf(directory)[1])


def test_bfloat16_loading_casts_each_tensor_as_it_is_read(saved):
    cfg, params = load_hf(saved["qwen3"][0])
    cfg16, params16 = load_hf(saved["qwen3"][0], dtype=torch.bfloat16)
    assert cfg16 == cfg
    for k, v in flat(params16).items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, flat(params)[k].to(torch.bfloat16)), k


def test_a_bfloat16_checkpoint_keeps_its_dtype_and_round_trips(saved, tmp_path):
    cfg, params = load_hf(saved["mistral"][0], dtype=torch.bfloat16)
    save_hf(params, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_tree(load_hf(tmp_path)[1], params)


def test_gpt2_directories_go_through_the_gpt2_loader(tmp_path):
    cfg = ft.Config(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16, activation="gelu_tanh")
    params = ft.init_params(cfg, seed=1)
    save_hf(params, cfg, tmp_path)
    cfg2, params2 = load_hf(tmp_path)
    assert cfg2.replace(dropout=0.0) == cfg and json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    assert_same_tree(params2, params)


def test_configs_no_family_expresses_are_refused_naming_the_field(tmp_path):
    base = dict(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16, bias=False,
                norm="rmsnorm", positional="rope", activation="swiglu")
    with pytest.raises(ValueError, match="activation='gelu'.*expected 'swiglu'"):
        save_hf({}, ft.Config.from_flat(**{**base, "activation": "gelu"}), tmp_path)
    cfg = ft.Config.from_flat(**base, attention=Attention(window=(3, None)))
    with pytest.raises(ValueError, match="window per layer needs qwen2.*or qwen3"):
        save_hf(ft.init_params(cfg), cfg, tmp_path)


def test_save_hf_names_a_mis_shaped_parameter(tmp_path):
    cfg = ft.Config.from_flat(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16, bias=False,
                    norm="rmsnorm", positional="rope", activation="swiglu")
    params = ft.init_params(cfg)
    params["blocks"][1]["mlp"]["w_in"] = torch.zeros(24, 41)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.w_in.*\(24, 41\).*\(24, 40\)"):
        save_hf(params, cfg, tmp_path)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def copy_of(saved, tmp_path):
    def copy(family):
        directory = tmp_path / family
        shutil.copytree(saved[family][0], directory)
        return directory
    return copy


def rewrite_weights(directory, change):
    sd = load_file(directory / "model.safetensors")
    change(sd)
    save_file(sd, directory / "model.safetensors")


def test_a_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no config.json"):
        load_hf(tmp_path)


def test_a_missing_tensor_is_named_with_its_shape(copy_of):
    directory = copy_of("qwen2")
    rewrite_weights(directory, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'model\.layers\.1\.self_attn\.k_proj\.bias' \(12,\)"):
        load_hf(directory)


def test_an_extra_tensor_is_named(copy_of):
    directory = copy_of("llama")
    rewrite_weights(directory, lambda sd: sd.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(24)}))
    with pytest.raises(ValueError, match=r"no place for: model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_hf(directory)


def test_a_mis_shaped_tensor_is_named_with_both_shapes(copy_of):
    directory = copy_of("mistral")
    rewrite_weights(directory, lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(41, 24)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(41, 24\).*expects \(40, 24\)"):
        load_hf(directory)


def test_an_unsupported_family_lists_the_supported_ones(copy_of):
    directory = copy_of("llama")
    hf = json.loads((directory / "config.json").read_text())
    hf.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="model_type='falcon'.*supported model_type: gpt2, llama, mistral, qwen2, qwen3, olmo2, phi3, gpt_neox, gemma, gemma2, gemma3_text"):
        load_hf(directory)


@pytest.mark.parametrize(("change", "words"), [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope type 'yarn', which is not implemented yet; supported: 'default', 'linear', 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'; supported: 'silu'"),
    ({"attention_bias": True}, "attention_bias=True and mlp_bias=False; supported: both False, or both True"),
])
def test_an_unsupported_option_is_named_with_what_is_supported(copy_of, change, words):
    directory = copy_of("llama")
    hf = json.loads((directory / "config.json").read_text()) | change
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_hf(directory)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_safetensors_file_is_named(copy_of, damage):
    directory = copy_of("qwen3")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        load_hf(directory)


def test_a_directory_without_weights_says_which_files_it_looked_for(copy_of):
    directory = copy_of("qwen3")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no weights: expected model.safetensors or model.safetensors.index.json"):
        load_hf(directory)


def test_shard_sizes_parse_like_save_pretrained_and_pack_greedily():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size.*'5 parsecs'"):
        parse_size("5 parsecs")
    assert plan_shards([("a", 6), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards([("a", 3), ("b", 5), ("c", 2), ("d", 1)], 10) == [["a", "b", "c"], ["d"]]


def test_converted_tensors_pass_through_a_few_rows_at_a_time(saved, monkeypatch):
    from ftransformer.interop import hf

    cfg, params = load_hf(saved["llama"][0])
    monkeypatch.setattr(hf, "_CHUNK_BYTES", 100)  # a few rows per read: every block boundary is exercised
    assert_same_tree(load_hf(saved["llama"][0])[1], params)
    assert_same_tree(load_hf(saved["llama"][0], dtype=torch.float64)[1], ft.tree.to(params, dtype=torch.float64))


def test_bench_load_times_both_loaders_in_fresh_processes(tmp_path, capsys):
    from ftransformer.cli import main

    assert main(["bench", "load", "--dir", str(tmp_path), "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "writing a random tiny checkpoint" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "/" not in line and
            line.startswith(("ft.load_hf", "transformers"))}
    assert set(rows) == {"ft.load_hf", "transformers"}
    assert all(len(r) == 5 and float(r[0]) >= 0 and float(r[1]) > 0 for r in rows.values())  # seconds, MiB, ...
    assert "ft.load_hf / transformers: time x" in out
    assert (tmp_path / "config.json").is_file()
    from ftransformer.bench.load import ensure_checkpoint

    ensure_checkpoint(tmp_path, "tiny", "bfloat16")  # the same size again: reused, not written again
    assert "writing" not in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_hf_dir_describes_the_config_and_counts_the_parameters(saved, family, capsys):
    from ftransformer.cli import main

    assert main(["inspect", "--hf-dir", str(saved[family][0])]) == 0
    out = capsys.readouterr().out
    assert f"model_type={family!r}" in out
    assert re.search(rf"head_dim +{EXPECTED[family]['head_dim']}  \((given|derived)\)", out)
    n = sum(p.numel() for p in saved[family][1].parameters())  # transformers counts a tied table once, too
    assert "exact total" in out and f"{n:,}" in out


def test_inspect_hf_dir_errors_name_the_problem(saved, tmp_path, capsys):
    from ftransformer.cli import main

    assert main(["inspect", "--hf-dir", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["inspect", "--hf-dir", str(saved["llama"][0]), "--preset", "seed"]) == 2
    assert "give one" in capsys.readouterr().err
