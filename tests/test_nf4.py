"""NF4 weights (ftransformer.layers.nf4) and QLoRA (peft.lora(..., base="nf4")): code book, round trip,
bitsandbytes' codes, adapters on a 4-bit base (grad, vmap, compile, merge), storage bytes, checkpoints."""

import pytest
import torch

import ftransformer as ft
from ftransformer import peft
from ftransformer.layers.adapter import DoRAWeight, LoRAWeight
from ftransformer.layers.int8 import Int8Weight, as_float
from ftransformer.layers.linear import linear
from ftransformer.layers.nf4 import (
    DYNAMIC_TABLE, NF4_CODE, NF4Weight, block_absmax, dequantize_nf4, nbytes, quantize_nf4,
)

F64 = torch.float64
# QLoRA (arXiv:2305.14314), Appendix E: the NF4 data type's 16 values, as the paper prints them.
PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def llama() -> ft.Config:
    return ft.PRESETS["tiny"].replace(positional="rope", n_kv_heads=1, activation="swiglu", norm="rmsnorm",
                                      bias=False, tie_embeddings=False)


def draw(gen: torch.Generator, *shape, std=0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def qlora(cfg: ft.Config, dora=False, seed=0, moved=True) -> dict:
    """A float64 model whose adapted matrices sit on NF4 bases, ``b`` (and ``m``) moved off their init."""
    params = ft.init_params(cfg, seed=0, dtype=F64)
    adapted = peft.lora(params, cfg, rank=2, alpha=4.0, key=ft.random.key(seed), dora=dora, base="nf4")
    if not moved:
        return adapted
    trainable, frozen = peft.split(adapted)
    g = torch.Generator().manual_seed(seed + 10)
    return peft.combine(ft.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64), trainable),
                        frozen)


# ---------------------------------------------------------------- the format


def test_code_book_is_the_published_one():
    assert list(NF4_CODE) == PUBLISHED
    assert len(set(NF4_CODE)) == 16 and sorted(NF4_CODE) == list(NF4_CODE)


@pytest.mark.parametrize("shape", [(40, 24), (128, 96), (2, 7)])  # 7 blocks of 64 + a short one; one short block
def test_round_trip_error_is_bounded_per_block(gen, shape):
    w = draw(gen, *shape)
    q = quantize_nf4(w)
    assert q.shape == w.shape and q.codes.dtype == torch.uint8 and q.codes.shape == (shape[1], shape[0] // 2)
    back = dequantize_nf4(q, torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    flat, err = w.t().reshape(-1), (w - back).t().reshape(-1)
    gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    stored = block_absmax(q)
    for i in range(stored.numel()):
        block = slice(64 * i, 64 * (i + 1))
        true_absmax = flat[block].abs().max()
        # half the largest code gap times the block's absmax, plus what double-quantizing the absmax moved it
        bound = gap / 2 * true_absmax + (stored[i] - true_absmax).abs() + 1e-7
        assert float(err[block].abs().max()) <= float(bound), i
    assert float(((stored - torch.stack([flat[64 * i:64 * (i + 1)].abs().max() for i in range(stored.numel())]))
                  .abs()).max()) <= 0.01 * float(flat.abs().max())  # the 8-bit absmax is close


def test_dequantize_in_float64_is_exact_and_float32_rounds_it_once(gen):
    q = quantize_nf4(draw(gen, 64, 40))
    exact = dequantize_nf4(q, F64)
    assert torch.equal(dequantize_nf4(q, torch.float32), exact.float())
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), exact.float().bfloat16())
    assert torch.equal(as_float(q, F64), exact) and as_float(q).dtype == torch.float32


def test_linear_dequantizes_in_the_inputs_dtype(gen):
    q = quantize_nf4(draw(gen, 64, 40))
    b = draw(gen, 40)
    for dtype in (torch.bfloat16, torch.float32, F64):
        x = torch.randn(3, 64, generator=gen).to(dtype)
        y = linear(x, q, b.to(dtype))
        assert y.dtype == dtype
        want = x @ dequantize_nf4(q, dtype) + b.to(dtype)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12 if dtype == F64 else 1e-2)


