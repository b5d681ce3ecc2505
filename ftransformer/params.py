"""Parameters are data: ``init_params`` builds a nested dict of tensors that mirrors the call tree.

::

    {"embed":   {"tokens": [vocab, d_model], "positions"?: [max_seq, d_model]},
     "blocks":  [{"ln1": {"scale", "bias"?}, "attn": {"w_qkv", "b_qkv"?, "w_o", "b_o"?, "q_norm"?, "k_norm"?},
                  "ln2"?: {...},             "mlp"?: {"w_in", "b_in"?, ("w_gate", "b_gate"?,) "w_out", "b_out"?}},
                 ...],
     "ln_f"?:   {"scale", "bias"?},           # pre-LN only
     "unembed"?: {"w": [d_model, vocab]}}     # untied only

(``ln2`` and ``mlp`` are absent in attention-only models, ``Layout(mlp=False)``; ``ln2`` alone with
``Layout(residual="parallel_shared_norm")``. ``Layout(norm_position="sandwich")`` adds ``ln1_post`` after
``attn`` and ``ln2_post`` after ``mlp``. ``b_qkv`` without ``b_o``
is ``Attention(qkv_bias=True)``; ``q_norm`` / ``k_norm`` (``{"scale": [head_dim]}``) are ``Attention(qk_norm=True)``.)

A leaf that a config does not use is absent, never ``None``. Walking, flattening, casting and moving
trees: ``ftransformer.tree``.
"""

import math

import torch

from ftransformer.layers.norm import init_norm
from torch import Tensor

from ftransformer import tree
from ftransformer.config import GATED_ACTIVATIONS, Config
from ftransformer.tree import PyTree



def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> Tensor:
    if torch.get_default_device().type == "meta":
        # Shapes only (checkpoint and Hugging Face loaders): drawing on meta would import torch._dynamo (~3 s).
        return torch.empty(shape)
    # Scaled in place: no second full-size temporary, which GPT-2-sized tables would feel.
    return torch.randn(shape, generator=gen).mul_(std)


def _norm_params(cfg: Config, width: int | None = None) -> dict:
    return init_norm(cfg.norm, width or cfg.d_model, bias=cfg.bias)


def _block_params(cfg: Config, gen: torch.Generator) -> dict:
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    qkv_width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    attn = {"w_qkv": _normal(gen, (cfg.d_model, qkv_width), std)}
    if cfg.bias or cfg.attention.qkv_bias:
        attn["b_qkv"] = torch.zeros(qkv_width)
    attn["w_o"] = _normal(gen, (cfg.n_heads * cfg.head_dim, cfg.d_model), out_std)
    if cfg.bias:
        attn["b_o"] = torch.zeros(cfg.d_model)
    if cfg.attention.qk_norm:
        whole = cfg.attention.qk_norm_over == "projection"  # one norm over all heads' channels (OLMo-2)
        attn["q_norm"] = _norm_params(cfg, cfg.head_dim * (cfg.n_heads if whole else 1))
        attn["k_norm"] = _norm_params(cfg, cfg.head_dim * (cfg.n_kv_heads if whole else 1))
    mlp = {}
    names = ("w_gate", "w_in") if cfg.activation in GATED_ACTIVATIONS else ("w_in",)
    for name in names:
        mlp[name] = _normal(gen, (cfg.d_model, cfg.d_ff), std)
        if cfg.bias:
            mlp["b" + name[1:]] = torch.zeros(cfg.d_ff)
    mlp["w_out"] = _normal(gen, (cfg.d_ff, cfg.d_model), out_std)
    if cfg.bias:
        mlp["b_out"] = torch.zeros(cfg.d_model)
    sandwich = cfg.layout.norm_position == "sandwich"  # a second norm on each sublayer's output
    block = {"ln1": _norm_params(cfg), "attn": attn} | ({"ln1_post": _norm_params(cfg)} if sandwich else {})
    if not cfg.layout.mlp:
        return block
    if cfg.layout.residual != "parallel_shared_norm":  # the shared-norm layout's one norm feeds both sublayers
        block["ln2"] = _norm_params(cfg)
    block["mlp"] = mlp
    return block | ({"ln2_post": _norm_params(cfg)} if sandwich else {})


