"""Attribution patching (ftransformer.interp.attribution): AtP / AtP* against exact patching."""

import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.layers import attention_kernel
from tests.test_interp import perturbed_params

BATCH, SEQ = 5, 7
TARGET, OTHER = 3, 11


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[..., -1, TARGET] - logits[..., -1, OTHER]).mean()


def tokens(cfg: ft.Config) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 5) % cfg.vocab_size
    corrupt[:, 4] = (clean[:, 4] + 9) % cfg.vocab_size
    return clean, corrupt


def exact_effect(params, clean, corrupt, cfg, **kwargs) -> torch.Tensor:
    """``patch_sweep``'s metric minus the base run's: what AtP estimates."""
    base = corrupt if kwargs.get("direction", "denoise") == "denoise" else clean
    swept = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, **kwargs)
    with attention_kernel("einsum"):  # the kernel patch_sweep's runs use
        return swept - logit_diff(ft.forward(params, base, cfg))


# layers 3, heads 4, kv_heads 2, head_dim 6, seq 7, batch 5, d_model 24, d_ff 40, vocab 37 (every axis differs).
GQA = dict(n_layers=3, n_heads=4, n_kv_heads=2, positional="rope")


def test_atp_is_exact_where_the_metric_is_linear_in_the_site():
    """Post-LN: the last block's ``resid_post`` is already normed and the unembedding reads it directly (no
    final norm), so the logits -- and a logit difference -- are linear in it: first order is the whole story
    at the last layer, for every position and for the whole sequence at once. Earlier layers are not."""
    cfg = ft.PRESETS["tiny"].replace(norm_position="post", **GQA)
    params, (clean, corrupt) = perturbed_params(cfg), tokens(cfg)
    for by in [("layer", "position"), ("layer",)]:
        kwargs = dict(site="resid_post", by=by)
        estimate = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, **kwargs)
        exact = exact_effect(params, clean, corrupt, cfg, **kwargs)
        assert estimate.shape == exact.shape
        torch.testing.assert_close(estimate[-1], exact[-1], atol=1e-5, rtol=1e-5)
        assert exact[-1].abs().max() > 1e-2
    # The first layers' estimates are not exact (the later blocks are nonlinear): the test above is not vacuous.
    assert (estimate[0] - exact[0]).abs() > 1e-3


def near_linear_norms(cfg: ft.Config, params: dict) -> dict:
    """With ``norm_eps`` far above the variance, a LayerNorm is ``(x - mean) * scale / sqrt(eps)`` to ~1e-8:
    multiplying every norm's scale by ``sqrt(eps)`` keeps the values' size and makes the norms linear. The
    q/k/v weights are tripled so the softmax is far from uniform (and far from linear)."""
    factors = {"scale": cfg.norm.eps ** 0.5, "w_qkv": 3.0}
    flat = ft.tree.flatten_with_paths(params)
    return ft.tree.unflatten_paths({p: x * factors.get(p.rsplit(".", 1)[-1], 1.0) for p, x in flat.items()}, params)


@pytest.mark.parametrize(("site", "by"), [("attn.q", ("layer", "head", "position")), ("attn.k", ("layer", "position", "head")),
                                          ("attn.q", ("layer", "head")), ("attn.k", ("layer", "head"))])
def test_atp_star_is_exact_for_queries_and_keys_where_the_metric_is_linear_in_the_pattern(site, by):
    """An attention-only model whose norms are linear: after the last layer's pattern, head outputs, the
    final norm and the unembedding are all linear, so AtP* -- exact softmax of the patched q or k, linear
    from the pattern on -- equals exact patching there for each head (and position), while plain AtP
    (linear through the softmax too) does not."""
    cfg = ft.PRESETS["tiny"].replace(mlp=False, norm_eps=1e8, **GQA)
    params, (clean, corrupt) = near_linear_norms(cfg, perturbed_params(cfg)), tokens(cfg)
    exact = exact_effect(params, clean, corrupt, cfg, site=site, by=by)
    star = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site=site, by=by, chunk=3)
    plain = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site=site, by=by, correction=False)
    torch.testing.assert_close(star[-1], exact[-1], atol=1e-5, rtol=1e-4)
    assert exact[-1].abs().max() > 0.1
    assert (plain[-1] - exact[-1]).abs().max() > 0.05
    # Earlier layers feed the last softmax: no estimate is exact there.
    assert (star[0] - exact[0]).abs().max() > 1e-3


SITES = [
    ("resid_mid", ("layer", "position")),
    ("mlp.hidden", ("layer", "position")),
    ("attn.head_out", ("layer", "position", "head")),
    ("attn.v", ("layer", "head", "position")),
    ("attn.pattern", ("layer", "position", "head")),
    ("attn.q", ("layer", "position", "head")),
    ("attn.k", ("layer", "head", "position")),
]


