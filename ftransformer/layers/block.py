"""Learning-path step 5: the transformer block -- attention and feed-forward, each wrapped in a
residual connection and a normalisation, in either order.

* pre-LN (GPT-2 and later): ``x = x + f(norm(x))`` -- the residual stream is never normalised, which
  keeps deep stacks trainable without warm-up tricks;
* post-LN (the 2017 diagram): ``x = norm(x + f(x))``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer.layers.attention import multi_head_attention
from ftransformer.layers.feedforward import feedforward
from ftransformer.layers.norm import norm


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
    positions: Int[Tensor, "*batch seq"],
    mask: Bool[Tensor, "*#batch seq seq"] | None = None,
    key: Tensor | None = None,
) -> Float[Tensor, "*batch seq d_model"]:
    """One transformer block: ``params = {"ln1", "attn", "ln2", "mlp"}``."""
    keys = [None] * 3 if key is None else random.split(key, 3)

    def attn(p, h):
        return multi_head_attention(p, h, cfg, positions=positions, mask=mask, key=keys[0])

    def mlp(p, h):
        return feedforward(p, h, cfg)

    x = residual(params["attn"], x, attn, params["ln1"], cfg, keys[1])
    return residual(params["mlp"], x, mlp, params["ln2"], cfg, keys[2])
