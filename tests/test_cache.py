"""The KV-cache and forward_with_cache: cached == uncached for every variant, chunking, ragged batches,
purity (the cache passed in is never modified), and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ftransformer as ft
from strategies import configs, kernels
from ftransformer.layers import attention_kernel
from ftransformer.cache import write_index
from ftransformer.layers.attention import write_kv
from ftransformer.layers.masks import cache_mask

POSITIONALS = ("learned", "sinusoidal", "rope")

# Every switch appears at least once; every axis a different size (vocab 37, d_model 24, head_dim 4,
# heads 6, kv_heads 3/2/1, d_ff 40, layers 2, max_seq_len 16).
BASE = ft.Config(vocab_size=37, d_model=24, n_heads=6, n_layers=2, d_ff=40, max_seq_len=16)
# a variant named "*-einsum" runs its attention on the einsum kernel (``_variant_kernel``)
VARIANTS = {f"{pos}-{impl}": BASE.replace(positional=pos) for pos in POSITIONALS for impl in ("sdpa", "einsum")}
VARIANTS |= {
    "post-norm": BASE.replace(norm_position="post"),
    "gqa-rope": BASE.replace(n_kv_heads=3, positional="rope"),
    "gqa-einsum": BASE.replace(n_kv_heads=2),
    "mqa-sinusoidal": BASE.replace(n_kv_heads=1, positional="sinusoidal"),
    "swiglu-rmsnorm-nobias": BASE.replace(activation="swiglu", norm="rmsnorm", bias=False),
    "untied-gelu_tanh-post-rope": BASE.replace(
        tie_embeddings=False, activation="gelu_tanh", norm_position="post", positional="rope"
    ),
    "llama-like": BASE.replace(
        n_kv_heads=2, positional="rope", activation="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False
    ),
}


@pytest.fixture(autouse=True)
def _variant_kernel(request):
    """A test of a variant named ``*-einsum`` runs inside ``attention_kernel("einsum")``."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("name", "") if callspec else ""
    with attention_kernel("einsum" if str(name).endswith("-einsum") else "auto"):
        yield


def tokens_for(cfg, shape, gen):
    return torch.randint(0, cfg.vocab_size, shape, generator=gen)


def run_in_chunks(params, tokens, cache, cfg, sizes):
    """forward_with_cache over consecutive chunks of ``tokens``; returns all logits and the final cache."""
    out, start = [], 0
    for size in sizes:
        logits, cache = ft.forward_with_cache(params, tokens[..., start : start + size], cache, cfg)
        out.append(logits)
        start += size
    return torch.cat(out, dim=-2), cache


def clone_cache(cache):
    return ft.tree.map(torch.clone, cache)


def assert_caches_equal(a, b):
    for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b), strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- init_cache


def test_init_cache_shapes_and_dtypes(tiny_cfg):
    cfg = tiny_cfg.replace(n_kv_heads=1)
    cache = ft.init_cache(cfg, batch_size=3, max_len=11)
    assert isinstance(cache, ft.KVCache)
    assert len(cache.k) == len(cache.v) == cfg.n_layers
    for buf in cache.k + cache.v:
        assert buf.shape == (3, 1, 11, cfg.head_dim) and buf.dtype == torch.float32
    assert cache.lengths.shape == (3,) and cache.lengths.dtype == torch.int64
    assert cache.max_len == 11 and cache.batch_shape == (3,)
    assert ft.init_cache(cfg, (2, 5), dtype=torch.float64).k[0].shape == (2, 5, 1, cfg.max_seq_len, cfg.head_dim)
    assert ft.init_cache(cfg, (2, 5), dtype=torch.float64).k[0].dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=(2, -1)), "batch_size"),
        (dict(batch_size=2, max_len=0), "max_len"),
        (dict(batch_size=2, max_len=17), "max_len=17 exceeds max_seq_len=16"),
    ],
)
def test_init_cache_rejects_bad_sizes(tiny_cfg, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ft.init_cache(tiny_cfg, **kwargs)


def test_cache_is_a_pytree_that_round_trips(tiny_cfg):
    import torch.utils._pytree as pytree

    cache = ft.init_cache(tiny_cfg, 2, max_len=5)
    leaves, spec = pytree.tree_flatten(cache)
    assert len(leaves) == 2 * tiny_cfg.n_layers + 1
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, ft.KVCache)
    assert_caches_equal(rebuilt, cache)


# ---------------------------------------------------------------- helpers


def test_cache_mask_lets_each_query_see_its_row_so_far():
    slots = torch.tensor([[2, 3], [0, 1]])
    expected = torch.tensor(
        [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]], dtype=torch.bool
    )
    bias = cache_mask(slots, 5, torch.float64).allowed
    assert bias.dtype == torch.float64
    assert torch.equal(bias == 0, expected) and bool(torch.isneginf(bias[~expected]).all())


