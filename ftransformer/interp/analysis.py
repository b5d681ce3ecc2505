"""Learning-path step 9c: what the heads and layers do, as pure functions of ``acts`` returning tensors.

* ``attention_entropy``, ``previous_token_scores``, ``induction_scores``: one number per (layer, head);
* ``logit_lens``: the unembedding applied to the residual stream after every layer;
* ``direct_logit_attribution``: how much each head and MLP writes towards a token's logit;
* ``loss_per_position``: the in-context learning curve.

Induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads") are found on random
tokens repeated twice: in the second copy, a head that attends from token ``t`` to the token *after*
``t``'s first occurrence is copying the continuation forward.
"""

import torch
from einops import rearrange, reduce
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.layers.block import check_stream_is_sum, write_norms
from ftransformer.layers.norm import inverse_scale, norm
from ftransformer.model import check_ids, cross_entropy, final_norm, forward, unembed, unembedding


def stacked_patterns(acts: dict) -> Float[Tensor, "layers *batch heads seq kv_seq"]:
    """Every layer's attention pattern, stacked along a leading ``layers`` axis."""
    return torch.stack([b["attn"]["pattern"] for b in acts["blocks"]])


def _per_head_mean(x: Float[Tensor, "layers *batch heads seq"]) -> Float[Tensor, "layers heads"]:
    """Average over the batch axes and query positions, keeping (layer, head)."""
    return reduce(x, "layers ... heads seq -> layers heads", "mean")


def attention_entropy(acts: dict) -> Float[Tensor, "layers heads"]:
    """Mean entropy (nats) of each head's attention rows: 0 looks at one token, log(n) spreads evenly."""
    p = stacked_patterns(acts)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return _per_head_mean(entropy)


def previous_token_scores(acts: dict) -> Float[Tensor, "layers heads"]:
    """Mean attention from each position to the one before it (positions 1 onward): 1 for a perfect
    previous-token head."""
    p = stacked_patterns(acts)
    if p.shape[-1] < 2:
        raise ValueError("previous-token scores need seq >= 2")
    return _per_head_mean(p.diagonal(offset=-1, dim1=-2, dim2=-1))


def induction_scores(acts: dict, period: int) -> Float[Tensor, "layers heads"]:
    """Mean attention from position ``t`` of a sequence repeating every ``period`` tokens to position
    ``t - period + 1`` (the token that followed ``t``'s previous occurrence), over ``t >= period``."""
    p = stacked_patterns(acts)
    seq = p.shape[-1]
    if not 1 <= period < seq:
        raise ValueError(f"period must lie in [1, seq={seq}), got {period}")
    return _per_head_mean(p.diagonal(offset=1 - period, dim1=-2, dim2=-1)[..., 1:])


def repeated_random_tokens(
    cfg: Config, *, half: int, batch: int = 8, seed: int = 0, low: int = 0
) -> Int[Tensor, "batch seq"]:
    """``batch`` rows of ``half`` random ids in ``[low, vocab_size)`` followed by the same ``half`` again."""
    if 2 * half > cfg.max_seq_len or half < 2:
        raise ValueError(f"half must lie in [2, max_seq_len/2 = {cfg.max_seq_len // 2}], got {half}")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, cfg.vocab_size, (batch, half), generator=gen)
    return torch.cat([first, first], dim=-1)


