"""Learning-path step 5: the transformer block -- attention and feed-forward, each wrapped in a
residual connection and a normalisation, in either order.

* pre-LN (GPT-2 and later): ``x = x + f(norm(x))`` -- the residual stream is never normalised, which
  keeps deep stacks trainable without warm-up tricks;
* post-LN (the 2017 diagram): ``x = norm(x + f(x))``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer.layers.attention import multi_head_attention, multi_head_attention_with_cache
from ftransformer.layers.feedforward import feedforward
from ftransformer.layers.norm import norm
from ftransformer.layers.tap import NO_TAP, Tap


def residual(
    params: dict, x: Float[Tensor, "*batch seq d_model"], sublayer, norm_params: dict, cfg, key: Tensor | None
) -> Float[Tensor, "*batch seq d_model"]:
    """One residual sublayer in the config's norm position, with dropout on the sublayer's output."""
    if cfg.norm_position == "pre":
        return x + random.dropout(sublayer(params, norm(norm_params, x, cfg)), cfg.dropout, key)
    return norm(norm_params, x + random.dropout(sublayer(params, x), cfg.dropout, key), cfg)


def block(
    params: dict,
    x: Float[Tensor, "*batch seq d_model"],
    cfg,
    *,
    positions: Int[Tensor, "*#batch seq"],
    mask: Bool[Tensor, "*#batch seq seq"] | None = None,
    key: Tensor | None = None,
    tap: Tap = NO_TAP,
) -> Float[Tensor, "*batch seq d_model"]:
    """One transformer block: ``params = {"ln1", "attn", "ln2"?, "mlp"?}`` (no MLP when ``cfg.mlp`` is False).

    ``tap`` sees ``resid_pre``, ``resid_mid`` (after attention), ``resid_post``, and the sublayers'
    values under ``attn.`` and ``mlp.``.
    """
    keys = [None] * 3 if key is None else random.split(key, 3)

    def attn(p, h):
        return multi_head_attention(p, h, cfg, positions=positions, mask=mask, key=keys[0], tap=tap.scope("attn"))

    def mlp(p, h):
        return feedforward(p, h, cfg, tap=tap.scope("mlp"))

    x = tap("resid_pre", x)
    x = tap("resid_mid", residual(params["attn"], x, attn, params["ln1"], cfg, keys[1]))
    if cfg.mlp:
        x = residual(params["mlp"], x, mlp, params["ln2"], cfg, keys[2])
    return tap("resid_post", x)


def block_with_cache(
    params: dict,
    x: Float[Tensor, "*batch seq d_model"],
    cfg,
    *,
    positions: Int[Tensor, "*#batch seq"],
    k_cache: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    v_cache: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    write_index: Int[Tensor, "*batch kv_heads seq head_dim"],
    mask: Bool[Tensor, "*batch seq kv_seq"] | Float[Tensor, "*batch seq kv_seq"],
    donate: bool = False,
) -> tuple[
    Float[Tensor, "*batch seq d_model"],
    Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    Float[Tensor, "*batch kv_heads kv_seq head_dim"],
]:
    """``block`` for inference with a KV-cache: also returns this layer's updated key/value buffers.

    ``donate``: see ``multi_head_attention_with_cache``.
    """

    def attn(p, h):
        return multi_head_attention_with_cache(
            p, h, cfg, positions=positions, k_cache=k_cache, v_cache=v_cache, write_index=write_index, mask=mask,
            donate=donate,
        )

    # Written out rather than through `residual`, whose sublayer returns a single tensor.
    if cfg.norm_position == "pre":
        a, k_new, v_new = attn(params["attn"], norm(params["ln1"], x, cfg))
        x = x + a
    else:
        a, k_new, v_new = attn(params["attn"], x)
        x = norm(params["ln1"], x + a, cfg)
    if cfg.mlp:
        x = residual(params["mlp"], x, lambda p, h: feedforward(p, h, cfg), params["ln2"], cfg, None)
    return x, k_new, v_new
