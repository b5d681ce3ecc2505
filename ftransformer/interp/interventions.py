"""Learning-path step 9b: ready-made interventions -- ablate heads, patch in another run, steer.

Each helper returns an ``interventions`` dict (``path -> value -> value``) for
``forward_with_activations``; ``combine`` merges several (two at one path run one after the other).
``head_ablation_sweep`` ablates every head in turn: a ``patch_sweep`` of zeros (or means) into ``attn.head_out``.
"""

from collections.abc import Callable, Sequence

import torch
from einops import reduce

from ftransformer.layers.attention import attention_kernel
from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.patching import replace_sweep
from ftransformer.model import cross_entropy
from ftransformer.shapes import Float, Tensor, Tokens

Interventions = dict[str, Callable[[Tensor], Tensor]]
ABLATIONS = ("zero", "mean")


def combine(*interventions: Interventions) -> Interventions:
    """One dict from several; where two name the same path, the earlier one is applied first."""
    out: Interventions = {}
    for d in interventions:
        for path, fn in d.items():
            if path in out:
                first = out[path]
                out[path] = lambda v, f=first, g=fn: g(f(v))
            else:
                out[path] = fn
    return out


def _check_layer(layer: int, cfg: Config) -> None:
    validate.int_in("layer", layer, 0, cfg.n_layers, high_name="n_layers")


def _head_mask(heads: Sequence[int] | int, cfg: Config) -> Tensor:
    """1.0 for the heads kept, 0.0 for the heads named."""
    heads = [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in heads if not validate.is_int(h) or not 0 <= h < cfg.n_heads]
    if bad:
        raise ValueError(f"heads must be ints in [0, n_heads={cfg.n_heads}), got {bad}")
    keep = torch.ones(cfg.n_heads)
    keep[heads] = 0.0
    return keep


def masked_heads(
    head_out: Float[Tensor, "*batch heads seq d_model"],
    keep: Float[Tensor, " heads"],
    fill: Float[Tensor, "heads d_model"] | None = None,
) -> Float[Tensor, "*batch heads seq d_model"]:
    """``head_out`` with the heads where ``keep`` is 0 replaced by ``fill`` (None: zeros); keep may be fractional."""
    keep = keep.to(head_out.dtype)[:, None, None]
    if fill is None:
        return head_out * keep
    return head_out * keep + fill[:, None, :].to(head_out.dtype) * (1 - keep)


def head_means(head_out: Float[Tensor, "*batch heads seq d_model"]) -> Float[Tensor, "heads d_model"]:
    """Each head's mean output over every batch axis and position (what mean-ablation writes instead)."""
    return reduce(head_out, "... heads seq d_model -> heads d_model", "mean")


def ablate_heads(
    layer: int, heads: Sequence[int] | int, cfg: Config, *, kind: str = "zero", means: Tensor | None = None
) -> Interventions:
    """Knock out ``heads`` of ``layer``: their writes to the residual stream become zero, or their mean.

    Args:
        kind: ``"zero"``, or ``"mean"``: each head's output averaged over a reference run -- ``means``
            (``[heads, d_model]``, e.g. ``head_means(acts["blocks"][layer]["attn"]["head_out"])``),
            or, when None, over the batch and positions of the very run being ablated.
    """
    _check_layer(layer, cfg)
    validate.one_of("kind", kind, ABLATIONS)
    keep = _head_mask(heads, cfg)

    def ablate(v: Tensor) -> Tensor:
        fill = None if kind == "zero" else (head_means(v) if means is None else means)
        return masked_heads(v, keep.to(v.device), fill)

    return {f"blocks.{layer}.attn.head_out": ablate}


def patch(
    path: str, source: Tensor, *, positions: Sequence[int] | int | None = None, heads: Sequence[int] | int | None = None
) -> Interventions:
    """Activation patching: the value at ``path`` replaced by ``source`` (from another run's ``acts``).

    ``positions`` (the ``seq`` axis, second from last in every site) and ``heads`` (the ``heads`` axis
    of the ``attn.*`` sites) limit the patch to a slice; None patches all of it.
    """

    def replace(v: Tensor) -> Tensor:
        if source.shape != v.shape:
            raise ValueError(f"patch source for {path!r} has shape {tuple(source.shape)}, the site {tuple(v.shape)}")
        out = v.clone()
        index = [slice(None)] * v.ndim
        if positions is not None:
            index[-2] = [positions] if isinstance(positions, int) else list(positions)
        if heads is not None:
            if v.ndim < 3:
                raise ValueError(f"heads= needs a site with a heads axis (attn.*), {path!r} has none")
            index[-3] = [heads] if isinstance(heads, int) else list(heads)
        if positions is not None and heads is not None:
            # Two list indices would pair up element-wise; take the rectangle instead.
            mask = torch.zeros(v.shape[-3:-1], dtype=torch.bool, device=v.device)
            mask[index[-3], :] = True
            mask[:, ~torch.isin(torch.arange(v.shape[-2]), torch.tensor(index[-2]))] = False
            return torch.where(mask[..., None], source.to(v.dtype), v)
        out[tuple(index)] = source[tuple(index)].to(v.dtype)
        return out

    return {path: replace}


def steer(
    layer: int, vector: Float[Tensor, " d_model"], cfg: Config, *, scale: float = 1.0, site: str = "resid_post",
    positions: Sequence[int] | int | None = None,
) -> Interventions:
    """Add ``scale * vector`` to the residual stream at ``blocks.{layer}.{site}`` (activation steering).

    ``site`` is ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``; ``positions`` None adds it everywhere.
    """
    _check_layer(layer, cfg)
    sites = ("resid_pre", "resid_mid", "resid_post")
    validate.one_of("site", site, sites)
    if not isinstance(vector, Tensor) or vector.shape != (cfg.d_model,):
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(f"vector must have shape (d_model,) = ({cfg.d_model},), got {got}")

    def add(v: Tensor) -> Tensor:
        delta = scale * vector.to(v.dtype)
        if positions is None:
            return v + delta
        where = torch.zeros(v.shape[-2], 1, dtype=v.dtype, device=v.device)
        where[positions] = 1.0
        return v + where * delta

    return {f"blocks.{layer}.{site}": add}


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def head_ablation_sweep(
    params: dict,
    tokens: Tokens,
    targets: Tokens,
    cfg: Config,
    *,
    kind: str = "zero",
    chunk_size: int | None = None,
) -> Float[Tensor, "layers heads"]:
    """The loss change from ablating each head alone: ``[layers, heads]``, positive where a head helps.

    A ``patch_sweep`` of ``attn.head_out`` by layer x head whose source is zeros (or each head's mean
    output over the clean run of the same tokens): each layer's ablated runs are ONE ``torch.func.vmap``
    over a stack of head masks, starting at that layer from the clean run's cached residual stream and
    head outputs (the ablated layer's queries, keys and pattern are not recomputed: only ``head_out``
    changes), ``chunk_size`` of them at a time.
    """
    validate.one_of("kind", kind, ABLATIONS)
    clean_logits, clean = forward_with_activations(params, tokens, cfg)
    base = cross_entropy(clean_logits, targets)
    outs = [b["attn"]["head_out"] for b in clean["blocks"]]
    fills = [torch.zeros_like(o) if kind == "zero" else head_means(o)[:, None, :] for o in outs]

    def loss(logits: Tensor) -> Float[Tensor, ""]:
        return cross_entropy(logits, targets)

    losses = replace_sweep(
        params, tokens, fills, loss, cfg, site="attn.head_out", by=("layer", "head"), chunk=chunk_size, run=(clean_logits, clean)
    )
    return losses - base