def init_params(
    cfg: Config, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> dict:
    """GPT-2-style initial parameters: N(0, init_std) weights, residual outputs scaled by 1/sqrt(2 n_layers),
    zero biases, unit norm scales. The same seed gives the same tensors on every device."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    gen = torch.Generator().manual_seed(seed)
    embed = {"tokens": _normal(gen, (cfg.vocab_size, cfg.d_model), cfg.init_std)}
    if cfg.positional.kind == "learned":
        embed["positions"] = _normal(gen, (cfg.max_seq_len, cfg.d_model), cfg.init_std)
    params: dict = {"embed": embed, "blocks": [_block_params(cfg, gen) for _ in range(cfg.n_layers)]}
    if cfg.layout.norm_position != "post":
        params["ln_f"] = _norm_params(cfg)
    if not cfg.embeddings.tie:
        params["unembed"] = {"w": _normal(gen, (cfg.d_model, cfg.vocab_size), cfg.init_std)}
    return tree.to(params, device=device, dtype=dtype)


# ---------------------------------------------------------------- counts


def count_params(params: PyTree) -> int:
    """Number of scalars in all tensor leaves."""
    return sum(x.numel() for x in tree.leaves(params) if isinstance(x, Tensor))


# ---------------------------------------------------------------- breakdown


def param_breakdown(cfg: Config) -> dict:
    """Exact parameter counts by part, next to the classic estimate ``V d + L (4 d^2 + 2 d d_ff)``.

    Returns ``{"rows": [(part, count), ...], "total": int, "estimate_terms": [(term, count), ...],
    "estimate": int, "left_out": [(what, count), ...]}``. Counts come from shapes, not from tensors,
    so a GPT-2-sized breakdown costs nothing.
    """
    d, L, V, hd = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    norm_size = d * (2 if cfg.bias and cfg.norm.kind == "layernorm" else 1)
    n_ff_in = 2 if cfg.activation in GATED_ACTIVATIONS else 1
    attn_w = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    attn_b = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * (cfg.bias or cfg.attention.qkv_bias) + d * cfg.bias
    qk_norms = 2 * hd if cfg.attention.qk_norm else 0
    if cfg.attention.qk_norm and cfg.attention.qk_norm_over == "projection":
        qk_norms = (cfg.n_heads + cfg.n_kv_heads) * hd
    ff_w = (n_ff_in + 1) * d * cfg.d_ff if cfg.layout.mlp else 0
    ff_b = (n_ff_in * cfg.d_ff + d) if cfg.bias and cfg.layout.mlp else 0
    norms_per_block = (2 if cfg.layout.mlp and cfg.layout.residual != "parallel_shared_norm" else 1) + (
        (2 if cfg.layout.mlp else 1) if cfg.layout.norm_position == "sandwich" else 0)
    rows = [
        ("token embeddings", V * d),
        ("position embeddings", cfg.max_seq_len * d if cfg.positional.kind == "learned" else 0),
        ("attention weights", L * attn_w),
        ("attention biases", L * attn_b),
        ("feed-forward weights", L * ff_w),
        ("feed-forward biases", L * ff_b),
        ("norms", (norms_per_block * L + (1 if cfg.layout.norm_position != "post" else 0)) * norm_size + L * qk_norms),
        ("output projection", 0 if cfg.embeddings.tie else d * V),
    ]
    terms = [
        ("token embeddings V*d", V * d),
        ("attention Q,K,V,O L*4*d^2", L * 4 * d * d),
        ("feed-forward L*2*d*d_ff", L * 2 * d * cfg.d_ff if cfg.layout.mlp else 0),
    ]
    total = sum(n for _, n in rows)
    estimate = sum(n for _, n in terms)
    left_out = [(name, n) for name, n in rows if n and name in (
        "position embeddings", "attention biases", "feed-forward biases", "norms", "output projection")]
    # GQA, SwiGLU and a head_dim other than d/n_heads change the weight counts themselves; say so rather
    # than hide it in a remainder.
    shape_gap = (L * attn_w - L * 4 * d * d) + (L * ff_w - L * 2 * d * cfg.d_ff * cfg.layout.mlp)
    if shape_gap:
        left_out.append(("GQA / SwiGLU / head_dim weight difference", shape_gap))
    return {"rows": rows, "total": total, "estimate_terms": terms, "estimate": estimate, "left_out": left_out}


def format_breakdown(cfg: Config) -> str:
    """The breakdown as a printable table."""
    b = param_breakdown(cfg)
    width = max(len(n) for n, _ in b["rows"] + b["estimate_terms"] + b["left_out"]) + 2
    lines = [f"{'part':<{width}}{'parameters':>14}", "-" * (width + 14)]
    lines += [f"{name:<{width}}{n:>14,}" for name, n in b["rows"]]
    lines += ["-" * (width + 14), f"{'exact total':<{width}}{b['total']:>14,}", "", "classic estimate:"]
    lines += [f"{name:<{width}}{n:>14,}" for name, n in b["estimate_terms"]]
    lines += [f"{'estimate':<{width}}{b['estimate']:>14,}", "", "what the estimate leaves out:"]
    lines += [f"{name:<{width}}{n:>14,}" for name, n in b["left_out"]]
    lines.append(f"{'exact - estimate':<{width}}{b['total'] - b['estimate']:>14,}")
    return "\n".join(lines)
