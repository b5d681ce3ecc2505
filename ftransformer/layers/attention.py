"""Learning-path steps 2 and 3: causal scaled dot-product attention, then many heads (MHA / GQA / MQA).

Two interchangeable paths compute the same numbers:

* ``"einsum"`` writes attention out -- scores, mask, softmax, weighted sum -- and can hand back the
  pattern. It is the path to read, and the one to use under ``vmap`` for per-example gradients.
* ``"sdpa"`` calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, fast).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer.layers.embedding import apply_rotary, rotary_angles
from ftransformer.layers.linear import linear
from ftransformer.layers.tap import NO_TAP, Tap


def causal_mask(q_positions: Int[Tensor, "*batch seq"], k_positions: Int[Tensor, "*batch kv_seq"]) -> Bool[
    Tensor, "*batch seq kv_seq"
]:
    """True where query i may look at key j: key position <= query position."""
    return k_positions[..., None, :] <= q_positions[..., :, None]


def attention_pattern(
    q: Float[Tensor, "*batch kv_heads group seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Bool[Tensor, "*#batch #kv_heads #group seq kv_seq"]
    | Float[Tensor, "*#batch #kv_heads #group seq kv_seq"]
    | None = None,
) -> Float[Tensor, "*batch kv_heads group seq kv_seq"]:
    """softmax(q k^T / sqrt(head_dim)) over keys; ``mask`` False hides a key (None: causal, seq == kv_seq).

    A float ``mask`` is added to the scores instead (0 to keep a key, -inf to hide it).
    """
    scores = torch.einsum("...hgqd,...hkd->...hgqk", q, k) / math.sqrt(q.shape[-1])
    if mask is None:
        n_q, n_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    return scores.softmax(dim=-1)


def attend(
    pattern: Float[Tensor, "*batch kv_heads group seq kv_seq"], v: Float[Tensor, "*batch kv_heads kv_seq head_dim"]
) -> Float[Tensor, "*batch kv_heads group seq head_dim"]:
    """Each query's weighted sum of the values."""
    return torch.einsum("...hgqk,...hkd->...hgqd", pattern, v)


def scaled_dot_product_attention(
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    v: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Bool[Tensor, "*#batch seq kv_seq"] | Float[Tensor, "*#batch seq kv_seq"] | None = None,
    *,
    impl: str = "sdpa",
    dropout: float = 0.0,
    key: Tensor | None = None,
) -> Float[Tensor, "*batch heads seq head_dim"]:
    """Attention of every query head over its key/value head; ``mask`` None means causal, with the queries
    taken as the last ``seq`` of the ``kv_seq`` positions.

    ``mask`` is Bool (True: may attend) or an additive float bias (0 / -inf); a bias built once and
    reused by every layer saves SDPA converting a Bool mask in each one.

    With ``key`` given and ``dropout > 0`` the pattern is dropped out with that key, on the einsum path
    (the fused kernel draws from torch's global generator, which explicit keys rule out).
    """
    kv_heads = k.shape[-3]
    if impl == "sdpa" and (key is None or dropout == 0.0):
        group = q.shape[-3] // kv_heads
        if group > 1:
            k = repeat(k, "... kv_heads kv_seq head_dim -> ... (kv_heads group) kv_seq head_dim", group=group)
            v = repeat(v, "... kv_heads kv_seq head_dim -> ... (kv_heads group) kv_seq head_dim", group=group)
        if mask is None and q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if mask is None:
            # SDPA's is_causal aligns the mask top-left; with fewer queries than keys the queries are
            # the *last* positions, so build the bottom-right-aligned mask ourselves.
            n_q, n_k = q.shape[-2], k.shape[-2]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(-3))
    q = rearrange(q, "... (kv_heads group) seq head_dim -> ... kv_heads group seq head_dim", kv_heads=kv_heads)
    if mask is not None:
        mask = mask[..., None, None, :, :]
    pattern = random.dropout(attention_pattern(q, k, mask), dropout, key)
    return rearrange(attend(pattern, v), "... kv_heads group seq head_dim -> ... (kv_heads group) seq head_dim")


