"""init_params (determinism, structure, init statistics, dtype/device) and the tree helpers."""

import math

import pytest
import torch
from torch import Tensor

import ftransformer as ft


def assert_trees_equal(a, b):
    fa, fb = ft.tree.flatten_with_paths(a), ft.tree.flatten_with_paths(b)
    assert list(fa) == list(fb)
    for path in fa:
        assert torch.equal(fa[path], fb[path]), path


def test_same_seed_gives_the_same_params(tiny_cfg):
    assert_trees_equal(ft.init_params(tiny_cfg, seed=3), ft.init_params(tiny_cfg, seed=3))


def test_different_seeds_give_different_weights(tiny_cfg):
    a, b = ft.tree.flatten_with_paths(ft.init_params(tiny_cfg, 0)), ft.tree.flatten_with_paths(ft.init_params(tiny_cfg, 1))
    for path in ("embed.tokens", "embed.positions", "blocks.0.attn.w_qkv", "blocks.1.mlp.w_out"):
        assert not torch.equal(a[path], b[path]), path


def test_params_are_a_tree_of_tensors_only(tiny_cfg):
    params = ft.init_params(tiny_cfg)

    def visit(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                assert isinstance(k, str), path
                visit(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{path}.{i}")
        else:
            assert isinstance(node, Tensor), f"{path} is {type(node).__name__}"

    visit(params, "params")
    assert all(isinstance(x, Tensor) for x in ft.tree.leaves(params))


def test_shapes_follow_the_config(tiny_cfg):
    cfg = tiny_cfg.replace(n_kv_heads=1)
    p = ft.init_params(cfg)
    d, hd = cfg.d_model, cfg.head_dim
    assert p["embed"]["tokens"].shape == (cfg.vocab_size, d)
    assert p["embed"]["positions"].shape == (cfg.max_seq_len, d)
    assert len(p["blocks"]) == cfg.n_layers
    blk = p["blocks"][0]
    assert blk["attn"]["w_qkv"].shape == (d, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
    assert blk["attn"]["b_qkv"].shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd,)
    assert blk["attn"]["w_o"].shape == (cfg.n_heads * hd, d)
    assert blk["mlp"]["w_in"].shape == (d, cfg.d_ff)
    assert blk["mlp"]["w_out"].shape == (cfg.d_ff, d)
    assert blk["ln1"]["scale"].shape == blk["ln1"]["bias"].shape == (d,)
    assert set(p) == {"embed", "blocks", "ln_f"}


def test_leaves_a_config_does_not_use_are_absent(tiny_cfg):
    cfg = tiny_cfg.replace(
        bias=False, norm="rmsnorm", norm_position="post", positional="rope", activation="swiglu", tie_embeddings=False
    )
    p = ft.init_params(cfg)
    assert set(p) == {"embed", "blocks", "unembed"}  # post-LN: no final norm; untied: an output matrix
    assert set(p["embed"]) == {"tokens"}  # rotary positions have no table
    assert p["unembed"]["w"].shape == (cfg.d_model, cfg.vocab_size)
    for blk in p["blocks"]:
        assert set(blk["attn"]) == {"w_qkv", "w_o"}
        assert set(blk["mlp"]) == {"w_gate", "w_in", "w_out"}
        assert set(blk["ln1"]) == set(blk["ln2"]) == {"scale"}
    # LayerNorm without biases keeps only its scale too; sinusoidal positions have no table either.
    p = ft.init_params(tiny_cfg.replace(bias=False, positional="sinusoidal"))
    assert set(p["ln_f"]) == {"scale"} and set(p["embed"]) == {"tokens"}
    assert all(not path.split(".")[-1].startswith("b") for path in ft.tree.flatten_with_paths(p))


def test_init_statistics_follow_gpt2():
    cfg = ft.Config(vocab_size=301, d_model=64, n_heads=4, n_layers=8, d_ff=192, max_seq_len=96)
    p = ft.init_params(cfg, seed=0)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def std_of(name, group):
        return torch.cat([blk[group][name].flatten() for blk in p["blocks"]]).std().item()

    assert std_of("w_qkv", "attn") == pytest.approx(cfg.init_std, rel=0.05)
    assert std_of("w_in", "mlp") == pytest.approx(cfg.init_std, rel=0.05)
    assert std_of("w_o", "attn") == pytest.approx(out_std, rel=0.05)
    assert std_of("w_out", "mlp") == pytest.approx(out_std, rel=0.05)
    assert p["embed"]["tokens"].std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert p["embed"]["positions"].std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert abs(p["embed"]["tokens"].mean().item()) < 0.002
    for blk in p["blocks"]:
        assert torch.equal(blk["ln1"]["scale"], torch.ones(cfg.d_model))
        assert torch.equal(blk["ln1"]["bias"], torch.zeros(cfg.d_model))
        assert torch.equal(blk["attn"]["b_qkv"], torch.zeros(3 * cfg.d_model))
        assert torch.equal(blk["mlp"]["b_out"], torch.zeros(cfg.d_model))
    # init_std is honoured, not hard-wired.
    wide = ft.init_params(cfg.replace(init_std=0.1), seed=0)
    assert wide["embed"]["tokens"].std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_casts_every_leaf_and_keeps_the_numbers(tiny_cfg, dtype):
    p32 = ft.init_params(tiny_cfg, seed=5)
    p = ft.init_params(tiny_cfg, seed=5, dtype=dtype)
    assert {x.dtype for x in ft.tree.leaves(p)} == {dtype}
    assert_trees_equal(p, ft.tree.to(p32, dtype=dtype))


def test_device_argument_places_every_leaf(tiny_cfg):
    p = ft.init_params(tiny_cfg, device="meta")
    assert {x.device.type for x in ft.tree.leaves(p)} == {"meta"}
    assert {x.device.type for x in ft.tree.leaves(ft.init_params(tiny_cfg, device=torch.device("cpu")))} == {"cpu"}


def test_init_params_rejects_a_non_config():
    with pytest.raises(TypeError, match="Config"):
        ft.init_params({"vocab_size": 37}, seed=0)


def test_count_params_counts_every_scalar():
    tree = {"a": torch.zeros(3, 4), "b": [torch.zeros(5), {"c": torch.zeros(2, 3, 7)}]}
    assert ft.count_params(tree) == 12 + 5 + 42
    assert ft.count_params({}) == 0


def test_tree_map_keeps_structure_and_zips_trees():
    tree = {"a": torch.ones(2), "b": [torch.full((3,), 2.0), {"c": torch.full((1,), 3.0)}]}
    doubled = ft.tree.map(lambda x: x * 2, tree)
    assert isinstance(doubled["b"], list) and isinstance(doubled["b"][1], dict)
    assert torch.equal(doubled["b"][1]["c"], torch.tensor([6.0]))
    summed = ft.tree.map(lambda x, y: x + y, tree, doubled)
    assert torch.equal(summed["a"], torch.full((2,), 3.0))
    assert torch.equal(tree["a"], torch.ones(2)), "tree_map must not modify its input"


def test_flatten_uses_dotted_paths_and_unflatten_inverts_it(tiny_cfg):
    params = ft.init_params(tiny_cfg.replace(tie_embeddings=False))
    flat = ft.tree.flatten_with_paths(params)
    assert "blocks.0.attn.w_qkv" in flat and "blocks.1.mlp.b_out" in flat and "unembed.w" in flat
    assert flat["blocks.1.ln2.scale"] is params["blocks"][1]["ln2"]["scale"]
    assert len(flat) == len(ft.tree.leaves(params))
    assert ft.tree.flatten_with_paths(params) == flat  # a stable order
    back = ft.tree.unflatten_paths(flat)
    assert isinstance(back["blocks"], list) and len(back["blocks"]) == tiny_cfg.n_layers
    assert_trees_equal(back, params)


def test_unflatten_orders_list_indices_numerically():
    flat = {f"xs.{i}": torch.tensor(float(i)) for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 11)}
    xs = ft.tree.unflatten_paths(flat)["xs"]
    assert [int(x) for x in xs] == list(range(12))


def test_tree_to_casts_floats_and_leaves_integers_alone():
    tree = {"w": torch.ones(2, 3), "step": torch.tensor(7), "m": [torch.zeros(4, dtype=torch.float64)]}
    out = ft.tree.to(tree, dtype=torch.bfloat16)
    assert out["w"].dtype == out["m"][0].dtype == torch.bfloat16
    assert out["step"].dtype == torch.int64 and int(out["step"]) == 7
    moved = ft.tree.to(tree, device="meta")
    assert {x.device.type for x in ft.tree.leaves(moved)} == {"meta"}
    assert moved["m"][0].dtype == torch.float64
    assert tree["w"].dtype == torch.float32, "tree_to must not modify its input"


def test_modern_attention_leaves_follow_the_config():
    from ftransformer.config import Attention

    cfg = ft.Config.from_flat(vocab_size=37, d_model=24, n_heads=3, n_kv_heads=1, n_layers=2, d_ff=40, max_seq_len=16,
                    bias=False, norm="rmsnorm", positional="rope", activation="swiglu",
                    attention=Attention(head_dim=10, qkv_bias=True, qk_norm=True))
    attn = ft.init_params(cfg)["blocks"][0]["attn"]
    assert set(attn) == {"w_qkv", "b_qkv", "w_o", "q_norm", "k_norm"}  # q/k/v biased, w_o not
    assert attn["w_qkv"].shape == (24, (3 + 2 * 1) * 10)
    assert attn["b_qkv"].shape == ((3 + 2 * 1) * 10,)
    assert attn["w_o"].shape == (3 * 10, 24)
    assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (10,)
    assert torch.equal(attn["q_norm"]["scale"], torch.ones(10))
    assert ft.params.param_breakdown(cfg)["total"] == ft.count_params(ft.init_params(cfg))
