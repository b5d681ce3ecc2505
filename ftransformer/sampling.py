"""How the next token is chosen: the options (``Sampling``), the distribution they define (``probs``),
and a draw from it with an explicit random key (``ftransformer.random``), so a seed reproduces a text.

``probs`` is the one definition of that distribution: ``sample`` draws from it, and speculative
decoding compares the target's and the draft's versions of it token by token.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer import validate


def check_sampling(temperature: float | int, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` on sampling settings outside their ranges."""
    if not validate.is_number(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    validate.positive_int("top_k", top_k, allow_none=True)
    if top_p is not None and (
        not validate.is_number(top_p) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: one validated home for the options every generation function takes,
    e.g. ``generate(..., sampling=Sampling(temperature=0.8, top_k=40), seed=0)``. The seed is not an option of
    the distribution: it goes to the function that draws (``generate(seed=...)``, ``sample(logits, key, ...)``).
    """

    temperature: float | int = 1.0  # softmax temperature; 0 is greedy
    top_k: int | None = None  # sample among the k likeliest tokens only
    top_p: float | None = None  # sample among the likeliest tokens holding probability p only (nucleus)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax (no random numbers are drawn)."""
        return self.temperature == 0 or self.top_k == 1


GREEDY = Sampling(temperature=0)  # the argmax every step: no random numbers drawn


def check_sampling_arg(sampling: object) -> None:
    """Raise ``TypeError`` unless ``sampling`` is a ``Sampling``."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling(temperature=..., top_k=..., top_p=...), got {type(sampling).__name__}")


def restrict_logits(
    logits: Float[Tensor, "*batch vocab"], *, top_k: int | None = None, top_p: float | None = None
) -> Float[Tensor, "*batch vocab"]:
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set holding ``top_p`` of the mass."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p: the most likely one always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs(logits: Float[Tensor, "*batch vocab"], sampling: Sampling) -> Float[Tensor, "*batch vocab"]:
    """The distribution the next token is drawn from: softmax(logits / temperature) restricted to
    ``top_k`` / ``top_p``, or one-hot on the argmax when greedy."""
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    restricted = restrict_logits(logits.float() / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return restricted.softmax(-1)


def gumbel_noise(key: Tensor, like: Tensor) -> Tensor:
    """Gumbel(0, 1) noise shaped like ``like``, from ``key``: argmax(log-weights + noise) samples the weights."""
    u = random.uniform(key, like.shape).to(like.device)
    # Keep u away from 0 so log(u) is finite; 2**-25 is below the smallest nonzero uniform (2**-24).
    return -torch.log(-torch.log(u.clamp(min=2.0**-25)))


def draw(p: Float[Tensor, "*batch vocab"], key: Tensor) -> Int[Tensor, " *batch"]:
    """One token per row from the distribution ``p``, driven by ``key``.

    The Gumbel-max trick: argmax(log p + Gumbel noise) is a sample from ``p`` and needs only uniform
    numbers, which ``key`` makes reproducible. Zero-probability ids never win.
    """
    return (p.log() + gumbel_noise(key, p)).argmax(-1)


def sample(
    logits: Float[Tensor, "*batch vocab"], key: Tensor | None, sampling: Sampling = Sampling()
) -> Int[Tensor, " *batch"]:
    """The next token of each row: the argmax when greedy (``key`` unused), else a draw from ``probs`` driven by ``key``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if key is None:
        raise ValueError(f"sampling with temperature={sampling.temperature} needs a random key, got None")
    return draw(probs(logits, sampling), key)


__all__ = ["GREEDY", "Sampling", "check_sampling", "check_sampling_arg", "draw", "gumbel_noise", "probs", "restrict_logits", "sample"]
