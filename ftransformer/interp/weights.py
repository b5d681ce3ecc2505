"""Weight processing as pure parameter transforms, and per-head QK / OV circuits kept factored.

Each transform takes ``(params, cfg)`` and returns a new ``(params, cfg)`` computing the same logits
(``center_unembed``: the same log-probabilities); the input tree is never modified. TransformerLens does
the same processing when it loads a model; here it is four functions to compose:

    params, cfg = fold_layer_norm(params, cfg)
    params, cfg = center_writing_weights(params, cfg)
    params, cfg = center_unembed(params, cfg)
    params, cfg = fold_value_biases(params, cfg)

The Config has no "normalisation without scale or bias" choice, so a folded norm stays in the tree with the
identity's parameters (unit scale -- zero under ``norm_unit_offset`` -- and zero bias): the tree keeps its
structure, so checkpoints and every function that takes params still accept it. A transform that would have
to change the token embedding *and* the unembedding differently unties them (``tie_embeddings=False``).

Circuits (Elhage et al. 2021) in the row-vector convention of ``linear`` (``x @ w``): a head's QK circuit
``W_Q W_K^T`` maps a query-side residual to a key-side one (``score = x_q W_Q W_K^T x_k^T``), its OV
circuit ``W_V W_O`` maps what it reads to what it writes. Both are d_model x d_model of rank head_dim, kept
as a ``FactoredMatrix`` whose norms, singular values and products need only head_dim x head_dim work.
"""

from typing import NamedTuple

import torch
from einops import rearrange

from ftransformer import tree, validate
from ftransformer.config import Config
from ftransformer.layers.attention import check_scores_bilinear
from ftransformer.layers.block import check_writes_are_summands, has_mlp, mlp_norm
from ftransformer.layers.norm import check_removes_mean, identity_params, norm_scale
from ftransformer.model import check_uncapped, untie
from ftransformer.shapes import Float, Tensor

# ---------------------------------------------------------------- checks and helpers


def _copy(params: dict) -> dict:
    """New containers around the same tensors: a transform replaces leaves without touching the input tree."""
    return tree.map(lambda t: t, params)


# ---------------------------------------------------------------- fold_layer_norm


def _fold_into(layer: dict, norm_params: dict, cfg: Config, names: tuple[str, ...]) -> None:
    """Fold a norm's scale into the rows of each ``w_{name}`` and its bias into ``b_{name}`` (in place on ``layer``,
    a fresh copy). Every layer that reads a biased LayerNorm has a bias of its own (both come from ``Config.bias``)."""
    scale = norm_scale(norm_params, cfg.norm)
    for name in names:
        w = layer["w_" + name]
        if "bias" in norm_params:
            layer["b_" + name] = layer["b_" + name] + norm_params["bias"] @ w
        layer["w_" + name] = scale[:, None] * w


def _fold_final(params: dict, cfg: Config) -> dict:
    """Fold ``ln_f``'s scale into the unembedding. There is no unembedding bias, so ``ln_f``'s bias stays,
    divided by the scale: ``(n * s + b) @ W = (n + b / s) @ (s W)``."""
    ln_f = params["ln_f"]
    scale = norm_scale(ln_f, cfg.norm)
    if "bias" in ln_f and bool(((scale == 0) & (ln_f["bias"] != 0)).any()):
        raise ValueError("fold_layer_norm needs ln_f's scale nonzero wherever its bias is nonzero (no unembedding bias)")
    params["unembed"] = {"w": scale[:, None] * params["unembed"]["w"]}
    folded = identity_params(ln_f, cfg.norm)
    if "bias" in ln_f:
        folded["bias"] = torch.where(scale == 0, torch.zeros_like(scale), ln_f["bias"] / scale)
    params["ln_f"] = folded
    return params


def fold_layer_norm(params: dict, cfg: Config) -> tuple[dict, Config]:
    """Fold every pre-norm's scale (and LayerNorm bias) into the weights that read it.

    ``ln1`` folds into ``w_qkv`` / ``b_qkv``, ``ln2`` (``ln1`` under ``parallel_shared_norm``) into the MLP's
    input projections, ``ln_f`` into the unembedding (untied first: the token embedding must stay as it
    is); the folded norms keep the identity's parameters (see the module docstring). Pre-norm only: a
    post-, sandwich- or output-norm scales what a sublayer *writes*, which no reader's weights can absorb.
    """
    check_writes_are_summands(cfg, "fold_layer_norm")
    params, cfg = untie(_copy(params), cfg)
    mlp_names = ("gate", "in") if "w_gate" in (params["blocks"][0].get("mlp") or {}) else ("in",)
    blocks = []
    for block in params["blocks"]:
        block = dict(block, attn=dict(block["attn"]))
        _fold_into(block["attn"], block["ln1"], cfg, ("qkv",))
        if has_mlp(cfg):
            block["mlp"] = dict(block["mlp"])
            _fold_into(block["mlp"], mlp_norm(block, cfg), cfg, mlp_names)
            if "ln2" in block:
                block["ln2"] = identity_params(block["ln2"], cfg.norm)
        block["ln1"] = identity_params(block["ln1"], cfg.norm)
        blocks.append(block)
    params["blocks"] = blocks
    return _fold_final(params, cfg), cfg


