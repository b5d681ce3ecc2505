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


def check_sampling(temperature: float | int, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` on sampling settings outside their ranges."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: one validated home for the options every generation function takes.

    ``generate(..., sampling=Sampling(temperature=0.8, top_k=40))`` and the keyword form
    ``generate(..., temperature=0.8, top_k=40)`` mean the same; give one or the other.
    """

    temperature: float | int = 1.0  # softmax temperature; 0 is greedy
    top_k: int | None = None  # sample among the k likeliest tokens only
    top_p: float | None = None  # sample among the likeliest tokens holding probability p only (nucleus)
    seed: int = 0  # the random key's seed: the same seed gives the same text

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax (no random numbers are drawn)."""
        return self.temperature == 0 or self.top_k == 1


def resolve_sampling(sampling: Sampling | None, **keywords) -> Sampling:
    """``sampling``, or a ``Sampling`` from the keyword options that were given (None means not given)."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if sampling is None:
        return Sampling(**given)
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if given:
        raise ValueError(f"give the sampling options either as sampling=Sampling(...) or as keywords, not both ({', '.join(given)})")
    return sampling


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


def next_token(logits: Float[Tensor, "*batch vocab"], key: Tensor | None, sampling: Sampling) -> Int[Tensor, " *batch"]:
    """``sample`` on settings already checked: the argmax when greedy (``key`` unused), else a draw from ``probs``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if key is None:
        raise ValueError(f"sampling with temperature={sampling.temperature} needs a random key, got None")
    return draw(probs(logits, sampling), key)


def sample(
    logits: Float[Tensor, "*batch vocab"],
    key: Tensor | None,
    *,
    temperature: float | int = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Tensor, " *batch"]:
    """The next token of each row: greedy when ``temperature == 0``, else a draw from ``probs`` driven by ``key``."""
    return next_token(logits, key, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))


__all__ = [
    "Sampling", "check_sampling", "draw", "gumbel_noise", "next_token", "probs", "resolve_sampling",
    "restrict_logits", "sample",
]
