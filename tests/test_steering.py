"""Interventions during generation (through the KV-cache path) and steering vectors (``interp.steering``)."""

import pytest
import torch

import ftransformer as ft
from ftransformer.decode_steps import tapped_step
from ftransformer.interp import steering
from ftransformer.layers.tap import Tap
from ftransformer.sampling import GREEDY
from ftransformer.speculative import Draft

BASE = ft.Config(vocab_size=37, d_model=24, n_heads=6, n_kv_heads=2, n_layers=3, d_ff=40, max_seq_len=24)
CONFIGS = {
    "pre-ln-rope-gqa": BASE.replace(positional="rope"),
    "parallel": BASE.replace(**{"layout.residual": "parallel"}),
}


def _setup(cfg, seed=0):
    params = ft.init_params(cfg, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    vector = torch.randn(cfg.d_model, generator=gen, dtype=torch.float64)
    # Two position-wise interventions at two kinds of site: a big steering vector and a clamped MLP unit.
    interventions = {
        "blocks.1.resid_mid": lambda v: v + 3.0 * vector,
        "blocks.0.mlp.hidden": lambda h: torch.cat([h[..., :1].clamp(min=2.0), h[..., 1:]], dim=-1),
    }
    return params, interventions, torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)


def _masked(interventions, is_on):
    """The interventions acting only where ``is_on`` (a ``[seq]`` bool mask) holds: the uncached reference."""
    return {p: (lambda v, f=f: torch.where(is_on[: v.shape[-2], None], f(v), v)) for p, f in interventions.items()}


def _uncached_greedy(params, prompt, cfg, interventions, positions, n):
    """Greedy decoding the slow way: the whole sequence through ``forward_with_activations`` per new token, the
    interventions acting at the prompt's positions, the generated ones, or both."""
    seq = torch.arange(prompt.shape[-1] + n)
    is_on = {"all": seq >= 0, "prompt": seq < prompt.shape[-1], "generated": seq >= prompt.shape[-1]}[positions]
    tokens = prompt
    for _ in range(n):
        logits, _ = ft.forward_with_activations(params, tokens, cfg, interventions=_masked(interventions, is_on))
        tokens = torch.cat([tokens, logits[..., -1, :].argmax(-1, keepdim=True)], dim=-1)
    return tokens


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_generation_under_interventions_equals_the_uncached_forward(cfg, positions):
    params, interventions, prompt = _setup(cfg)
    n = 8
    out = ft.generate(params, prompt, cfg, max_new_tokens=n, sampling=GREEDY, interventions=interventions,
                      positions=positions)
    assert torch.equal(out, _uncached_greedy(params, prompt, cfg, interventions, positions, n))
    plain = ft.generate(params, prompt, cfg, max_new_tokens=n, sampling=GREEDY)
    assert not torch.equal(out, plain)  # the interventions change the text
    if positions == "generated":  # the first new token is read off the prompt's last position: untouched
        assert torch.equal(out[:, : prompt.shape[-1] + 1], plain[:, : prompt.shape[-1] + 1])


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_prefill_and_the_tapped_step_give_the_uncached_logits(cfg):
    params, interventions, prompt = _setup(cfg)
    tokens = torch.cat([prompt, torch.tensor([[3, 4], [5, 6]])], dim=-1)
    expected, _ = ft.forward_with_activations(params, tokens, cfg, interventions=interventions)
    cache = ft.init_cache(cfg, 2, max_len=tokens.shape[-1], dtype=torch.float64)
    tap = Tap(interventions, record=False)  # what generation passes: it intervenes and keeps nothing
    logits, cache = ft.prefill(params, prompt, cache, cfg, tap=tap)
    torch.testing.assert_close(logits, expected[:, prompt.shape[-1] - 1], atol=1e-12, rtol=0)
    assert tap.acts == {}
    stepper = tapped_step(Tap(interventions))
    for i in range(prompt.shape[-1], tokens.shape[-1]):
        logits, cache = stepper.step(params, tokens[:, i], cache, cfg)
        torch.testing.assert_close(logits, expected[:, i], atol=1e-12, rtol=0)


def test_ragged_prompts_under_interventions_generate_what_each_row_generates_alone():
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params, interventions, prompt = _setup(cfg)
    lengths = torch.tensor([6, 4])
    out = ft.generate(params, prompt, cfg, max_new_tokens=5, sampling=GREEDY, seq_lengths=lengths,
                      interventions=interventions, pad_id=0)
    for row, n in enumerate(lengths.tolist()):
        alone = ft.generate(params, prompt[row, :n], cfg, max_new_tokens=5, sampling=GREEDY,
                            interventions=interventions)
        assert torch.equal(out[row, : n + 5], alone)


