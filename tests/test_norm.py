"""LayerNorm against torch.nn.LayerNorm, RMSNorm against its formula and torch.nn.RMSNorm."""

import pytest
import torch
from jaxtyping import TypeCheckError

import ftransformer as ft
from ftransformer.layers import layer_norm, norm, rms_norm

D_MODEL = 7


def test_layer_norm_matches_torch_layer_norm(gen):
    x = torch.randn(2, 3, D_MODEL, generator=gen, dtype=torch.float64) * 3 + 1
    ref = torch.nn.LayerNorm(D_MODEL, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(D_MODEL, generator=gen))
        ref.bias.copy_(torch.randn(D_MODEL, generator=gen))
    torch.testing.assert_close(layer_norm(x, ref.weight.detach(), ref.bias.detach(), eps=1e-5), ref(x).detach())


def test_layer_norm_normalises_and_has_an_optional_bias(gen):
    x = torch.randn(4, D_MODEL, generator=gen, dtype=torch.float64) * 5 - 2
    y = layer_norm(x, torch.ones(D_MODEL, dtype=torch.float64))
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(layer_norm(x, torch.ones(D_MODEL, dtype=torch.float64), eps=0.5),
                               (x - mean) / torch.sqrt(var + 0.5))


def test_rms_norm_matches_the_formula_and_torch(gen):
    x = torch.randn(3, 2, D_MODEL, generator=gen, dtype=torch.float64) * 2 + 1
    scale = torch.randn(D_MODEL, generator=gen, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * scale
    torch.testing.assert_close(rms_norm(x, scale, eps=1e-6), expected)
    ref = torch.nn.RMSNorm(D_MODEL, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(scale)
    torch.testing.assert_close(rms_norm(x, scale, eps=1e-6), ref(x).detach())


def test_norm_dispatches_on_the_config(gen):
    cfg = ft.Config.from_flat(vocab_size=37, d_model=D_MODEL, n_heads=1, n_layers=1, d_ff=11, max_seq_len=8, norm_eps=1e-3)
    x = torch.randn(2, 5, D_MODEL, generator=gen)
    p = {"scale": torch.randn(D_MODEL, generator=gen), "bias": torch.randn(D_MODEL, generator=gen)}
    torch.testing.assert_close(norm(p, x, cfg.norm), layer_norm(x, p["scale"], p["bias"], eps=1e-3))
    torch.testing.assert_close(norm({"scale": p["scale"]}, x, cfg.norm), layer_norm(x, p["scale"], eps=1e-3))
    rms = cfg.replace(norm="rmsnorm")
    torch.testing.assert_close(norm({"scale": p["scale"]}, x, rms.norm), rms_norm(x, p["scale"], eps=1e-3))


def test_norm_gradcheck(gen):
    x = torch.randn(2, 3, D_MODEL, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(D_MODEL, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(D_MODEL, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer_norm, (x, scale, bias))
    assert torch.autograd.gradcheck(rms_norm, (x, scale))


def test_wrong_shaped_scale_raises_a_type_error_naming_d_model(gen):
    x = torch.randn(2, 3, D_MODEL, generator=gen)
    with pytest.raises(TypeCheckError, match="d_model=7"):
        layer_norm(x, torch.ones(D_MODEL + 1))
    with pytest.raises(TypeCheckError, match="d_model=7"):
        rms_norm(x, torch.ones(D_MODEL - 1))


@pytest.mark.parametrize("kind", [dict(norm="layernorm"), dict(norm="rmsnorm"), dict(norm="rmsnorm", norm_unit_offset=True)])
def test_a_frozen_divisor_makes_the_norm_affine_and_its_own_divisor_gives_the_norm(gen, kind):
    from ftransformer.layers.norm import identity_params, inverse_scale, norm_scale

    cfg = ft.PRESETS["tiny"].replace(d_model=D_MODEL, n_heads=1, **kind)
    params = {"scale": torch.randn(D_MODEL, generator=gen, dtype=torch.float64)}
    if cfg.norm.kind == "layernorm":
        params["bias"] = torch.randn(D_MODEL, generator=gen, dtype=torch.float64)
    a, b = (torch.randn(3, 5, D_MODEL, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(2))
    inv = inverse_scale(a + b, cfg.norm)
    assert inv.shape == (3, 5, 1)
    tol = 1e-6 if cfg.norm.unit_offset else 1e-12  # the (1 + w) norm computes in float32, whatever x's dtype
    torch.testing.assert_close(norm(params, a + b, cfg.norm, inv=inv), norm(params, a + b, cfg.norm), atol=tol, rtol=tol)
    zero = norm(params, torch.zeros_like(a), cfg.norm, inv=inv)
    torch.testing.assert_close(norm(params, a, cfg.norm, inv=inv) + norm(params, b, cfg.norm, inv=inv) - zero,
                               norm(params, a + b, cfg.norm), atol=tol, rtol=tol)
    # the norm's factor, and the parameters under which it only normalises
    plain = norm(identity_params(params, cfg.norm), a, cfg.norm)
    torch.testing.assert_close(norm(dict(params, bias=torch.zeros(D_MODEL, dtype=torch.float64)) if "bias" in params
                                    else params, a, cfg.norm), plain * norm_scale(params, cfg.norm))
