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


QUANT_TYPES = {"token_embd": T.Q5_0, "attn_q": T.Q4_1, "attn_k": T.Q5_1, "attn_v": T.Q8_0, "attn_output": T.Q4_0,
               "output": T.BF16, "norm": T.F16}
RANDOM_BYTES = {"ffn_gate": T.Q4_K, "ffn_up": T.Q5_K, "ffn_down": T.Q6_K}  # gguf cannot quantize K-types: raw blocks


def _quantized_file(path, model, writer=None):
    """``model`` written with every supported type (K-types as random blocks, rows of 256 values)."""
    tensors = gguf_tiny.gguf_tensors(model, "llama")
    types = {}
    for name, data in tensors.items():
        part = name.split(".")[-2]
        if part in RANDOM_BYTES:
            tensors[name] = (gguf_tiny.random_blocks(*data.shape, RANDOM_BYTES[part], seed=len(types)), RANDOM_BYTES[part])
        types[name] = next((t for k, t in QUANT_TYPES.items() if k in part), T.F32)
    gguf_tiny.write(path, model, "llama", types=types, tensors=tensors, writer=writer)


def test_quantized_tensors_dequantize_bit_for_bit_as_gguf_does(tmp_path):
    from einops import rearrange
    from ftransformer.interop.hf import load_hf

    model = gguf_tiny.build_model("llama", hidden_size=256, intermediate_size=512)
    _quantized_file(tmp_path / "q.gguf", model)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    names, c = gguf_tiny.hf_names(model, "llama"), model.config
    reference = {}  # gguf's own dequantization, q/k rows put back in HF's order
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(*reversed(t.shape.tolist()))
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = c.num_attention_heads if ".attn_q." in t.name else c.num_key_value_heads
            w = rearrange(w, "(heads half two) d -> (heads two half) d", heads=heads, two=2)
        reference[names[t.name]] = w.float()
    model.load_state_dict(reference, strict=True)
    model.save_pretrained(tmp_path / "hf")
    expected = ft.tree.flatten_with_paths(load_hf(tmp_path / "hf", dtype=torch.float32)[1])
    got = ft.tree.flatten_with_paths(load_gguf(tmp_path / "q.gguf")[1])
    assert expected.keys() == got.keys()
    for path in expected:
        assert torch.equal(got[path].view(torch.int32), expected[path].view(torch.int32)), path