def test_the_stream_under_interventions_yields_what_generate_returns():
    cfg = CONFIGS["parallel"]
    params, interventions, prompt = _setup(cfg)
    stream = ft.generate_stream(params, prompt, cfg, max_new_tokens=4, sampling=GREEDY, interventions=interventions)
    out = ft.generate(params, prompt, cfg, max_new_tokens=4, sampling=GREEDY, interventions=interventions)
    assert torch.equal(torch.stack(list(stream), dim=-1), out[:, prompt.shape[-1]:])


def test_generation_refuses_what_it_cannot_intervene_on():
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params, interventions, prompt = _setup(cfg)
    kw = dict(max_new_tokens=2, sampling=GREEDY)
    with pytest.raises(ValueError, match="attn.head_out"):
        ft.generate(params, prompt, cfg, interventions={"blocks.0.attn.head_out": lambda v: v}, **kw)
    with pytest.raises(ValueError, match="step='eager'.*got step='compile'"):  # plain functions: eager only
        ft.generate(params, prompt, cfg, interventions=interventions, step="compile", **kw)
    steered = steering.steer(torch.ones(cfg.d_model, dtype=torch.float64), "blocks.0.resid_post")
    with pytest.raises(ValueError, match="got step='aot'"):  # WithTensors ones: eager or compile, never aot
        ft.generate(params, prompt, cfg, interventions=steered, step="aot", **kw)
    with pytest.raises(ValueError, match="got step='aot'"):  # refused before the step is built
        ft.generate_stream(params, prompt, cfg, interventions=interventions, step="aot", **kw)
    with pytest.raises(ValueError, match="positions must be one of"):
        ft.generate(params, prompt, cfg, interventions=interventions, positions="middle", **kw)
    with pytest.raises(ValueError, match="unknown activation path 'blocks.9.resid_post'"):
        ft.generate(params, prompt, cfg, interventions={"blocks.9.resid_post": lambda v: v}, **kw)
    with pytest.raises(TypeError, match="interventions"):
        ft.generate(params, prompt, cfg, interventions=[lambda v: v], **kw)
    with pytest.raises(ValueError, match="takes no interventions"):
        ft.generate(params, prompt[0], cfg, interventions=interventions, draft=Draft(params, cfg, tokens=2), **kw)


# ---------------------------------------------------------------- steering vectors


def test_steering_vector_is_the_mean_difference_at_the_site():
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params, _, _ = _setup(cfg)
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.randint(0, 37, (3, 5), generator=gen), torch.randint(0, 37, (2, 7), generator=gen)
    site = "blocks.1.resid_post"
    acts = {name: ft.forward_with_activations(params, t, cfg)[1]["blocks"][1]["resid_post"] for name, t in
            (("pos", pos), ("neg", neg))}
    last = acts["pos"][:, -1].mean(0) - acts["neg"][:, -1].mean(0)
    mean = acts["pos"].mean((0, 1)) - acts["neg"].mean((0, 1))
    torch.testing.assert_close(steering.steering_vector(params, cfg, pos, neg, site), last, atol=1e-12, rtol=0)
    got = steering.steering_vector(params, cfg, pos, neg, site, position="mean")
    torch.testing.assert_close(got, mean, atol=1e-12, rtol=0)
    assert steering.steering_vector(params, cfg, pos, neg, "blocks.0.mlp.hidden").shape == (cfg.d_ff,)


def test_steer_adds_the_scaled_vector_at_every_position():
    cfg = CONFIGS["parallel"]
    params, _, tokens = _setup(cfg)
    vector = torch.linspace(-1, 1, cfg.d_model, dtype=torch.float64)
    _, clean = ft.forward_with_activations(params, tokens, cfg)
    logits, acts = ft.forward_with_activations(params, tokens, cfg,
                                               interventions=steering.steer(vector, "blocks.0.resid_post", 2.5))
    torch.testing.assert_close(acts["blocks"][0]["resid_post"], clean["blocks"][0]["resid_post"] + 2.5 * vector)
    # the same edit as interp.steer (layer, site name, cfg) makes
    expected, _ = ft.forward_with_activations(params, tokens, cfg, interventions=ft.interp.steer(0, vector, cfg, scale=2.5))
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)