def repeated_stretches(
    cfg: Config, batch: int, generator: torch.Generator
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Training rows for induction: ``(tokens, targets)`` of ``max_seq_len`` random ids (targets shifted by
    one) in which a stretch of 6 .. ``max_seq_len // 2`` tokens occurs twice, at random places. The distance
    between the copies changes from row to row, so no head can learn "look back a fixed number of
    positions" -- only "look for where this token was before" (an induction head) predicts the copy."""
    if cfg.max_seq_len < 12:
        raise ValueError(f"repeated_stretches needs max_seq_len >= 12 (two stretches of 6), got {cfg.max_seq_len}")
    seq = cfg.max_seq_len + 1  # one longer: the targets are the tokens shifted by one
    rows = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    for r in range(batch):
        half = int(torch.randint(6, cfg.max_seq_len // 2 + 1, (), generator=generator))
        start = int(torch.randint(0, seq - 2 * half + 1, (), generator=generator))
        gap = int(torch.randint(0, seq - 2 * half - start + 1, (), generator=generator))
        rows[r, start + half + gap:start + 2 * half + gap] = rows[r, start:start + half]
    return rows[:, :-1], rows[:, 1:]


def head_scores(
    params: dict, cfg: Config, *, half: int | None = None, batch: int = 8, seed: int = 0
) -> dict[str, Float[Tensor, "layers heads"]]:
    """Induction, previous-token and entropy scores of every head, on repeated random tokens.

    ``half`` defaults to ``max_seq_len // 2`` (the whole context, the sequence repeated once).
    """
    half = cfg.max_seq_len // 2 if half is None else half
    device = next(iter(params["embed"].values())).device
    tokens = repeated_random_tokens(cfg, half=half, batch=batch, seed=seed).to(device)
    with torch.no_grad():
        _, acts = forward_with_activations(params, tokens, cfg)
    return {
        "induction": induction_scores(acts, half),
        "previous_token": previous_token_scores(acts),
        "entropy": attention_entropy(acts),
    }


def logit_lens(params: dict, acts: dict, cfg: Config) -> Float[Tensor, "layers_plus_1 *batch seq vocab"]:
    """The model's own unembedding (final norm included) applied to the residual stream entering block 0
    and after every block: row ``i`` is what the model would predict if it stopped after ``i`` blocks.
    The last row is the logits."""
    streams = [acts["embed"]] + [b["resid_post"] for b in acts["blocks"]]
    return torch.stack([unembed(params, x, cfg) for x in streams])


def _unembedding_columns(params: dict, cfg: Config, token) -> Tensor:
    """The unembedding's column(s) for ``token``: ``[d_model]`` for an int, ``[*batch, seq, d_model]`` for ids."""
    w = unembedding(params, cfg).t()
    if isinstance(token, Tensor):
        return w[token]
    if not validate.is_int(token) or not 0 <= token < cfg.vocab_size:
        raise ValueError(f"token must be an id in [0, vocab_size={cfg.vocab_size}) or a tensor of ids, got {token!r}")
    return w[token]


def _head_writes(block_params: dict, block_acts: dict, cfg: Config) -> tuple[Tensor, Tensor]:
    """``(each head's write [heads, *batch, seq, d_model], the rest of the attention's write)``: a norm on the
    attention's output (sandwich, output layouts) is split with its divisor frozen at the whole output."""
    heads = rearrange(block_acts["attn"]["head_out"], "... heads seq d_model -> heads ... seq d_model")
    written = block_acts["resid_mid"] - block_acts["resid_pre"]
    post = write_norms(block_params, cfg)[0]
    if post is not None:
        b_o = block_params["attn"].get("b_o")
        out = heads.sum(0) if b_o is None else heads.sum(0) + b_o
        inv = inverse_scale(out, cfg.norm)
        heads = norm(post, heads, cfg.norm, inv=inv) - norm(post, torch.zeros_like(out), cfg.norm, inv=inv)
    return heads, written - heads.sum(0)


def direct_logit_attribution(
    params: dict, acts: dict, cfg: Config, token: int | Int[Tensor, "*batch seq"]
) -> dict[str, Tensor]:
    """Each component's direct contribution to the logit of ``token`` at every position, before the soft-cap.

    The residual stream entering the final norm is a sum of writes: the embedding, every head, every
    attention bias, every MLP. With the final norm's divisor frozen at its value on the whole stream (the
    usual convention) the norm is affine, and the logit splits exactly into one term per write. A norm on
    a sublayer's output (the sandwich and output layouts) is split the same way, its divisor frozen at the
    whole output, so each head keeps its own share. The logit soft-cap (``Embeddings.logit_softcap``, a ``tanh``) is not additive: the
    parts sum to the logit *before* the cap, ``final @ unembedding`` (``model.unembedding``).

    Args:
        token: one id for every position, or a tensor of ids (``[*batch, seq]``, e.g. the targets).

    Returns:
        ``{"embed": [*batch, seq], "heads": [layers, heads, *batch, seq], "mlp": [layers, *batch, seq],
        "bias": [*batch, seq]}``; ``bias`` holds the attention output biases (with their share of a norm on
        the attention's output) and the final norm's bias. Their sum is the pre-cap logit.
    """
    check_stream_is_sum(cfg, "direct logit attribution")
    resid = acts["blocks"][-1]["resid_post"]
    inv = inverse_scale(resid, cfg.norm)
    zero = final_norm(params, torch.zeros_like(resid), cfg, inv=inv)
    u = _unembedding_columns(params, cfg, token).to(resid.dtype)

    def logit(c: Tensor) -> Tensor:
        """A write's share of the logit: the final norm's linear part (frozen divisor), then ``u``."""
        return ((final_norm(params, c, cfg, inv=inv) - zero) * u).sum(-1)

    heads, mlps, bias = [], [], (zero * u).sum(-1)
    for p, b in zip(params["blocks"], acts["blocks"]):
        head_writes, rest = _head_writes(p, b, cfg)
        heads.append(logit(head_writes))
        bias = bias + logit(rest)
        mlps.append(logit(b["resid_post"] - b["resid_mid"]))
    return {"embed": logit(acts["embed"]), "heads": torch.stack(heads), "mlp": torch.stack(mlps), "bias": bias}


def loss_per_position(
    params: dict,
    tokens: Int[Tensor, "*batch seq"],
    targets: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    ignore_index: int = -100,
) -> Float[Tensor, " seq"]:
    """Cross-entropy at each position, averaged over the batch: how much earlier context helps.

    Targets equal to ``ignore_index`` (the padding ``SplitWindows`` batches carry) count for nothing;
    a position with no counted target is NaN. Each position's loss is ``cross_entropy``'s, float32 lift included.
    """
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but tokens has shape {tuple(tokens.shape)}")
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
    logits = forward(params, tokens, cfg)
    sums = torch.stack([
        cross_entropy(logits[..., p : p + 1, :], targets[..., p : p + 1], ignore_index=ignore_index, reduction="sum")
        for p in range(tokens.shape[-1])
    ])
    counted = reduce((targets != ignore_index).long(), "... seq -> seq", "sum")
    return sums / counted
