"""Learning-path step 4: the position-wise feed-forward network (GELU MLP, or a gated one: SwiGLU, GeGLU)."""

import torch
import torch.nn.functional as F

from ftransformer.config import GATED_ACTIVATIONS
from ftransformer.layers.linear import init_normal, linear
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.shapes import Residual


def gelu_mlp(
    params: dict, x: Residual, *, approximate: str = "none", tap: Tap = NO_TAP
) -> Residual:
    """w_out(gelu(w_in x)): widen to d_ff, bend, narrow back. ``approximate="tanh"`` is GPT-2's GELU.

    ``tap`` sees ``hidden``, the d_ff-wide activations after the GELU.
    """
    h = tap("hidden", F.gelu(linear(x, params["w_in"], params.get("b_in")), approximate=approximate))
    return linear(h, params["w_out"], params.get("b_out"))


def swiglu_mlp(
    params: dict, x: Residual, *, tap: Tap = NO_TAP, gelu_gate: bool = False
) -> Residual:
    """w_out(silu(w_gate x) * w_in x) (Shazeer 2020): a gate decides how much of each hidden unit passes.

    ``gelu_gate``: the tanh GELU bends the gate instead of SiLU (GeGLU, Gemma). ``tap`` sees ``hidden``,
    the gated d_ff-wide activations.
    """
    gate = linear(x, params["w_gate"], params.get("b_gate"))
    gate = F.gelu(gate, approximate="tanh") if gelu_gate else F.silu(gate)
    h = tap("hidden", gate * linear(x, params["w_in"], params.get("b_in")))
    return linear(h, params["w_out"], params.get("b_out"))


def feedforward(
    params: dict, x: Residual, cfg, *, tap: Tap = NO_TAP
) -> Residual:
    """The config's feed-forward network."""
    if cfg.activation in ("swiglu", "geglu_tanh"):
        return swiglu_mlp(params, x, tap=tap, gelu_gate=cfg.activation == "geglu_tanh")
    return gelu_mlp(params, x, approximate="tanh" if cfg.activation == "gelu_tanh" else "none", tap=tap)


def init_feedforward(cfg, gen: torch.Generator, *, std: float, out_std: float) -> dict:
    """A feed-forward layer's parameters: ``w_in`` (and ``w_gate`` for the gated activations), ``w_out``, and
    their biases when ``cfg.bias``."""
    mlp = {}
    for name in ("w_gate", "w_in") if cfg.activation in GATED_ACTIVATIONS else ("w_in",):
        mlp[name] = init_normal(gen, (cfg.d_model, cfg.d_ff), std)
        if cfg.bias:
            mlp["b" + name[1:]] = torch.zeros(cfg.d_ff)
    mlp["w_out"] = init_normal(gen, (cfg.d_ff, cfg.d_model), out_std)
    if cfg.bias:
        mlp["b_out"] = torch.zeros(cfg.d_model)
    return mlp
