import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ftransformer as ft
from ftransformer import checkpoint, data, optim
from ftransformer import tree
from ftransformer.layers.int8 import Int8Weight
from ftransformer.quantization import is_quantized

# every axis a different size: vocab 29, d_model 20, heads 5, d_ff 36, seq 11, layers 2
CFG = ft.Config(vocab_size=29, d_model=20, n_heads=5, n_layers=2, d_ff=36, max_seq_len=11)


def make_optimizer():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10, 1e-3)))


def trained_state(seed=0):
    """Params and optimizer state after one real update (so the moments are not zeros)."""
    params = ft.init_params(CFG, seed=seed)
    opt = make_optimizer()
    state = opt.init(params)
    tokens = torch.randint(0, CFG.vocab_size, (3, 11), generator=torch.Generator().manual_seed(seed))
    grads = torch.func.grad(ft.loss_fn)(params, tokens, tokens.roll(-1, dims=-1), CFG)
    updates, state = opt.update(grads, state, params)
    return optim.apply_updates(params, updates), state, opt


def assert_trees_equal(a, b):
    fa, sa = torch.utils._pytree.tree_flatten(a)
    fb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(fa, fb):
        assert torch.equal(x, y) and x.dtype == y.dtype


def test_round_trip_everything(tmp_path):
    params, state, opt = trained_state()
    tok = data.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
    metrics = [{"step": 0, "val_loss": 3.3}, {"step": 5, "val_loss": 2.5}]
    extra = {"fit": {"seed": 7, "next_step": 5}, "note": "hello"}
    path = checkpoint.save_checkpoint(
        tmp_path / "ck", params=params, config=CFG, step=5, opt_state=state, tokenizer=tok, metrics=metrics,
        extra=extra,
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "opt_state.safetensors", "params.safetensors", "tokenizer.json"]
    ck = checkpoint.load_checkpoint(path)
    restored = ck.optimizer_state(opt)
    assert ck.config == CFG and ck.step == 5 and ck.metrics == metrics and ck.extra == extra
    assert ck.tokenizer == tok
    assert_trees_equal(ck.params, params)
    assert_trees_equal(restored, state)
    # the restored state has the optimizer's own structure (NamedTuples), so training continues from it
    assert type(restored[1]) is optim.AdamWState and int(restored[1].count) == 1
    grads = ft.tree.map(torch.ones_like, params)
    u1, _ = opt.update(grads, state, params)
    u2, _ = opt.update(grads, restored, ck.params)
    assert_trees_equal(u1, u2)


def test_opt_state_has_one_type_whatever_the_arguments(tmp_path):
    params, state, opt = trained_state()
    checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=1, opt_state=state)
    checkpoint.save_checkpoint(tmp_path / "bare", params=params, config=CFG, step=1)
    loads = [checkpoint.load_checkpoint(tmp_path / "ck"), checkpoint.load_checkpoint(tmp_path / "ck", config=CFG),
             checkpoint.load_checkpoint(tmp_path / "ck", with_opt_state=False), checkpoint.load_checkpoint(tmp_path / "bare")]
    assert all(type(ck.opt_state) is dict for ck in loads)
    assert sorted(loads[0].opt_state) == sorted(tree.flatten_with_paths(state)) and loads[2].opt_state == loads[3].opt_state == {}
    assert_trees_equal(loads[1].optimizer_state(opt), state)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        loads[2].optimizer_state(opt)
    with pytest.raises(TypeError, match="optimizer"):
        checkpoint.load_checkpoint(tmp_path / "ck", optimizer=opt)


def test_opt_state_paths_name_fields(tmp_path):
    _, state, _ = trained_state()
    flat = tree.flatten_with_paths(state)
    assert "1.mu.blocks.0.attn.w_qkv" in flat and "1.count" in flat
    # without the optimizer, load returns that flat dict
    params, state, _ = trained_state()
    checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=1, opt_state=state)
    ck = checkpoint.load_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.opt_state["1.nu.embed.tokens"], state[1].nu["embed"]["tokens"])
    assert ck.tokenizer is None


