"""Learning-path step 6: the complete model -- embed, a stack of blocks, unembed -- and its loss.

Step 8 adds ``forward_with_cache``: the same model over new tokens and a KV-cache of the old ones.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ftransformer import random
from ftransformer.cache import KVCache, check_cache, check_room, query_slots, write_index
from ftransformer.config import Config
from ftransformer.layers.attention import KVWrite, write_kv, write_kv_
from ftransformer.layers.block import block, block_with_cache
from ftransformer.layers.embedding import Rotary, embed_tokens, learned_positions, rotary_tables, sinusoidal_positions
from ftransformer.layers.adapter import Adapted
from ftransformer.layers.int8 import Int8Weight
from ftransformer.layers.linear import init_normal, linear
from ftransformer.layers.masks import Mask, cache_mask, document_positions, layer_masks, self_mask
from ftransformer.layers.norm import init_norm, norm
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.shapes import Float, Int, Key, Logits, Residual, Tensor, Tokens
from ftransformer.tracing import is_tracing


def check_ids(name: str, ids: Tensor, limit: int, *, allowed: int | None = None) -> None:
    """Raise ``ValueError`` naming the first id outside ``[0, limit)`` (``allowed`` is let through, e.g. padding)."""
    if is_tracing(ids) or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= limit)
    if allowed is not None:
        bad &= ids != allowed
    if bool(bad.any()):
        value = int(ids[bad].flatten()[0])
        raise ValueError(f"{name} contains id {value}, outside [0, vocab_size={limit})")


def check_tokens(tokens: Tensor, cfg: Config, *, name: str = "tokens") -> None:
    """Type, rank, length and value checks for token ids entering the model."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}")
    if tokens.ndim == 0:
        raise ValueError(f"{name} must have shape (*batch, seq), got a scalar")
    seq = tokens.shape[-1]
    if seq == 0:
        raise ValueError(f"{name} has seq=0; need at least one token")
    if seq > cfg.max_seq_len:
        raise ValueError(f"{name} has seq={seq} but max_seq_len={cfg.max_seq_len}")
    check_ids(name, tokens, cfg.vocab_size)


