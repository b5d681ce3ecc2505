"""Adapters in Hugging Face PEFT's format: ours saved -> ``PeftModel.from_pretrained`` gives our logits (LoRA, DoRA),
an adapter PEFT made and saved loads into ours with its logits, and the merged model exported through ``save_hf``
loads in transformers with the same logits. Tiny random Llama (GQA, llama3 rope), every parameter re-randomised."""

import json

import pytest
import torch

import ftransformer as ft
from ftransformer import peft as ftpeft
from ftransformer.interop.hf import load_hf, save_hf
from ftransformer.layers.adapter import ADAPTERS, DoRAWeight
from ftransformer.peft.adapters import is_weight_node, map_nodes

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import hf_tiny  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf_tiny.build("llama", directory, seed=3)
    return directory


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def randomised(params, seed):
    """Every adapter's ``b`` (and DoRA's ``m``) drawn non-zero, so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)

    def draw(path, w):
        if not isinstance(w, ADAPTERS):
            return w
        w = w._replace(b=torch.randn(w.b.shape, generator=gen) * 0.3)
        return w._replace(m=w.m * (1 + 0.2 * torch.rand(w.m.shape, generator=gen))) if isinstance(w, DoRAWeight) else w

    return map_nodes(params, draw)


def peft_logits(base_dir, adapter_dir, x):
    model = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_ours_saved_loads_in_peft_with_our_logits(base_dir, tmp_path, dora):
    cfg, params = load_hf(base_dir)
    adapted = randomised(ftpeft.lora(params, cfg, rank=3, alpha=5, key=ft.random.key(1), dora=dora), seed=2)
    ftpeft.save_peft(tmp_path, adapted, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (3, 5, dora)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    x = hf_tiny.tokens(2, 11)
    ours = ft.forward(adapted, x, cfg)
    assert (ours - ft.forward(params, x, cfg)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(peft_logits(base_dir, tmp_path, x), ours, **TOL)
    back = ftpeft.load_peft(tmp_path, params, cfg)  # one a for w_qkv again: the same tree
    for p, w in ft.tree.flatten_with_paths(adapted).items():
        assert torch.equal(ft.tree.flatten_with_paths(back)[p], w), p


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_made_by_peft_loads_into_ours(base_dir, tmp_path, dora):
    torch.manual_seed(0)  # PEFT draws its (non-zero, init_lora_weights=False) B from torch's global generator
    config = peft.LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, use_dora=dora, rank_pattern={"o_proj": 2})
    model = peft.get_peft_model(hf_model(base_dir), config)
    model.save_pretrained(tmp_path / "theirs")
    x = hf_tiny.tokens(2, 9, seed=1)
    with torch.no_grad():
        theirs = model.eval()(x).logits
    cfg, params = load_hf(base_dir)
    ours = ftpeft.load_peft(tmp_path / "theirs", params, cfg)
    torch.testing.assert_close(ft.forward(ours, x, cfg), theirs, **TOL)
    # Saved again: the same modules and tensors as PEFT's (k_proj not written, o_proj's rank 2 as a pattern).
    ftpeft.save_peft(tmp_path / "again", ours, cfg)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in range(cfg.n_layers)}


def test_merged_export_loads_in_transformers(base_dir, tmp_path):
    cfg, params = load_hf(base_dir)
    adapted = randomised(ftpeft.lora(params, cfg, rank=2, alpha=3, key=ft.random.key(4), dora=True), seed=5)
    merged = ftpeft.merge(adapted)
    save_hf(merged, cfg, tmp_path)
    x = hf_tiny.tokens(1, 13, seed=2)
    with torch.no_grad():
        theirs = hf_model(tmp_path)(x).logits
    torch.testing.assert_close(theirs, ft.forward(merged, x, cfg), **TOL)
    # merging rounds W + s * a @ b once: the unmerged forward agrees to float32 rounding of these O(10) logits
    torch.testing.assert_close(theirs, ft.forward(adapted, x, cfg), rtol=1e-4, atol=1e-4)


def test_bad_adapters_are_refused_by_name(base_dir, tmp_path):
    cfg, params = load_hf(base_dir)
    with pytest.raises(ValueError, match="no adapter"):
        ftpeft.save_peft(tmp_path, params, cfg)
    adapted = randomised(ftpeft.lora(params, cfg, rank=2, alpha=2, key=ft.random.key(0)), seed=0)
    ftpeft.save_peft(tmp_path, adapted, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        ftpeft.load_peft(tmp_path, params, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        ftpeft.load_peft(tmp_path, params, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already adapted"):
        ftpeft.load_peft(tmp_path, adapted, cfg)
    with pytest.raises(ValueError, match=r"is not a directory \(expected a PEFT adapter directory\)"):
        ftpeft.load_peft(tmp_path / "nowhere", params, cfg)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        ftpeft.load_peft(tmp_path, params, cfg)


def test_a_fresh_adapter_writes_every_target(base_dir, tmp_path):
    """At b = 0 (before training) every targeted module is written, at full rank, and PEFT's logits are the base's."""
    cfg, params = load_hf(base_dir)
    fresh = ftpeft.lora(params, cfg, rank=2, alpha=4, targets=["blocks.1.attn.*"], key=ft.random.key(0))
    ftpeft.save_peft(tmp_path, fresh, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(f"model.layers.1.self_attn.{n}_proj" for n in "qkvo")
    x = hf_tiny.tokens(1, 7)
    torch.testing.assert_close(peft_logits(base_dir, tmp_path, x), ft.forward(params, x, cfg), **TOL)


@pytest.mark.parametrize("family,dora", [("phi3", True), ("gpt_neox", False), ("qwen3", True)])
def test_fused_and_interleaved_layouts_round_trip(tmp_path, family, dora):
    """Phi-3's fused qkv_proj and gate_up_proj (our w_gate and w_in share its lora_A), GPT-NeoX's per-head
    interleaved query_key_value, Qwen3's q/k norms and tied head: PEFT computes our logits, and back."""
    hf_tiny.build(family, tmp_path / "base", seed=1)
    cfg, params = load_hf(tmp_path / "base")
    adapted = randomised(ftpeft.lora(params, cfg, rank=3, alpha=6, key=ft.random.key(0), dora=dora), seed=1)
    ftpeft.save_peft(tmp_path / "adapter", adapted, cfg)
    x = hf_tiny.tokens(1, 9)
    ours = ft.forward(adapted, x, cfg)
    torch.testing.assert_close(peft_logits(tmp_path / "base", tmp_path / "adapter", x), ours, **TOL)
    torch.testing.assert_close(ft.forward(ftpeft.load_peft(tmp_path / "adapter", params, cfg), x, cfg), ours, **TOL)