def _q8_rows_sharing_one_scale(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q8_0 blocks whose row's blocks all share one scale, each row reaching +-127 (int8 per row holds them)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (rows, cols // 32, 32), dtype=np.int8)
    q[:, 0, 0] = 127
    d = np.repeat((rng.random((rows, 1, 1)) * 0.01 + 0.001).astype(np.float16), cols // 32, axis=1)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(rows, -1)


def test_int8_keeps_q8_0_matrices_as_int8_weights(tmp_path):
    from ftransformer.layers.int8 import Int8Weight

    model = gguf_tiny.build_model("llama", hidden_size=64, intermediate_size=96)
    tensors = gguf_tiny.gguf_tensors(model, "llama")
    types = {n: T.Q8_0 for n in tensors if n.endswith(("attn_v.weight", "attn_q.weight", "attn_k.weight", "ffn_up.weight"))}
    tensors["blk.0.ffn_down.weight"] = (_q8_rows_sharing_one_scale(64, 96), T.Q8_0)
    gguf_tiny.write(tmp_path / "q8.gguf", model, "llama", types=types, tensors=tensors)
    cfg, dense = load_gguf(tmp_path / "q8.gguf")
    _, packed = load_gguf(tmp_path / "q8.gguf", int8=True)
    for i in range(cfg.n_layers):
        w_qkv, w_in = packed["blocks"][i]["attn"]["w_qkv"], packed["blocks"][i]["mlp"]["w_in"]
        assert isinstance(w_qkv, Int8Weight) and isinstance(w_in, Int8Weight)
        for got, want in ((w_qkv, dense["blocks"][i]["attn"]["w_qkv"]), (w_in, dense["blocks"][i]["mlp"]["w_in"])):
            assert ((got.dequantize() - want).abs() <= got.scale / 2 * (1 + 1e-6)).all()  # per-channel rounding only
        assert torch.equal(packed["blocks"][i]["attn"]["w_o"], dense["blocks"][i]["attn"]["w_o"])  # F32 stays float
    assert not isinstance(packed["blocks"][1]["mlp"]["w_out"], Int8Weight)  # F32 in layer 1
    exact = packed["blocks"][0]["mlp"]["w_out"]  # blocks of a row share a scale: per-channel int8 holds Q8_0 exactly
    assert isinstance(exact, Int8Weight) and torch.equal(exact.dequantize(), dense["blocks"][0]["mlp"]["w_out"])
    x = tokens(2, 9)  # 18 rows: the reference int8 product, the weight-only rounding alone
    expected = ft.forward(ft.quantization.dequantize(packed), x, cfg)
    torch.testing.assert_close(ft.forward(packed, x, cfg), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(gguf_tiny.CASES))
def test_save_gguf_f32_round_trips_exactly(case, tmp_path):
    model = gguf_tiny.build_model(case)
    gguf_tiny.write(tmp_path / "in.gguf", model, gguf_tiny.CASES[case][1])
    cfg, params = load_gguf(tmp_path / "in.gguf")
    out = save_gguf(params, cfg, tmp_path / "out.gguf", quant="f32")
    cfg2, params2 = load_gguf(out)
    assert cfg2 == cfg
    for path, leaf in ft.tree.flatten_with_paths(params).items():
        assert torch.equal(ft.tree.flatten_with_paths(params2)[path], leaf), path
    x = tokens(2, 11)
    if case in gguf_tiny.TRANSFORMERS_READS:  # GPT-2's vocabulary size from the placeholder tokens
        torch.testing.assert_close(hf_logits(transformers_gguf(out), x), ft.forward(params, x, cfg), rtol=1e-5, atol=1e-5)


def test_save_gguf_q8_0_within_its_rounding_and_read_alike_by_transformers(tmp_path):
    model = gguf_tiny.build_model("qwen2", hidden_size=64, intermediate_size=96)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = ft.load_hf(tmp_path / "hf")
    out = save_gguf(params, cfg, tmp_path / "q8.gguf", quant="q8_0")
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}  # norms and biases F32
    cfg2, params2 = load_gguf(out)
    flat, flat2 = ft.tree.flatten_with_paths(params), ft.tree.flatten_with_paths(params2)
    for path, w in flat.items():
        # Q8_0: a scale per 32 weights (their max / 127, stored as f16), each weight rounded to half a step
        assert (flat2[path] - w).abs().max() <= w.abs().max() / 127, path
    x = tokens(2, 11)
    ours = ft.forward(params2, x, cfg2)
    torch.testing.assert_close(ours, hf_logits(transformers_gguf(out), x), rtol=1e-5, atol=1e-5)


def test_save_gguf_refuses_what_gguf_cannot_say(tmp_path):
    from hf_tiny import build

    build("qwen2", tmp_path / "hf")  # per-layer sliding windows: llama.cpp's qwen2 has none
    cfg, params = ft.load_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="cannot express this config: attention"):
        save_gguf(params, cfg, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unknown GGUF quant 'q3_k'; supported: f32, f16"):
        save_gguf(params, cfg, tmp_path / "x.gguf", quant="q3_k")
    assert not (tmp_path / "x.gguf").exists()


def test_errors_name_the_architecture_type_and_tensor(tmp_path):
    model = gguf_tiny.build_model("llama")
    tensors = gguf_tiny.gguf_tensors(model, "llama")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'; supported: llama, qwen2"):
        gguf_tiny.write(tmp_path / "a.gguf", model, "mamba", tensors=tensors)
        load_gguf(tmp_path / "a.gguf")
    q2 = dict(tensors, **{"blk.0.ffn_up.weight": (np.zeros((40, 84), np.uint8), T.Q2_K)})
    gguf_tiny.write(tmp_path / "b.gguf", model, "llama", tensors=q2)
    with pytest.raises(ValueError, match=r"blk.0.ffn_up.weight \(Q2_K\); supported: F32, F16, BF16, Q8_0"):
        load_gguf(tmp_path / "b.gguf")
    gguf_tiny.write(tmp_path / "c.gguf", model, "llama", tensors={k: v for k, v in tensors.items() if k != "blk.1.attn_v.weight"})
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\).*blk.1.attn_v.weight \(model.layers.1.self_attn.v_proj"):
        load_gguf(tmp_path / "c.gguf")
    gguf_tiny.write(tmp_path / "d.gguf", model, "llama", tensors=dict(tensors, **{"blk.0.extra.weight": tensors["output_norm.weight"]}))
    with pytest.raises(ValueError, match="has 1 tensor.* no place for: blk.0.extra.weight"):
        load_gguf(tmp_path / "d.gguf")
    (tmp_path / "e.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_gguf(tmp_path / "e.gguf")
    with pytest.raises(ValueError, match="is not a file"):
        load_gguf(tmp_path / "nothing.gguf")


def test_save_gguf_hands_the_tokenizer_to_gguf_tokenizer(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def add_tokenizer(writer, tokenizer):
        calls.append(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokenizer)

    monkeypatch.setitem(sys.modules, "ftransformer.interop.gguf_tokenizer", types.SimpleNamespace(add_tokenizer=add_tokenizer))
    cfg, params = load_gguf(_written(tmp_path, "llama"))
    vocab = [f"t{i}" for i in range(cfg.vocab_size)]
    out = save_gguf(params, cfg, tmp_path / "tok.gguf", tokenizer=vocab)
    fields = gguf.GGUFReader(out).fields
    assert calls == [vocab] and fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.tokens"].contents() == vocab
    no_tokenizer = gguf.GGUFReader(save_gguf(params, cfg, tmp_path / "none.gguf")).fields
    assert no_tokenizer["tokenizer.ggml.model"].contents() == "none" and "tokenizer.ggml.tokens" not in no_tokenizer


def _written(tmp_path, case: str):
    path = tmp_path / f"{case}.gguf"
    gguf_tiny.write(path, gguf_tiny.build_model(case), gguf_tiny.CASES[case][1])
    return path


# Features transformers' GGUF loader drops (it keeps its config defaults) but llama.cpp's metadata holds.
BEYOND_TRANSFORMERS = {
    "phi3": dict(sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5, attn_logit_softcapping=5.0,
                   final_logit_softcapping=4.0),
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5, num_hidden_layers=7, rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "qwen3": dict(head_dim=10),
}


@pytest.mark.parametrize("case", list(BEYOND_TRANSFORMERS))
def test_metadata_transformers_ignores_is_read(case, tmp_path):
    model = gguf_tiny.build_model(case, **BEYOND_TRANSFORMERS[case])
    path = tmp_path / "m.gguf"
    gguf_tiny.write(path, model, gguf_tiny.CASES[case][1])
    if case == "gemma3":  # rope scaling on the global layers, as llama.cpp's converter writes it
        meta = gguf.GGUFWriter(path, "gemma3")
        meta.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        meta.add_rope_scaling_factor(8.0)
        gguf_tiny.write(path, model, "gemma3", writer=meta)
    cfg, params = load_gguf(path)
    x = tokens(2, 11)
    torch.testing.assert_close(ft.forward(params, x, cfg), hf_logits(model, x), rtol=1e-5, atol=1e-5)
    save_gguf(params, cfg, tmp_path / "again.gguf", quant="f32")
    assert load_gguf(tmp_path / "again.gguf")[0] == cfg


# ---------------------------------------------------------------- reading: header, memory map, one tensor at a time


@pytest.mark.parametrize("alignment", [None, 64])
def test_header_reader_gives_gguf_readers_tensor_infos(alignment, tmp_path):
    from ftransformer.interop.gguf_file import read_gguf_header

    model = gguf_tiny.build_model("llama", hidden_size=256, intermediate_size=512)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    _quantized_file(tmp_path / "q.gguf", model, writer=writer)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    meta, infos = read_gguf_header(tmp_path / "q.gguf")
    assert list(infos) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = infos[t.name]
        assert (info.shape, info.ggml_type, info.start) == (tuple(reversed(t.shape.tolist())), int(t.tensor_type), t.data_offset)
    assert meta.get("general.alignment") == alignment
    assert meta["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    skipped, _ = read_gguf_header(tmp_path / "q.gguf", keep=lambda key: not key.startswith("tokenizer."))
    assert skipped == {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}


def test_float_tensors_are_views_of_the_mapped_file_which_is_never_written(tmp_path):
    from test_hf_zero_copy import mapped_from

    path = tmp_path / "f32.gguf"
    gguf_tiny.write(path, gguf_tiny.build_model("llama"), "llama")
    before = path.read_bytes()
    cfg, params = load_gguf(path)
    flat = ft.tree.flatten_with_paths(params)
    views = [p for p, t in flat.items() if mapped_from(t, path)]
    # every leaf one stored tensor needs no change is the file's memory; the fused q|k|v (and the
    # permuted q/k rows in it) is a copy
    assert set(views) == {p for p in flat if not p.endswith("w_qkv")}
    assert flat["blocks.0.mlp.w_in"].stride() == (1, cfg.d_model)  # a transposed view, not a copy
    for t in flat.values():
        t.mul_(2)
    assert path.read_bytes() == before


def test_each_tensor_is_read_once_after_every_name_and_shape_is_checked(tmp_path, monkeypatch):
    import gc
    import weakref

    from ftransformer.interop import gguf as gguf_io

    model = gguf_tiny.build_model("llama", hidden_size=256, intermediate_size=512)
    _quantized_file(tmp_path / "q.gguf", model)
    made, alive = [], []
    real = gguf_io._file_tensor

    def recording(data, info, kind, order):
        gc.collect()
        alive.append(sum(r() is not None for r in made))  # dequantized tensors still held when the next is read
        t = real(data, info, kind, order)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(gguf_io, "_file_tensor", recording)
    load_gguf(tmp_path / "q.gguf", dtype=torch.float64)  # every parameter a cast copy: no tensor is kept
    assert len(made) == len(gguf.GGUFReader(tmp_path / "q.gguf").tensors) and max(alive) == 0
    made.clear()
    tensors = gguf_tiny.gguf_tensors(model, "llama")
    tensors["blk.1.ffn_up.weight"] = np.ascontiguousarray(tensors["blk.1.ffn_up.weight"][:256])
    gguf_tiny.write(tmp_path / "bad.gguf", model, "llama", tensors=tensors)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(256, 256\) but the config expects \(512, 256\)"):
        load_gguf(tmp_path / "bad.gguf")
    assert made == []


def test_a_truncated_file_is_refused_before_any_tensor_is_read(tmp_path):
    path = tmp_path / "f32.gguf"
    gguf_tiny.write(path, gguf_tiny.build_model("llama"), "llama")
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(ValueError, match=r"is truncated: tensor .* ends at byte \d+ of a \d+-byte file"):
        load_gguf(path)
    path.write_bytes(whole[:300])
    with pytest.raises(ValueError, match="is not a readable GGUF file .*malformed GGUF metadata"):
        load_gguf(path)


def test_bench_load_gguf_times_both_loaders(tmp_path, capsys):
    from ftransformer.cli import main

    path = tmp_path / "tiny.gguf"
    gguf_tiny.write(path, gguf_tiny.build_model("llama"), "llama")
    assert main(["bench", "load", "--gguf", str(path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "loading tiny.gguf (float32, 1 thread(s))" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("ft.load_gguf ", "transformers ")) and "/" not in line}
    assert set(rows) == {"ft.load_gguf", "transformers"}
    assert all(len(r) == 5 and float(r[0]) >= 0 and float(r[1]) > 0 for r in rows.values())
    assert "ft.load_gguf / transformers: time x" in out
    assert main(["bench", "load", "--gguf", str(tmp_path / "nothing.gguf")]) == 2
    assert "--gguf" in capsys.readouterr().err


# ---------------------------------------------------------------- save_gguf with a tokenizer


def _tokenizers():
    """The two tiny trained tokenizers of test_hf_tokenizer: byte-level BPE (Llama 3 style) and SentencePiece BPE."""
    from test_gguf_tokenizer import hf_style
    from test_hf_tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, byte_level_backend, sentencepiece_backend

    return {
        "byte-level": hf_style(byte_level_backend(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                               chat_template=LLAMA3_TEMPLATE),
        "sentencepiece": hf_style(sentencepiece_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=CHATML_TEMPLATE),
    }


TEXTS = ["Hello, world! 12345", "To be, or not to be: that is the question.", "café 東京 😀 <|eot_id|>x"]


@pytest.mark.parametrize("kind,case", [("byte-level", "llama"), ("sentencepiece", "llama"), ("byte-level", "gpt2")])
def test_save_gguf_with_a_tokenizer_reads_back_the_same_ids_and_logits(kind, case, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = _tokenizers()[kind]
    model = gguf_tiny.build_model(case, vocab_size=tokenizer.vocab_size)
    gguf_tiny.write(tmp_path / "in.gguf", model, gguf_tiny.CASES[case][1])
    cfg, params = load_gguf(tmp_path / "in.gguf")
    out = save_gguf(params, cfg, tmp_path / "out.gguf", tokenizer=tokenizer, quant="f32")
    ours, theirs = ft.load_gguf_tokenizer(out), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    cfg2, params2 = load_gguf(out)
    model2 = transformers_gguf(out)
    assert cfg2 == cfg and ours.chat_templates == tokenizer.chat_templates
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ours.encode(text) == ids and theirs.encode(text) == ids, text
        x = torch.tensor([ids])
        logits = ft.forward(params, x, cfg)
        assert torch.equal(ft.forward(params2, x, cfg2), logits)
        torch.testing.assert_close(hf_logits(model2, x), logits, rtol=1e-5, atol=1e-5)


def test_save_gguf_refuses_a_tokenizer_of_another_size(tmp_path):
    tokenizer = _tokenizers()["byte-level"]
    cfg, params = load_gguf(_written(tmp_path, "llama"))
    with pytest.raises(ValueError, match=rf"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"):
        save_gguf(params, cfg, tmp_path / "x.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "x.gguf").exists()


def test_a_deferred_tensor_must_be_what_it_promised():
    from ftransformer.interop.hf import Deferred, _made

    promised = Deferred((2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"promised \(2, 3\) torch.float32, made \(3, 2\) torch.float32"):
        _made(promised)
    assert torch.equal(_made(Deferred((2,), torch.float16, lambda: torch.ones(2, dtype=torch.float16))), torch.ones(2, dtype=torch.float16))