def test_write_kv_puts_each_rows_tokens_at_its_own_slots(gen):
    buffer = torch.randn(2, 3, 7, 4, generator=gen)
    new = torch.randn(2, 3, 2, 4, generator=gen)
    slots = torch.tensor([[1, 2], [4, 5]])
    out = write_kv(buffer, new, write_index(slots, 3, 4))
    expected = buffer.clone()
    expected[0, :, 1:3] = new[0]
    expected[1, :, 4:6] = new[1]
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- cached == uncached


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_logits_equal_forward_at_every_position(name, gen):
    """Prefill a few tokens, then decode one at a time: each position's logits match a plain forward."""
    cfg = VARIANTS[name]
    params = ft.init_params(cfg, seed=1)
    tokens = tokens_for(cfg, (2, 13), gen)
    expected = ft.forward(params, tokens, cfg)
    cache = ft.init_cache(cfg, batch_size=2, max_len=cfg.max_seq_len)
    logits, cache = run_in_chunks(params, tokens, cache, cfg, [4] + [1] * 9)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [13, 13]


@pytest.mark.parametrize("name", ["learned-sdpa", "rope-einsum", "gqa-rope", "post-norm"])
def test_cache_holds_the_keys_and_values_forward_computes(name, gen):
    """Buffer slot s of layer i holds the key/value of token s in layer i (checked for the first layer)."""
    cfg = VARIANTS[name]
    params = ft.init_params(cfg, seed=2)
    tokens = tokens_for(cfg, (3, 6), gen)
    _, cache = ft.forward_with_cache(params, tokens, ft.init_cache(cfg, 3, max_len=9), cfg)
    positions = torch.arange(6).expand(3, 6)
    x = ft.model.embed(params, tokens, cfg, positions=positions)
    h = ft.layers.norm(params["blocks"][0]["ln1"], x, cfg.norm) if cfg.layout.norm_position == "pre" else x
    _, k, v = ft.layers.project_qkv(params["blocks"][0]["attn"], h, cfg, ft.layers.rotary_tables(positions, cfg))
    torch.testing.assert_close(cache.k[0][..., :6, :], k)
    torch.testing.assert_close(cache.v[0][..., :6, :], v)
    assert bool((cache.k[0][..., 6:, :] == 0).all())


