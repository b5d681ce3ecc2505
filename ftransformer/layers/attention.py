"""Learning-path steps 2 and 3: causal scaled dot-product attention, then many heads (MHA / GQA / MQA).

Two interchangeable kernels compute the same numbers (to rounding):

* ``"einsum"`` writes attention out -- scores, mask, softmax, weighted sum -- and can hand back the
  pattern. It is the path to read, and the one every ``torch.func`` transform can batch and differentiate
  twice.
* ``"sdpa"`` calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, fast).

The kernel is how attention is computed, not what the model is, so it is not part of ``Config``: each
call picks it (``kernel_here``). By default (``"auto"``) that is ``"sdpa"``, except under ``vmap``,
``jvp`` or a second ``grad``, where the fused kernel has no batching rule for its backward or no double
backward and the einsum path runs instead. ``with attention_kernel("einsum"):`` (or ``"sdpa"``) fixes it
for the calls inside: e.g. to compare a vmapped run with a plain one to the last bit, or to time both.

Who may see whom is never decided here: every function takes the ``Mask`` (``layers.masks``) and the
rotary tables (``layers.embedding.rotary_tables``) its caller built once for the whole forward pass.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from ftransformer import random
from ftransformer.layers.embedding import Rotary, apply_rotary
from ftransformer.layers.linear import init_normal, linear
from ftransformer.layers.masks import Mask
from ftransformer.layers.norm import init_norm, norm
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.shapes import Bool, Float, Int, Key, Residual, Tensor, einsum_equation
from ftransformer.tracing import compiling, transforms
from ftransformer.validate import one_of

# torch.einsum equations, written in the glossary's words (translated once, here).
SCORES = einsum_equation(
    "... kv_heads group seq head_dim, ... kv_heads kv_seq head_dim -> ... kv_heads group seq kv_seq"
)
WEIGHTED_SUM = einsum_equation(
    "... kv_heads group seq kv_seq, ... kv_heads kv_seq head_dim -> ... kv_heads group seq head_dim"
)
PER_HEAD_OUT = einsum_equation("... heads seq head_dim, heads head_dim d_model -> ... heads seq d_model")


def attention_pattern(
    q: Float[Tensor, "*batch kv_heads group seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Bool[Tensor, "... seq kv_seq"] | Float[Tensor, "... seq kv_seq"],
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "*batch kv_heads group seq kv_seq"]:
    """softmax(q k^T / sqrt(head_dim)) over keys; ``mask`` False hides a key.

    A float ``mask`` is added to the scores instead (0 to keep a key, -inf to hide it). It broadcasts
    against the scores: a batched mask needs its ``kv_heads`` and ``group`` axes (of size 1).
    ``scale`` replaces ``1 / sqrt(head_dim)``; ``softcap`` caps the scores smoothly, ``softcap *
    tanh(scores / softcap)``, before the mask (``Attention(scale=..., softcap=...)``).
    """
    scores = torch.einsum(SCORES, q, k)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    return scores.softmax(dim=-1)


def attend(
    pattern: Float[Tensor, "*batch kv_heads group seq kv_seq"], v: Float[Tensor, "*batch kv_heads kv_seq head_dim"]
) -> Float[Tensor, "*batch kv_heads group seq head_dim"]:
    """Each query's weighted sum of the values."""
    return torch.einsum(WEIGHTED_SUM, pattern, v)


def group_heads(
    q: Float[Tensor, "*batch heads seq head_dim"], kv_heads: int
) -> Float[Tensor, "*batch kv_heads group seq head_dim"]:
    """Query heads in groups, one per key/value head (GQA): head ``h`` reads key/value head ``h // group``."""
    return rearrange(q, "... (kv_heads group) seq head_dim -> ... kv_heads group seq head_dim", kv_heads=kv_heads)


def ungroup_heads(o: Float[Tensor, "*batch kv_heads group seq head_dim"]) -> Float[Tensor, "*batch heads seq head_dim"]:
    """The inverse of ``group_heads``: the heads' outputs side by side again."""
    return rearrange(o, "... kv_heads group seq head_dim -> ... (kv_heads group) seq head_dim")


KERNELS = ("auto", "sdpa", "einsum")
_CHOSEN = ["auto"]  # the innermost attention_kernel(...) choice last