def embed(
    params: dict, tokens: Tokens, cfg: Config, *, positions: Int[Tensor, "*#batch seq"], key: Key | None = None
) -> Residual:
    """Token embeddings plus absolute positions (rotary positions are added inside attention instead)."""
    x = embed_tokens(params["embed"]["tokens"], tokens)
    if cfg.embeddings.scale:
        # transformers rounds sqrt(d_model) to float32, then to the embeddings' dtype, then multiplies.
        x = x * torch.tensor(cfg.d_model**0.5, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    if cfg.positional.kind == "learned":
        x = x + learned_positions(params["embed"]["positions"], positions)
    elif cfg.positional.kind == "sinusoidal":
        x = x + sinusoidal_positions(positions, cfg.d_model, base=cfg.positional.base, dtype=x.dtype)
    return random.dropout(x, cfg.dropout, key)


def final_norm(params: dict, x: Residual, cfg: Config, *, inv: Float[Tensor, "*#batch #seq 1"] | None = None) -> Residual:
    """The norm the unembedding reads through: ``ln_f`` (none under post-LN, whose blocks end normed);
    ``inv`` freezes its divisor (see ``layers.norm.norm``)."""
    return norm(params["ln_f"], x, cfg.norm, inv=inv) if cfg.layout.final_norm else x


def unembedding(params: dict, cfg: Config) -> Float[Tensor, "d_model vocab"] | Int8Weight | Adapted:
    """The unembedding's weight, ``[d_model, vocab]``: the token embedding's transpose when the two are tied."""
    return params["embed"]["tokens"].t() if cfg.embeddings.tie else params["unembed"]["w"]


def untie(params: dict, cfg: Config) -> tuple[dict, Config]:
    """The same model with its own unembedding ``unembed.w`` (a copy of the token embedding's transpose) when the
    two are tied; ``(params, cfg)`` as they are otherwise. The input tree is not modified."""
    if not cfg.embeddings.tie:
        return params, cfg
    params = dict(params, unembed={"w": params["embed"]["tokens"].t().clone()})
    return params, cfg.replace(embeddings=cfg.embeddings.replace(tie=False))


def check_uncapped(cfg: Config, what: str) -> None:
    """``ValueError`` unless the logits are the projection's own, uncapped: moving every logit of a position by
    the same amount then leaves the softmax as it is."""
    cap = cfg.embeddings.logit_softcap
    if cap is not None:
        raise ValueError(
            f"{what} supports Config.embeddings.logit_softcap=None only (under the tanh cap a shift of every logit "
            f"changes the softmax), got {cap!r}"
        )


def init_head(cfg: Config, gen: torch.Generator) -> dict:
    """The parameters after the blocks: ``ln_f`` (all but post-LN) and, untied, ``unembed.w`` [d_model, vocab]."""
    head = {"ln_f": init_norm(cfg.norm, cfg.d_model, bias=cfg.bias)} if cfg.layout.final_norm else {}
    if not cfg.embeddings.tie:
        head["unembed"] = {"w": init_normal(gen, (cfg.d_model, cfg.vocab_size), cfg.init_std)}
    return head


def unembed(params: dict, x: Residual, cfg: Config, *, tap: Tap = NO_TAP) -> Logits:
    """Final norm (all but post-LN) and the projection to one logit per token id, soft-capped with
    ``cfg.embeddings.logit_softcap``; ``tap`` sees ``final``, the residual the projection reads."""
    x = tap("final", final_norm(params, x, cfg))
    logits = linear(x, unembedding(params, cfg))
    if cfg.embeddings.logit_softcap is not None:
        logits = torch.tanh(logits / cfg.embeddings.logit_softcap) * cfg.embeddings.logit_softcap
    return logits


def default_positions(tokens: Tokens) -> Int[Tensor, " seq"]:
    """0, 1, ..., seq-1, shared by every row (layers broadcast it over the batch axes)."""
    return torch.arange(tokens.shape[-1], device=tokens.device)


def forward(
    params: dict, tokens: Tokens, cfg: Config, *, key: Key | None = None, documents: Tokens | None = None
) -> Logits:
    """Logits for the next token at every position. ``key`` turns dropout on (training); None is eval.
    ``documents`` (ids per token, shaped like ``tokens``) packs several documents per row: no attention
    across them, positions restarting at each."""
    check_tokens(tokens, cfg)
    check_documents(documents, tokens)
    return forward_unchecked(params, tokens, cfg, key=key, documents=documents)


def check_documents(documents: object, tokens: Tokens) -> None:
    """``documents`` is None or an integer tensor shaped like ``tokens``."""
    if documents is None:
        return
    if not isinstance(documents, Tensor) or documents.dtype.is_floating_point or documents.dtype == torch.bool:
        got = getattr(documents, "dtype", type(documents).__name__)
        raise TypeError(f"documents must be an integer tensor, got {got}")
    if documents.shape != tokens.shape:
        raise ValueError(f"documents has shape {tuple(documents.shape)} but tokens has shape {tuple(tokens.shape)}")


def layer_rotaries(positions: Int[Tensor, "*#batch seq"], cfg: Config) -> tuple[Rotary | None, ...]:
    """One rotary table per layer, built once per call: one for all layers, or (``cfg.positional.window_base``)
    one for the windowed layers and one for the rest."""
    if cfg.positional.window_base is None:
        return (rotary_tables(positions, cfg),) * cfg.n_layers
    built = {}
    for windowed in dict.fromkeys(cfg.layer_window(i) is not None for i in range(cfg.n_layers)):
        built[windowed] = rotary_tables(positions, cfg, windowed=windowed)
    return tuple(built[cfg.layer_window(i) is not None] for i in range(cfg.n_layers))


class BlockInputs(NamedTuple):
    """What the blocks of one cache-less pass read besides the residual stream: built once per call (the masks
    and rotary tables, one per layer, depend on positions only)."""

    positions: Int[Tensor, "*#batch seq"]
    masks: tuple[Mask, ...]
    rotaries: tuple[Rotary | None, ...]


def block_inputs(tokens: Tokens, cfg: Config, documents: Tokens | None = None) -> BlockInputs:
    """The ``BlockInputs`` of a cache-less pass over ``tokens`` (packed ``documents``: see ``forward``)."""
    positions = default_positions(tokens) if documents is None else document_positions(documents)
    masks = layer_masks(cfg, lambda w: self_mask(positions, w, documents))
    return BlockInputs(positions, masks, layer_rotaries(positions, cfg))


def forward_unchecked(
    params: dict, tokens: Tokens, cfg: Config, *, key: Key | None = None, tap: Tap = NO_TAP,
    documents: Tokens | None = None,
) -> Logits:
    """``forward`` without the input checks. ``tap`` sees ``embed``, then every block's values under
    ``blocks.{i}.``, then ``final`` (``interp.forward_with_activations`` passes one)."""
    inputs = block_inputs(tokens, cfg, documents)
    masks, rotaries = inputs.masks, inputs.rotaries
    keys = [None] * (cfg.n_layers + 1) if key is None else random.split(key, cfg.n_layers + 1)
    x = tap("embed", embed(params, tokens, cfg, positions=inputs.positions, key=keys[0]))
    for i, block_params in enumerate(params["blocks"]):
        x = block(block_params, x, cfg, mask=masks[i], rotary=rotaries[i], key=keys[i + 1], tap=tap.scope(f"blocks.{i}"))
    return unembed(params, x, cfg, tap=tap)


def check_seq_lengths(seq_lengths: object, tokens: Tokens, *, name: str = "seq_lengths") -> None:
    """The one rule for how many of each row's tokens are real: an integer tensor of shape ``(*batch,)``
    with values in ``[0, seq]`` (None: all of them). The value check is skipped while tracing."""
    if seq_lengths is None:
        return
    if isinstance(seq_lengths, Tensor) and (seq_lengths.dtype.is_floating_point or seq_lengths.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {seq_lengths.dtype}")
    if not isinstance(seq_lengths, Tensor) or seq_lengths.shape != tokens.shape[:-1]:
        got = tuple(seq_lengths.shape) if isinstance(seq_lengths, Tensor) else type(seq_lengths).__name__
        raise ValueError(f"{name} must be a tensor of shape (*batch,) = {tuple(tokens.shape[:-1])}, got {got}")
    seq = tokens.shape[-1]
    if not is_tracing(seq_lengths) and bool(((seq_lengths < 0) | (seq_lengths > seq)).any()):
        raise ValueError(f"{name} must lie in [0, seq={seq}], got {seq_lengths.tolist()}")


def forward_with_cache(
    params: dict, tokens: Tokens, cache: KVCache, cfg: Config, *, seq_lengths: Int[Tensor, "*batch"] | None = None,
    tap: Tap = NO_TAP,
) -> tuple[Logits, KVCache]:
    """Logits for ``tokens`` placed after what ``cache`` holds, and the new cache (the old one is untouched).

    One function for a whole prompt (prefill), a prompt in chunks, and one token at a time (decode).
    ``seq_lengths`` says how many of each row's tokens are real (the rest is right padding, whose
    logits are meaningless); None means all of them. ``tap`` sees ``embed``, the residual stream and MLP values
    under ``blocks.{i}.``, and ``final`` (not the attention's: ``generation`` passes one to intervene).
    """
    check_tokens(tokens, cfg)
    check_cache(cache, cfg, tokens, params)
    check_room(cache.lengths, tokens.shape[-1], cache.max_len)
    check_seq_lengths(seq_lengths, tokens)
    return forward_with_cache_in_place(params, tokens, cache, cfg, seq_lengths=seq_lengths, write=write_kv, tap=tap)


def forward_with_cache_in_place(
    params: dict,
    tokens: Tokens,
    cache: KVCache,
    cfg: Config,
    *,
    seq_lengths: Int[Tensor, "*batch"] | None = None,
    write: KVWrite = write_kv_,
    layer: Callable | None = None,
    tap: Tap = NO_TAP,
) -> tuple[Logits, KVCache]:
    """The decode loops' fast path: ``forward_with_cache`` unchecked, writing ``cache``'s buffers in place.

    Only for a loop that owns its cache and never uses the old one again (JAX's buffer donation): the
    decode steps (``decode_steps``, ``speculative``). It checks nothing (the loop checked its inputs once).
    ``forward_with_cache`` shares this body with ``write=write_kv`` (a new cache, the old one untouched).
    ``layer`` runs each block (None: ``block_with_cache``; or that compiled once for all layers: ``decode_steps``);
    an active ``tap`` (see ``forward_with_cache``) is passed to it, so only ``block_with_cache`` takes one.
    """
    layer = block_with_cache if layer is None else layer  # looked up per call, not frozen at import
    seq = tokens.shape[-1]
    # Everything position-dependent is built once here and shared by all layers: it is the per-op
    # overhead, not the arithmetic, that bounds one-token decoding.
    slots = query_slots(cache.lengths, seq)
    # A sliding window is a mask over the whole cache: keys older than the window stay, invisible.
    masks = layer_masks(cfg, lambda w: cache_mask(slots, cache.max_len, cache.k[0].dtype, w))
    rotaries = layer_rotaries(slots, cfg)
    index = write_index(slots, cfg.n_kv_heads, cfg.head_dim)
    x = tap("embed", embed(params, tokens, cfg, positions=slots))
    new_k, new_v = [], []
    layers = zip(params["blocks"], cache.k, cache.v, masks, rotaries)
    for i, (block_params, k_cache, v_cache, mask, rotary) in enumerate(layers):
        tapped = {"tap": tap.scope(f"blocks.{i}")} if tap.active else {}
        x, k_cache, v_cache = layer(
            block_params, x, cfg, mask=mask, rotary=rotary, k_cache=k_cache, v_cache=v_cache, write_index=index,
            write=write, **tapped,
        )
        new_k.append(k_cache)
        new_v.append(v_cache)
    lengths = cache.lengths + (seq if seq_lengths is None else seq_lengths)
    return unembed(params, x, cfg, tap=tap), KVCache(tuple(new_k), tuple(new_v), lengths)


def cross_entropy(
    logits: Logits,
    targets: Tokens,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Float[Tensor, ""]:
    """Next-token cross-entropy; targets equal to ``ignore_index`` (padding) count for nothing.

    ``reduction="mean"`` averages over counted tokens; ``"sum"`` adds them (for token-weighted
    gradient accumulation).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # Low-precision logits are lifted to float32 for the log-sum-exp; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


def loss_fn(
    params: dict,
    tokens: Tokens,
    targets: Tokens,
    cfg: Config,
    *,
    key: Key | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    documents: Tokens | None = None,
) -> Float[Tensor, ""]:
    """Mean (or summed) next-token cross-entropy of ``forward`` (packed ``documents``) against ``targets``."""
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but tokens has shape {tuple(tokens.shape)}")
    check_ids("targets", targets, cfg.vocab_size, allowed=ignore_index)
    logits = forward(params, tokens, cfg, key=key, documents=documents)
    return cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
