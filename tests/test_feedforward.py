"""Feed-forward networks against their formulas: exact GELU, GPT-2's tanh GELU, SwiGLU."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError

import ftransformer as ft
from ftransformer.layers import feedforward, gelu_mlp, swiglu_mlp

D_MODEL, D_FF = 6, 10


def params(gen, *, gate=False, bias=True, dtype=torch.float64):
    p = {"w_in": torch.randn(D_MODEL, D_FF, generator=gen, dtype=dtype),
         "w_out": torch.randn(D_FF, D_MODEL, generator=gen, dtype=dtype)}
    if gate:
        p["w_gate"] = torch.randn(D_MODEL, D_FF, generator=gen, dtype=dtype)
    if bias:
        p |= {"b_in": torch.randn(D_FF, generator=gen, dtype=dtype),
              "b_out": torch.randn(D_MODEL, generator=gen, dtype=dtype)}
        if gate:
            p["b_gate"] = torch.randn(D_FF, generator=gen, dtype=dtype)
    return p


def gelu_exact(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def gelu_tanh(z):
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def test_gelu_mlp_matches_the_formula(gen):
    p = params(gen)
    x = torch.randn(2, 3, D_MODEL, generator=gen, dtype=torch.float64)
    expected = gelu_exact(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]
    torch.testing.assert_close(gelu_mlp(p, x), expected)


def test_gelu_tanh_mlp_matches_gpt2s_formula(gen):
    p = params(gen)
    x = torch.randn(4, D_MODEL, generator=gen, dtype=torch.float64)
    expected = gelu_tanh(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]
    torch.testing.assert_close(gelu_mlp(p, x, approximate="tanh"), expected)
    # The two GELUs are close but not the same function.
    assert not torch.allclose(gelu_mlp(p, x), expected, rtol=0, atol=1e-9)


def test_swiglu_mlp_matches_the_formula(gen):
    p = params(gen, gate=True)
    x = torch.randn(3, 5, D_MODEL, generator=gen, dtype=torch.float64)
    g = x @ p["w_gate"] + p["b_gate"]
    expected = (g * torch.sigmoid(g) * (x @ p["w_in"] + p["b_in"])) @ p["w_out"] + p["b_out"]
    torch.testing.assert_close(swiglu_mlp(p, x), expected)


def test_missing_biases_mean_no_bias(gen):
    p = params(gen, gate=True, bias=False)
    x = torch.randn(5, D_MODEL, generator=gen, dtype=torch.float64)
    g = x @ p["w_gate"]
    torch.testing.assert_close(swiglu_mlp(p, x), (g * torch.sigmoid(g) * (x @ p["w_in"])) @ p["w_out"])
    torch.testing.assert_close(gelu_mlp(p, x), gelu_exact(x @ p["w_in"]) @ p["w_out"])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
def test_feedforward_dispatches_on_the_config(gen, activation):
    cfg = ft.Config(vocab_size=37, d_model=D_MODEL, n_heads=2, n_layers=1, d_ff=D_FF, max_seq_len=8, activation=activation)
    p = params(gen, gate=activation == "swiglu")
    x = torch.randn(2, 3, D_MODEL, generator=gen, dtype=torch.float64)
    expected = {"gelu": lambda: gelu_mlp(p, x), "gelu_tanh": lambda: gelu_mlp(p, x, approximate="tanh"),
                "swiglu": lambda: swiglu_mlp(p, x)}[activation]()
    torch.testing.assert_close(feedforward(p, x, cfg), expected)


@pytest.mark.parametrize("fn", ["gelu", "gelu_tanh", "swiglu"])
def test_feedforward_gradcheck(gen, fn):
    p = params(gen, gate=fn == "swiglu")
    names = sorted(p)
    x = torch.randn(2, D_MODEL, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, *weights):
        q = dict(zip(names, weights))
        if fn == "swiglu":
            return swiglu_mlp(q, x)
        return gelu_mlp(q, x, approximate="tanh" if fn == "gelu_tanh" else "none")

    assert torch.autograd.gradcheck(f, (x, *[p[n].clone().requires_grad_() for n in names]))


def test_wrong_shaped_weight_raises_a_type_error_naming_the_axis(gen):
    p = params(gen)
    p["w_out"] = torch.randn(D_FF + 1, D_MODEL, generator=gen, dtype=torch.float64)  # d_ff rows do not match
    with pytest.raises(TypeCheckError, match="d_in=10"):
        gelu_mlp(p, torch.randn(3, D_MODEL, generator=gen, dtype=torch.float64))