@contextmanager
def attention_kernel(kernel: str) -> Iterator[None]:
    """Run the attention of every call inside on ``kernel`` (``"sdpa"``, ``"einsum"``, or ``"auto"``: the
    default rule of ``kernel_here``). Nests; a process-wide setting, like ``torch.nn.attention.sdpa_kernel``."""
    one_of("kernel", kernel, KERNELS)
    _CHOSEN.append(kernel)
    try:
        yield
    finally:
        _CHOSEN.pop()


def kernel_here() -> str:
    """The kernel attention runs on at this call: ``attention_kernel``'s choice, else ``"einsum"`` under a
    ``torch.func`` transform that needs it (``vmap``, ``jvp``, ``grad`` of ``grad``), else ``"sdpa"``."""
    if _CHOSEN[-1] != "auto":
        return _CHOSEN[-1]
    active = transforms()
    needs_einsum = "vmap" in active or "jvp" in active or active.count("grad") > 1
    return "einsum" if needs_einsum else "sdpa"


def scaled_dot_product_attention(
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    v: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Mask,
    *,
    impl: str = "auto",
    dropout: float = 0.0,
    key: Key | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "*batch heads seq head_dim"]:
    """Attention of every query head over its key/value head, hiding the keys ``mask`` hides.

    ``impl``: the kernel (``KERNELS``); ``"auto"`` takes ``kernel_here()``'s. With ``key`` given and ``dropout > 0`` the pattern is dropped out with that key, on the einsum path
    (the fused kernel draws from torch's global generator, which explicit keys rule out). ``scale`` and
    ``softcap``: see ``attention_pattern``; soft-capping always takes the einsum path.
    """
    kv_heads = k.shape[-3]
    if impl == "auto":
        impl = kernel_here()
    one_of("impl", impl, KERNELS[1:])
    if impl == "sdpa" and (key is None or dropout == 0.0) and softcap is None:
        group = q.shape[-3] // kv_heads
        if group > 1:
            k = repeat(k, "... kv_heads kv_seq head_dim -> ... (kv_heads group) kv_seq head_dim", group=group)
            v = repeat(v, "... kv_heads kv_seq head_dim -> ... (kv_heads group) kv_seq head_dim", group=group)
        if mask.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed.unsqueeze(-3), scale=scale)
    pattern = attention_pattern(
        group_heads(q, kv_heads), k, mask.allowed[..., None, None, :, :], scale=scale, softcap=softcap
    )
    return ungroup_heads(attend(random.dropout(pattern, dropout, key), v))


