"""Ground truth for trainable interventions: a hand-set model that stores a known variable in a known subspace.

``planted_model`` sets the weights of a Llama-shaped ``Config`` (rotary positions, RMSNorm, SwiGLU, untied
unembedding, so ``interop.save_hf`` writes it as a ``transformers`` Llama) so that every block writes nothing:
the residual stream at every layer is the token embedding. Token ``t`` of ``vocab`` is embedded at angle
``2 pi t / vocab`` on a circle in the PLANTED 2-D subspace (a random orthonormal pair of directions; or, with
``dim=3``, ..., at a corner of a cube in a planted ``dim``-wide subspace), plus noise
in the orthogonal complement that the unembedding never reads; the unembedding reads the circle back, so the
model echoes the last token. The variable "last token" therefore lives in the planted subspace at the last
position of every layer, and swapping it there makes the model answer the source's last token (``pairs``).
"""

import math

import torch

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.params import init_params
from ftransformer.shapes import Float, Tensor

PLANTED_DIM = 2  # the size of the subspace that holds the variable


def planted_config(vocab: int = 8, d_model: int = 16, n_layers: int = 2, seq: int = 4, n_heads: int = 1) -> Config:
    """A Llama-shaped config (rope, RMSNorm, SwiGLU, untied) for ``planted_model``."""
    return Config(vocab_size=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=2 * d_model,
                  max_seq_len=seq).replace(positional="rope", norm="rmsnorm", activation="swiglu",
                                           **{"embeddings.tie": False})


def planted_basis(d_model: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Float[Tensor, "d_model d_model"]:
    """A random orthogonal basis; its first ``PLANTED_DIM`` columns span the planted subspace."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_model, d_model, generator=gen, dtype=torch.float64)).Q.to(dtype)


def planted_points(vocab: int, dim: int = PLANTED_DIM, dtype: torch.dtype = torch.float32) -> Float[Tensor, "vocab k"]:
    """Each token's value of the variable, ``dim`` numbers of norm 1: a circle for ``dim = 2``; else the corners
    ``(+-1, ..., +-1) / sqrt(dim)`` of the token's ``dim``-bit code (so every coordinate matters), ``vocab <= 2^dim``."""
    validate.int_in("dim", dim, 1, 10**9)
    if dim == 2:
        angles = 2 * math.pi * torch.arange(vocab, dtype=dtype) / vocab
        return torch.stack([angles.cos(), angles.sin()], dim=-1)
    if vocab > 2**dim:
        raise ValueError(f"a {dim}-dim planted variable has 2^{dim} = {2**dim} corners, fewer than vocab={vocab}")
    bits = (torch.arange(vocab)[:, None] >> torch.arange(dim)) & 1
    return (2 * bits - 1).to(dtype) / math.sqrt(dim)


def planted_model(cfg: Config, *, seed: int = 0, dtype: torch.dtype = torch.float32, dim: int = PLANTED_DIM) -> dict:
    """The echo model's params: blocks write nothing; the embedding's planted part (``dim`` wide, the first
    ``dim`` columns of ``planted_basis``) holds ``planted_points``, which the unembedding reads back."""
    validate.int_in("d_model", cfg.d_model, dim + 1, 10**9)
    params = init_params(cfg, seed=seed, dtype=dtype)
    basis = planted_basis(cfg.d_model, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    points = planted_points(cfg.vocab_size, dim, dtype)
    noise = torch.randn(cfg.vocab_size, cfg.d_model - dim, generator=gen, dtype=dtype)
    params["embed"]["tokens"] = torch.cat([4 * points, noise], -1) @ basis.T
    for block in params["blocks"]:
        for part, names in (("attn", ("w_o", "b_o")), ("mlp", ("w_out", "b_out"))):
            for name in names:
                if name in block[part]:
                    block[part][name] = torch.zeros_like(block[part][name])
    params["unembed"]["w"] = basis[:, :dim] @ (5 * points.T)
    return params


def pairs(n: int, cfg: Config, *, seed: int = 0, seq: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` (base, source) pairs whose last tokens differ, and the counterfactual label: the source's last token."""
    seq = cfg.max_seq_len if seq is None else seq
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, cfg.vocab_size, (n, seq), generator=gen)
    source = torch.randint(0, cfg.vocab_size, (n, seq), generator=gen)
    source[:, -1] = (base[:, -1] + torch.randint(1, cfg.vocab_size, (n,), generator=gen)) % cfg.vocab_size
    return base, source, source[:, -1].clone()


__all__ = ["PLANTED_DIM", "pairs", "planted_basis", "planted_config", "planted_model", "planted_points"]
