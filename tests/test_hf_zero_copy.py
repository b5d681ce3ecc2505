"""load_hf without copies: parameters that are a stored tensor are its memory map or a transposed view of
it, and everything downstream (linear, compile, int8, tree ops, checkpoints, save_hf, training) works on them."""

import shutil
from pathlib import Path

import pytest
import torch

import ftransformer as ft
from ftransformer.interop.hf import fill_params, load_hf, save_hf
from ftransformer.interop.registry import FAMILIES
from ftransformer.layers.linear import linear
from hf_tiny import build, tokens

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")

MATRICES = ("attn.w_o", "mlp.w_gate", "mlp.w_in", "mlp.w_out")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, transformers model) for llama (separate q/k/v) and phi3 (fused gate_up rows)."""
    root = tmp_path_factory.mktemp("zero_copy")
    return {family: (root / family, build(family, root / family)) for family in ("llama", "phi3")}


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of a family's directory (a test that writes must not change the shared one)."""
    def make(family):
        shutil.copytree(saved[family][0], tmp_path / family)
        return tmp_path / family
    return make


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s memory lies in a private (copy-on-write) map of the file ``path``."""
    ptr, name = t.data_ptr(), str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if fields[-1] == name and lo <= ptr < hi:
            return fields[1][3] == "p"
    return False


def leaves(params):
    return ft.tree.flatten_with_paths(params)


def contiguous_copy(params):
    return ft.tree.map(lambda t: t.clone(memory_format=torch.contiguous_format), params)


def test_matrices_are_transposed_views_of_the_mapped_file_and_only_fused_qkv_is_copied(saved):
    directory, model = saved["llama"]
    cfg, params = load_hf(directory)
    file = directory / "model.safetensors"
    flat = leaves(params)
    for i in range(cfg.n_layers):
        for name in MATRICES:
            w = flat[f"blocks.{i}.{name}"]
            assert not w.is_contiguous() and w.t().is_contiguous() and mapped_from(w, file), name
        assert mapped_from(flat[f"blocks.{i}.ln1.scale"], file)
        qkv = flat[f"blocks.{i}.attn.w_qkv"]  # q, k and v concatenated: a value that must change, so a copy,
        assert qkv.t().is_contiguous() and not mapped_from(qkv, file)  # laid out in the file's rows
    assert mapped_from(flat["embed.tokens"], file) and flat["embed.tokens"].is_contiguous()
    assert mapped_from(flat["unembed.w"], file) and torch.equal(flat["unembed.w"], model.lm_head.weight.T)


def test_fused_rows_become_views_and_a_cast_copies(saved):
    directory, model = saved["phi3"]
    cfg, params = load_hf(directory)
    file, mlp = directory / "model.safetensors", params["blocks"][1]["mlp"]
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    assert mapped_from(mlp["w_gate"], file) and mapped_from(mlp["w_in"], file)
    assert torch.equal(mlp["w_gate"], gate_up[: cfg.d_ff].T) and torch.equal(mlp["w_in"], gate_up[cfg.d_ff:].T)
    _, cast = load_hf(directory, dtype=torch.float64)
    assert not any(mapped_from(t, file) for t in leaves(cast).values())
    assert all(t.dtype == torch.float64 for t in leaves(cast).values())
    assert cast["blocks"][1]["attn"]["w_o"].t().is_contiguous() and cast["embed"]["tokens"].is_contiguous()
    for k, t in leaves(params).items():
        assert torch.equal(leaves(cast)[k], t.double()), k


def test_fill_params_makes_views_of_tensors_in_memory(saved):
    _, model = saved["llama"]
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg = ft.interop.hf.config_from_hf_dir(saved["llama"][0])
    params = fill_params(sd, FAMILIES["llama"], cfg)
    w_o, o_proj = params["blocks"][0]["attn"]["w_o"], sd["model.layers.0.self_attn.o_proj.weight"]
    assert w_o.data_ptr() == o_proj.data_ptr() and torch.equal(w_o, o_proj.T)
    assert params["embed"]["tokens"] is sd["model.embed_tokens.weight"]
    assert all(t.dtype == torch.float64 for t in leaves(params).values())
    copied = fill_params(sd, FAMILIES["llama"], cfg, dtype=torch.float32)  # a cast copies
    assert copied["blocks"][0]["attn"]["w_o"].data_ptr() != o_proj.data_ptr()


def test_linear_reads_a_transposed_view_without_copying_it():
    stored = torch.randn(7, 5, dtype=torch.float64)  # [d_out, d_in], as a file holds it
    w, x = stored.t(), torch.randn(3, 5, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        y = linear(x, w)
    ops = {e.name for e in prof.events()}
    assert not ops & {"aten::contiguous", "aten::clone", "aten::copy_"}, ops
    assert torch.equal(y, torch.nn.functional.linear(x, stored))  # the stored matrix itself, as nn.Linear reads it
    torch.testing.assert_close(y, x @ w.contiguous(), atol=1e-12, rtol=1e-12)


def test_in_place_updates_change_the_parameters_never_the_file(copy):
    directory = copy("llama")
    file = directory / "model.safetensors"
    before = file.read_bytes()
    cfg, params = load_hf(directory)
    original = contiguous_copy(params)
    for t in leaves(params).values():
        t.add_(1.0)  # copy-on-write: the touched pages become this process's own
    assert file.read_bytes() == before
    for k, t in leaves(params).items():
        assert torch.equal(t, leaves(original)[k] + 1.0), k
    assert all(torch.equal(a, b) for a, b in zip(leaves(load_hf(directory)[1]).values(), leaves(original).values()))


def test_a_training_step_on_mapped_parameters_leaves_the_file_alone(copy):
    directory = copy("llama")
    before = (directory / "model.safetensors").read_bytes()
    cfg, params = load_hf(directory)
    original = contiguous_copy(params)
    train = ft.train.make_train_step(cfg, ft.optim.adamw(1e-2))
    state = train.init(params)
    x = tokens(2, 9)
    for _ in range(2):
        params, state, metrics = train(params, state, (x[:, :-1], x[:, 1:]))
        assert torch.isfinite(metrics["loss"])
    assert (directory / "model.safetensors").read_bytes() == before
    assert all(not torch.equal(a, b) for a, b in zip(leaves(params).values(), leaves(original).values()))


def test_checkpoints_and_tree_ops_work_on_views(saved, tmp_path):
    cfg, params = load_hf(saved["llama"][0])
    dense = contiguous_copy(params)
    ft.checkpoint.save_checkpoint(tmp_path / "ckpt", params=params, config=cfg, step=3)
    back = ft.checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert back.step == 3 and back.config == cfg
    for (k, a), b in zip(leaves(back.params).items(), leaves(dense).values()):
        assert torch.equal(a, b), k
    doubled, as64 = ft.tree.map(lambda t: t * 2, params), ft.tree.to(params, dtype=torch.float64)
    for k, t in leaves(dense).items():
        assert torch.equal(leaves(doubled)[k], t * 2) and torch.equal(leaves(as64)[k], t.double()), k
    flat, treedef = ft.tree.flatten(params)
    assert all(a is b for a, b in zip(ft.tree.leaves(ft.tree.unflatten(flat, treedef)), flat))


def test_save_hf_over_the_directory_the_model_was_loaded_from(copy):
    directory = copy("llama")
    cfg, params = load_hf(directory)
    dense = contiguous_copy(params)
    save_hf(params, cfg, directory)  # renamed over the mapped file: the parameters keep reading the old one
    save_hf(params, cfg, directory)
    for (k, a), b, c in zip(leaves(params).items(), leaves(dense).values(), leaves(load_hf(directory)[1]).values()):
        assert torch.equal(a, b) and torch.equal(c, b), k
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_int8_quantize_of_views_equals_quantize_of_contiguous_params(saved):
    cfg, params = load_hf(saved["llama"][0])
    q_views, q_dense = ft.quantization.quantize(params, cfg), ft.quantization.quantize(contiguous_copy(params), cfg)
    for (k, a), b in zip(leaves(q_views).items(), leaves(q_dense).values()):
        assert torch.equal(a, b), k
    x = tokens(2, 9)
    assert torch.equal(ft.forward(q_views, x, cfg), ft.forward(q_dense, x, cfg))


def test_a_pytorch_bin_checkpoint_is_mapped_too(saved, tmp_path):
    directory, model = saved["llama"]
    shutil.copy(directory / "config.json", tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the zip format torch >= 1.6 writes
    cfg, params = load_hf(tmp_path)
    w_o = params["blocks"][0]["attn"]["w_o"]
    assert mapped_from(w_o, tmp_path / "pytorch_model.bin")
    assert torch.equal(w_o, model.model.layers[0].self_attn.o_proj.weight.T)


@pytest.mark.slow  # inductor's first compile takes ~30 s on a small CPU
def test_compiled_forward_on_views_matches_eager(saved, no_typecheck):
    cfg, params = load_hf(saved["llama"][0])
    x = tokens(2, 9)
    compiled = torch.compile(ft.forward, fullgraph=True)
    torch.testing.assert_close(compiled(params, x, cfg), ft.forward(contiguous_copy(params), x, cfg),
                               atol=1e-5, rtol=1e-5)


def test_another_device_gets_copies_in_the_config_shapes(saved):
    """Off the CPU nothing is mapped: every leaf is allocated on the device (meta here: no GPU needed)."""
    cfg, params = load_hf(saved["llama"][0], device="meta")
    assert all(t.device.type == "meta" for t in leaves(params).values())
    expected = {k: t.shape for k, t in leaves(ft.init_params(cfg)).items()}
    assert {k: t.shape for k, t in leaves(params).items()} == expected
