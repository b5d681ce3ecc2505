"""Sparse autoencoders as pure functions on a params pytree: ReLU + L1, TopK, BatchTopK, JumpReLU.

An SAE reads an activation ``x`` (``d_in`` wide: ``d_model`` for a residual site, ``d_ff`` for
``mlp.hidden``) and writes it as a sparse, non-negative combination of ``d_sae`` learned directions::

    pre   = (x - b_dec) @ w_enc + b_enc              encoder pre-activations
    acts  = sparsify(pre)                            ReLU / TopK / BatchTopK / JumpReLU
    x_hat = acts @ w_dec + b_dec                     reconstruction

Axes beyond the package glossary: ``d_in`` (the site's width), ``d_sae`` (latents), ``members`` (SAEs
in a stack). Row ``i`` of ``w_dec`` is latent ``i``'s direction (SAELens' "decoder column" of
``W_dec^T``); it is kept at unit norm after every step.

Hyperparameters that may differ between the members of a stack are tensors in a dict ``hp``:
``hp["l1"]`` (sparsity coefficient: L1 for ReLU, L0 for JumpReLU), ``hp["k"]`` (latents kept per token,
TopK and BatchTopK) and ``hp["lr"]``. ``k`` is applied as a threshold -- the ``k``-th largest value of
one ``torch.topk`` of static width ``k_max`` -- so one call serves members with different ``k``.
"""

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from ftransformer import random
from ftransformer import validate

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
HPARAMS = ("l1", "k", "lr")