def _logit_diff(logits):
    return logits[..., -1, 3].mean() - logits[..., -1, 5].mean()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_steering_sweep_is_one_vmap_equal_to_a_loop(chunk_size):
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params, _, tokens = _setup(cfg)
    gen = torch.Generator().manual_seed(2)
    vectors = {layer: torch.randn(cfg.d_model, generator=gen, dtype=torch.float64) for layer in (2, 0)}
    scales = [0.0, -1.5, 4.0]
    got = steering.steering_sweep(params, cfg, tokens, vectors, scales, _logit_diff, chunk_size=chunk_size)
    assert got.shape == (2, 3)
    for i, layer in enumerate([0, 2]):
        for j, scale in enumerate(scales):
            logits, _ = ft.forward_with_activations(
                params, tokens, cfg, interventions=steering.steer(vectors[layer], f"blocks.{layer}.resid_post", scale)
            )
            torch.testing.assert_close(got[i, j], _logit_diff(logits), atol=1e-10, rtol=0)
    clean = _logit_diff(ft.forward(params, tokens, cfg))
    torch.testing.assert_close(got[:, 0], clean.expand(2), atol=1e-10, rtol=0)  # scale 0 steers nothing
    assert (got[:, 1:] - clean).abs().min() > 1e-6  # the others do


def test_steering_bad_inputs_name_expected_and_got():
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params, _, tokens = _setup(cfg)
    v = torch.zeros(cfg.d_model, dtype=torch.float64)
    with pytest.raises(ValueError, match="site must be one of .* got 'blocks.0.attn.q'"):
        steering.steering_vector(params, cfg, tokens, tokens, "blocks.0.attn.q")
    with pytest.raises(ValueError, match="position must be one of"):
        steering.steering_vector(params, cfg, tokens, tokens, "embed", position="first")
    with pytest.raises(ValueError, match=r"shape \(prompts, seq\), got \(6,\)"):
        steering.steering_vector(params, cfg, tokens[0], tokens, "embed")
    with pytest.raises(TypeError, match="vector"):  # the annotation (a 1-D float tensor) catches it first
        steering.steer(torch.zeros(2, 24), "embed")
    with pytest.raises(TypeError, match="scale"):
        steering.steer(v, "embed", "big")
    with pytest.raises(ValueError, match="has width 5, the site 24"):
        ft.forward_with_activations(params, tokens, cfg, interventions=steering.steer(torch.zeros(5), "embed"))
    with pytest.raises(ValueError, match=r"vector of layer 0 must have shape \(d_model,\) = \(24,\), got \(5,\)"):
        steering.steering_sweep(params, cfg, tokens, {0: torch.zeros(5)}, [1.0], _logit_diff)
    with pytest.raises(ValueError, match="layer"):
        steering.steering_sweep(params, cfg, tokens, {7: v}, [1.0], _logit_diff)
    with pytest.raises(ValueError, match="scales must be a non-empty"):
        steering.steering_sweep(params, cfg, tokens, {0: v}, [], _logit_diff)
    with pytest.raises(ValueError, match="metric must return a scalar"):
        steering.steering_sweep(params, cfg, tokens, {0: v}, [1.0], lambda logits: logits[..., -1, :].sum(-1))


def test_bench_steering_overhead_runs_on_tiny_sizes():
    from ftransformer.bench.steering import format_overhead, steering_overhead

    result = steering_overhead("tiny", prompt_len=4, new_tokens=4, repeats=1, warmup=0)
    assert set(result) == {"plain_tok_s", "steered_tok_s", "overhead"}
    assert result["plain_tok_s"] > 0 and result["steered_tok_s"] > 0
    assert result["overhead"] == pytest.approx(1 - result["steered_tok_s"] / result["plain_tok_s"])
    assert format_overhead(result, "tiny").startswith("tiny: plain ")


def test_nnsight_steering_of_the_same_hf_model_gives_our_tokens():
    pytest.importorskip("nnsight")
    pytest.importorskip("transformers")
    from ftransformer.bench.steering import _hf_model, _setup, nnsight_generate

    cfg, params, prompt, vector = _setup("tiny", 4, 0)
    _, lm = _hf_model(params, cfg)
    layer = cfg.n_layers // 2
    theirs = nnsight_generate(lm, prompt, layer, 4.0 * vector, 6)
    ours = ft.generate(params, prompt, cfg, max_new_tokens=6, sampling=GREEDY,
                       interventions=steering.steer(vector, f"blocks.{layer}.resid_post", 4.0))
    assert torch.equal(theirs, ours)
    assert not torch.equal(ours, ft.generate(params, prompt, cfg, max_new_tokens=6, sampling=GREEDY))