# ---------------------------------------------------------------- centring


def _centre(t: Tensor) -> Tensor:
    return t - t.mean(-1, keepdim=True)


def center_writing_weights(params: dict, cfg: Config) -> tuple[dict, Config]:
    """Remove the mean over d_model from everything that writes to the residual stream: token and learned
    position embeddings, ``w_o`` / ``b_o``, ``w_out`` / ``b_out``.

    Exact because every reader of the residual is a pre-LayerNorm, which subtracts the mean anyway: needs
    ``norm="layernorm"`` and ``norm_position="pre"``. Sinusoidal positions are a function, not a weight,
    and stay uncentred (the LayerNorms still remove their mean). A tied unembedding is untied first, so the
    logits keep reading the uncentred embedding.
    """
    check_removes_mean(cfg.norm, "center_writing_weights")
    check_writes_are_summands(cfg, "center_writing_weights")
    params, cfg = untie(_copy(params), cfg)
    params["embed"] = {name: _centre(t) for name, t in params["embed"].items()}
    blocks = []
    for block in params["blocks"]:
        block = dict(block)
        for sub, names in (("attn", ("w_o", "b_o")), ("mlp", ("w_out", "b_out"))):
            if sub in block:
                block[sub] = {k: _centre(t) if k in names else t for k, t in block[sub].items()}
        blocks.append(block)
    params["blocks"] = blocks
    return params, cfg


def center_unembed(params: dict, cfg: Config) -> tuple[dict, Config]:
    """Subtract each d_model row's mean over the vocabulary from the unembedding: every logit of a position
    moves by the same amount, so the softmax (and ``log_softmax``) is unchanged. Unties a tied embedding
    (the embedding stays); refuses ``logit_softcap``, under which a shift is not softmax-invariant."""
    check_uncapped(cfg, "center_unembed")
    params, cfg = untie(_copy(params), cfg)
    params["unembed"] = {"w": _centre(params["unembed"]["w"])}
    return params, cfg


# ---------------------------------------------------------------- value biases


def _qkv_widths(cfg: Config) -> list[int]:
    return [n * cfg.head_dim for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]


def _fold_value_bias(attn: dict, cfg: Config) -> dict:
    b_q, b_k, b_v = attn["b_qkv"].split(_qkv_widths(cfg))
    b_v = rearrange(b_v, "(kv_heads head_dim) -> kv_heads head_dim", head_dim=cfg.head_dim)
    w_o = rearrange(
        attn["w_o"], "(kv_heads group head_dim) d_model -> kv_heads group head_dim d_model", kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
    )
    written = torch.einsum("kh,kghd->d", b_v, w_o)
    return dict(attn, b_qkv=torch.cat([b_q, b_k, torch.zeros_like(attn["b_qkv"][: b_v.numel()])]),
                b_o=attn["b_o"] + written)


def fold_value_biases(params: dict, cfg: Config) -> tuple[dict, Config]:
    """Move the value bias into the output bias: a head's pattern rows sum to one, so ``b_v`` reaches the
    residual as the constant ``b_v @ W_O`` (each query head reading its kv head's ``b_v``, GQA included).

    Needs an output bias to move it into (``Config.bias=True``); attention dropout must be off, as it is at
    evaluation. A tree without value biases comes back unchanged.
    """
    params = _copy(params)
    if "b_qkv" not in params["blocks"][0]["attn"]:
        return params, cfg
    if "b_o" not in params["blocks"][0]["attn"]:
        raise ValueError(
            "fold_value_biases needs an output bias b_o to move the value bias into (Config.bias=True), got "
            f"Config.bias={cfg.bias} (the value bias is Attention.qkv_bias's)"
        )
    params["blocks"] = [dict(b, attn=_fold_value_bias(b["attn"], cfg)) for b in params["blocks"]]
    return params, cfg


# ---------------------------------------------------------------- factored matrices


def _r_factor(m: Tensor) -> Tensor:
    """R of the reduced QR: ``m = Q R`` with orthonormal Q, so ``m``'s products and norms are ``R``'s."""
    return torch.linalg.qr(m, mode="r")[1]