@dataclass(frozen=True)
class SAEConfig:
    """The static shape and rules of every SAE in a stack (what differs per member lives in ``hp``)."""

    d_in: int  # width of the activations read (the site's last axis)
    d_sae: int  # number of latents (dictionary size); one width per stack
    architecture: str = "relu"  # one of ARCHITECTURES
    k_max: int = 32  # topk/batchtopk: the largest k of any member (width of the one torch.topk per call)
    k_aux: int = 0  # topk/batchtopk: dead latents the auxiliary loss uses per token; 0 means d_in // 2
    aux_coeff: float = 1 / 32  # topk/batchtopk: weight of the auxiliary loss (Gao et al. 2024)
    dead_tokens: int = 10_000  # a latent that has not fired on this many training tokens counts as dead
    bandwidth: float = 0.001  # jumprelu: width of the rectangle kernel of the straight-through estimator
    init_threshold: float = 0.001  # jumprelu: every latent's threshold at init
    threshold_momentum: float = 0.99  # batchtopk: running average of the inference threshold

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k_max", "dead_tokens"):
            value = getattr(self, name)
            validate.int_at_least(f"SAEConfig.{name}", value, 1)
        validate.one_of("SAEConfig.architecture", self.architecture, ARCHITECTURES)
        if self.architecture in ("topk", "batchtopk") and self.k_max > self.d_sae:
            raise ValueError(f"SAEConfig.k_max={self.k_max} must be <= d_sae={self.d_sae}")
        validate.int_in("SAEConfig.k_aux", self.k_aux, 0, self.d_sae, closed=True, high_name="d_sae")
        for name in ("aux_coeff", "bandwidth", "init_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SAEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"SAEConfig.threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}")

    @property
    def aux_k(self) -> int:
        """Dead latents per token in the auxiliary loss (``k_aux``, or ``d_in // 2`` capped at ``d_sae``)."""
        return self.k_aux or min(max(self.d_in // 2, 1), self.d_sae)


def init_sae(key: Tensor, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32) -> dict:
    """Unit-norm random decoder rows, ``w_enc = w_dec^T``, zero biases (and the architecture's extras)."""
    w_dec = unit_rows(random.normal(key, (cfg.d_sae, cfg.d_in), dtype=dtype))
    params = {"w_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(cfg.d_sae, dtype=dtype, device=key.device),
              "w_dec": w_dec, "b_dec": torch.zeros(cfg.d_in, dtype=dtype, device=key.device)}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = torch.full((cfg.d_sae,), math.log(cfg.init_threshold), dtype=dtype, device=key.device)
    if cfg.architecture == "batchtopk":
        # Set from training batches, never by a gradient: see ``trainable``.
        params["threshold"] = torch.zeros((), dtype=dtype, device=key.device)
    return params


def trainable(params: dict) -> dict:
    """The leaves the optimizer moves (all but BatchTopK's inference threshold)."""
    return {name: value for name, value in params.items() if name != "threshold"}


def unit_rows(w: Float[Tensor, "d_sae d_in"]) -> Float[Tensor, "d_sae d_in"]:
    """Each decoder row scaled to unit L2 norm."""
    return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(1e-12)


def pre_activations(params: dict, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
    """The encoder before its nonlinearity."""
    return (x - params["b_dec"]) @ params["w_enc"] + params["b_enc"]


def decode(params: dict, acts: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
    """The reconstruction from latent activations."""
    return acts @ params["w_dec"] + params["b_dec"]


def kth_largest(values: Float[Tensor, "*batch d_sae"], k: Tensor, width: int) -> Float[Tensor, "*batch 1"]:
    """The ``k``-th largest entry of each row, for ``1 <= k <= width``: one ``topk`` of static ``width``,
    then ``k`` picked by a one-hot mask (``k`` may be a tensor that differs per ``vmap`` member)."""
    top = torch.topk(values, width, dim=-1).values
    pick = torch.arange(1, width + 1, device=values.device) == k.to(torch.int64)
    return torch.where(pick, top, torch.zeros_like(top)).sum(-1, keepdim=True)


def _straight_through(theta: Tensor, value: Tensor, slope: Tensor) -> Tensor:
    """``value`` forward; ``d/d theta`` is ``slope`` (the other inputs' gradients as in ``value``)."""
    return value + (theta - theta.detach()) * slope.detach()


def jump(pre: Float[Tensor, "*batch d_sae"], theta: Float[Tensor, " d_sae"], bandwidth: float) -> Float[Tensor, "*batch d_sae"]:
    """JumpReLU ``pre * H(pre - theta)``; ``theta`` learns through the rectangle-kernel pseudo-derivative
    ``-(theta / eps) K((pre - theta) / eps)`` (Rajamanoharan et al. 2024)."""
    open_ = (pre > theta).to(pre.dtype).detach()
    kernel = ((pre - theta).abs() < bandwidth / 2).to(pre.dtype)
    return _straight_through(theta, pre * open_, -(theta / bandwidth) * kernel)


def jump_l0(pre: Float[Tensor, "*batch d_sae"], theta: Float[Tensor, " d_sae"], bandwidth: float) -> Float[Tensor, "*batch"]:
    """Latents open per token, ``sum H(pre - theta)``, with ``d/d theta = -(1/eps) K(...)``."""
    open_ = (pre > theta).to(pre.dtype)
    kernel = ((pre - theta).abs() < bandwidth / 2).to(pre.dtype)
    return _straight_through(theta, open_, -kernel / bandwidth).sum(-1)


def batch_kth(pre: Float[Tensor, "*batch d_sae"], k: Tensor, width: int) -> Float[Tensor, ""]:
    """BatchTopK's cut: the ``k * tokens``-th largest pre-activation over the whole batch."""
    flat = rearrange(pre, "... d_sae -> () (... d_sae)")
    tokens = flat.shape[-1] // pre.shape[-1]
    return rearrange(kth_largest(flat, k * tokens, width * tokens), "() () ->")


def encode(params: dict, x: Float[Tensor, "*batch d_in"], hp: dict, cfg: SAEConfig, *,
           training: bool = False) -> Float[Tensor, "*batch d_sae"]:
    """Latent activations of ``x``. BatchTopK keeps the batch's top ``k * tokens`` while ``training``,
    and cuts at its learned ``threshold`` otherwise (so a token's code does not depend on its batch)."""
    pre = pre_activations(params, x)
    return sparsify(params, pre, hp, cfg, training=training)


def sparsify(params: dict, pre: Float[Tensor, "*batch d_sae"], hp: dict, cfg: SAEConfig, *,
             training: bool = False) -> Float[Tensor, "*batch d_sae"]:
    """The architecture's nonlinearity applied to pre-activations."""
    if cfg.architecture == "relu":
        return torch.relu(pre)
    if cfg.architecture == "jumprelu":
        return jump(pre, params["log_threshold"].exp(), cfg.bandwidth)
    if cfg.architecture == "topk":
        cut = kth_largest(pre, hp["k"], cfg.k_max)
    elif training:
        cut = batch_kth(pre, hp["k"], cfg.k_max)
    else:
        cut = params["threshold"]
    return torch.relu(pre) * (pre >= cut).to(pre.dtype)


def aux_loss(params: dict, pre: Float[Tensor, "batch d_sae"], err: Float[Tensor, "batch d_in"],
             dead: Bool[Tensor, " d_sae"], k_aux: int) -> Float[Tensor, ""]:
    """AuxK (Gao et al. 2024): the top ``k_aux`` dead latents per token reconstruct the residual error,
    normalized by its variance; 0 while no latent is dead. Only the dead latents get its gradient."""
    err = err.detach()
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    cut = torch.topk(masked, k_aux, dim=-1).values[..., -1:]
    acts = torch.relu(pre) * (dead & (pre >= cut)).to(pre.dtype)
    err_hat = acts @ params["w_dec"]
    var = (err - err.mean(0)).square().sum(-1).mean().clamp_min(1e-12)
    loss = (err_hat - err).square().sum(-1).mean() / var
    return torch.where(dead.any(), loss, torch.zeros_like(loss))


def sparsity_loss(params: dict, pre: Tensor, acts: Tensor, hp: dict, cfg: SAEConfig) -> Float[Tensor, ""]:
    """ReLU: ``l1 * sum_i acts_i * |w_dec_i|``; JumpReLU: ``l1 * L0``; TopK kinds: 0 (k sets sparsity)."""
    if cfg.architecture == "relu":
        norms = torch.linalg.vector_norm(params["w_dec"], dim=-1)
        return hp["l1"] * (acts * norms).sum(-1).mean()
    if cfg.architecture == "jumprelu":
        return hp["l1"] * jump_l0(pre, params["log_threshold"].exp(), cfg.bandwidth).mean()
    return torch.zeros((), dtype=pre.dtype, device=pre.device)


def sae_loss(params: dict, x: Float[Tensor, "batch d_in"], hp: dict, dead: Bool[Tensor, " d_sae"],
             cfg: SAEConfig) -> tuple[Float[Tensor, ""], dict]:
    """Training loss of one SAE on a batch of activations, and its parts: ``(loss, {"mse", "sparsity",
    "aux", "l0", "fired", "cut"})`` (``fired``: which latents fired on the batch; ``cut``: BatchTopK's
    batch threshold, else 0)."""
    pre = pre_activations(params, x)
    acts = sparsify(params, pre, hp, cfg, training=True)
    x_hat = decode(params, acts)
    mse = (x_hat - x).square().sum(-1).mean()
    sparsity = sparsity_loss(params, pre, acts, hp, cfg)
    aux = torch.zeros_like(mse)
    if cfg.architecture in ("topk", "batchtopk"):
        aux = aux_loss(params, pre, x - x_hat, dead, cfg.aux_k)
    cut = batch_kth(pre, hp["k"], cfg.k_max).detach() if cfg.architecture == "batchtopk" else torch.zeros_like(mse)
    fired = (acts > 0).detach()
    parts = {"mse": mse.detach(), "sparsity": sparsity.detach(), "aux": aux.detach(),
             "l0": fired.to(x.dtype).sum(-1).mean(), "fired": fired.any(0), "cut": cut}
    return mse + sparsity + cfg.aux_coeff * aux, parts
