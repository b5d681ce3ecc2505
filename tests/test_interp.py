"""Interpretability: activations as return values, interventions as arguments, analyses (ftransformer.interp)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ftransformer as ft
from ftransformer import interp
from ftransformer.layers import feedforward, norm, residual
from ftransformer.model import unembed
from tests.strategies import configs, kernels
from ftransformer.layers import attention_kernel

# Every Config switch the tapped forward has to follow, each at once with a different neighbour.
VARIANTS = {
    "default-sdpa": {},
    "einsum": {},  # the default config on the einsum kernel (see ``variant``)
    "rope-gqa-swiglu": dict(positional="rope", n_heads=4, d_model=24, n_kv_heads=2, activation="swiglu"),
    "post-ln-rmsnorm": dict(norm_position="post", norm="rmsnorm", bias=False),
    "mqa-untied-sinusoidal": dict(n_kv_heads=1, tie_embeddings=False, positional="sinusoidal"),
    "attention-only": dict(mlp=False),
}


def perturbed_params(cfg: ft.Config, seed: int = 0) -> dict:
    """Initial params plus noise, so norms and biases are far from 1/0 and heads differ clearly."""
    gen = torch.Generator().manual_seed(seed + 100)
    return ft.tree.map(lambda x: x + 0.2 * torch.randn(x.shape, generator=gen), ft.init_params(cfg, seed=seed))


def tokens_for(cfg: ft.Config, batch: int = 3, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, tiny_cfg):
    cfg = tiny_cfg.replace(**VARIANTS[request.param])
    with attention_kernel("einsum" if request.param == "einsum" else "auto"):
        yield cfg, perturbed_params(cfg)


def test_logits_are_forwards_bit_for_bit(variant):
    cfg, params = variant
    tokens = tokens_for(cfg)
    logits, _ = ft.forward_with_activations(params, tokens, cfg)
    assert torch.equal(logits, ft.forward(params, tokens, cfg))


def test_acts_have_the_documented_names_and_shapes(variant):
    cfg, params = variant
    tokens = tokens_for(cfg, batch=3, seq=11)
    _, acts = ft.forward_with_activations(params, tokens, cfg)
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    assert set(acts) == {"embed", "blocks", "final"} and len(acts["blocks"]) == cfg.n_layers
    assert acts["embed"].shape == acts["final"].shape == (3, 11, d)
    for b in acts["blocks"]:
        assert set(b) == {"resid_pre", "attn", "resid_mid", "resid_post"} | ({"mlp"} if cfg.layout.mlp else set())
        assert b["resid_pre"].shape == b["resid_mid"].shape == b["resid_post"].shape == (3, 11, d)
        a = b["attn"]
        assert a["q"].shape == (3, h, 11, hd) and a["k"].shape == a["v"].shape == (3, kv, 11, hd)
        assert a["pattern"].shape == (3, h, 11, 11) and a["head_out"].shape == (3, h, 11, d)
        if cfg.layout.mlp:
            assert b["mlp"]["hidden"].shape == (3, 11, cfg.d_ff)
    paths = interp.activation_paths(cfg)
    assert paths == list(ft.tree.flatten_with_paths(acts)) or set(paths) == set(ft.tree.flatten_with_paths(acts))


def test_residual_stream_is_chained_and_heads_sum_to_the_attention_output(variant):
    cfg, params = variant
    _, acts = ft.forward_with_activations(params, tokens_for(cfg), cfg)
    assert torch.equal(acts["blocks"][0]["resid_pre"], acts["embed"])
    for prev, nxt in zip(acts["blocks"], acts["blocks"][1:]):
        assert torch.equal(nxt["resid_pre"], prev["resid_post"])
    if cfg.layout.norm_position == "pre":
        for bp, b in zip(params["blocks"], acts["blocks"]):
            attn_out = b["attn"]["head_out"].sum(-3) + bp["attn"].get("b_o", 0)
            torch.testing.assert_close(b["resid_mid"] - b["resid_pre"], attn_out, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), kernel=kernels, batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_patterns_are_causal_softmax_rows(cfg, kernel, batch, seed):
    with attention_kernel(kernel):
        params = ft.init_params(cfg, seed=seed)
        tokens = tokens_for(cfg, batch=batch, seq=cfg.max_seq_len, seed=seed)
        _, acts = ft.forward_with_activations(params, tokens, cfg)
        seq = cfg.max_seq_len
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        for b in acts["blocks"]:
            p = b["attn"]["pattern"]
            assert bool((p >= 0).all())
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6, rtol=0)
            assert bool((p[..., future] == 0).all())


def test_acts_equal_hugging_face_attentions_and_hidden_states():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=23, n_embd=40, n_layer=3, n_head=5, n_inner=56, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    hf_cfg._attn_implementation = "eager"  # the attention implementation that can return its patterns
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    cfg, params = ft.load_hf_gpt2(model.state_dict(), config=hf_cfg.to_dict())
    tokens = tokens_for(cfg, batch=2, seq=17)
    with torch.no_grad():
        out = model(tokens, output_attentions=True, output_hidden_states=True)
    _, acts = ft.forward_with_activations(params, tokens, cfg)
    assert len(out.attentions) == cfg.n_layers and len(out.hidden_states) == cfg.n_layers + 1
    for i, b in enumerate(acts["blocks"]):
        torch.testing.assert_close(b["attn"]["pattern"], out.attentions[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b["resid_pre"], out.hidden_states[i], atol=1e-5, rtol=1e-5)
    # transformers' last hidden state is after ln_f: what the unembedding reads.
    torch.testing.assert_close(acts["final"], out.hidden_states[-1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- interventions


def test_zero_ablating_a_head_equals_zeroing_its_slice_of_w_o(variant):
    cfg, params = variant
    tokens = tokens_for(cfg)
    layer, head = 1, 2
    logits, acts = ft.forward_with_activations(params, tokens, cfg, interventions=interp.ablate_heads(layer, head, cfg))
    assert bool((acts["blocks"][layer]["attn"]["head_out"][:, head] == 0).all())
    by_hand = ft.tree.map(lambda x: x.clone(), params)
    w_o = by_hand["blocks"][layer]["attn"]["w_o"]
    w_o[head * cfg.head_dim:(head + 1) * cfg.head_dim] = 0.0
    torch.testing.assert_close(logits, ft.forward(by_hand, tokens, cfg), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, ft.forward(params, tokens, cfg), atol=1e-3)


def test_interventions_on_the_pattern_flow_into_the_output(variant):
    cfg, params = variant
    tokens = tokens_for(cfg)
    # An unchanged pattern routed through the einsum path: the forward's numbers to float rounding.
    logits, _ = ft.forward_with_activations(params, tokens, cfg, interventions={"blocks.0.attn.pattern": lambda p: p.clone()})
    torch.testing.assert_close(logits, ft.forward(params, tokens, cfg), atol=1e-5, rtol=1e-5)
    # A head that attends to nothing writes nothing.
    def silence_head_1(p):
        p = p.clone()
        p[:, 1] = 0.0
        return p

    _, acts = ft.forward_with_activations(params, tokens, cfg, interventions={"blocks.1.attn.pattern": silence_head_1})
    assert bool((acts["blocks"][1]["attn"]["head_out"][:, 1] == 0).all())


def test_mean_ablation_writes_the_heads_mean(tiny_cfg):
    params = perturbed_params(tiny_cfg)
    tokens = tokens_for(tiny_cfg)
    _, clean = ft.forward_with_activations(params, tokens, tiny_cfg)
    means = interp.head_means(clean["blocks"][0]["attn"]["head_out"])
    _, acts = ft.forward_with_activations(
        params, tokens, tiny_cfg, interventions=interp.ablate_heads(0, [0, 2], tiny_cfg, kind="mean", means=means)
    )
    out = acts["blocks"][0]["attn"]["head_out"]
    for h in (0, 2):
        torch.testing.assert_close(out[:, h], means[h].expand_as(out[:, h]))
    torch.testing.assert_close(out[:, 1], clean["blocks"][0]["attn"]["head_out"][:, 1])


def test_patching_a_run_with_its_own_activations_changes_nothing(variant):
    cfg, params = variant
    tokens = tokens_for(cfg)
    logits, acts = ft.forward_with_activations(params, tokens, cfg)
    flat = ft.tree.flatten_with_paths(acts)
    patches = interp.combine(*(interp.patch(path, value) for path, value in flat.items()))
    patched, _ = ft.forward_with_activations(params, tokens, cfg, interventions=patches)
    assert torch.equal(patched, logits)


def test_patching_from_another_run_at_one_position_moves_only_later_positions(tiny_cfg):
    params = perturbed_params(tiny_cfg)
    clean, corrupt = tokens_for(tiny_cfg, seed=1), tokens_for(tiny_cfg, seed=2)
    _, corrupt_acts = ft.forward_with_activations(params, corrupt, tiny_cfg)
    site = "blocks.0.resid_post"
    source = corrupt_acts["blocks"][0]["resid_post"]
    base, _ = ft.forward_with_activations(params, clean, tiny_cfg)
    logits, acts = ft.forward_with_activations(params, clean, tiny_cfg, interventions=interp.patch(site, source, positions=5))
    torch.testing.assert_close(acts["blocks"][0]["resid_post"][:, 5], source[:, 5])
    assert torch.equal(logits[:, :5], base[:, :5])  # causal: earlier positions never see position 5
    assert not torch.allclose(logits[:, 5:], base[:, 5:])
    # A head-and-position patch touches exactly that rectangle of the site.
    head_src = corrupt_acts["blocks"][1]["attn"]["head_out"]
    _, acts = ft.forward_with_activations(
        params, clean, tiny_cfg, interventions=interp.patch("blocks.1.attn.head_out", head_src, positions=[2, 3], heads=1)
    )
    got = acts["blocks"][1]["attn"]["head_out"]
    torch.testing.assert_close(got[:, 1, 2:4], head_src[:, 1, 2:4])
    _, base_acts = ft.forward_with_activations(params, clean, tiny_cfg)
    untouched = torch.ones(got.shape[1:3], dtype=torch.bool)
    untouched[1, 2:4] = False
    torch.testing.assert_close(got[:, untouched], base_acts["blocks"][1]["attn"]["head_out"][:, untouched])


def test_steering_adds_the_vector_to_the_residual_stream(tiny_cfg):
    params = perturbed_params(tiny_cfg)
    tokens = tokens_for(tiny_cfg)
    vector = torch.randn(tiny_cfg.d_model, generator=torch.Generator().manual_seed(3))
    _, base = ft.forward_with_activations(params, tokens, tiny_cfg)
    _, acts = ft.forward_with_activations(params, tokens, tiny_cfg, interventions=interp.steer(0, vector, tiny_cfg, scale=2.0))
    torch.testing.assert_close(acts["blocks"][0]["resid_post"], base["blocks"][0]["resid_post"] + 2.0 * vector)
    _, acts = ft.forward_with_activations(
        params, tokens, tiny_cfg, interventions=interp.steer(1, vector, tiny_cfg, site="resid_mid", positions=[0, 4])
    )
    delta = acts["blocks"][1]["resid_mid"] - base["blocks"][1]["resid_mid"]
    torch.testing.assert_close(delta[:, [0, 4]], vector.expand(3, 2, -1))
    assert torch.equal(delta[:, 1:4], torch.zeros_like(delta[:, 1:4]))


def test_bad_interventions_say_what_is_valid(tiny_cfg):
    params, tokens = ft.init_params(tiny_cfg), tokens_for(tiny_cfg)
    with pytest.raises(ValueError, match=r"unknown activation path 'blocks\.9\.resid_post'.*blocks\.1\.attn\.head_out"):
        ft.forward_with_activations(params, tokens, tiny_cfg, interventions={"blocks.9.resid_post": lambda v: v})
    with pytest.raises(ValueError, match=r"'blocks\.0\.resid_mid' must return a tensor of shape \(3, 11, 24\), got \(3, 11\)"):
        ft.forward_with_activations(params, tokens, tiny_cfg, interventions={"blocks.0.resid_mid": lambda v: v.sum(-1)})
    with pytest.raises(TypeError, match="must be a function"):
        ft.forward_with_activations(params, tokens, tiny_cfg, interventions={"embed": 3})
    with pytest.raises(ValueError, match=r"heads must be ints in \[0, n_heads=3\)"):
        interp.ablate_heads(0, 3, tiny_cfg)
    with pytest.raises(ValueError, match="layer must be an int"):
        interp.ablate_heads(2, 0, tiny_cfg)
    with pytest.raises(ValueError, match="kind must be one of"):
        interp.ablate_heads(0, 0, tiny_cfg, kind="resample")
    with pytest.raises(ValueError, match=r"vector must have shape \(d_model,\) = \(24,\)"):
        interp.steer(0, torch.zeros(5), tiny_cfg)
    attn_only = tiny_cfg.replace(mlp=False)
    with pytest.raises(ValueError, match="unknown activation path 'blocks.0.mlp.hidden'"):
        ft.forward_with_activations(ft.init_params(attn_only), tokens, attn_only, interventions={"blocks.0.mlp.hidden": abs})


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_vmapped_head_ablation_sweep_equals_the_loop(kind, variant):
    cfg, params = variant
    tokens, targets = tokens_for(cfg, seed=1), tokens_for(cfg, seed=2)
    sweep = ft.interp.head_ablation_sweep(params, tokens, targets, cfg, kind=kind)
    assert sweep.shape == (cfg.n_layers, cfg.n_heads)
    base = ft.loss_fn(params, tokens, targets, cfg)
    _, clean = ft.forward_with_activations(params, tokens, cfg)
    loop = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        means = interp.head_means(clean["blocks"][layer]["attn"]["head_out"])
        for head in range(cfg.n_heads):
            ablation = interp.ablate_heads(layer, head, cfg, kind=kind, means=means)
            logits, _ = ft.forward_with_activations(params, tokens, cfg, interventions=ablation)
            loop[layer, head] = ft.model.cross_entropy(logits, targets) - base
    # Losses of ~3.6 in float32 differ by a few ulps (1e-6) between the einsum and SDPA kernels.
    torch.testing.assert_close(sweep, loop, atol=2e-5, rtol=0)
    assert bool((loop.abs() > 1e-4).any())


# ---------------------------------------------------------------- transforms


def test_grad_through_activations_equals_a_hand_written_equivalent(tiny_cfg):
    """d logit / d resid_mid of layer 1: through an intervention adding a zero delta, and by writing the
    rest of the model out by hand from resid_mid on."""
    cfg = tiny_cfg.replace(n_layers=3)
    params = perturbed_params(cfg)
    tokens = tokens_for(cfg, batch=2, seq=9)
    _, acts = ft.forward_with_activations(params, tokens, cfg)
    mid = acts["blocks"][1]["resid_mid"]
    pos, tok = 6, 4

    def via_intervention(delta):
        logits, _ = ft.forward_with_activations(params, tokens, cfg, interventions={"blocks.1.resid_mid": lambda v: v + delta})
        return logits[:, pos, tok].sum()

    def by_hand(x):
        x = residual(params["blocks"][1]["mlp"], x, lambda p, h: feedforward(p, h, cfg), params["blocks"][1]["ln2"], cfg, None)
        x = ft.layers.block(params["blocks"][2], x, cfg, mask=ft.layers.self_mask(torch.arange(9)))
        return unembed(params, x, cfg)[:, pos, tok].sum()

    got = torch.func.grad(via_intervention)(torch.zeros_like(mid))
    want = torch.func.grad(by_hand)(mid)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert bool(got[:, pos + 1:].eq(0).all()) and bool(got[:, :pos + 1].ne(0).any())
    # And with respect to the parameters, through the activations: a logit-lens loss at layer 0.
    def lens_loss(p):
        _, a = ft.forward_with_activations(p, tokens, cfg)
        return unembed(p, a["blocks"][0]["resid_post"], cfg).logsumexp(-1).mean()

    def lens_by_hand(p):
        x = ft.model.embed(p, tokens, cfg, positions=torch.arange(9))
        x = ft.layers.block(p["blocks"][0], x, cfg, mask=ft.layers.self_mask(torch.arange(9)))
        return unembed(p, x, cfg).logsumexp(-1).mean()

    g1, g2 = torch.func.grad(lens_loss)(params), torch.func.grad(lens_by_hand)(params)
    for (path, a), b in zip(ft.tree.flatten_with_paths(g1).items(), ft.tree.leaves(g2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=path)


@attention_kernel("einsum")
def test_vmap_over_examples_and_over_models_equals_the_loop(tiny_cfg):
    cfg = tiny_cfg
    params = perturbed_params(cfg)
    tokens = tokens_for(cfg, batch=4, seq=8)
    logits, acts = torch.func.vmap(lambda t: ft.forward_with_activations(params, t, cfg))(tokens)
    for i in range(4):
        li, ai = ft.forward_with_activations(params, tokens[i], cfg)
        torch.testing.assert_close(logits[i], li, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(acts["blocks"][1]["attn"]["pattern"][i], ai["blocks"][1]["attn"]["pattern"], atol=1e-6, rtol=1e-5)
    members = [perturbed_params(cfg, seed=s) for s in range(3)]
    stacked = ft.tree.map(lambda *x: torch.stack(x), *members)
    scores = torch.func.vmap(lambda p: ft.forward_with_activations(p, tokens, cfg)[1]["blocks"][0]["attn"]["pattern"])(stacked)
    for m, p in enumerate(members):
        torch.testing.assert_close(scores[m], ft.forward_with_activations(p, tokens, cfg)[1]["blocks"][0]["attn"]["pattern"],
                                   atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- analyses


def test_logit_lens_ends_at_the_logits(variant):
    cfg, params = variant
    tokens = tokens_for(cfg)
    logits, acts = ft.forward_with_activations(params, tokens, cfg)
    lens = interp.logit_lens(params, acts, cfg)
    assert lens.shape == (cfg.n_layers + 1, *logits.shape)
    assert torch.equal(lens[-1], logits)
    torch.testing.assert_close(lens[0], unembed(params, acts["embed"], cfg))


@pytest.mark.parametrize("name", ["default-sdpa", "rope-gqa-swiglu", "mqa-untied-sinusoidal", "attention-only"])
def test_direct_logit_attribution_sums_to_the_logit(name, tiny_cfg):
    cfg = tiny_cfg.replace(**VARIANTS[name], **({"norm": "rmsnorm"} if name == "rope-gqa-swiglu" else {}))
    params = perturbed_params(cfg)
    tokens = tokens_for(cfg)
    logits, acts = ft.forward_with_activations(params, tokens, cfg)
    for token in (5, tokens_for(cfg, seed=9)):
        dla = interp.direct_logit_attribution(params, acts, cfg, token)
        assert dla["heads"].shape == (cfg.n_layers, cfg.n_heads, 3, 11) and dla["mlp"].shape == (cfg.n_layers, 3, 11)
        total = dla["embed"] + dla["heads"].sum((0, 1)) + dla["mlp"].sum(0) + dla["bias"]
        want = logits[..., token] if isinstance(token, int) else logits.gather(-1, token[..., None])[..., 0]
        # A sum of ~30 float32 terms of size ~1: a few ulps each.
        torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    if not cfg.layout.mlp:
        assert bool((dla["mlp"] == 0).all())


def test_direct_logit_attribution_refuses_post_ln(tiny_cfg):
    cfg = tiny_cfg.replace(norm_position="post")
    params = ft.init_params(cfg)
    _, acts = ft.forward_with_activations(params, tokens_for(cfg), cfg)
    with pytest.raises(ValueError, match="norm_position='pre'"):
        interp.direct_logit_attribution(params, acts, cfg, 1)
    with pytest.raises(ValueError, match="token must be an id"):
        interp.direct_logit_attribution(ft.init_params(tiny_cfg), acts, tiny_cfg, 37)


def synthetic_acts(pattern: torch.Tensor) -> dict:
    return {"blocks": [{"attn": {"pattern": p}} for p in pattern]}


def test_scores_on_hand_made_patterns():
    seq, half = 8, 4
    prev = torch.zeros(seq, seq)
    prev[0, 0] = 1.0
    prev[torch.arange(1, seq), torch.arange(seq - 1)] = 1.0
    induction = torch.eye(seq)
    induction[torch.arange(half, seq), torch.arange(1, half + 1)] = 1.0
    induction[torch.arange(half, seq), torch.arange(half, seq)] = 0.0
    uniform = torch.ones(seq, seq).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    # layers=2, batch=1, heads=3
    pattern = torch.stack([torch.stack([prev, induction, uniform]), torch.stack([induction, uniform, prev])])[:, None]
    acts = synthetic_acts(pattern)
    torch.testing.assert_close(interp.previous_token_scores(acts)[0, 0], torch.tensor(1.0))
    torch.testing.assert_close(interp.induction_scores(acts, half)[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(interp.induction_scores(acts, half)[1, 0], torch.tensor(1.0))
    assert float(interp.induction_scores(acts, half)[0, 0]) == 0.0
    entropy = interp.attention_entropy(acts)
    want = torch.log(torch.arange(1, seq + 1, dtype=torch.float)).mean()
    torch.testing.assert_close(entropy[0, 2], want)
    assert float(entropy[0, 0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="period must lie in"):
        interp.induction_scores(acts, seq)


def test_repeated_tokens_and_head_scores(tiny_cfg):
    tokens = interp.repeated_random_tokens(tiny_cfg, half=8, batch=5, seed=1)
    assert tokens.shape == (5, 16) and torch.equal(tokens[:, :8], tokens[:, 8:])
    scores = interp.head_scores(perturbed_params(tiny_cfg), tiny_cfg, batch=4)
    assert set(scores) == {"induction", "previous_token", "entropy"}
    for s in scores.values():
        assert s.shape == (tiny_cfg.n_layers, tiny_cfg.n_heads) and bool(torch.isfinite(s).all())
    with pytest.raises(ValueError, match="half must lie in"):
        interp.repeated_random_tokens(tiny_cfg, half=9)


def test_loss_per_position_averages_to_the_loss(tiny_cfg):
    params = perturbed_params(tiny_cfg)
    tokens, targets = tokens_for(tiny_cfg, seed=1), tokens_for(tiny_cfg, seed=2)
    curve = interp.loss_per_position(params, tokens, targets, tiny_cfg)
    assert curve.shape == (11,)
    torch.testing.assert_close(curve.mean(), ft.loss_fn(params, tokens, targets, tiny_cfg))


# ---------------------------------------------------------------- attention-only models


def test_attention_only_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(mlp=False)
    params = ft.init_params(cfg)
    assert all(set(b) == {"ln1", "attn"} for b in params["blocks"])
    assert ft.count_params(params) == ft.params.param_breakdown(cfg)["total"]
    with pytest.raises((ValueError, TypeError), match="mlp"):  # beartype (in tests) or Config's own check
        tiny_cfg.replace(mlp="no")
    with pytest.raises(ValueError, match="Config.layout.mlp=False cannot be expressed in GPT-2"):
        ft.to_hf_gpt2(params, cfg)
    ft.save_checkpoint(tmp_path / "ckpt", params=params, config=cfg, step=0)
    loaded = ft.load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == cfg
