"""Learning-path step 5: the transformer block -- attention and feed-forward, each wrapped in a
residual connection and a normalisation, in either order.

* pre-LN (GPT-2 and later): ``x = x + f(norm(x))`` -- the residual stream is never normalised, which
  keeps deep stacks trainable without warm-up tricks;
* post-LN (the 2017 diagram): ``x = norm(x + f(x))``;
* sandwich (Gemma 2/3): ``x = x + norm'(f(norm(x)))``, a second norm (``ln1_post`` / ``ln2_post``) on
  each sublayer's output;
* output (OLMo-2): ``x = x + norm(f(x))``, the sublayer reads the raw residual;
* parallel (GPT-NeoX / Pythia, ``Config.residual="parallel"``): ``x = x + attn(ln1(x)) + mlp(ln2(x))``,
  both sublayers reading the block's input; ``"parallel_shared_norm"`` (GPT-J, Phi-2) feeds both the
  same ``ln1(x)``.

``block`` and ``block_with_cache`` differ only in their attention sublayer; ``wire`` is the one place
the residual connections are made.
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from ftransformer import random
from ftransformer.layers.attention import (
    KVWrite, init_attention, multi_head_attention, multi_head_attention_with_cache, write_kv,
)
from ftransformer.layers.embedding import Rotary
from ftransformer.layers.feedforward import feedforward, init_feedforward
from ftransformer.layers.masks import Mask
from ftransformer.layers.norm import init_norm, norm
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.shapes import Float, Int, Key, Residual, Tensor

# A sublayer with a side output: (params, x) -> (output, extra), e.g. attention and its new cache buffers.
Sublayer = Callable[[dict, Tensor], tuple[Tensor, Any]]


def residual_with(
    params: dict, x: Residual, sublayer: Sublayer, norm_params: dict, cfg, key: Key | None, post: dict | None = None
) -> tuple[Residual, Any]:
    """``residual`` for a sublayer that also returns something else, which is passed through untouched.

    ``post``: the sandwich layout's second norm, on the sublayer's output."""
    if cfg.layout.norm_position in ("pre", "sandwich"):
        out, extra = sublayer(params, norm(norm_params, x, cfg.norm))
        if post is not None:
            out = norm(post, out, cfg.norm)
        return x + random.dropout(out, cfg.dropout, key), extra
    if cfg.layout.norm_position == "output":
        out, extra = sublayer(params, x)
        return x + random.dropout(norm(norm_params, out, cfg.norm), cfg.dropout, key), extra
    out, extra = sublayer(params, x)
    return norm(norm_params, x + random.dropout(out, cfg.dropout, key), cfg.norm), extra


def residual(
    params: dict, x: Residual, sublayer, norm_params: dict, cfg, key: Key | None, post: dict | None = None
) -> Residual:
    """One residual sublayer in the config's norm position, with dropout on the sublayer's output."""
    return residual_with(params, x, lambda p, h: (sublayer(p, h), None), norm_params, cfg, key, post)[0]


def write_norms(params: dict, cfg) -> tuple[dict | None, dict | None]:
    """The norms the attention's and the MLP's outputs pass through before they are added to the residual
    stream (sandwich: ``ln1_post`` / ``ln2_post``; output: ``ln1`` / ``ln2``); None where an output is
    added as it is (pre-LN, parallel) or where the sum is normed instead (post-LN)."""
    if cfg.layout.norm_position == "sandwich":
        return params["ln1_post"], params.get("ln2_post")
    if cfg.layout.norm_position == "output":
        return params["ln1"], params.get("ln2")
    return None, None


def mlp_norm(params: dict, cfg) -> dict:
    """The norm the MLP reads through in the pre-LN layouts: ``ln2``, or ``ln1`` under the shared-norm parallel
    residual (one norm feeds both sublayers)."""
    return params["ln1"] if cfg.layout.residual == "parallel_shared_norm" else params["ln2"]


def mlp_reads(cfg) -> str:
    """Which recorded residual the MLP reads (before its norm): ``"resid_mid"`` (after attention) in the
    sequential layout, ``"resid_pre"`` (the block's input) in the parallel ones."""
    return "resid_mid" if cfg.layout.residual == "sequential" else "resid_pre"


def has_mlp(cfg) -> bool:
    """Whether the config's blocks have an MLP (``ln2`` / ``mlp`` parameters, ``mlp.*`` activations)."""
    return cfg.layout.mlp


# Why a layout's writes are not summands of the residual stream: each norm position but pre-LN's.
NOT_SUMMANDS = {
    "post": "every block renormalises the sum x + f(x), so no write stays a summand of the residual stream",
    "sandwich": "each sublayer's output is normed (ln1_post / ln2_post) before it is added, and a norm of the "
                "heads' sum is not a sum of per-head writes",
    "output": "each sublayer's output is normed (ln1 / ln2) before it is added, x + norm(f(x)), and a norm of "
              "the heads' sum is not a sum of per-head writes",
}


def check_writes_are_summands(cfg, what: str) -> None:
    """``ValueError`` naming why, unless every head's and MLP's own output is a summand of the residual stream
    (pre-LN, sequential or parallel): for a consumer (``what``) that removes or moves one writer's write."""
    position = cfg.layout.norm_position
    if position != "pre":
        raise ValueError(
            f"{what} supports Config.layout.norm_position='pre' only, got {position!r}: {NOT_SUMMANDS[position]}"
        )


def check_stream_is_sum(cfg, what: str) -> None:
    """``ValueError`` naming why, unless the last residual stream is the embedding plus every sublayer's write
    (each maybe normed on its own first): every layout but post-LN's."""
    if cfg.layout.norm_position == "post":
        raise ValueError(
            f"{what} needs Config.layout.norm_position='pre', 'sandwich' or 'output', got 'post': in a post-LN model "
            "every block renormalises the residual stream, so it is not a sum of the components' writes"
        )


def wire(
    params: dict, x: Residual, cfg, attn: Sublayer, *, keys: tuple[Key | None, Key | None], tap: Tap
) -> tuple[Residual, Any]:
    """The block's residual wiring around ``attn`` and the config's MLP; returns ``attn``'s side output too.

    ``keys`` are the two sublayers' dropout keys (None: no dropout). ``tap`` sees ``resid_pre``,
    ``resid_mid`` (after attention), ``resid_post``, and the MLP's values under ``mlp.``.
    """
    x = tap("resid_pre", x)
    if cfg.layout.residual != "sequential":
        return parallel_wire(params, x, cfg, attn, keys=keys, tap=tap)
    # Only the sandwich's second norms reach residual_with as `post`; the output layout's are its norm_params.
    post = write_norms(params, cfg) if cfg.layout.norm_position == "sandwich" else (None, None)
    x, extra = residual_with(params["attn"], x, attn, params["ln1"], cfg, keys[0], post[0])
    x = tap("resid_mid", x)
    if cfg.layout.mlp:
        mlp = tap.scope("mlp")

        def ffn(p: dict, h: Tensor) -> Tensor:
            return feedforward(p, h, cfg, tap=mlp)

        x = residual(params["mlp"], x, ffn, params["ln2"], cfg, keys[1], post[1])
    return tap("resid_post", x), extra


def parallel_wire(
    params: dict, x: Residual, cfg, attn: Sublayer, *, keys: tuple[Key | None, Key | None], tap: Tap
) -> tuple[Residual, Any]:
    """``wire`` for the parallel layouts: attention and MLP both read the block input ``x`` (normed by
    ``ln1`` and ``ln2``, or both by ``ln1``). ``resid_mid`` is ``x`` plus the attention output alone: the
    MLP does not read it, it is where the attention's write ends."""
    h = norm(params["ln1"], x, cfg.norm)
    out, extra = attn(params["attn"], h)
    out = random.dropout(out, cfg.dropout, keys[0])
    mid = tap("resid_mid", x + out)
    if cfg.layout.residual == "parallel":
        h = norm(mlp_norm(params, cfg), x, cfg.norm)
    mlp = random.dropout(feedforward(params["mlp"], h, cfg, tap=tap.scope("mlp")), cfg.dropout, keys[1])
    # (mlp + attn) + x is GPT-NeoX's order of the sum (in bfloat16 the order decides the rounding); a
    # resid_mid an intervention replaced flows on instead.
    post = mid + mlp if tap.intervenes("resid_mid") else mlp + out + x
    return tap("resid_post", post), extra


def block(
    params: dict,
    x: Residual,
    cfg,
    *,
    mask: Mask,
    rotary: Rotary | None = None,
    key: Key | None = None,
    tap: Tap = NO_TAP,
) -> Residual:
    """One transformer block: ``params = {"ln1", "attn", "ln2"?, "mlp"?}`` (no MLP when ``cfg.layout.mlp`` is False).

    ``mask`` and ``rotary``: see ``multi_head_attention``. ``tap`` sees the values listed in ``wire``,
    and the attention's under ``attn.``.
    """
    keys = [None] * 3 if key is None else random.split(key, 3)

    def attn(p: dict, h: Tensor) -> tuple[Tensor, None]:
        return multi_head_attention(p, h, cfg, mask=mask, rotary=rotary, key=keys[0], tap=tap.scope("attn")), None

    return wire(params, x, cfg, attn, keys=(keys[1], keys[2]), tap=tap)[0]


def block_with_cache(
    params: dict,
    x: Residual,
    cfg,
    *,
    mask: Mask,
    rotary: Rotary | None,
    k_cache: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    v_cache: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    write_index: Int[Tensor, "*batch kv_heads seq head_dim"],
    write: KVWrite = write_kv,
    tap: Tap = NO_TAP,
) -> tuple[
    Residual, Float[Tensor, "*batch kv_heads kv_seq head_dim"], Float[Tensor, "*batch kv_heads kv_seq head_dim"]
]:
    """``block`` for inference with a KV-cache: also returns this layer's updated key/value buffers.

    ``write``: see ``multi_head_attention_with_cache``. ``tap`` sees the values ``wire`` lists (the residual
    stream and ``mlp.hidden``), not the attention's.
    """

    def attn(p: dict, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, k, v = multi_head_attention_with_cache(
            p, h, cfg, mask=mask, rotary=rotary, k_cache=k_cache, v_cache=v_cache, write_index=write_index, write=write
        )
        return out, (k, v)

    x, (k_new, v_new) = wire(params, x, cfg, attn, keys=(None, None), tap=tap)
    return x, k_new, v_new


def init_block(cfg, gen: torch.Generator) -> dict:
    """One block's parameters for the config's ``Layout``: ``ln1`` and ``attn``; ``ln2`` and ``mlp`` unless
    attention-only (no ``ln2`` under the shared-norm parallel residual); ``ln1_post`` / ``ln2_post`` when
    sandwiched. Weights N(0, init_std), residual outputs scaled by 1/sqrt(2 n_layers) (GPT-2)."""
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    layout, new_norm = cfg.layout, lambda: init_norm(cfg.norm, cfg.d_model, bias=cfg.bias)
    attn = init_attention(cfg, gen, std=std, out_std=out_std)
    # Drawn even for attention-only blocks (and dropped): a seed keeps giving the same attention weights
    # whatever the layout, as it has since 0.1.
    mlp = init_feedforward(cfg, gen, std=std, out_std=out_std)
    sandwich = layout.norm_position == "sandwich"  # a second norm on each sublayer's output
    block = {"ln1": new_norm(), "attn": attn} | ({"ln1_post": new_norm()} if sandwich else {})
    if not layout.mlp:
        return block
    if layout.residual != "parallel_shared_norm":  # the shared-norm layout's one norm feeds both sublayers
        block["ln2"] = new_norm()
    return block | {"mlp": mlp} | ({"ln2_post": new_norm()} if sandwich else {})
