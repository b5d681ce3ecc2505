"""Attention against independent references: a plain-Python loop and torch.nn.MultiheadAttention.

Sizes: batch 3, seq 5, kv_seq 7 (where it differs), heads 4, kv_heads 2 (GQA) / 1 (MQA), head_dim 6,
d_model 24 -- every axis its own size.
"""

import math

import pytest
import torch
from jaxtyping import TypeCheckError

import ftransformer as ft
from ftransformer.layers import (
    attention_kernel,
    kernel_here,
    Mask,
    apply_rotary,
    attend,
    attention_pattern,
    causal_mask,
    multi_head_attention,
    rotary_angles,
    rotary_tables,
    scaled_dot_product_attention,
    self_mask,
)

BATCH, SEQ, KV_SEQ, HEADS, HEAD_DIM = 3, 5, 7, 4, 6
D_MODEL = HEADS * HEAD_DIM
IMPLS = ("einsum", "sdpa")
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
CAUSAL = self_mask(torch.arange(SEQ))


def loop_attention(q, k, v, mask=None):
    """Attention one (batch, head, query) at a time, in Python; query head h reads kv head h // group."""
    batch, heads, seq, head_dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for i in range(seq):
                allowed = [j for j in range(k.shape[2]) if (j <= i if mask is None else bool(mask[b, i, j]))]
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] / math.sqrt(head_dim) for j in allowed])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, i] = sum(w * v[b, kv, j] for w, j in zip(weights, allowed))
    return out


def qkv(gen, kv_heads, kv_seq=SEQ, dtype=torch.float32):
    q = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=gen, dtype=dtype)
    k = torch.randn(BATCH, kv_heads, kv_seq, HEAD_DIM, generator=gen, dtype=dtype)
    v = torch.randn(BATCH, kv_heads, kv_seq, HEAD_DIM, generator=gen, dtype=dtype)
    return q, k, v


def random_mask(gen, seq, kv_seq):
    """A random key mask in which every query still sees at least one key (its diagonal)."""
    mask = torch.rand(BATCH, seq, kv_seq, generator=gen) < 0.5
    mask[:, torch.arange(seq), torch.arange(seq) + kv_seq - seq] = True
    return mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KV_HEADS))
def test_causal_attention_matches_the_plain_loop(gen, impl, kind):
    q, k, v = qkv(gen, KV_HEADS[kind])
    out = scaled_dot_product_attention(q, k, v, CAUSAL, impl=impl)
    torch.testing.assert_close(out, loop_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_masked_attention_matches_the_plain_loop(gen, impl, kind):
    q, k, v = qkv(gen, KV_HEADS[kind], kv_seq=KV_SEQ)
    mask = random_mask(gen, SEQ, KV_SEQ)
    out = scaled_dot_product_attention(q, k, v, Mask(mask), impl=impl)
    assert out.shape == q.shape
    torch.testing.assert_close(out, loop_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KV_HEADS))
def test_einsum_path_equals_sdpa_path(gen, kind):
    q, k, v = qkv(gen, KV_HEADS[kind])
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum"),
        scaled_dot_product_attention(q, k, v, CAUSAL, impl="sdpa"),
    )
    # The same causal mask without the flag (SDPA then reads the tensor) gives the same numbers.
    mask = Mask(causal_mask(torch.arange(SEQ), torch.arange(SEQ)))
    for impl in IMPLS:
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, mask, impl=impl),
            scaled_dot_product_attention(q, k, v, CAUSAL, impl="sdpa"),
        )
    # A mask with kv_seq != seq, as a cache makes.
    q, k, v = qkv(gen, KV_HEADS[kind], kv_seq=KV_SEQ)
    mask = Mask(random_mask(gen, SEQ, KV_SEQ))
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask, impl="einsum"),
        scaled_dot_product_attention(q, k, v, mask, impl="sdpa"),
    )


def test_attention_takes_any_number_of_leading_batch_axes(gen):
    q, k, v = qkv(gen, 2)
    ref = scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum")
    for impl in IMPLS:
        torch.testing.assert_close(scaled_dot_product_attention(q[0], k[0], v[0], CAUSAL, impl=impl), ref[0])
        torch.testing.assert_close(
            scaled_dot_product_attention(q[None, :, None], k[None, :, None], v[None, :, None], CAUSAL, impl=impl)[
                0, :, 0
            ],
            ref,
        )