def project_qkv(params: dict, x: Residual, cfg, rotary: Rotary | None = None) -> tuple[
    Float[Tensor, "*batch heads seq head_dim"],
    Float[Tensor, "*batch kv_heads seq head_dim"],
    Float[Tensor, "*batch kv_heads seq head_dim"],
]:
    """Queries, keys and values from one fused projection ``w_qkv``; with ``cfg.attention.qk_norm`` q and k
    RMS-normalised per head; ``rotary`` applied to q and k (RoPE)."""
    qkv = linear(x, params["w_qkv"], params.get("b_qkv"))
    whole = cfg.attention.qk_norm and cfg.attention.qk_norm_over == "projection"
    if whole:  # OLMo-2: q and k each normalised over all their heads' channels at once
        widths = [n * cfg.head_dim for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
        q, k, v = qkv.split(widths, dim=-1)
        qkv = torch.cat([norm(params["q_norm"], q, cfg.norm), norm(params["k_norm"], k, cfg.norm), v], dim=-1)
    # w_qkv's columns are n_heads query heads, then n_kv_heads key heads, then n_kv_heads value heads:
    # one rearrange into heads and a split along them gives the same views as three rearranges, in
    # half the time (per-call overhead is what bounds one-token decoding).
    qkv = rearrange(qkv, "... seq (heads head_dim) -> ... heads seq head_dim", head_dim=cfg.head_dim)
    q, k, v = qkv.split([cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads], dim=-3)
    if cfg.attention.qk_norm and not whole:
        # Qwen3: every head's query and key RMS-normalised over head_dim, before the rotation.
        q = norm(params["q_norm"], q, cfg.norm)
        k = norm(params["k_norm"], k, cfg.norm)
    if cfg.positional.kind == "rope":
        if rotary is None:
            raise ValueError("cfg.positional='rope' needs the rotary tables: rotary=rotary_tables(positions, cfg)")
        q, k = (apply_rotary(t, *rotary, in_float32=cfg.positional.float32) for t in (q, k))
    return q, k, v


def project_out(params: dict, o: Float[Tensor, "*batch heads seq head_dim"]) -> Residual:
    """Concatenate the heads and mix them back into the residual stream with ``w_o``."""
    return linear(rearrange(o, "... heads seq head_dim -> ... seq (heads head_dim)"), params["w_o"], params.get("b_o"))


def multi_head_attention(
    params: dict,
    x: Residual,
    cfg,
    *,
    mask: Mask,
    rotary: Rotary | None = None,
    key: Key | None = None,
    tap: Tap = NO_TAP,
) -> Residual:
    """Self-attention with ``cfg.n_heads`` query heads sharing ``cfg.n_kv_heads`` key/value heads.

    ``mask`` (``self_mask(positions)``) and ``rotary`` (``rotary_tables(positions, cfg)``, needed for
    ``cfg.positional="rope"``) come from the caller. ``tap`` sees ``q``, ``k``, ``v``, ``pattern`` and
    ``head_out`` (see ``layers.tap``).
    """
    q, k, v = project_qkv(params, x, cfg, rotary)
    if tap.active:
        return tapped_attention(params, q, k, v, cfg, mask=mask, tap=tap)
    o = scaled_dot_product_attention(q, k, v, mask, dropout=cfg.dropout, key=key, **scores(cfg))
    return project_out(params, o)


def scores(cfg) -> dict:
    """The config's ``scale`` and ``softcap`` of the attention scores, as keyword arguments."""
    return dict(scale=cfg.attention.scale, softcap=cfg.attention.softcap)


def head_pattern(
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads kv_seq head_dim"],
    mask: Mask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "*batch heads seq kv_seq"]:
    """Every query head's attention pattern (its softmax rows), with grouped key heads shared as in GQA."""
    pattern = attention_pattern(
        group_heads(q, k.shape[-3]), k, mask.allowed[..., None, None, :, :], scale=scale, softcap=softcap
    )
    return rearrange(pattern, "... kv_heads group seq kv_seq -> ... (kv_heads group) seq kv_seq")


def head_outputs(params: dict, o: Float[Tensor, "*batch heads seq head_dim"]) -> Float[Tensor, "*batch heads seq d_model"]:
    """Each head's own contribution to the residual stream: its slice of ``w_o`` applied to its output.

    Summed over heads, plus ``b_o``, this is ``project_out``.
    """
    w_o = rearrange(params["w_o"], "(heads head_dim) d_model -> heads head_dim d_model", heads=o.shape[-3])
    return torch.einsum(PER_HEAD_OUT, o, w_o)


def tapped_attention(
    params: dict,
    q: Float[Tensor, "*batch heads seq head_dim"],
    k: Float[Tensor, "*batch kv_heads seq head_dim"],
    v: Float[Tensor, "*batch kv_heads seq head_dim"],
    cfg,
    *,
    mask: Mask,
    tap: Tap,
) -> Residual:
    """Attention that shows its insides to ``tap`` (no dropout: this is for looking at a model).

    Where nothing intervenes on the pattern or the head outputs, the output is computed by the very
    kernels ``forward`` uses (the pattern and per-head outputs are then computed beside it, to be
    recorded), so a tapped forward gives the same logits to the last bit. An intervened value is routed
    into the output instead.
    """
    q, k, v = tap("q", q), tap("k", k), tap("v", v)
    pattern = tap("pattern", head_pattern(q, k, mask, **scores(cfg)))
    if tap.intervenes("pattern"):
        kv_heads = k.shape[-3]
        grouped = rearrange(pattern, "... (kv_heads group) seq kv_seq -> ... kv_heads group seq kv_seq", kv_heads=kv_heads)
        o = ungroup_heads(attend(grouped, v))
    else:
        o = scaled_dot_product_attention(q, k, v, mask, **scores(cfg))
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

    Only for a caller that owns the buffers and drops the old cache (JAX's buffer donation), as the
    decode loops do through ``model.forward_with_cache_in_place``.

    Eagerly ``scatter_`` is the cheapest write. Under ``torch.compile`` the same write is an
    ``index_put_``, which Inductor performs in place; a ``scatter_`` on a graph input it turns into a
    copy of the whole buffer plus a write back (measured: ~40 us a layer per decode step, seed preset).
    """
    new = new.to(buffer.dtype)
    if not compiling():
        return buffer.scatter_(-2, index, new)
    rows = buffer.reshape(-1, *buffer.shape[-3:])  # a view: the cache buffers are contiguous
    slots = index[..., 0, :, 0].reshape(rows.shape[0], 1, -1)  # [rows, 1, seq]
    row = torch.arange(rows.shape[0], device=buffer.device)[:, None, None]
    head = torch.arange(rows.shape[1], device=buffer.device)[None, :, None]
    rows.index_put_((row, head, slots), new.reshape(rows.shape[0], *new.shape[-3:]))
    return buffer


KVWrite = Callable[[Tensor, Tensor, Tensor], Tensor]


def multi_head_attention_with_cache(
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
) -> tuple[
    Residual, Float[Tensor, "*batch kv_heads kv_seq head_dim"], Float[Tensor, "*batch kv_heads kv_seq head_dim"]
]:
    """Attention of new tokens over the cached ones and themselves; returns the output and the new buffers.

    The new keys/values go into the buffers (by ``write``: ``write_kv``, or ``write_kv_`` in place)
    between ``project_qkv`` and the attention itself. ``mask`` is ``cache_mask(slots, ...)``: explicit,
    because the queries are fewer than the keys, where SDPA's ``is_causal`` would align them wrongly.
    """
    q, k, v = project_qkv(params, x, cfg, rotary)
    k_cache, v_cache = write(k_cache, k, write_index), write(v_cache, v, write_index)
    o = scaled_dot_product_attention(q, k_cache, v_cache, mask, **scores(cfg))
    return project_out(params, o), k_cache, v_cache


def init_attention(cfg, gen: torch.Generator, *, std: float, out_std: float) -> dict:
    """An attention layer's parameters: ``w_qkv`` (+ ``b_qkv``), ``w_o`` (+ ``b_o``), and the q/k norms of
    ``Attention(qk_norm=True)`` (over each head, or over the whole projections)."""
    qkv_width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    attn = {"w_qkv": init_normal(gen, (cfg.d_model, qkv_width), std)}
    if cfg.bias or cfg.attention.qkv_bias:
        attn["b_qkv"] = torch.zeros(qkv_width)
    attn["w_o"] = init_normal(gen, (cfg.n_heads * cfg.head_dim, cfg.d_model), out_std)
    if cfg.bias:
        attn["b_o"] = torch.zeros(cfg.d_model)
    if cfg.attention.qk_norm:
        whole = cfg.attention.qk_norm_over == "projection"  # one norm over all heads' channels (OLMo-2)
        attn["q_norm"] = init_norm(cfg.norm, cfg.head_dim * (cfg.n_heads if whole else 1), bias=cfg.bias)
        attn["k_norm"] = init_norm(cfg.norm, cfg.head_dim * (cfg.n_kv_heads if whole else 1), bias=cfg.bias)
    return attn


def check_heads_separate(cfg, what: str) -> None:
    """``ValueError`` naming why, unless each head's q and k are computed from the residual on their own (no
    q/k norm over every head's channels): for a consumer (``what``) that feeds each head its own input."""
    over = cfg.attention.qk_norm_over
    if cfg.attention.qk_norm and over != "head":
        raise ValueError(
            f"{what} supports Attention.qk_norm_over='head' only (a norm over every head's channels mixes the heads' "
            f"inputs), got {over!r}"
        )


def check_scores_bilinear(cfg, what: str) -> None:
    """``ValueError`` unless every score is bilinear in the query's and the key's residuals (no q/k norm)."""
    if cfg.attention.qk_norm:
        raise ValueError(f"{what}: q/k norms make scores nonlinear in the residual, got Attention.qk_norm=True")