def test_bpe_tokenizer_travels_with_checkpoint(tmp_path):
    params = ft.init_params(CFG)
    bpe = data.BPETokenizer.train("def f(x):\n    return x\n" * 50, vocab_size=280)
    checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=0, tokenizer=bpe)
    assert checkpoint.load_checkpoint(tmp_path / "ck").tokenizer == bpe


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    params1, state1, opt = trained_state(seed=1)
    checkpoint.save_checkpoint(path, params=params1, config=CFG, step=1, opt_state=state1)
    params2, state2, _ = trained_state(seed=2)

    real = checkpoint._write_tensors
    calls = []

    def crash_on_second_file(p, flat):
        calls.append(p.name)
        if len(calls) == 2:  # params are written, the crash hits the optimizer state
            raise OSError("disk full (simulated)")
        real(p, flat)

    monkeypatch.setattr(checkpoint, "_write_tensors", crash_on_second_file)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, params=params2, config=CFG, step=2, opt_state=state2)
    monkeypatch.undo()
    ck = checkpoint.load_checkpoint(path)
    assert ck.step == 1
    assert_trees_equal(ck.params, params1)
    assert_trees_equal(ck.optimizer_state(opt), state1)
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary directory left behind
    # a later save works and replaces it
    checkpoint.save_checkpoint(path, params=params2, config=CFG, step=2, opt_state=state2)
    assert checkpoint.load_checkpoint(path).step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_crash_between_renames_is_recovered(tmp_path):
    path = tmp_path / "latest"
    params, _, _ = trained_state()
    checkpoint.save_checkpoint(path, params=params, config=CFG, step=3)
    # the moment inside a save when the old checkpoint is set aside and the new one is not yet in place
    path.rename(tmp_path / ".latest.old-123456789abc")
    assert checkpoint.checkpoint_exists(path)
    ck = checkpoint.load_checkpoint(path)
    assert ck.step == 3 and path.is_dir()


def test_mismatched_config_names_key_and_shapes(tmp_path):
    params, state, _ = trained_state()
    checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=1, opt_state=state)
    with pytest.raises(ValueError, match=r"embed.tokens has shape \(29, 20\) in the checkpoint but the config expects \(29, 30\)"):
        checkpoint.load_checkpoint(tmp_path / "ck", config=CFG.replace(d_model=30))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.w_in has shape \(20, 36\) in the checkpoint but the config expects \(20, 44\)"):
        checkpoint.load_checkpoint(tmp_path / "ck", config=CFG.replace(d_ff=44))
    with pytest.raises(ValueError, match=r"blocks.2.ln1.scale \(shape \(20,\)\) is expected but missing"):
        checkpoint.load_checkpoint(tmp_path / "ck", config=CFG.replace(n_layers=3))
    with pytest.raises(ValueError, match=r"holds blocks.0.attn.b_o \(shape \(20,\)\), which the config does not have"):
        checkpoint.load_checkpoint(tmp_path / "ck", config=CFG.replace(bias=False))
    with pytest.raises(ValueError, match=r"does not fit the optimizer: 1.trace.embed.tokens \(shape \(29, 20\)\) is expected"):
        checkpoint.load_checkpoint(tmp_path / "ck").optimizer_state(
            optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9))
        )
    # a config that only changes non-shape fields fits
    assert checkpoint.load_checkpoint(tmp_path / "ck", config=CFG.replace(dropout=0.1)).config.dropout == 0.1


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        checkpoint.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "half")
    params = ft.init_params(CFG)
    path = checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=0)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        checkpoint.load_checkpoint(path).optimizer_state(make_optimizer())
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["format"] = "something-else"
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not an ftransformer checkpoint"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        checkpoint.save_checkpoint(tmp_path / "x", params=params, config=CFG, step=-1)


def test_expected_shapes_match_init_params():
    # computed on the meta device, so even GPT-2's shapes cost no memory
    shapes = checkpoint.expected_param_shapes(ft.PRESETS["gpt2"])
    assert shapes["embed.tokens"] == (50257, 768) and shapes["blocks.11.attn.w_qkv"] == (768, 2304)
    real = {k: v.shape for k, v in tree.flatten_with_paths(ft.init_params(CFG)).items()}
    assert checkpoint.expected_param_shapes(CFG) == real


def test_a_run_directory_loads_its_latest_checkpoint(tmp_path):
    params = ft.init_params(CFG)
    checkpoint.save_checkpoint(tmp_path / checkpoint.LATEST, params=params, config=CFG, step=9)
    ck = checkpoint.load_checkpoint(tmp_path)
    assert ck.step == 9 and ck.path == tmp_path / "latest"


def saved_checkpoint(tmp_path):
    params, state, _ = trained_state()
    tok = data.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
    return checkpoint.save_checkpoint(tmp_path / "ck", params=params, config=CFG, step=3, opt_state=state, tokenizer=tok)


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (lambda p: (p / "params.safetensors").write_bytes((p / "params.safetensors").read_bytes()[:100]),
         "params.safetensors"),
        (lambda p: (p / "tokenizer.json").write_text('{"kind": "char"}'), "tokenizer.json"),
        (lambda p: (p / "tokenizer.json").write_text('{"model": {"type": "BPE"}}'), "tokenizer.json"),
        (lambda p: (p / "checkpoint.json").write_text(json.dumps(
            {k: v for k, v in json.loads((p / "checkpoint.json").read_text()).items() if k != "config"})),
         "checkpoint.json"),
    ],
)
def test_damaged_files_give_one_value_error_naming_the_file(tmp_path, damage, file):
    path = saved_checkpoint(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=rf"checkpoint .*: {file}"):
        checkpoint.load_checkpoint(path)