@pytest.mark.parametrize("name", ["learned-sdpa", "rope-einsum", "mqa-sinusoidal", "llama-like"])
def test_chunked_prefill_equals_one_prefill(name, gen):
    cfg = VARIANTS[name]
    params = ft.init_params(cfg, seed=3)
    tokens = tokens_for(cfg, (2, 11), gen)
    empty = ft.init_cache(cfg, 2, max_len=14)
    whole, cache_whole = ft.forward_with_cache(params, tokens, empty, cfg)
    chunked, cache_chunked = run_in_chunks(params, tokens, empty, cfg, [3, 5, 1, 2])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    for a, b in zip(cache_chunked.k + cache_chunked.v, cache_whole.k + cache_whole.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(cache_chunked.lengths, cache_whole.lengths)


def test_any_number_of_leading_batch_axes(gen):
    cfg = VARIANTS["gqa-rope"]
    params = ft.init_params(cfg, seed=4)
    tokens = tokens_for(cfg, (2, 3, 7), gen)
    logits, cache = run_in_chunks(params, tokens, ft.init_cache(cfg, (2, 3), max_len=8), cfg, [5, 1, 1])
    torch.testing.assert_close(logits, ft.forward(params, tokens, cfg), atol=1e-5, rtol=0)
    assert cache.lengths.shape == (2, 3)
    # One unbatched sequence works too: the cache then has no batch axes.
    single, _ = run_in_chunks(params, tokens[1, 2], ft.init_cache(cfg, (), max_len=8), cfg, [2, 5])
    torch.testing.assert_close(single, logits[1, 2], atol=1e-5, rtol=0)


def test_vmap_over_rows_equals_the_batch(gen):
    cfg = VARIANTS["rope-einsum"]
    params = ft.init_params(cfg, seed=5)
    tokens = tokens_for(cfg, (3, 6), gen)
    cache = ft.init_cache(cfg, 3, max_len=9)
    _, cache = ft.forward_with_cache(params, tokens[:, :4], cache, cfg)
    batched, batched_cache = ft.forward_with_cache(params, tokens[:, 4:], cache, cfg)

    def one_row(tok, row_cache):
        return ft.forward_with_cache(params, tok, row_cache, cfg)

    mapped, mapped_cache = torch.func.vmap(one_row)(tokens[:, 4:], cache)
    torch.testing.assert_close(mapped, batched, atol=1e-5, rtol=0)
    for a, b in zip(ft.tree.leaves(mapped_cache), ft.tree.leaves(batched_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- purity


def test_the_cache_passed_in_is_never_modified(gen):
    cfg = VARIANTS["gqa-rope"]
    params = ft.init_params(cfg, seed=6)
    tokens = tokens_for(cfg, (2, 7), gen)
    cache = ft.init_cache(cfg, 2, max_len=10)
    before = clone_cache(cache)
    _, after_prefill = ft.forward_with_cache(params, tokens[:, :5], cache, cfg)
    assert_caches_equal(cache, before)
    before_decode = clone_cache(after_prefill)
    logits_a, next_a = ft.forward_with_cache(params, tokens[:, 5:6], after_prefill, cfg)
    assert_caches_equal(after_prefill, before_decode)
    # The old cache is still a valid state: continuing from it again gives the same answer.
    logits_b, next_b = ft.forward_with_cache(params, tokens[:, 5:6], after_prefill, cfg)
    assert torch.equal(logits_a, logits_b)
    assert_caches_equal(next_a, next_b)
    # And no buffer of the new cache shares memory with the old one.
    for old, new in zip(after_prefill.k + after_prefill.v, next_a.k + next_a.v):
        assert old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()


def test_the_in_place_path_writes_in_place_and_gives_the_same_numbers(gen):
    """The generation loop's in-place path (it owns its cache) computes exactly what the pure path does."""
    cfg = VARIANTS["llama-like"]
    params = ft.init_params(cfg, seed=7)
    tokens = tokens_for(cfg, (2, 6), gen)
    _, cache = ft.forward_with_cache(params, tokens[:, :5], ft.init_cache(cfg, 2, max_len=8), cfg)
    pure_logits, pure_cache = ft.forward_with_cache(params, tokens[:, 5:], cache, cfg)
    owned = clone_cache(cache)
    logits, donated = ft.model.forward_with_cache_in_place(params, tokens[:, 5:], owned, cfg)
    assert torch.equal(logits, pure_logits)
    assert_caches_equal(donated, pure_cache)
    assert donated.k[0].untyped_storage().data_ptr() == owned.k[0].untyped_storage().data_ptr()


# ---------------------------------------------------------------- ragged batches


@pytest.mark.parametrize("name", ["learned-sdpa", "sinusoidal-einsum", "rope-sdpa", "gqa-einsum", "llama-like"])
def test_ragged_batch_gives_each_row_what_it_gives_alone(name, gen):
    """Right-padded prompts of different lengths, then decoding: every row matches a batch of one."""
    cfg = VARIANTS[name]
    params = ft.init_params(cfg, seed=8)
    lengths = torch.tensor([5, 2, 7, 1])
    prompts = tokens_for(cfg, (4, 7), gen)
    follow = tokens_for(cfg, (4, 3), gen)
    cache = ft.init_cache(cfg, 4, max_len=11)
    logits, cache = ft.forward_with_cache(params, prompts, cache, cfg, seq_lengths=lengths)
    assert cache.lengths.tolist() == lengths.tolist()
    assert not logits.isnan().any()
    steps = []
    for i in range(3):
        step_logits, cache = ft.forward_with_cache(params, follow[:, i : i + 1], cache, cfg)
        steps.append(step_logits)
    steps = torch.cat(steps, dim=-2)
    for row, n in enumerate(lengths.tolist()):
        alone = torch.cat([prompts[row, :n], follow[row]])
        expected = ft.forward(params, alone, cfg)
        torch.testing.assert_close(logits[row, :n], expected[:n], atol=1e-5, rtol=0)
        torch.testing.assert_close(steps[row], expected[n:], atol=1e-5, rtol=0)


def test_rows_whose_chunk_is_all_padding_stay_finite_and_unchanged(gen):
    cfg = VARIANTS["rope-sdpa"]
    params = ft.init_params(cfg, seed=9)
    tokens = tokens_for(cfg, (2, 6), gen)
    _, cache = ft.forward_with_cache(params, tokens[:, :3], ft.init_cache(cfg, 2, max_len=9), cfg)
    logits, cache = ft.forward_with_cache(params, tokens[:, 3:], cache, cfg, seq_lengths=torch.tensor([3, 0]))
    assert bool(logits.isfinite().all())
    assert cache.lengths.tolist() == [6, 3]
    # Row 1 continues exactly where it was: its next token lands at position 3.
    last, _ = ft.forward_with_cache(params, tokens[:, 3:4], cache, cfg)
    torch.testing.assert_close(last[1, 0], ft.forward(params, tokens[1, :4], cfg)[-1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- property-based


@st.composite
def cases(draw):
    cfg = draw(configs())
    seq = draw(st.integers(1, cfg.max_seq_len))
    chunks, left = [], seq
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    max_len = draw(st.integers(seq, cfg.max_seq_len))
    return cfg, chunks, max_len, draw(st.integers(1, 3)), draw(st.integers(0, 2**16)), draw(kernels)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_any_chunking_of_any_config_equals_forward(case):
    cfg, chunks, max_len, batch, seed, kernel = case
    with attention_kernel(kernel):
        params = ft.init_params(cfg, seed=seed)
        tokens = torch.randint(0, cfg.vocab_size, (batch, sum(chunks)), generator=torch.Generator().manual_seed(seed))
        logits, cache = run_in_chunks(params, tokens, ft.init_cache(cfg, batch, max_len=max_len), cfg, chunks)
        torch.testing.assert_close(logits, ft.forward(params, tokens, cfg), atol=1e-5, rtol=0)
        assert cache.lengths.tolist() == [sum(chunks)] * batch


# ---------------------------------------------------------------- errors


def test_writing_past_max_len_names_max_len_and_the_length_asked(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg)
    _, cache = ft.forward_with_cache(params, tokens_for(tiny_cfg, (2, 4), gen), ft.init_cache(tiny_cfg, 2, 6), tiny_cfg)
    with pytest.raises(ValueError, match=r"length 7 .*max_len=6"):
        ft.forward_with_cache(params, tokens_for(tiny_cfg, (2, 3), gen), cache, tiny_cfg)
    # Two more fit exactly.
    _, cache = ft.forward_with_cache(params, tokens_for(tiny_cfg, (2, 2), gen), cache, tiny_cfg)
    with pytest.raises(ValueError, match=r"length 7 .*max_len=6"):
        ft.forward_with_cache(params, tokens_for(tiny_cfg, (2, 1), gen), cache, tiny_cfg)


def test_tokens_longer_than_max_seq_len_are_rejected(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg)
    with pytest.raises(ValueError, match="seq=17 but max_seq_len=16"):
        ft.forward_with_cache(params, tokens_for(tiny_cfg, (1, 17), gen), ft.init_cache(tiny_cfg, 1), tiny_cfg)


def test_batch_mismatch_between_cache_and_tokens(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg)
    with pytest.raises(ValueError, match=r"tokens has batch shape \(3,\) but the cache has batch shape \(2,\)"):
        ft.forward_with_cache(params, tokens_for(tiny_cfg, (3, 2), gen), ft.init_cache(tiny_cfg, 2), tiny_cfg)


def test_cache_for_another_config_is_rejected(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg)
    tokens = tokens_for(tiny_cfg, (2, 2), gen)
    with pytest.raises(ValueError, match="cache has 3 layers but n_layers=2"):
        ft.forward_with_cache(params, tokens, ft.init_cache(tiny_cfg.replace(n_layers=3), 2), tiny_cfg)
    with pytest.raises(ValueError, match=r"cache.k\[0\] has shape \(2, 1, 16, 8\)"):
        ft.forward_with_cache(params, tokens, ft.init_cache(tiny_cfg.replace(n_kv_heads=1), 2), tiny_cfg)
    # With the jaxtyping hook on (as in this suite) beartype rejects it first; both errors are TypeErrors.
    with pytest.raises(TypeError, match="cache"):
        ft.forward_with_cache(params, tokens, {"k": []}, tiny_cfg)


def test_bad_seq_lengths_are_rejected(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg)
    tokens = tokens_for(tiny_cfg, (2, 3), gen)
    cache = ft.init_cache(tiny_cfg, 2)
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, seq=3\]"):
        ft.forward_with_cache(params, tokens, cache, tiny_cfg, seq_lengths=torch.tensor([4, 1]))
    # The jaxtyping hook (on in this suite) catches the shape first; without it the ValueError does.
    with pytest.raises((ValueError, TypeError), match="seq_lengths"):
        ft.forward_with_cache(params, tokens, cache, tiny_cfg, seq_lengths=torch.tensor([1]))


def test_cache_of_another_dtype_is_a_clear_error():
    cfg = ft.PRESETS["tiny"]
    params = ft.tree.to(ft.init_params(cfg), dtype=torch.float64)
    with pytest.raises(ValueError, match="cache buffers are torch.float32 .* params are torch.float64"):
        ft.forward_with_cache(params, torch.zeros(2, 3, dtype=torch.long), ft.init_cache(cfg, 2), cfg)


def test_float_lengths_are_a_type_error(no_typecheck):
    """Our own message (with the test suite's type-check hook on, jaxtyping rejects the dtype first)."""
    cfg = ft.PRESETS["tiny"]
    params = ft.init_params(cfg)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="seq_lengths must be an integer tensor"):
        ft.forward_with_cache(params, tokens, ft.init_cache(cfg, 2), cfg, seq_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="seq_lengths must be an integer tensor"):
        ft.generate(params, tokens, cfg, max_new_tokens=1, seq_lengths=torch.tensor([1.0, 2.0]))