def test_causal_mask_compares_positions():
    mask = causal_mask(torch.tensor([2, 3]), torch.tensor([0, 1, 2, 3, 4]))
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    batched = causal_mask(torch.arange(3).expand(2, 3), torch.arange(3).expand(2, 3))
    assert batched.shape == (2, 3, 3) and torch.equal(batched[1], torch.ones(3, 3, dtype=torch.bool).tril())


def test_self_mask_is_the_lower_triangle_for_any_increasing_positions():
    for positions in (torch.arange(4), torch.tensor([3, 5, 6, 10]), torch.arange(4).expand(2, 4)):
        mask = self_mask(positions)
        assert mask.causal and torch.equal(mask.allowed, torch.ones(4, 4, dtype=torch.bool).tril().expand_as(mask.allowed))


def test_cache_mask_is_the_causal_rule_over_slots_as_a_bias():
    slots = torch.tensor([[2, 3], [0, 1]])
    mask = ft.layers.cache_mask(slots, 5, torch.float64)
    assert not mask.causal and mask.allowed.dtype == torch.float64
    assert torch.equal(mask.allowed == 0, causal_mask(slots, torch.arange(5)))
    assert set(mask.allowed.unique().tolist()) == {0.0, float("-inf")}


def test_attention_pattern_is_a_causal_distribution(gen):
    q = torch.randn(BATCH, 2, 3, SEQ, HEAD_DIM, generator=gen)  # kv_heads 2, group 3
    k = torch.randn(BATCH, 2, SEQ, HEAD_DIM, generator=gen)
    pattern = attention_pattern(q, k, CAUSAL.allowed)
    assert pattern.shape == (BATCH, 2, 3, SEQ, SEQ)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(BATCH, 2, 3, SEQ))
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))
    assert torch.equal(pattern[..., 0, 0], torch.ones(BATCH, 2, 3))  # the first token sees only itself
    v = torch.randn(BATCH, 2, SEQ, HEAD_DIM, generator=gen)
    torch.testing.assert_close(attend(pattern, v), torch.einsum("bhgqk,bhkd->bhgqd", pattern, v))


def test_pattern_with_fewer_queries_than_keys_is_aligned_to_the_last_keys(gen):
    q = torch.randn(1, 1, 2, HEAD_DIM, generator=gen)
    k = torch.randn(1, KV_SEQ, HEAD_DIM, generator=gen)
    pattern = attention_pattern(q, k, causal_mask(torch.arange(KV_SEQ - 2, KV_SEQ), torch.arange(KV_SEQ)))
    # The two queries are the last two positions: the first of them sees all keys but the last.
    assert (pattern[0, 0, 0, :-1] > 0).all() and pattern[0, 0, 0, -1] == 0
    assert (pattern[0, 0, 1] > 0).all()