def project_qkv(
    params: dict, x: Float[Tensor, "*batch seq d_model"], cfg, positions: Int[Tensor, "*#batch seq"]
) -> tuple[
    Float[Tensor, "*batch heads seq head_dim"],
    Float[Tensor, "*batch kv_heads seq head_dim"],
    Float[Tensor, "*batch kv_heads seq head_dim"],
]:
    """Queries, keys and values from one fused projection ``w_qkv``; rotary positions applied to q and k."""
    qkv = linear(x, params["w_qkv"], params.get("b_qkv"))
    # w_qkv's columns are n_heads query heads, then n_kv_heads key heads, then n_kv_heads value heads:
    # one rearrange into heads and a split along them gives the same views as three rearranges, in
    # half the time (per-call overhead is what bounds one-token decoding).
    qkv = rearrange(qkv, "... seq (heads head_dim) -> ... heads seq head_dim", head_dim=cfg.head_dim)
    q, k, v = qkv.split([cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads], dim=-3)
    if cfg.positional == "rope":
        cos, sin = rotary_angles(positions, cfg.head_dim, base=cfg.rope_base)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q, k, v


def project_out(params: dict, o: Float[Tensor, "*batch heads seq head_dim"]) -> Float[Tensor, "*batch seq d_model"]:
    """Concatenate the heads and mix them back into the residual stream with ``w_o``."""
    return linear(rearrange(o, "... heads seq head_dim -> ... seq (heads head_dim)"), params["w_o"], params.get("b_o"))


def multi_head_attention(
    params: dict,
    x: Float[Tensor, "*batch seq d_model"],
    cfg,
    *,
    positions: Int[Tensor, "*#batch seq"],
    mask: Bool[Tensor, "*#batch seq seq"] | None = None,
    key: Tensor | None = None,
    tap: Tap = NO_TAP,
) -> Float[Tensor, "*batch seq d_model"]:
    """Causal self-attention with ``cfg.n_heads`` query heads sharing ``cfg.n_kv_heads`` key/value heads.

    ``tap`` sees ``q``, ``k``, ``v``, ``pattern`` and ``head_out`` (see ``layers.tap``).
    """
    q, k, v = project_qkv(params, x, cfg, positions)
    if tap.active:
        return tapped_attention(params, q, k, v, cfg, mask=mask, tap=tap)
    o = scaled_dot_product_attention(q, k, v, mask, impl=cfg.attn_impl, dropout=cfg.dropout, key=key)
    return project_out(params, o)


def head_pattern(
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Bool[Tensor, "*#batch seq kv_seq"] | None = None,
) -> Float[Tensor, "*batch heads seq kv_seq"]:
    """Every query head's attention pattern (its softmax rows), with grouped key heads shared as in GQA."""
    kv_heads = k.shape[-3]
    q = rearrange(q, "... (kv_heads group) seq head_dim -> ... kv_heads group seq head_dim", kv_heads=kv_heads)
    pattern = attention_pattern(q, k, None if mask is None else mask[..., None, None, :, :])
    return rearrange(pattern, "... kv_heads group seq kv_seq -> ... (kv_heads group) seq kv_seq")


def head_outputs(params: dict, o: Float[Tensor, "*batch heads seq head_dim"]) -> Float[Tensor, "*batch heads seq d_model"]:
    """Each head's own contribution to the residual stream: its slice of ``w_o`` applied to its output.

    Summed over heads, plus ``b_o``, this is ``project_out``.
    """
    w_o = rearrange(params["w_o"], "(heads head_dim) d_model -> heads head_dim d_model", heads=o.shape[-3])
    return torch.einsum("...hsd,hdm->...hsm", o, w_o)