def test_bitsandbytes_quantizes_the_same_tensor_to_the_same_codes(gen):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = draw(gen, 128, 96 * 10)  # 1920 blocks: 8 superblocks (the last one short)
    q = quantize_nf4(w)
    try:  # bitsandbytes quantizes torch.nn.Linear's [d_out, d_in]: our matrix's transpose
        packed, state = bnb.quantize_4bit(w.t().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes has no CPU quantize_4bit here: {e}")
    assert torch.equal(packed.reshape(-1), q.codes.reshape(-1))  # every 4-bit code
    assert torch.equal(state.offset, q.absmax_offset) and torch.equal(state.state2.absmax, q.absmax_scale)
    # The absmax codes: ours are the nearest dynamic-map value; bitsandbytes' CPU binary search (BinSearch's
    # Direct2) lands on a neighbour for a few values. Where they differ ours is at least as near.
    same = state.absmax == q.absmax
    assert float(same.float().mean()) > 0.99
    absmax = w.t().reshape(-1, 64).abs().amax(dim=1)
    target = (absmax - q.absmax_offset) / torch.repeat_interleave(q.absmax_scale, 256)[: absmax.numel()]
    ours, theirs = (target - DYNAMIC_TABLE[q.absmax.long()]).abs(), (target - DYNAMIC_TABLE[state.absmax.long()]).abs()
    assert bool((ours <= theirs + 1e-7).all())
    # The dequantized values equal bitsandbytes' wherever the block's absmax code is the same.
    theirs_w = bnb.dequantize_4bit(packed, state).t()
    per_weight = torch.repeat_interleave(same, 64)[: w.numel()].reshape(w.shape[1], w.shape[0]).t()
    mine = dequantize_nf4(q, torch.float32)
    assert torch.equal(mine[per_weight], theirs_w[per_weight])
    # and bitsandbytes' dequantization of our state gives our matrix to the bit
    state.absmax = q.absmax
    assert torch.equal(bnb.dequantize_4bit(packed, state).t(), mine)


def test_packed_storage_is_under_three_tenths_of_float32(gen):
    w = draw(gen, 1024, 512)
    q = quantize_nf4(w)
    ratio = nbytes(q) / (w.numel() * 4)
    assert ratio <= 0.3, ratio
    assert 0.128 < ratio < 0.13  # 0.5 byte a weight + 1 byte a block of 64 + 4 bytes a superblock, of 4 bytes


def test_bad_input_gives_clear_errors(gen):
    with pytest.raises(ValueError, match="even d_in, got d_in=3"):
        quantize_nf4(draw(gen, 3, 4))
    with pytest.raises(ValueError, match=r"block must be one of \(32, 64.*got 48"):
        quantize_nf4(draw(gen, 4, 4), block=48)
    with pytest.raises(TypeError, match=r"float \[d_in, d_out\] matrix, got a torch.int64 tensor"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.long))
    cfg = llama()
    params = ft.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match=r"base must be one of \[None, 'int8', 'nf4'\], got 'nf3'"):
        peft.lora(params, cfg, rank=2, alpha=1.0, key=ft.random.key(0), base="nf3")
    with pytest.raises(ValueError, match="already a Int8Weight"):
        peft.lora(ft.quantize(params, cfg), cfg, rank=2, alpha=1.0, key=ft.random.key(0), base="nf4")


