"""The transformer block, pre-LN and post-LN, against a composition written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import ftransformer as ft
from ftransformer.layers import block

BATCH, SEQ, D_MODEL, HEADS, D_FF = 2, 5, 12, 3, 20


def cfg_for(**changes) -> ft.Config:
    return ft.Config(vocab_size=37, d_model=D_MODEL, n_heads=HEADS, n_layers=2, d_ff=D_FF, max_seq_len=9, **changes)


def randomized_block_params(cfg, gen):
    """Block params with non-trivial norm scales and biases, so every leaf is exercised."""
    p = ft.init_params(cfg, seed=0, dtype=torch.float64)["blocks"][0]
    return ft.tree_map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype), p)


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


@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
def test_pre_ln_block_is_x_plus_f_of_norm_x(gen, impl):
    cfg = cfg_for(norm_position="pre", attn_impl=impl)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    h = x + attention_by_hand(p["attn"], ln(p["ln1"], x))
    expected = h + mlp_by_hand(p["mlp"], ln(p["ln2"], h))
    out = block(p, x, cfg, positions=torch.arange(SEQ).expand(BATCH, SEQ))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
def test_post_ln_block_is_norm_of_x_plus_f_x(gen, impl):
    cfg = cfg_for(norm_position="post", attn_impl=impl)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    h = ln(p["ln1"], x + attention_by_hand(p["attn"], x))
    expected = ln(p["ln2"], h + mlp_by_hand(p["mlp"], h))
    out = block(p, x, cfg, positions=torch.arange(SEQ).expand(BATCH, SEQ))
    torch.testing.assert_close(out, expected)
    # Post-LN output is normalised; pre-LN output is not.
    pre = block(p, x, cfg.replace(norm_position="pre"), positions=torch.arange(SEQ).expand(BATCH, SEQ))
    assert not torch.allclose(pre, out)


def test_block_works_without_a_batch_axis(gen):
    cfg = cfg_for(norm="rmsnorm", activation="swiglu", positional="rope", n_kv_heads=1)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    batched = block(p, x, cfg, positions=torch.arange(SEQ).expand(BATCH, SEQ))
    torch.testing.assert_close(block(p, x[1], cfg, positions=torch.arange(SEQ)), batched[1])


def test_block_dropout_follows_the_key(gen):
    cfg = cfg_for(dropout=0.3)
    p = randomized_block_params(cfg, gen)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    k0, k1 = ft.random.split(ft.random.key(0))
    a = block(p, x, cfg, positions=pos, key=k0)
    assert torch.equal(a, block(p, x, cfg, positions=pos, key=k0))
    assert not torch.allclose(a, block(p, x, cfg, positions=pos, key=k1))
    # No key: evaluation, no dropout, the same as a dropout-free config.
    torch.testing.assert_close(block(p, x, cfg, positions=pos), block(p, x, cfg.replace(dropout=0.0), positions=pos))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_gradcheck(gen, norm_position):
    # seq 3, heads 2, head_dim 4, d_model 8, d_ff 5
    cfg = ft.Config(vocab_size=7, d_model=8, n_heads=2, n_layers=1, d_ff=5, max_seq_len=4,
                    norm_position=norm_position, attn_impl="einsum")
    p = randomized_block_params(cfg, gen)
    flat = ft.tree_flatten_with_paths(p)
    names = list(flat)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, *leaves):
        return block(ft.tree_unflatten_paths(dict(zip(names, leaves))), x, cfg, positions=torch.arange(3))

    # fast_mode checks a random projection of the Jacobian: the same test of the backward pass, far fewer calls.
    assert torch.autograd.gradcheck(f, (x, *[flat[n].clone().requires_grad_() for n in names]), fast_mode=True)