class FactoredMatrix(NamedTuple):
    """The matrix ``A @ B`` kept as its factors ``A [..., m, r]`` and ``B [..., r, n]`` (leading axes
    broadcast). Norms and singular values come from the r x r core ``R_A R_B^T`` (``A = Q_A R_A``,
    ``B^T = Q_B R_B``): nothing m x n is formed unless ``full()`` is asked for."""

    A: Tensor
    B: Tensor

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> "FactoredMatrix":
        return FactoredMatrix(other @ self.A, self.B)

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.mT, self.A.mT)

    def core(self) -> Tensor:
        """``R_A R_B^T``: the same singular values and Frobenius norm as ``A @ B``, r x r."""
        return _r_factor(self.A) @ _r_factor(self.B.mT).mT

    def svdvals(self) -> Tensor:
        """Singular values, largest first: r of them (the inner width); the rest of ``A @ B``'s are zero."""
        return torch.linalg.svdvals(self.core())

    def norms(self) -> Tensor:
        """Frobenius norm over the last two axes."""
        return torch.linalg.matrix_norm(self.core())

    def full(self) -> Tensor:
        return self.A @ self.B


# ---------------------------------------------------------------- circuits


def _head_weights(params: dict, cfg: Config, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """W_Q ``[kv_heads, group, d_model, head_dim]``, W_K and W_V ``[kv_heads, 1, d_model, head_dim]``,
    W_O ``[kv_heads, group, head_dim, d_model]``: views of the layer's weights, grouped so that each query
    head broadcasts against its own kv head (no copy per query head)."""
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must lie in [0, n_layers={cfg.n_layers}), got {layer}")
    attn = params["blocks"][layer]["attn"]
    w_q, w_k, w_v = attn["w_qkv"].split(_qkv_widths(cfg), dim=-1)
    split = "d_model (kv_heads group head_dim) -> kv_heads group d_model head_dim"
    w_q = rearrange(w_q, split, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    w_k, w_v = (rearrange(w, split, group=1, head_dim=cfg.head_dim) for w in (w_k, w_v))
    w_o = rearrange(
        attn["w_o"], "(kv_heads group head_dim) d_model -> kv_heads group head_dim d_model", kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
    )
    return w_q, w_k, w_v, w_o


def qk_circuit(params: dict, cfg: Config, layer: int) -> FactoredMatrix:
    """Every head's ``W_Q W_K^T`` (d_model x d_model, rank head_dim), leading axes ``[kv_heads, group]``:
    query head ``h = kv * group + j``, the order of ``w_qkv``'s columns (``.full().flatten(0, 1)`` gives
    ``[heads, ...]``). Rotary positions act between the two factors and are left out, as in
    TransformerLens; biases are left out too."""
    check_scores_bilinear(cfg, "qk_circuit")
    w_q, w_k, _, _ = _head_weights(params, cfg, layer)
    return FactoredMatrix(w_q, w_k.mT)


def ov_circuit(params: dict, cfg: Config, layer: int) -> FactoredMatrix:
    """Every head's ``W_V W_O`` (what it writes for what it reads), leading axes ``[kv_heads, group]``."""
    _, _, w_v, w_o = _head_weights(params, cfg, layer)
    return FactoredMatrix(w_v, w_o)


def _flat_heads(m: FactoredMatrix) -> FactoredMatrix:
    """Leading axes ``[kv_heads, group]`` broadcast and flattened to ``[heads]`` (small r x r work only)."""
    shape = torch.broadcast_shapes(m.A.shape[:-2], m.B.shape[:-2])
    flat = "kv_heads group d_in d_out -> (kv_heads group) d_in d_out"
    return FactoredMatrix(rearrange(m.A.expand(*shape, *m.A.shape[-2:]), flat), rearrange(m.B.expand(*shape, *m.B.shape[-2:]), flat))


def composition_scores(params: dict, cfg: Config, writer: int, reader: int, kind: str) -> Float[Tensor, "heads heads"]:
    """``||W_A W_B||_F / (||W_A||_F ||W_B||_F)`` for every writer head (rows, layer ``writer``) and reader
    head (columns, layer ``reader`` > ``writer``): ``kind="q"`` (``W_A`` the writer's OV, ``W_B`` the reader's
    QK), ``"k"`` (the reader's QK transposed: what the writer puts into keys) or ``"v"`` (the reader's OV).

    All products go through the r x r cores: ``||A1 (B1 A2) B2||_F = ||R_A1 (B1 A2) R_B2^T||_F``.
    """
    validate.one_of("kind", kind, ("q", "k", "v"))
    if not writer < reader:
        raise ValueError(f"the writer layer must come before the reader layer, got writer={writer}, reader={reader}")
    first = _flat_heads(ov_circuit(params, cfg, writer))
    second = {"q": lambda: qk_circuit(params, cfg, reader), "k": lambda: qk_circuit(params, cfg, reader).T,
              "v": lambda: ov_circuit(params, cfg, reader)}[kind]()
    second = _flat_heads(second)
    r_a, r_b = _r_factor(first.A)[:, None], _r_factor(second.B.mT)[None]
    middle = first.B[:, None] @ second.A[None]
    product = torch.linalg.matrix_norm(r_a @ middle @ r_b.mT)
    return product / (first.norms()[:, None] * second.norms()[None])