def test_multi_head_attention_matches_torch_multihead_attention(gen, kernel):
    cfg = ft.Config(vocab_size=37, d_model=D_MODEL, n_heads=HEADS, n_layers=1, d_ff=40, max_seq_len=16)
    params = ft.init_params(cfg, seed=1, dtype=torch.float64)["blocks"][0]["attn"]
    # Non-zero biases, so the bias layout is checked too.
    params = {**params, "b_qkv": torch.randn(3 * D_MODEL, generator=gen, dtype=torch.float64) * 0.1,
              "b_o": torch.randn(D_MODEL, generator=gen, dtype=torch.float64) * 0.1}
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    ours = multi_head_attention(params, x, cfg, mask=self_mask(torch.arange(SEQ).expand(BATCH, SEQ)))

    mha = torch.nn.MultiheadAttention(D_MODEL, HEADS, bias=True, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(params["w_qkv"].T)
        mha.in_proj_bias.copy_(params["b_qkv"])
        mha.out_proj.weight.copy_(params["w_o"].T)
        mha.out_proj.bias.copy_(params["b_o"])
    future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # True = may not attend
    theirs, _ = mha(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(ours, theirs)


@attention_kernel("einsum")
@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_multi_head_attention_with_rope_and_gqa_matches_a_hand_composition(gen, kind):
    cfg = ft.Config.from_flat(
        vocab_size=37, d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS[kind], n_layers=1, d_ff=40,
        max_seq_len=16, positional="rope",
    )
    params = ft.init_params(cfg, seed=2)["blocks"][0]["attn"]
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen)
    positions = (torch.arange(SEQ) + 3).expand(BATCH, SEQ)  # positions need not start at 0
    mask, rotary = self_mask(positions), rotary_tables(positions, cfg)
    out = multi_head_attention(params, x, cfg, mask=mask, rotary=rotary)

    qkv_ = x @ params["w_qkv"] + params["b_qkv"]
    kv_width = KV_HEADS[kind] * HEAD_DIM
    q = qkv_[..., :D_MODEL].reshape(BATCH, SEQ, HEADS, HEAD_DIM).transpose(1, 2)
    k = qkv_[..., D_MODEL:D_MODEL + kv_width].reshape(BATCH, SEQ, -1, HEAD_DIM).transpose(1, 2)
    v = qkv_[..., D_MODEL + kv_width:].reshape(BATCH, SEQ, -1, HEAD_DIM).transpose(1, 2)
    cos, sin = rotary_angles(positions, HEAD_DIM)
    o = loop_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    expected = o.transpose(1, 2).reshape(BATCH, SEQ, D_MODEL) @ params["w_o"] + params["b_o"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with attention_kernel("sdpa"):
        torch.testing.assert_close(multi_head_attention(params, x, cfg, mask=mask, rotary=rotary), out)


def test_rope_attention_without_rotary_tables_says_what_it_needs(gen):
    cfg = ft.PRESETS["tiny"].replace(positional="rope")
    params = ft.init_params(cfg, seed=1)["blocks"][0]["attn"]
    with pytest.raises(ValueError, match="rotary_tables"):
        multi_head_attention(params, torch.randn(2, 5, cfg.d_model, generator=gen), cfg, mask=self_mask(torch.arange(5)))


def test_attention_dropout_uses_the_key(gen):
    q, k, v = qkv(gen, 2)
    key = ft.random.key(0)
    a = scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum", dropout=0.5, key=key)
    assert torch.equal(a, scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum", dropout=0.5, key=key))
    # The fused path cannot take a key, so it hands dropout to the einsum path: the same numbers.
    assert torch.equal(a, scaled_dot_product_attention(q, k, v, CAUSAL, impl="sdpa", dropout=0.5, key=key))
    other = scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum", dropout=0.5, key=ft.random.key(1))
    assert not torch.equal(a, other)
    no_drop = scaled_dot_product_attention(q, k, v, CAUSAL, impl="einsum")
    assert not torch.allclose(a, no_drop)
    # Without a key there is no dropout at all (evaluation).
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, CAUSAL, impl="sdpa", dropout=0.5), no_drop)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_gradcheck(gen, impl):
    q = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = self_mask(torch.arange(3))
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask, impl=impl), (q, k, v))


def test_multi_head_attention_gradcheck(gen, kernel):
    # batch 3, seq 5, heads 2, kv_heads 1, head_dim 4, d_model 8
    cfg = ft.Config.from_flat(vocab_size=7, d_model=8, n_heads=2, n_kv_heads=1, n_layers=1, d_ff=6, max_seq_len=5,
                    positional="rope")
    p = ft.init_params(cfg, dtype=torch.float64)["blocks"][0]["attn"]
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    names = sorted(p)
    positions = torch.arange(5).expand(3, 5)
    mask, rotary = self_mask(positions), rotary_tables(positions, cfg)

    def f(x, *weights):
        return multi_head_attention(dict(zip(names, weights)), x, cfg, mask=mask, rotary=rotary)

    weights = [p[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *weights), fast_mode=True)


def test_mismatched_shapes_raise_a_type_error_naming_the_axis(gen):
    q, k, v = qkv(gen, 2)
    with pytest.raises(TypeCheckError, match="head_dim=6"):
        scaled_dot_product_attention(q, k[..., :5], v, CAUSAL)  # keys narrower than queries
    with pytest.raises(TypeCheckError, match="kv_seq"):
        scaled_dot_product_attention(q, k, v[..., :4, :], CAUSAL)  # fewer values than keys
    cfg = ft.Config(vocab_size=37, d_model=D_MODEL, n_heads=HEADS, n_layers=1, d_ff=40, max_seq_len=16)
    params = ft.init_params(cfg)["blocks"][0]["attn"]
    x = torch.randn(BATCH, SEQ, D_MODEL + 1, generator=gen)  # residual stream of the wrong width
    with pytest.raises(TypeCheckError, match="d_in"):
        multi_head_attention(params, x, cfg, mask=CAUSAL)