def tapped_attention(
    params: dict,
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads seq head_dim"],
    v: Float[Tensor, "*batch kv_heads seq head_dim"],
    cfg,
    *,
    mask: Bool[Tensor, "*#batch seq seq"] | None,
    tap: Tap,
) -> Float[Tensor, "*batch seq d_model"]:
    """Attention that shows its insides to ``tap`` (no dropout: this is for looking at a model).

    Where nothing intervenes on the pattern or the head outputs, the output is computed by the very
    kernels ``forward`` uses (the pattern and per-head outputs are then computed beside it, to be
    recorded), so a tapped forward gives the same logits to the last bit. An intervened value is routed
    into the output instead.
    """
    q, k, v = tap("q", q), tap("k", k), tap("v", v)
    pattern = tap("pattern", head_pattern(q, k, mask))
    if tap.intervenes("pattern"):
        grouped = rearrange(pattern, "... (kv_heads group) seq kv_seq -> ... kv_heads group seq kv_seq", kv_heads=k.shape[-3])
        o = rearrange(attend(grouped, v), "... kv_heads group seq head_dim -> ... (kv_heads group) seq head_dim")
    else:
        o = scaled_dot_product_attention(q, k, v, mask, impl=cfg.attn_impl)
    head_out = tap("head_out", head_outputs(params, o))
    if tap.intervenes("head_out"):
        b_o = params.get("b_o")
        out = head_out.sum(dim=-3)
        return out if b_o is None else out + b_o
    return project_out(params, o)


# ---------------------------------------------------------------- with a KV-cache (learning-path step 8)


def write_kv(
    buffer: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    new: Float[Tensor, "*batch kv_heads seq head_dim"],
    index: Int[Tensor, "*batch kv_heads seq head_dim"],
) -> Float[Tensor, "*batch kv_heads kv_seq head_dim"]:
    """A copy of ``buffer`` with ``new`` written at the slots in ``index``; ``buffer`` is left untouched.

    Out-of-place ``scatter`` costs one copy of the buffer (about a ``clone``); measured against
    ``index_copy``, ``index_put`` and ``torch.where`` it is the cheapest way that also lets every row
    write at its own slot.
    """
    return buffer.scatter(-2, index, new.to(buffer.dtype))


def write_kv_(
    buffer: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    new: Float[Tensor, "*batch kv_heads seq head_dim"],
    index: Int[Tensor, "*batch kv_heads seq head_dim"],
) -> Float[Tensor, "*batch kv_heads kv_seq head_dim"]:
    """``write_kv`` in place: ``buffer`` itself, with ``new`` written at the slots in ``index``.

    Eagerly ``scatter_`` is the cheapest write. Under ``torch.compile`` the same write is an
    ``index_put_``, which Inductor performs in place; a ``scatter_`` on a graph input it turns into a
    copy of the whole buffer plus a write back (measured: ~40 us a layer per decode step, seed preset).
    """
    new = new.to(buffer.dtype)
    if not torch.compiler.is_compiling():
        return buffer.scatter_(-2, index, new)
    rows = buffer.reshape(-1, *buffer.shape[-3:])  # a view: the cache buffers are contiguous
    slots = index[..., 0, :, 0].reshape(rows.shape[0], 1, -1)  # [rows, 1, seq]
    row = torch.arange(rows.shape[0], device=buffer.device)[:, None, None]
    head = torch.arange(rows.shape[1], device=buffer.device)[None, :, None]
    rows.index_put_((row, head, slots), new.reshape(rows.shape[0], *new.shape[-3:]))
    return buffer


def multi_head_attention_with_cache(
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
    """Attention of new tokens over the cached ones and themselves; returns the output and the new buffers.

    The new keys/values go into the buffers between ``project_qkv`` and the attention itself. ``mask``
    (key slot <= query slot, built once for all layers; Bool, or an additive 0 / -inf bias) is
    explicit because the queries are fewer than the keys, where SDPA's ``is_causal`` would align
    them wrongly.

    ``donate=True`` writes into ``k_cache``/``v_cache`` in place instead of copying them (JAX's buffer
    donation): only for a caller that owns the buffers and drops the old cache, as ``generate`` does.
    """
    q, k, v = project_qkv(params, x, cfg, positions)
    if donate:
        k_cache = write_kv_(k_cache, k, write_index)
        v_cache = write_kv_(v_cache, v, write_index)
    else:
        k_cache = write_kv(k_cache, k, write_index)
        v_cache = write_kv(v_cache, v, write_index)
    o = scaled_dot_product_attention(q, k_cache, v_cache, mask, impl=cfg.attn_impl)
    return project_out(params, o), k_cache, v_cache
