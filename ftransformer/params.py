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

import re

import torch
from torch import Tensor

from ftransformer import tree
from ftransformer.config import Config
from ftransformer.layers.block import init_block
from ftransformer.layers.embedding import init_embed
from ftransformer.model import init_head
from ftransformer.tree import PyTree



def init_params(
    cfg: Config, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> dict:
    """GPT-2-style initial parameters: N(0, init_std) weights, residual outputs scaled by 1/sqrt(2 n_layers),
    zero biases, unit norm scales. Each layer builds its own part (``init_embed``, ``init_block``,
    ``init_head``), drawing in that order from one generator: the same seed gives the same tensors on every
    device."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    gen = torch.Generator().manual_seed(seed)
    params: dict = {"embed": init_embed(cfg, gen), "blocks": [init_block(cfg, gen) for _ in range(cfg.n_layers)]}
    return tree.to(params | init_head(cfg, gen), device=device, dtype=dtype)


# ---------------------------------------------------------------- counts


def count_params(params: PyTree) -> int:
    """Number of scalars in all tensor leaves."""
    return sum(x.numel() for x in tree.leaves(params) if isinstance(x, Tensor))


# ---------------------------------------------------------------- breakdown


# part of the breakdown -> what a leaf's path looks like (the first that matches wins)
_PARTS = (
    ("token embeddings", r"embed\.tokens"),
    ("position embeddings", r"embed\.positions"),
    ("attention weights", r"blocks\.\d+\.attn\.w_\w+"),
    ("attention biases", r"blocks\.\d+\.attn\.b_\w+"),
    ("feed-forward weights", r"blocks\.\d+\.mlp\.w_\w+"),
    ("feed-forward biases", r"blocks\.\d+\.mlp\.b_\w+"),
    ("norms", r".*(ln\w*|_norm)\.\w+"),
    ("output projection", r"unembed\.w"),
)


def param_breakdown(cfg: Config) -> dict:
    """Exact parameter counts by part, next to the classic estimate ``V d + L (4 d^2 + 2 d d_ff)``.

    Returns ``{"rows": [(part, count), ...], "total": int, "estimate_terms": [(term, count), ...],
    "estimate": int, "left_out": [(what, count), ...]}``. Counts come from the shapes ``init_params`` builds
    on the meta device (no data), so a GPT-2-sized breakdown costs nothing and reads no architecture flag.
    """
    with torch.device("meta"):
        shapes = tree.flatten_with_paths(init_params(cfg, device="meta"))
    counts = dict.fromkeys((part for part, _ in _PARTS), 0)
    for path, leaf in shapes.items():
        counts[next(part for part, pattern in _PARTS if re.fullmatch(pattern, path))] += leaf.numel()
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    has_mlp = counts["feed-forward weights"] > 0
    terms = [
        ("token embeddings V*d", V * d),
        ("attention Q,K,V,O L*4*d^2", L * 4 * d * d),
        ("feed-forward L*2*d*d_ff", L * 2 * d * cfg.d_ff if has_mlp else 0),
    ]
    rows = list(counts.items())
    left_out = [(name, n) for name, n in rows if n and name in (
        "position embeddings", "attention biases", "feed-forward biases", "norms", "output projection")]
    # GQA, SwiGLU and a head_dim other than d/n_heads change the weight counts themselves; say so rather
    # than hide it in a remainder.
    shape_gap = (counts["attention weights"] - L * 4 * d * d) + (counts["feed-forward weights"] - terms[2][1])
    if shape_gap:
        left_out.append(("GQA / SwiGLU / head_dim weight difference", shape_gap))
    total, estimate = sum(counts.values()), sum(n for _, n in terms)
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