@pytest.mark.parametrize("block", [32, 128])
def test_other_block_sizes_round_trip(gen, block):
    w = draw(gen, 64, 24)
    q = quantize_nf4(w, block=block)
    assert q.absmax.shape == (64 * 24 // block,)
    assert float((dequantize_nf4(q, torch.float32) - w).abs().max()) <= 0.15 * float(w.abs().max())


# ---------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("dora", [False, True])
def test_step_zero_equals_the_nf4_base_and_linear_reads_it(gen, dora):
    cfg = llama()
    params = ft.init_params(cfg, seed=0, dtype=F64)
    adapted = qlora(cfg, dora=dora, moved=False)
    w = adapted["blocks"][0]["attn"]["w_qkv"]
    assert isinstance(w, DoRAWeight if dora else LoRAWeight) and isinstance(w.base, NF4Weight)
    assert w.a.dtype == F64 and w.b.dtype == F64
    dequantized = ft.tree.map(lambda t: as_float(t, F64) if isinstance(t, NF4Weight) else t, peft.split(adapted)[1],
                              is_leaf=lambda t: isinstance(t, NF4Weight))
    x = torch.randint(0, cfg.vocab_size, (3, 7), generator=gen)
    reference = {**params, "blocks": [{**blk, "attn": {k: getattr(v, "base", v) for k, v in blk["attn"].items()},
                                       "mlp": {k: getattr(v, "base", v) for k, v in blk["mlp"].items()}}
                                      for blk in dequantized["blocks"]]}
    torch.testing.assert_close(ft.forward(adapted, x, cfg), ft.forward(reference, x, cfg), rtol=0, atol=1e-12)
    assert not torch.allclose(ft.forward(adapted, x, cfg), ft.forward(params, x, cfg), rtol=0, atol=1e-6)
    h = torch.randn(2, 5, 24, generator=gen, dtype=F64)
    torch.testing.assert_close(linear(h, w.base), h @ dequantize_nf4(w.base, F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_dequantizes_first_and_loses_nothing(gen, dora):
    cfg = llama()
    adapted = qlora(cfg, dora=dora)
    merged = peft.merge(adapted)
    assert all(isinstance(t, torch.Tensor) and t.dtype == F64 for t in ft.tree.leaves(merged))
    x = torch.randint(0, cfg.vocab_size, (3, 7), generator=gen)
    want = ft.forward(adapted, x, cfg)
    torch.testing.assert_close(ft.forward(merged, x, cfg), want, rtol=0, atol=1e-10)
    # What PEFT does for a 4-bit layer: merge, then quantize the merged matrix to NF4 again.
    requantized = ft.tree.map(
        lambda w: as_float(quantize_nf4(w.float()), F64) if w.ndim == 2 and w.shape[0] == 24 else w, merged)
    assert float((ft.forward(requantized, x, cfg) - want).abs().max()) > 1e-4


def test_gradients_reach_the_adapters_only(gen):
    cfg = llama()
    trainable, frozen = peft.split(qlora(cfg, dora=True))
    x, y = (torch.randint(0, cfg.vocab_size, (2, 6), generator=gen) for _ in range(2))
    grads = torch.func.grad(peft.adapter_loss)(trainable, frozen, x, y, cfg)
    assert all(p.endswith((".a", ".b", ".m")) for p in ft.tree.flatten_with_paths(grads))
    assert all(bool(g.abs().sum() > 0) for g in ft.tree.leaves(grads))
    leaves = ft.tree.map(lambda t: t.detach().requires_grad_(True), trainable)
    peft.adapter_loss(leaves, frozen, x, y, cfg).backward()
    assert all(t.grad is not None for t in ft.tree.leaves(leaves))
    assert all(not t.requires_grad and t.grad is None for t in ft.tree.leaves(frozen))
    codes = frozen["blocks"][0]["attn"]["w_qkv"].base.codes
    assert codes.dtype == torch.uint8  # the base stays packed in the frozen tree


def test_vmap_over_two_adapters_on_one_nf4_base(gen):
    cfg = llama()
    members = [qlora(cfg, seed=s) for s in (1, 2)]
    split = [peft.split(m) for m in members]
    frozen = split[0][1]
    assert split[1][1]["blocks"][0]["attn"]["w_qkv"].base.codes.equal(frozen["blocks"][0]["attn"]["w_qkv"].base.codes)
    stacked = ft.tree.stack([t for t, _ in split])
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    together = torch.func.vmap(lambda t, f: ft.forward(peft.combine(t, f), x, cfg), in_dims=(0, None))(stacked, frozen)
    for i, member in enumerate(members):
        torch.testing.assert_close(together[i], ft.forward(member, x, cfg), rtol=0, atol=1e-10)
    assert not torch.allclose(together[0], together[1])


def test_compiled_qlora_linear_equals_eager(gen, no_typecheck):
    w = qlora(llama(), dora=True)["blocks"][0]["mlp"]["w_out"]  # DoRA over an NF4 base: the whole QLoRA product
    w = ft.tree.map(lambda t: t.float() if t.is_floating_point() and t.dtype == F64 else t, w)
    x = torch.randn(2, 6, 40, generator=gen)
    compiled = torch.compile(linear, fullgraph=True)  # one graph: no tensor subclass; the Function traces
    torch.testing.assert_close(compiled(x, w), linear(x, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the inference path: plain ops, no Function
        torch.testing.assert_close(compiled(x, w), linear(x, w), rtol=1e-5, atol=1e-5)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn()`` runs (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_backward_keeps_the_packed_base_not_the_dequantized_matrix(gen):
    """A QLoRA layer's backward saves the 4-bit codes (recomputing the matrix), so training holds ~1/8 of
    a float32 base for it; its gradients equal those of the plain-ops product (float64)."""
    w = quantize_nf4(draw(gen, 256, 512))
    x = torch.randn(4, 256, generator=gen, dtype=F64, requires_grad=True)
    float_base = saved_bytes(lambda: linear(x.float(), as_float(w, torch.float32)))
    packed = saved_bytes(lambda: linear(x.float(), w))
    assert packed < 0.2 * float_base, (packed, float_base)
    g = torch.randn(4, 512, generator=gen, dtype=F64, requires_grad=True)
    (ours,) = torch.autograd.grad(linear(x, w), x, g, create_graph=True)
    torch.testing.assert_close(ours, g @ dequantize_nf4(w, F64).T, rtol=0, atol=1e-12)
    (second,) = torch.autograd.grad((ours * ours).sum(), g)  # double backward goes through the recomputation
    torch.testing.assert_close(second, 2 * ours @ dequantize_nf4(w, F64), rtol=0, atol=1e-10)
    tangent = torch.randn(4, 256, generator=gen, dtype=F64)
    _, jvp_out = torch.func.jvp(lambda v: linear(v, w), (x.detach(),), (tangent,))
    torch.testing.assert_close(jvp_out, tangent @ dequantize_nf4(w, F64), rtol=0, atol=1e-12)


def test_int8_base_option(gen):
    cfg = llama()
    adapted = peft.lora(ft.init_params(cfg, seed=0, dtype=F64), cfg, rank=2, alpha=2.0, key=ft.random.key(0),
                        base="int8")
    assert isinstance(adapted["blocks"][1]["mlp"]["w_in"].base, Int8Weight)
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    torch.testing.assert_close(ft.forward(peft.merge(adapted), x, cfg), ft.forward(adapted, x, cfg), rtol=0, atol=1e-12)


def test_checkpoint_of_an_nf4_tree_round_trips(tmp_path, gen):
    cfg = llama()
    adapted = qlora(cfg)
    ft.save_checkpoint(tmp_path / "ck", params=adapted, config={"adapter": "qlora"}, step=3)
    back = ft.checkpoint.load_tree(tmp_path / "ck", like=adapted)
    w = back.params["blocks"][0]["mlp"]["w_out"]
    assert isinstance(w, LoRAWeight) and isinstance(w.base, NF4Weight) and w.base.codes.dtype == torch.uint8
    paths = ft.tree.flatten_with_paths(back.params)
    assert "blocks.0.mlp.w_out.base.codes" in paths and "blocks.0.mlp.w_out.base.absmax_scale" in paths
    for a, b in zip(ft.tree.leaves(adapted), ft.tree.leaves(back.params)):
        assert torch.equal(a, b)
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    assert torch.equal(ft.forward(back.params, x, cfg), ft.forward(adapted, x, cfg))
