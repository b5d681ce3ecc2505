"""The whole model: shapes, causality, transforms (grad, vmap, compile), the loss, and bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError

import ftransformer as ft
from strategies import configs, kernels
from ftransformer.layers import attention_kernel

POSITIONALS = ("learned", "sinusoidal", "rope")
IMPLS = ("sdpa", "einsum")


def tokens_for(cfg, shape, gen):
    return torch.randint(0, cfg.vocab_size, shape, generator=gen)


# ---------------------------------------------------------------- shapes and batch axes


@pytest.mark.parametrize("positional", POSITIONALS)
def test_any_number_of_leading_batch_axes(tiny_cfg, gen, positional):
    cfg = tiny_cfg.replace(positional=positional)
    params = ft.init_params(cfg, seed=0)
    tokens = tokens_for(cfg, (2, 5, 7), gen)
    logits = ft.forward(params, tokens, cfg)
    assert logits.shape == (2, 5, 7, cfg.vocab_size)
    torch.testing.assert_close(ft.forward(params, tokens[1], cfg), logits[1])
    torch.testing.assert_close(ft.forward(params, tokens[1, 2], cfg), logits[1, 2])
    torch.testing.assert_close(ft.forward(params, tokens[None, None], cfg)[0, 0], logits)
    loss = ft.loss_fn(params, tokens, tokens, cfg)
    assert loss.shape == ()
    torch.testing.assert_close(ft.loss_fn(params, tokens.reshape(10, 7), tokens.reshape(10, 7), cfg), loss)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_a_hand_written_model(tiny_cfg, gen, tie):
    """embed + positions -> blocks -> final norm -> unembedding, composed from the layer functions."""
    cfg = tiny_cfg.replace(tie_embeddings=tie)
    p = ft.init_params(cfg, seed=4)
    tokens = tokens_for(cfg, (2, 6), gen)
    mask = ft.layers.self_mask(torch.arange(6).expand(2, 6))
    x = p["embed"]["tokens"][tokens] + p["embed"]["positions"][:6]
    for blk in p["blocks"]:
        x = ft.layers.block(blk, x, cfg, mask=mask)
    x = F.layer_norm(x, (cfg.d_model,), p["ln_f"]["scale"], p["ln_f"]["bias"], cfg.norm.eps)
    w_out = p["embed"]["tokens"].T if tie else p["unembed"]["w"]
    torch.testing.assert_close(ft.forward(p, tokens, cfg), x @ w_out)


# ---------------------------------------------------------------- causality


def assert_causal(cfg, params, tokens, t, *, changes_itself=True):
    changed = tokens.clone()
    changed[..., t] = (changed[..., t] + 1) % cfg.vocab_size
    a, b = ft.forward(params, tokens, cfg), ft.forward(params, changed, cfg)
    torch.testing.assert_close(a[..., :t, :], b[..., :t, :], atol=1e-6, rtol=1e-6)
    if changes_itself:
        assert not torch.allclose(a[..., t, :], b[..., t, :]), "the changed token must change its own logits"


@pytest.mark.parametrize("positional", POSITIONALS)
def test_changing_token_t_never_changes_earlier_logits(tiny_cfg, gen, positional, kernel):
    cfg = tiny_cfg.replace(positional=positional, n_kv_heads=1)
    params = ft.init_params(cfg, seed=1)
    tokens = tokens_for(cfg, (2, 9), gen)
    for t in range(9):
        assert_causal(cfg, params, tokens, t)


@settings(max_examples=25, deadline=None)
@given(cfg=configs(min_seq_len=6, max_seq_len=11), kernel=kernels, data=st.data())
def test_causality_for_random_configs(cfg, kernel, data):
    with attention_kernel(kernel):
        seq = data.draw(st.integers(2, cfg.max_seq_len), label="seq")
        t = data.draw(st.integers(0, seq - 1), label="t")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        params = ft.init_params(cfg, seed=seed)
        tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
        # Only the causal half: in a degenerate draw (LayerNorm over d_model=2 maps every vector to
        # +-(1, -1)) a changed token can leave even its own logits unchanged.
        assert_causal(cfg, params, tokens, t, changes_itself=False)


# ---------------------------------------------------------------- transforms


@attention_kernel("einsum")
def test_func_grad_of_loss_equals_autograd(tiny_cfg, gen):
    cfg = tiny_cfg.replace(positional="rope", n_kv_heads=1)
    params = ft.init_params(cfg, seed=2)
    tokens, targets = tokens_for(cfg, (5, 8), gen), tokens_for(cfg, (5, 8), gen)
    grads = torch.func.grad(ft.loss_fn)(params, tokens, targets, cfg)

    leaves = ft.tree.map(lambda t: t.detach().clone().requires_grad_(), params)
    ft.loss_fn(leaves, tokens, targets, cfg).backward()
    expected = ft.tree.flatten_with_paths(ft.tree.map(lambda t: t.grad, leaves))
    got = ft.tree.flatten_with_paths(grads)
    assert list(got) == list(expected)
    for path in got:
        torch.testing.assert_close(got[path], expected[path], msg=path)
    assert float(got["embed.tokens"].abs().sum()) > 0


def test_vmap_of_unbatched_forward_equals_batched_forward(tiny_cfg, gen, kernel):
    cfg = tiny_cfg.replace(positional="rope")
    params = ft.init_params(cfg, seed=3)
    tokens = tokens_for(cfg, (4, 7), gen)
    # The token-id check reads tensor values; under vmap it must step aside, not crash.
    vmapped = torch.func.vmap(ft.forward, in_dims=(None, 0, None))(params, tokens, cfg)
    torch.testing.assert_close(vmapped, ft.forward(params, tokens, cfg))
    nested = torch.func.vmap(torch.func.vmap(ft.forward, in_dims=(None, 0, None)), in_dims=(None, 0, None))
    torch.testing.assert_close(nested(params, tokens.reshape(2, 2, 7), cfg), vmapped.reshape(2, 2, 7, -1))
    losses = torch.func.vmap(ft.loss_fn, in_dims=(None, 0, 0, None))(params, tokens, tokens, cfg)
    torch.testing.assert_close(losses, torch.stack([ft.loss_fn(params, t, t, cfg) for t in tokens]))


@settings(max_examples=10, deadline=None)
@given(cfg=configs(min_seq_len=6, max_seq_len=11), kernel=kernels, batch=st.integers(1, 3), data=st.data())
def test_vmap_equals_batched_forward_for_random_configs(cfg, kernel, batch, data):
    with attention_kernel(kernel):
        seq = data.draw(st.integers(1, cfg.max_seq_len), label="seq")
        params = ft.init_params(cfg, seed=0)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
        vmapped = torch.func.vmap(ft.forward, in_dims=(None, 0, None))(params, tokens, cfg)
        torch.testing.assert_close(vmapped, ft.forward(params, tokens, cfg))


@attention_kernel("einsum")
def test_vmap_over_stacked_params_is_an_ensemble(tiny_cfg, gen):
    # The einsum path: vmap over weights has no fused SDPA batching rule (torch warns and loops).
    cfg = tiny_cfg
    members = [ft.init_params(cfg, seed=s) for s in range(4)]
    stacked = ft.tree.map(lambda *xs: torch.stack(xs), *members)
    tokens = tokens_for(cfg, (2, 5), gen)
    out = torch.func.vmap(ft.forward, in_dims=(0, None, None))(stacked, tokens, cfg)
    for i, p in enumerate(members):
        torch.testing.assert_close(out[i], ft.forward(p, tokens, cfg))


@attention_kernel("einsum")
def test_per_example_grads_by_vmap_equal_the_loop(tiny_cfg, gen):
    cfg = tiny_cfg
    params = ft.init_params(cfg, seed=0)
    tokens, targets = tokens_for(cfg, (4, 6), gen), tokens_for(cfg, (4, 6), gen)
    per_example = torch.func.vmap(torch.func.grad(ft.loss_fn), in_dims=(None, 0, 0, None))(params, tokens, targets, cfg)
    for i in range(4):
        one = torch.func.grad(ft.loss_fn)(params, tokens[i], targets[i], cfg)
        torch.testing.assert_close(per_example["blocks"][1]["attn"]["w_qkv"][i], one["blocks"][1]["attn"]["w_qkv"])
        torch.testing.assert_close(per_example["embed"]["tokens"][i], one["embed"]["tokens"])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_loss_gradcheck_float64(gen, norm_position):
    # batch 3, seq 5, heads 2, head_dim 4, d_model 8, d_ff 6, vocab 7
    cfg = ft.Config.from_flat(vocab_size=7, d_model=8, n_heads=2, n_layers=1, d_ff=6, max_seq_len=5, positional="rope",
                    tie_embeddings=False, norm_position=norm_position, activation="swiglu")
    flat = ft.tree.flatten_with_paths(ft.init_params(cfg, seed=0, dtype=torch.float64))
    names = list(flat)
    tokens, targets = tokens_for(cfg, (3, 5), gen), tokens_for(cfg, (3, 5), gen)

    def f(*leaves):
        return ft.loss_fn(ft.tree.unflatten_paths(dict(zip(names, leaves))), tokens, targets, cfg)

    assert f(*flat.values()).dtype == torch.float64
    assert torch.autograd.gradcheck(f, tuple(x.clone().requires_grad_() for x in flat.values()), fast_mode=True)


@pytest.mark.slow  # inductor's first compile takes ~30 s on a small CPU; later runs hit its cache
def test_compiled_forward_matches_eager(tiny_cfg, gen, no_typecheck):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens = tokens_for(tiny_cfg, (2, 9), gen)
    compiled = torch.compile(ft.forward, fullgraph=True)
    torch.testing.assert_close(compiled(params, tokens, tiny_cfg), ft.forward(params, tokens, tiny_cfg),
                               atol=1e-5, rtol=1e-5)
    # Same shapes, new values: the compiled graph is reused and still right.
    other = (tokens + 1) % tiny_cfg.vocab_size
    torch.testing.assert_close(compiled(params, other, tiny_cfg), ft.forward(params, other, tiny_cfg),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- dropout and the loss


@pytest.mark.parametrize(
    "changes",
    [{}, dict(positional="rope", n_kv_heads=1, norm_position="post", activation="swiglu", norm="rmsnorm")],
)
def test_dropout_only_with_a_key(tiny_cfg, gen, changes):
    cfg = tiny_cfg.replace(dropout=0.2, **changes)
    params = ft.init_params(cfg)
    tokens = tokens_for(cfg, (2, 5, 8), gen)
    a = ft.forward(params, tokens, cfg, key=ft.random.key(0))
    assert a.shape == (2, 5, 8, cfg.vocab_size)
    assert torch.equal(a, ft.forward(params, tokens, cfg, key=ft.random.key(0)))
    assert not torch.allclose(a, ft.forward(params, tokens, cfg, key=ft.random.key(1)))
    torch.testing.assert_close(ft.forward(params, tokens, cfg), ft.forward(params, tokens, cfg.replace(dropout=0.0)))
    loss = ft.loss_fn(params, tokens, tokens, cfg, key=ft.random.key(2))
    assert torch.equal(loss, ft.loss_fn(params, tokens, tokens, cfg, key=ft.random.key(2)))
    assert not torch.equal(loss, ft.loss_fn(params, tokens, tokens, cfg))


def test_loss_is_mean_next_token_cross_entropy_with_an_ignore_index(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = tokens_for(tiny_cfg, (2, 6), gen), tokens_for(tiny_cfg, (2, 6), gen)
    logp = ft.forward(params, tokens, tiny_cfg).log_softmax(-1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ft.loss_fn(params, tokens, targets, tiny_cfg), nll.mean())
    torch.testing.assert_close(ft.loss_fn(params, tokens, targets, tiny_cfg, reduction="sum"), nll.sum())
    padded = targets.clone()
    padded[0, 3:] = -100
    keep = padded != -100
    torch.testing.assert_close(ft.loss_fn(params, tokens, padded, tiny_cfg), nll[keep].mean())
    padded[padded == -100] = 0
    padded[0, 3:] = 36  # any id may be the ignore index
    torch.testing.assert_close(ft.loss_fn(params, tokens, padded, tiny_cfg, ignore_index=36), nll[padded != 36].mean())
    # A fresh model knows nothing: its loss is close to log(vocab).
    assert abs(float(nll.mean()) - torch.log(torch.tensor(37.0)).item()) < 0.2
    with pytest.raises(ValueError, match="reduction"):
        ft.loss_fn(params, tokens, targets, tiny_cfg, reduction="max")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [37, 40, -1])
def test_token_ids_outside_the_vocabulary_name_the_value_and_vocab_size(tiny_cfg, bad):
    params = ft.init_params(tiny_cfg)
    tokens = torch.tensor([[1, 2, 3], [4, bad, 5]])
    with pytest.raises(ValueError, match=rf"{bad}.*vocab_size=37"):
        ft.forward(params, tokens, tiny_cfg)
    with pytest.raises(ValueError, match=rf"targets.*{bad}.*vocab_size=37"):
        ft.loss_fn(params, torch.zeros_like(tokens), tokens, tiny_cfg)


def test_sequence_longer_than_max_seq_len_names_both(tiny_cfg):
    params = ft.init_params(tiny_cfg)
    with pytest.raises(ValueError, match=r"seq=17.*max_seq_len=16"):
        ft.forward(params, torch.zeros(2, 17, dtype=torch.long), tiny_cfg)
    ft.forward(params, torch.zeros(2, 16, dtype=torch.long), tiny_cfg)  # the limit itself is fine


def test_float_tokens_raise_type_error(tiny_cfg):
    params = ft.init_params(tiny_cfg)
    with pytest.raises(TypeError):
        ft.forward(params, torch.zeros(2, 5), tiny_cfg)
    with pytest.raises(TypeError):
        ft.loss_fn(params, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), tiny_cfg)


def test_input_checks_without_the_type_checker(tiny_cfg, no_typecheck):
    """The library's own checks, as users meet them (the test suite's jaxtyping hook would answer first)."""
    params = ft.init_params(tiny_cfg)
    with pytest.raises(TypeError, match="integer token ids.*float32"):
        ft.forward(params, torch.zeros(2, 5), tiny_cfg)
    with pytest.raises(TypeError, match="bool"):
        ft.forward(params, torch.zeros(2, 5, dtype=torch.bool), tiny_cfg)
    with pytest.raises(TypeError, match="list"):
        ft.forward(params, [1, 2, 3], tiny_cfg)
    with pytest.raises(ValueError, match="scalar"):
        ft.forward(params, torch.tensor(3), tiny_cfg)
    with pytest.raises(ValueError, match="seq=0"):
        ft.forward(params, torch.zeros(2, 0, dtype=torch.long), tiny_cfg)
    with pytest.raises(TypeError, match="targets.*float32"):
        ft.loss_fn(params, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), tiny_cfg)


def test_targets_of_another_shape_raise(tiny_cfg, no_typecheck):
    params = ft.init_params(tiny_cfg)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        ft.loss_fn(params, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), tiny_cfg)


def test_a_wrong_shaped_weight_raises_a_type_error_naming_the_axis(tiny_cfg):
    tokens = torch.zeros(2, 5, dtype=torch.long)
    params = ft.init_params(tiny_cfg)
    params["blocks"][1]["ln2"]["scale"] = torch.ones(tiny_cfg.d_model + 1)
    with pytest.raises(TypeCheckError, match="d_model=24"):
        ft.forward(params, tokens, tiny_cfg)
    # A token table of the wrong width: the first norm sees a residual stream of the wrong size.
    cfg = tiny_cfg.replace(positional="rope")
    params = ft.init_params(cfg)
    params["embed"]["tokens"] = torch.zeros(cfg.vocab_size, cfg.d_model - 1)
    with pytest.raises(TypeCheckError, match="d_model"):
        ft.forward(params, tokens, cfg)


# ---------------------------------------------------------------- built once per call


@pytest.mark.parametrize("with_cache", [False, True])
def test_mask_and_rotary_tables_are_built_once_per_call(tiny_cfg, gen, monkeypatch, with_cache):
    """Every block gets the very mask and rotary tables the model built once (not one per layer)."""
    cfg = tiny_cfg.replace(positional="rope", n_layers=3)
    params = ft.init_params(cfg, seed=0)
    tokens = tokens_for(cfg, (2, 5), gen)
    built, seen = [], []

    def counting(fn):
        def wrapper(*args, **kwargs):
            built.append(fn(*args, **kwargs))
            return built[-1]
        return wrapper

    for name in ("self_mask", "cache_mask", "rotary_tables"):
        monkeypatch.setattr(ft.model, name, counting(getattr(ft.model, name)))
    block_name = "block_with_cache" if with_cache else "block"
    real_block = getattr(ft.model, block_name)

    def spying_block(*args, **kwargs):
        seen.append((kwargs["mask"], kwargs["rotary"]))
        return real_block(*args, **kwargs)

    monkeypatch.setattr(ft.model, block_name, spying_block)
    if with_cache:
        ft.forward_with_cache(params, tokens, ft.init_cache(cfg, 2, max_len=8), cfg)
    else:
        ft.forward(params, tokens, cfg)
    assert len(built) == 2 and len(seen) == cfg.n_layers
    assert all(mask is built[0] and rotary is built[1] for mask, rotary in seen)


def test_check_seq_lengths_is_the_one_rule(gen):
    tokens = torch.zeros(2, 3, 4, dtype=torch.long)
    ft.model.check_seq_lengths(None, tokens)
    ft.model.check_seq_lengths(torch.tensor([[0, 4, 2], [1, 1, 1]]), tokens)
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, seq=4\], got \[\[0, 5, 2\]"):
        ft.model.check_seq_lengths(torch.tensor([[0, 5, 2], [1, 1, 1]]), tokens)
    with pytest.raises(ValueError, match=r"prompt_lengths must be a tensor of shape \(\*batch,\) = \(2, 3\), got \(3,\)"):
        ft.model.check_seq_lengths(torch.tensor([1, 1, 1]), tokens, name="prompt_lengths")
    with pytest.raises(ValueError, match="got list"):
        ft.model.check_seq_lengths([1, 2], tokens)
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        ft.model.check_seq_lengths(torch.ones(2, 3), tokens)