def test_loading_without_the_optimizer_state_skips_its_file(tmp_path):
    path = saved_checkpoint(tmp_path)
    (path / "opt_state.safetensors").write_bytes(b"not a safetensors file")
    ck = checkpoint.load_checkpoint(path, with_opt_state=False)
    assert ck.opt_state == {} and ck.step == 3
    with pytest.raises(ValueError, match="opt_state.safetensors is damaged"):
        checkpoint.load_checkpoint(path)


# ---------------------------------------------------------------- format version 1

V1 = Path(__file__).parent / "data" / "checkpoint_v1"  # written by commit 1f2cddd (tests/data/make_checkpoint_v1.py)
V1_CFG = ft.Config(vocab_size=7, d_model=6, n_heads=2, n_layers=1, d_ff=10, max_seq_len=5)


def v1_expected(prefix):
    """The tensors the v1 files were written from, ``{path: tensor}``, saved next to them by the old code."""
    flat = load_file(V1 / "expected.safetensors")
    return {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def assert_flat_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_reads_format_version_1_exactly():
    assert json.loads((V1 / "float" / checkpoint.META_FILE).read_text())["version"] == 1
    opt = make_optimizer()
    ck = checkpoint.load_checkpoint(V1 / "float")
    restored = ck.optimizer_state(opt)
    assert ck.config == V1_CFG and ck.step == 1 and ck.extra == {"note": "v1"}
    assert ck.tokenizer == data.CharTokenizer.from_text("abcdef ")
    assert_flat_equal(tree.flatten_with_paths(ck.params), v1_expected("params"))
    assert list(tree.flatten_with_paths(ck.params)) == list(tree.flatten_with_paths(ft.init_params(V1_CFG)))
    assert_flat_equal(tree.flatten_with_paths(restored), v1_expected("opt_state"))
    assert type(restored[1]) is optim.AdamWState and int(restored[1].count) == 1


def test_resumes_from_format_version_1():
    """One more step from the v1 files equals one more step from the state rebuilt by hand."""
    opt = make_optimizer()
    ck = checkpoint.load_checkpoint(V1 / "float")
    template = ft.init_params(V1_CFG)  # safetensors sorts keys: the template gives init_params' order back
    params = tree.unflatten_paths(v1_expected("params"), like=template)
    flat_state = v1_expected("opt_state")
    moments = {k: tree.unflatten_paths({p[len(k) + 3:]: v for p, v in flat_state.items() if p.startswith(f"1.{k}.")},
                                       like=template) for k in ("mu", "nu")}
    state = (optim.EmptyState(), optim.AdamWState(count=flat_state["1.count"], lr=flat_state["1.lr"], **moments))
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    grads = torch.func.grad(ft.loss_fn)(params, tokens, tokens.roll(-1, dims=-1), V1_CFG)
    u1, s1 = opt.update(grads, state, params)
    u2, s2 = opt.update(grads, ck.optimizer_state(opt), ck.params)
    assert_trees_equal(u1, u2)
    assert_trees_equal(s1, s2)


def test_reads_format_version_1_int8():
    ck = checkpoint.load_checkpoint(V1 / "int8")
    assert ck.opt_state == {} and is_quantized(ck.params)
    assert isinstance(ck.params["blocks"][0]["attn"]["w_qkv"], Int8Weight)
    assert_flat_equal(tree.flatten_with_paths(ck.params), v1_expected("int8"))
    logits = ft.forward(ck.params, torch.tensor([[1, 2, 3]]), V1_CFG)
    assert logits.shape == (1, 3, V1_CFG.vocab_size)


def test_new_checkpoints_are_version_2_with_the_same_names(tmp_path):
    ck = checkpoint.load_checkpoint(V1 / "float")
    checkpoint.save_checkpoint(tmp_path / "v2", params=ck.params, config=ck.config, step=1,
                               opt_state=ck.optimizer_state(make_optimizer()))
    meta = checkpoint.read_checkpoint_info(tmp_path / "v2")
    assert meta["version"] == 2 and meta["paths"] == checkpoint.PATHS
    for name in ("params", "opt_state"):
        old, new = (load_file(d / f"{name}.safetensors") for d in (V1 / "float", tmp_path / "v2"))
        assert_flat_equal(new, old)


def test_refuses_another_path_convention(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ck", params=ft.init_params(CFG), config=CFG, step=0)
    meta_file = tmp_path / "ck" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["paths"] = "something-else"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="names its tensors by 'something-else'; expected 'ftransformer.tree'"):
        checkpoint.load_checkpoint(tmp_path / "ck")
