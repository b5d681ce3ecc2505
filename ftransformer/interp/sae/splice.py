"""Splicing an SAE into the model: an intervention that replaces a site with the SAE's reconstruction.

The SAE reads the site's value times ``scale`` (the normalization fitted on its training activations)
and its reconstruction is divided by ``scale`` on the way back. Position 0 is left as it was: SAEs are
trained without it (its activations are outliers in most models), so splicing it would test the SAE
on data it never saw.

``error_term=True`` writes ``x_hat + (x - x_hat)``, the clean value, with the error held as a constant
(SAELens' error term): the logits are the clean ones exactly -- it is computed as
``x + (x_hat - stop_gradient(x_hat))``, whose value is ``x`` to the bit -- while gradients still reach
the SAE's latents, for attribution through them.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ftransformer.interp.sae.architectures import SAEConfig, decode, encode


def reconstruct(
    sae: dict, x: Float[Tensor, "*batch d_in"], hp: dict, cfg: SAEConfig, *, scale: float | Tensor = 1.0
) -> tuple[Float[Tensor, "*batch d_in"], Float[Tensor, "*batch d_sae"]]:
    """``(x_hat, acts)``: the reconstruction of ``x`` in the site's own units, and the latent activations."""
    acts = encode(sae, x * scale, hp, cfg)
    return decode(sae, acts) / scale, acts


def splice_value(v: Float[Tensor, "*batch seq d_in"], x_hat: Float[Tensor, "*batch seq d_in"], *,
                 error_term: bool = False, skip_first: bool = True) -> Float[Tensor, "*batch seq d_in"]:
    """``v`` with its positions (all but 0 when ``skip_first``) replaced by ``x_hat`` (or the error-term form)."""
    new = v + (x_hat - x_hat.detach()) if error_term else x_hat.to(v.dtype)
    if not skip_first:
        return new
    return torch.cat([v[..., :1, :], new[..., 1:, :]], dim=-2)


def splice_sae(
    path: str, sae: dict, hp: dict, cfg: SAEConfig, *, scale: float | Tensor = 1.0, error_term: bool = False,
    skip_first: bool = True,
) -> dict[str, Callable[[Tensor], Tensor]]:
    """The intervention ``{path: value -> SAE(value)}`` for ``forward_with_activations``.

    ``path`` is a site whose last axis the SAE reads (``blocks.{i}.resid_post``, ``blocks.{i}.mlp.hidden``, ...).
    """
    def replace(v: Tensor) -> Tensor:
        if v.shape[-1] != cfg.d_in:
            raise ValueError(f"the SAE reads d_in={cfg.d_in} but the site {path!r} has width {v.shape[-1]}")
        x_hat, _ = reconstruct(sae, v, hp, cfg, scale=scale)
        return splice_value(v, x_hat, error_term=error_term, skip_first=skip_first)

    return {path: replace}


def ablate_site(path: str, kind: str, mean: Float[Tensor, " d_in"] | None = None, *, skip_first: bool = True
                ) -> dict[str, Callable[[Tensor], Tensor]]:
    """The site replaced by zeros (``kind="zero"``) or by ``mean`` (``"mean"``): CE-recovered's baselines."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")
    if kind == "mean" and mean is None:
        raise ValueError("kind='mean' needs the site's mean activation (mean=...)")

    def replace(v: Tensor) -> Tensor:
        fill = torch.zeros_like(v) if kind == "zero" else mean.to(v.dtype).expand_as(v)
        return splice_value(v, fill, skip_first=skip_first)

    return {path: replace}