def test_sdpa_matches_einsum_when_queries_are_the_last_positions():
    """The causal mask of queries at the last positions of the keys is bottom-right aligned on both paths
    (SDPA's is_causal is not)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 3, 8, generator=g)
    k = torch.randn(2, 2, 7, 8, generator=g)
    v = torch.randn(2, 2, 7, 8, generator=g)
    mask = Mask(causal_mask(torch.arange(4, 7), torch.arange(7)))
    out_sdpa = scaled_dot_product_attention(q, k, v, mask, impl="sdpa")
    out_einsum = scaled_dot_product_attention(q, k, v, mask, impl="einsum")
    torch.testing.assert_close(out_sdpa, out_einsum, atol=1e-6, rtol=1e-5)
    # the last query sees every key: same as attending with no mask at all
    full = scaled_dot_product_attention(q[..., -1:, :], k, v, Mask(torch.ones(1, 7, dtype=torch.bool)), impl="einsum")
    torch.testing.assert_close(out_sdpa[..., -1:, :], full, atol=1e-6, rtol=1e-5)


def test_positions_broadcast_over_batch_axes():
    """One shared positions row serves every batch row (no expand needed)."""
    cfg = ft.PRESETS["tiny"].replace(positional="rope")
    params = ft.init_params(cfg, seed=1)["blocks"][0]["attn"]
    x = torch.randn(2, 3, 5, cfg.d_model)

    def attn(positions):
        return multi_head_attention(params, x, cfg, mask=self_mask(positions), rotary=rotary_tables(positions, cfg))

    torch.testing.assert_close(attn(torch.arange(5)), attn(torch.arange(5).expand(2, 3, 5)))


def test_the_kernel_is_chosen_per_call_by_the_transform_or_by_attention_kernel(gen):
    """Fused (sdpa) by default; written out (einsum) under vmap, jvp or grad of grad, where the fused kernel
    has no batching rule for its backward or no double backward; ``attention_kernel`` overrides both."""
    seen = []

    def probe(x):
        seen.append(kernel_here())
        return (x * 1.0).sum()

    x = torch.randn(3, 2, generator=gen)
    probe(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(probe)(x)
    torch.func.jvp(probe, (x,), (x,))
    torch.func.grad(lambda y: torch.func.grad(probe)(y).sum())(x)
    with attention_kernel("einsum"):
        probe(x)
        with attention_kernel("sdpa"):
            torch.func.vmap(probe)(x)
        with attention_kernel("auto"):
            probe(x)
    assert seen == ["sdpa", "sdpa", "einsum", "einsum", "einsum", "einsum", "sdpa", "sdpa"]
    assert kernel_here() == "sdpa"  # every choice is undone on the way out
    with pytest.raises(ValueError, match="kernel.*'sdpa'.*'flash'"):
        with attention_kernel("flash"):
            pass
    q, k, v = qkv(gen, 2)
    with pytest.raises(ValueError, match="impl.*'flash'"):
        scaled_dot_product_attention(q, k, v, CAUSAL, impl="flash")


def test_double_backward_through_attention_runs_on_the_einsum_kernel(gen):
    """A Hessian-vector product through a model (jvp of grad): works with no kernel named anywhere."""
    cfg = ft.PRESETS["tiny"]
    params = ft.init_params(cfg, seed=0, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    loss = lambda p: ft.loss_fn(p, tokens, tokens, cfg)
    direction = ft.tree.map(torch.ones_like, params)
    _, hvp = torch.func.jvp(torch.func.grad(loss), (params,), (direction,))
    with attention_kernel("einsum"):
        _, expected = torch.func.jvp(torch.func.grad(loss), (params,), (direction,))
    for a, b in zip(ft.tree.leaves(hvp), ft.tree.leaves(expected)):
        assert torch.equal(a, b)