@pytest.fixture(scope="module")
def random_model():
    """A random model (initial weights plus a little noise), rotary, SwiGLU and GQA."""
    cfg = ft.PRESETS["tiny"].replace(activation="swiglu", **GQA)
    gen = torch.Generator().manual_seed(101)
    params = ft.tree.map(lambda x: x + 0.05 * torch.randn(x.shape, generator=gen), ft.init_params(cfg, seed=1))
    return cfg, params, *tokens(cfg)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize(("site", "by"), SITES, ids=[f"{s}-{'x'.join(b)}" for s, b in SITES])
def test_atp_agrees_with_exact_patching_on_a_random_model(random_model, site, by):
    cfg, params, clean, corrupt = random_model
    direction = "noise" if site == "resid_mid" else "denoise"
    exact = exact_effect(params, clean, corrupt, cfg, site=site, by=by, direction=direction)
    estimate = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site=site, by=by, direction=direction)
    assert estimate.shape == exact.shape
    big = exact.abs() > 0.2 * exact.abs().max()
    assert torch.equal(torch.sign(estimate[big]), torch.sign(exact[big]))
    assert correlation(exact, estimate) > 0.95


def test_atp_misses_most_where_a_token_is_replaced_at_the_embedding(random_model):
    """AtP's known weak spot: patching ``resid_pre`` at layer 0 swaps a whole token embedding -- a large step
    through the first LayerNorm, far from linear. The report shows it as the largest miss; later layers,
    where the same change has been mixed and normed, agree closely."""
    cfg, params, clean, corrupt = random_model
    exact = exact_effect(params, clean, corrupt, cfg, site="resid_pre")
    estimate = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site="resid_pre")
    report = interp.atp_report(exact, estimate, top=3)
    assert report.splitlines()[2].split()[0] == "(0,"
    assert correlation(exact[1:], estimate[1:]) > 0.95 > correlation(exact, estimate) > 0.5


def test_atp_report_shows_correlation_and_the_largest_misses():
    exact = torch.tensor([[1.0, 0.0, -2.0], [0.5, 3.0, 0.0]])
    estimate = torch.tensor([[0.9, 0.0, -2.0], [0.5, 0.1, 0.0]])
    report = interp.atp_report(exact, estimate, top=2)
    lines = report.splitlines()
    corr = torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1].item()
    assert f"correlation {corr:.4f}" in lines[0] and "6 patches" in lines[0] and "signs agree 100.0% (of 4" in lines[0]
    assert len(lines) == 4
    # The false negative (exact 3.0, estimated 0.1) is the largest miss, then (0, 0).
    assert lines[2].split()[:2] == ["(1,", "1)"] and float(lines[2].split()[-1]) == pytest.approx(2.9)
    assert lines[3].split()[:2] == ["(0,", "0)"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: interp.atp_report(torch.zeros(2, 3), torch.zeros(3, 2)), r"same shape, got \(2, 3\) and \(3, 2\)"),
        (lambda: interp.atp_report(torch.zeros(2), torch.zeros(2), top=0), "top must be a positive int, got 0"),
    ],
)
def test_atp_report_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_attribution_patch_checks_its_arguments_like_patch_sweep(random_model):
    cfg, params, clean, corrupt = random_model
    with pytest.raises(ValueError, match="site must be one of"):
        interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site="embed")
    with pytest.raises(ValueError, match=r"metric must return a scalar tensor \(shape \(\)\), got shape \(5, 37\)"):
        interp.attribution_patch(params, clean, corrupt, lambda logits: logits[:, -1], cfg)


@pytest.mark.parametrize(("site", "by"), [("resid_pre", ("layer", "position")), ("attn.k", ("layer", "head")), ("attn.head_out", ("layer", "head"))])
def test_logits_at_the_positions_the_metric_reads_gives_the_same_estimate(random_model, site, by):
    """With ``logits_at=-1`` only the last position is unembedded (and differentiated through): the same
    estimate for a metric of the last position, in both directions, AtP* included (attn.k)."""
    cfg, params, clean, corrupt = random_model
    for direction in ("denoise", "noise"):
        kwargs = dict(site=site, by=by, direction=direction)
        whole = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, **kwargs)
        last = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, logits_at=-1, **kwargs)
        torch.testing.assert_close(last, whole, atol=1e-6, rtol=1e-5)


def test_logits_at_leaves_the_other_positions_to_the_base_run_and_is_checked(random_model):
    """A metric that reads a position left out of ``logits_at`` sees constants there (zeros), which do not
    depend on the patch: its estimate is zero. A position outside the sequence is refused."""
    cfg, params, clean, corrupt = random_model

    def first_position(logits):
        return logits[..., 0, TARGET].mean()

    est = interp.attribution_patch(params, clean, corrupt, first_position, cfg, site="resid_pre", logits_at=-1)
    assert torch.count_nonzero(est) == 0
    with pytest.raises(ValueError, match="logits_at must be positions"):
        interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, logits_at=SEQ)
