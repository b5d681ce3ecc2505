"""The transformer block, pre-LN and post-LN, against a composition written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import ftransformer as ft
from ftransformer.layers import block, self_mask
from ftransformer.layers.block import block_with_cache
from ftransformer.layers import attention_kernel

BATCH, SEQ, D_MODEL, HEADS, D_FF = 2, 5, 12, 3, 20


def cfg_for(**changes) -> ft.Config:
    return ft.Config.from_flat(vocab_size=37, d_model=D_MODEL, n_heads=HEADS, n_layers=2, d_ff=D_FF, max_seq_len=9, **changes)


def randomized_block_params(cfg, gen):
    """Block params with non-trivial norm scales and biases, so every leaf is exercised."""
    p = ft.init_params(cfg, seed=0, dtype=torch.float64)["blocks"][0]
    return ft.tree.map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype), p)


def attention_by_hand(p, x):
    hd = D_MODEL // HEADS
    q, k, v = (x @ p["w_qkv"] + p["b_qkv"]).split(D_MODEL, dim=-1)
    q, k, v = (t.reshape(*t.shape[:-1], HEADS, hd).transpose(-3, -2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).triu(1)
    o = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    return o.transpose(-3, -2).reshape(x.shape) @ p["w_o"] + p["b_o"]


def mlp_by_hand(p, x):
    return F.gelu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]


def ln(p, x):
    return F.layer_norm(x, (D_MODEL,), p["scale"], p["bias"], 1e-5)


def test_pre_ln_block_is_x_plus_f_of_norm_x(gen, kernel):
    cfg = cfg_for(norm_position="pre")
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    h = x + attention_by_hand(p["attn"], ln(p["ln1"], x))
    expected = h + mlp_by_hand(p["mlp"], ln(p["ln2"], h))
    out = block(p, x, cfg, mask=self_mask(torch.arange(SEQ).expand(BATCH, SEQ)))
    torch.testing.assert_close(out, expected)


def test_post_ln_block_is_norm_of_x_plus_f_x(gen, kernel):
    cfg = cfg_for(norm_position="post")
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    h = ln(p["ln1"], x + attention_by_hand(p["attn"], x))
    expected = ln(p["ln2"], h + mlp_by_hand(p["mlp"], h))
    out = block(p, x, cfg, mask=self_mask(torch.arange(SEQ).expand(BATCH, SEQ)))
    torch.testing.assert_close(out, expected)
    # Post-LN output is normalised; pre-LN output is not.
    pre = block(p, x, cfg.replace(norm_position="pre"), mask=self_mask(torch.arange(SEQ).expand(BATCH, SEQ)))
    assert not torch.allclose(pre, out)


def test_block_works_without_a_batch_axis(gen):
    cfg = cfg_for(norm="rmsnorm", activation="swiglu", positional="rope", n_kv_heads=1)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    positions = torch.arange(SEQ)
    rotary = ft.layers.rotary_tables(positions.expand(BATCH, SEQ), cfg)
    batched = block(p, x, cfg, mask=self_mask(positions.expand(BATCH, SEQ)), rotary=rotary)
    one = block(p, x[1], cfg, mask=self_mask(positions), rotary=ft.layers.rotary_tables(positions, cfg))
    torch.testing.assert_close(one, batched[1])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_with_cache_shares_the_blocks_wiring(gen, norm_position):
    """An empty cache: block_with_cache computes what block does, and writes this layer's keys/values."""
    cfg = cfg_for(norm_position=norm_position, positional="rope")
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    slots = ft.cache.query_slots(torch.zeros(BATCH, dtype=torch.int64), SEQ)
    rotary = ft.layers.rotary_tables(slots, cfg)
    buffers = torch.zeros(BATCH, HEADS, 7, D_MODEL // HEADS, dtype=torch.float64)
    out, k, v = block_with_cache(
        p, x, cfg, mask=ft.layers.cache_mask(slots, 7, torch.float64), rotary=rotary, k_cache=buffers,
        v_cache=buffers, write_index=ft.cache.write_index(slots, HEADS, D_MODEL // HEADS),
    )
    torch.testing.assert_close(out, block(p, x, cfg, mask=self_mask(slots), rotary=rotary))
    h = ft.layers.norm(p["ln1"], x, cfg.norm) if norm_position == "pre" else x
    _, k_new, v_new = ft.layers.project_qkv(p["attn"], h, cfg, rotary)
    assert torch.equal(k[..., :SEQ, :], k_new) and torch.equal(v[..., :SEQ, :], v_new)
    assert not k[..., SEQ:, :].any() and not buffers.any()


def test_block_dropout_follows_the_key(gen):
    cfg = cfg_for(dropout=0.3)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    mask = self_mask(torch.arange(SEQ).expand(BATCH, SEQ))
    k0, k1 = ft.random.split(ft.random.key(0))
    a = block(p, x, cfg, mask=mask, key=k0)
    assert torch.equal(a, block(p, x, cfg, mask=mask, key=k0))
    assert not torch.allclose(a, block(p, x, cfg, mask=mask, key=k1))
    # No key: evaluation, no dropout, the same as a dropout-free config.
    torch.testing.assert_close(block(p, x, cfg, mask=mask), block(p, x, cfg.replace(dropout=0.0), mask=mask))


@attention_kernel("einsum")
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_gradcheck(gen, norm_position):
    # seq 3, heads 2, head_dim 4, d_model 8, d_ff 5
    cfg = ft.Config.from_flat(vocab_size=7, d_model=8, n_heads=2, n_layers=1, d_ff=5, max_seq_len=4,
                    norm_position=norm_position)
    p = randomized_block_params(cfg, gen)
    flat = ft.tree.flatten_with_paths(p)
    names = list(flat)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, *leaves):
        return block(ft.tree.unflatten_paths(dict(zip(names, leaves))), x, cfg, mask=self_mask(torch.arange(3)))

    # fast_mode checks a random projection of the Jacobian: the same test of the backward pass, far fewer calls.
    assert torch.autograd.gradcheck(f, (x, *[flat[n].clone().requires_grad_() for n in names]), fast_mode=True)
