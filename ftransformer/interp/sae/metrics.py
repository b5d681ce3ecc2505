"""What an SAE costs the model: reconstruction metrics and spliced-model metrics, a whole stack in one ``vmap``.

* reconstruction, on the site's activations (positions 1 on): L0, MSE, explained variance, cosine,
  each latent's firing frequency (dead: never fires; dense: fires on more than ``dense_above`` of tokens);
* downstream, with the SAE spliced in (``splice.splice_sae``): the next-token cross-entropy, its change
  ``delta_ce`` (nats) from the clean model, the KL divergence from the clean model's predictions, and
  CE recovered against zero- and mean-ablation of the site:
  ``(ce_ablated - ce_spliced) / (ce_ablated - ce_clean)`` (1: as good as clean; 0: as bad as ablating).
"""

from functools import partial

import torch
from einops import rearrange
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer.layers.attention import attention_kernel
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.sae.architectures import SAEConfig
from ftransformer.interp.sae.splice import ablate_site, reconstruct, splice_sae
from ftransformer.model import cross_entropy

DENSE_ABOVE = 0.1  # a latent firing on more than this fraction of tokens counts as dense


def site_value(acts: dict, path: str) -> Tensor:
    """The value at dotted ``path`` (``"blocks.1.resid_post"``) of a ``forward_with_activations`` tree."""
    node = acts
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def reconstruction_metrics(
    x: Float[Tensor, "rows d_in"], x_hat: Float[Tensor, "rows d_in"], latents: Float[Tensor, "rows d_sae"]
) -> dict[str, Tensor]:
    """``l0 mse explained_variance cosine`` (0-d) and ``frequency`` (``[d_sae]``, fraction of tokens fired)."""
    err = (x - x_hat).square().sum(-1).mean()
    var = (x - x.mean(0)).square().sum(-1).mean()
    fired = (latents > 0).to(x.dtype)
    return {"l0": fired.sum(-1).mean(), "mse": err / x.shape[-1], "explained_variance": 1 - err / var,
            "cosine": F.cosine_similarity(x, x_hat, dim=-1).mean(), "frequency": fired.mean(0)}


def next_token_ce(logits: Float[Tensor, "*batch seq vocab"], tokens: Int[Tensor, "*batch seq"]) -> Float[Tensor, ""]:
    """Mean cross-entropy of each position's prediction of the next token of ``tokens``."""
    return cross_entropy(logits[..., :-1, :], tokens[..., 1:])


def kl_from(clean: Float[Tensor, "*batch seq vocab"], logits: Float[Tensor, "*batch seq vocab"]) -> Float[Tensor, ""]:
    """Mean over positions of ``KL(clean || logits)`` in nats."""
    p = clean.float().log_softmax(-1)
    return (p.exp() * (p - logits.float().log_softmax(-1))).sum(-1).mean()


def _baselines(params: dict, tokens: Tensor, cfg: Config, path: str) -> dict[str, Tensor]:
    """The clean run's logits, site value and CE, and the CE with the site zero- and mean-ablated."""
    clean, acts = forward_with_activations(params, tokens, cfg)
    site = site_value(acts, path)
    mean = rearrange(site[..., 1:, :], "... d_in -> (...) d_in").mean(0)
    out = {"logits": clean, "site": site, "ce_clean": next_token_ce(clean, tokens)}
    for kind in ("zero", "mean"):
        logits, _ = forward_with_activations(params, tokens, cfg, interventions=ablate_site(path, kind, mean))
        out[f"ce_{kind}"] = next_token_ce(logits, tokens)
    return out


def _member_metrics(sae: dict, hp: dict, *, params: dict, tokens: Tensor, cfg: Config, path: str,
                    sae_cfg: SAEConfig, scale: float, base: dict) -> dict[str, Tensor]:
    x = rearrange(base["site"][..., 1:, :], "... d_in -> (...) d_in", d_in=sae_cfg.d_in)
    x_hat, latents = reconstruct(sae, x, hp, sae_cfg, scale=scale)
    out = reconstruction_metrics(x, x_hat, latents)
    logits, _ = forward_with_activations(params, tokens, cfg, interventions=splice_sae(path, sae, hp, sae_cfg, scale=scale))
    out["ce"] = next_token_ce(logits, tokens)
    out["kl"] = kl_from(base["logits"], logits)
    return out


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def evaluate_stack(
    params: dict, tokens: Int[Tensor, "batch seq"], cfg: Config, path: str, saes: dict, hp: dict,
    sae_cfg: SAEConfig, *, scale: float = 1.0, dense_above: float = DENSE_ABOVE,
) -> dict[str, Tensor]:
    """Every metric of the module docstring for every SAE of a stack (leaves ``[members, ...]``), the
    spliced forwards of all members in ONE ``vmap``. Returns ``[members]`` tensors and the 0-d
    baselines ``ce_clean ce_zero ce_mean``."""
    base = _baselines(params, tokens, cfg, path)
    member = partial(_member_metrics, params=params, tokens=tokens, cfg=cfg, path=path, sae_cfg=sae_cfg,
                     scale=scale, base=base)
    out = torch.func.vmap(member, randomness="error")(saes, hp)
    frequency = out.pop("frequency")
    out["dead"] = (frequency == 0).sum(-1)
    out["dense"] = (frequency > dense_above).sum(-1)
    out["delta_ce"] = out["ce"] - base["ce_clean"]
    for kind in ("zero", "mean"):
        gap = base[f"ce_{kind}"] - base["ce_clean"]
        out[f"ce_recovered_{kind}"] = (base[f"ce_{kind}"] - out["ce"]) / gap
        out[f"ce_{kind}"] = base[f"ce_{kind}"]
    out["ce_clean"] = base["ce_clean"]
    return out
