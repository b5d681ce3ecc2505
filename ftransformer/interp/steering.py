"""Steering vectors (contrastive activation addition): build one from prompt pairs, add it, sweep layer x scale.

* ``steering_vector``: the mean over prompts of a site's activation at each prompt's LAST position (or, with
  ``position="mean"``, its mean over all positions), positive prompts minus negative ones;
* ``steer``: an interventions mapping that adds ``scale * vector`` at the site at every position it sees (for
  ``forward_with_activations``; ``generate(interventions=..., positions=...)`` says which passes see it);
* ``steering_sweep``: a teacher-forced metric for every (layer, scale), as ONE ``torch.func.vmap``.
"""

from collections.abc import Callable, Sequence

import torch
from einops import rearrange, reduce

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.layers.tap import WithTensors
from ftransformer.interp.activations import activation_paths, forward_with_activations
from ftransformer.tree import flatten_with_paths
from ftransformer.shapes import Float, Logits, Tensor, Tokens

POSITIONS = ("last", "mean")  # how steering_vector reads a prompt's positions
Interventions = dict[str, Callable[[Tensor], Tensor]]


def check_site(site: str, cfg: Config) -> None:
    """``ValueError`` unless ``site`` is an activation path with a ``[*batch, seq, width]`` value (not ``attn.*``)."""
    valid = [p for p in activation_paths(cfg) if ".attn." not in p]
    if site not in valid:
        raise ValueError(f"site must be one of {', '.join(valid)}; got {site!r}")


def _site_means(params: dict, tokens: Tensor, cfg: Config, site: str, position: str) -> Float[Tensor, " width"]:
    """The site's activation at each prompt's last position (or over all positions), averaged over prompts."""
    if not isinstance(tokens, Tensor) or tokens.ndim < 2:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"prompt tokens must have shape (prompts, seq), got {got}")
    with torch.no_grad():
        value = flatten_with_paths(forward_with_activations(params, tokens, cfg)[1])[site]
    per_prompt = value[..., -1, :] if position == "last" else reduce(value, "... seq width -> ... width", "mean")
    return reduce(per_prompt, "... width -> width", "mean")


def steering_vector(
    params: dict, cfg: Config, positive_tokens: Tensor, negative_tokens: Tensor, site: str, *, position: str = "last"
) -> Float[Tensor, " width"]:
    """The mean difference of ``site``'s activation between positive and negative prompts (contrastive
    activation addition), read at each prompt's last position (``position="last"``) or averaged over its
    positions (``"mean"``). ``positive_tokens`` / ``negative_tokens``: ``[prompts, seq]`` each (the two
    may differ in both)."""
    check_site(site, cfg)
    validate.one_of("position", position, POSITIONS)
    return _site_means(params, positive_tokens, cfg, site, position) - _site_means(
        params, negative_tokens, cfg, site, position
    )


def add_scaled(v: Tensor, vector: Tensor, scale: Tensor) -> Tensor:
    """``v + scale * vector`` at every position: the steering edit (``steer``), a pure function of its tensors."""
    if v.shape[-1] != vector.shape[0]:
        raise ValueError(f"the steering vector has width {vector.shape[0]}, the site {v.shape[-1]}")
    return v + scale.to(v.dtype) * vector.to(v.dtype)


def steer(vector: Float[Tensor, " width"], site: str, scale: float | Tensor = 1.0) -> Interventions:
    """``{site: v -> v + scale * vector}``: adds the vector at every position of the site's value.

    The edit is a ``WithTensors`` (``add_scaled`` of the vector and the scale as a 0-d tensor), so
    ``generate(..., step="compile")`` takes both as arguments: a new vector or scale reuses the compiled step.
    """
    if not isinstance(vector, Tensor) or vector.ndim != 1:
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(f"vector must be a 1-D tensor (width,), got {got}")
    if not isinstance(site, str):
        raise TypeError(f"site must be an activation path (str), got {type(site).__name__}")
    if not (validate.is_number(scale) or (isinstance(scale, Tensor) and scale.ndim == 0)):
        raise TypeError(f"scale must be a number or a 0-d tensor, got {scale!r}")
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=vector.dtype, device=vector.device)
    return {site: WithTensors(add_scaled, (vector, scale))}


def _check_sweep(vectors_by_layer: dict, scales: Sequence[float], cfg: Config, site: str) -> list[int]:
    """The sweep's layers, sorted, after checking its arguments."""
    if not isinstance(vectors_by_layer, dict) or not vectors_by_layer:
        raise TypeError(f"vectors_by_layer must be a non-empty dict layer -> vector, got {vectors_by_layer!r}")
    for layer, vector in vectors_by_layer.items():
        validate.int_in("layer", layer, 0, cfg.n_layers, high_name="n_layers")
        check_site(f"blocks.{layer}.{site}", cfg)
        if not isinstance(vector, Tensor) or vector.shape != (cfg.d_model,):
            got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(f"the vector of layer {layer} must have shape (d_model,) = ({cfg.d_model},), got {got}")
    if len(scales) == 0 or not all(validate.is_number(s) for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of numbers, got {scales!r}")
    return sorted(vectors_by_layer)


def steering_sweep(
    params: dict,
    cfg: Config,
    tokens: Tokens,
    vectors_by_layer: dict[int, Float[Tensor, " d_model"]],
    scales: Sequence[float],
    metric: Callable[[Logits], Float[Tensor, ""]],
    *,
    site: str = "resid_post",
    chunk_size: int | None = None,
) -> Float[Tensor, "layers scales"]:
    """``metric(logits)`` of the teacher-forced ``tokens`` steered at each layer (rows, in sorted layer order)
    by each scale (columns): ``steer(vector, f"blocks.{layer}.{site}", scale)`` alone per cell.

    ONE ``torch.func.vmap`` over (layer x scale), ``chunk_size`` cells at a time: every cell adds
    ``coef[j] * vector_j`` at every swept layer ``j``, its ``coef`` one-hot (its layer) times its scale.
    """
    layers = _check_sweep(vectors_by_layer, scales, cfg, site)
    vectors = torch.stack([vectors_by_layer[layer] for layer in layers])
    scale = torch.tensor([float(s) for s in scales], dtype=vectors.dtype, device=vectors.device)
    onehot = torch.eye(len(layers), dtype=vectors.dtype, device=vectors.device)
    coefs = rearrange(onehot[:, None, :] * scale[None, :, None], "layers scales k -> (layers scales) k")

    def cell(coef: Float[Tensor, " k"]) -> Float[Tensor, ""]:
        interventions: Interventions = {}
        for j, layer in enumerate(layers):
            interventions |= steer(vectors[j], f"blocks.{layer}.{site}", coef[j])
        out = metric(forward_with_activations(params, tokens, cfg, interventions=interventions)[0])
        if not isinstance(out, Tensor) or out.ndim != 0:
            raise ValueError(f"metric must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}")
        return out

    values = torch.func.vmap(cell, chunk_size=chunk_size)(coefs)
    return rearrange(values, "(layers scales) -> layers scales", layers=len(layers))
