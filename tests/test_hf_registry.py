"""The family registry: every family recognized, its config in and out, its tensors as a state dict; the
slot properties GPT-2 brought (tied heads, a base prefix, tensors in memory); adding an entry adds a family."""

from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

import ftransformer as ft
from ftransformer.interop import families
from ftransformer.interop.hf import hf_state_dict, load_hf, save_hf
from ftransformer.interop.hf_gpt2 import config_to_hf, load_hf_gpt2, to_hf_gpt2
from ftransformer.interop.registry import FAMILIES, Family, family_for, family_of
from hf_tiny import FAMILY_II_OPTIONS, FAMILY_OPTIONS, hf_config

transformers = pytest.importorskip("transformers")

NAMED = [*FAMILY_OPTIONS, *FAMILY_II_OPTIONS]
GPT2_CFG = ft.Config(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16, activation="gelu_tanh")
LLAMA_CFG = ft.Config.from_flat(vocab_size=37, d_model=24, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=40, max_seq_len=16,
                      bias=False, norm="rmsnorm", positional="rope", activation="swiglu", norm_upcast=True,
                      tie_embeddings=True)


def test_the_table_lists_every_family_once():
    assert list(FAMILIES) == ["gpt2", "llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gpt_neox", "gemma",
                              "gemma2", "gemma3_text"]
    assert sorted(NAMED) == sorted(set(FAMILIES) - {"gpt2"})
    assert len({f.architecture for f in FAMILIES.values()}) == len(FAMILIES)


@pytest.mark.parametrize("name", NAMED)
def test_each_family_is_recognized_and_its_config_goes_in_and_out(name):
    hf = hf_config(name).to_dict()
    entry = FAMILIES[name]
    assert family_of(hf) is entry
    assert family_of({"architectures": [entry.architecture]}) is entry  # no model_type: the class name decides
    cfg = entry.config_in(hf)
    assert family_for(cfg) is entry  # save_hf writes it back as the same family
    out = entry.config_json(cfg)
    assert (out["model_type"], out["architectures"]) == (name, [entry.architecture])
    assert entry.config_in(out) == cfg


@pytest.mark.parametrize("name", NAMED)
def test_hf_state_dict_loads_strictly_into_the_transformers_model(name):
    cfg = FAMILIES[name].config_in(hf_config(name).to_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    sd = hf_state_dict(ft.init_params(cfg, seed=1), cfg)
    if name == "gpt_neox":  # transformers 5's module calls the checkpoint's embed_out lm_head (renamed on load)
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_gpt2_is_an_entry_like_the_others():
    entry = FAMILIES["gpt2"]
    assert family_for(GPT2_CFG) is entry and family_of(config_to_hf(GPT2_CFG)) is entry
    assert config_to_hf(GPT2_CFG) == entry.config_json(GPT2_CFG)
    params = ft.init_params(GPT2_CFG, seed=2)
    assert to_hf_gpt2(params, GPT2_CFG).keys() == hf_state_dict(params, GPT2_CFG).keys()
    slots = {s.hf_key: s for s in entry.slots(GPT2_CFG)}
    assert not slots["transformer.h.0.attn.c_attn.weight"].transpose  # Conv1D stores [d_in, d_out], as linear takes it
    assert slots["lm_head.weight"].tied and not entry.slots(GPT2_CFG.replace(tie_embeddings=False))[-1].tied


def test_a_gpt2_directory_in_the_base_models_names_streams_through_load_hf(tmp_path):
    params = ft.init_params(GPT2_CFG, seed=3)
    save_hf(params, GPT2_CFG, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, tmp_path / "model.safetensors")  # the hub's layout
    cfg, loaded = load_hf(tmp_path)
    assert cfg.replace(dropout=0.0) == GPT2_CFG
    assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(loaded), ft.tree.leaves(params)))
    save_file({**sd, "wte.weight": sd["transformer.wte.weight"].clone()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="'wte.weight' is stored both with and without the 'transformer.' prefix"):
        load_hf(tmp_path)


def test_a_tied_head_stored_anyway_must_equal_the_embedding(tmp_path):
    params = ft.init_params(LLAMA_CFG, seed=4)
    save_hf(params, LLAMA_CFG, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd  # a tied head is not written
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors")
    assert torch.equal(load_hf(tmp_path)[1]["embed"]["tokens"], params["embed"]["tokens"])
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight but the config ties them"):
        load_hf(tmp_path)


def test_a_state_dict_becomes_the_parameters_without_a_copy_unless_converted(tmp_path):
    cfg = GPT2_CFG.replace(tie_embeddings=False)
    sd = {k: v.clone() for k, v in to_hf_gpt2(ft.init_params(cfg, seed=5), cfg).items()}
    _, params = load_hf_gpt2(sd, config=cfg)
    assert params["embed"]["tokens"] is sd["transformer.wte.weight"]
    assert torch.equal(params["unembed"]["w"], sd["lm_head.weight"].T)  # transposed: its own tensor
    _, params64 = load_hf_gpt2(sd, config=cfg, dtype=torch.float64)
    assert params64["embed"]["tokens"].dtype == torch.float64
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "gpt2.safetensors")
    _, from_file = load_hf_gpt2(tmp_path / "gpt2.safetensors", config=cfg)  # one weights file, no directory
    assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(from_file), ft.tree.leaves(params)))


def test_adding_an_entry_adds_a_family(tmp_path, monkeypatch):
    """The docs' recipe: an entry (here a Llama under another name) is all load_hf and save_hf need."""
    entry = Family("my_llama", "MyLlamaForCausalLM", partial(families.config_from_hf, family="llama"),
                   families.config_to_hf, partial(families.tensor_slots, family="llama"), writes=lambda cfg: True)
    monkeypatch.setitem(FAMILIES, "my_llama", entry)
    with pytest.raises(ValueError, match="model_type='my_llama '.*supported model_type: .*, my_llama \\("):
        family_of({"model_type": "my_llama "})
    params = ft.init_params(LLAMA_CFG, seed=6)
    save_hf(params, LLAMA_CFG, tmp_path)  # written as llama: the table's order decides, and llama comes first
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"llama"', '"my_llama"'))
    cfg, loaded = load_hf(tmp_path)
    assert cfg == LLAMA_CFG and torch.equal(loaded["embed"]["tokens"], params["embed"]["tokens"])


@pytest.mark.parametrize("cfg", [GPT2_CFG, LLAMA_CFG], ids=["gpt2", "llama"])
def test_load_hf_reads_an_older_pytorch_model_bin(cfg, tmp_path):
    params = ft.init_params(cfg, seed=7)
    save_hf(params, cfg, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    loaded = load_hf(tmp_path)[1]
    assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(loaded), ft.tree.leaves(params)))
