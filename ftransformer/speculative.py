"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
``Draft.tokens`` tokens one by one, the target model scores them all in ONE forward pass, and a
rejection rule keeps the longest prefix the target agrees with -- plus one token of its own.

The rule makes the output distributed exactly as the target's own sampling (greedy: token for token
the same), however bad the draft; a good draft only makes it faster, by turning ``K`` sequential
target steps into one. Draft token ``d`` drawn with probability ``q(d)`` is accepted with probability
``min(1, p(d) / q(d))``; at the first rejection the replacement is drawn from ``max(0, p - q)``
(renormalised), and when all are accepted a bonus token is drawn from the target's next distribution.

Rolling back rejected tokens costs nothing here because the cache is a value: the next round just
continues from a shorter ``lengths`` (slots past a row's length are masked, and overwritten before
they are read). Rows of a batch accept different numbers of tokens and move on at their own pace.

The rounds come out as steps, one new token per row (a step once every row has reached it), so stop
tokens end speculative decoding as they end ``generate_stream`` (``ftransformer.stopping``): no round
runs after every row has stopped.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer import validate
from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.decode_steps import untie_for_decoding
from ftransformer.model import check_tokens, forward_with_cache_in_place
from ftransformer.sampling import Sampling, check_sampling_arg, draw, probs
from ftransformer.stopping import check_max_new_tokens, stack_steps, until_stopped


class SpeculativeStats(NamedTuple):
    """How a speculative generation went: ``proposed`` and ``accepted`` draft tokens, target ``rounds``."""

    proposed: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (1.0: the target agreed with every proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class _Tally:
    """The counts of ``SpeculativeStats``, kept up to date by the rounds as they run."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0

    def add_round(self, proposed: int, accepted: int) -> None:
        self.proposed, self.accepted, self.rounds = self.proposed + proposed, self.accepted + accepted, self.rounds + 1


@dataclass(frozen=True)
class Draft:
    """The draft model of speculative decoding: ``generate(..., draft=Draft(draft_params, draft_cfg, tokens=4))``.

    ``tokens`` is how many tokens it proposes per round (``K``): each round costs ``K`` draft steps and one
    target pass over ``K + 1`` tokens, and yields 1 to ``K + 1`` tokens. The draft shares the target's vocabulary.
    """

    params: dict
    cfg: Config
    tokens: int = 4

    def __post_init__(self):
        if not isinstance(self.cfg, Config):
            raise TypeError(f"Draft's cfg must be a Config, got {type(self.cfg).__name__}")
        validate.int_at_least("draft tokens", self.tokens, 1)


class _Model(NamedTuple):
    params: dict
    cfg: Config


class _State(NamedTuple):
    """Between rounds: every row's tokens so far (``out``), how many (``n``), and both caches, which hold
    all of them but the last."""

    out: Tensor
    n: Tensor
    target_cache: KVCache
    draft_cache: KVCache


def _check_request(prompt: Tensor, cfg: Config, draft: Draft, max_new_tokens: int, sampling: Sampling) -> None:
    """Validate a speculative generation."""
    check_max_new_tokens(max_new_tokens)
    check_sampling_arg(sampling)
    if not isinstance(draft, Draft):
        raise TypeError(f"draft must be a speculative.Draft(draft_params, draft_cfg, tokens=...), got {type(draft).__name__}")
    if draft.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"the draft model has vocab_size={draft.cfg.vocab_size} but the target {cfg.vocab_size}: "
            "both must share one tokenizer"
        )
    check_tokens(prompt, cfg, name="prompt")
    n_prompt, k = prompt.shape[-1], draft.tokens
    need = n_prompt + max_new_tokens + k
    for name, c in (("target", cfg), ("draft", draft.cfg)):
        if need > c.max_seq_len:
            raise ValueError(
                f"prompt of seq={n_prompt} + max_new_tokens={max_new_tokens} + draft tokens={k} is {need} tokens "
                f"but the {name} model's max_seq_len={c.max_seq_len}"
            )


def speculative_generate(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    draft: Draft,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> tuple[Int[Tensor, "*batch _"], SpeculativeStats]:
    """The prompt followed by up to ``max_new_tokens`` tokens of the target model, drafted by ``draft``.

    Returns:
        ``(tokens, stats)``: ``tokens`` exactly as ``generate(..., draft=draft)`` returns them (stop
        tokens included); ``stats`` counts proposals and acceptances. The prompt, the new tokens and
        ``draft.tokens`` must fit both models' ``max_seq_len`` (the last round may look ``K`` tokens past
        the end).
    """
    _check_request(prompt, cfg, draft, max_new_tokens, sampling)
    key = random.key(seed).to(prompt.device)
    tally = _Tally()
    with torch.no_grad():
        steps = _steps(_Model(params, cfg), _Model(draft.params, draft.cfg), prompt, draft.tokens, max_new_tokens,
                       sampling, key, tally)
        new = stack_steps(until_stopped(steps, stop_tokens, pad_id), prompt)
    return torch.cat([prompt, new], dim=-1), SpeculativeStats(tally.proposed, tally.accepted, tally.rounds)


def _steps(
    target: _Model, draft: _Model, prompt: Tensor, k: int, max_new_tokens: int, sampling: Sampling, key: Tensor,
    tally: _Tally,
) -> Iterator[Tensor]:
    """The rounds behind ``speculative_generate`` (checked arguments), yielded one step at a time: step
    ``j`` as soon as every row has its ``j``-th new token. ``tally`` counts what the rounds did."""
    batch, prompt2 = prompt.shape[:-1], prompt.reshape(-1, prompt.shape[-1])
    n_prompt = prompt2.shape[1]
    end = n_prompt + max_new_tokens
    target, draft = _Model(*untie_for_decoding(*target)), _Model(*untie_for_decoding(*draft))
    state = _start(target, draft, prompt2, end, k)
    shown = n_prompt
    while shown < end:
        round_key = random.fold_in(key, tally.rounds)
        state, proposed, accepted = _round(target, draft, state, prompt2, round_key, k, end, sampling)
        tally.add_round(proposed, accepted)
        ready = min(int(state.n.min()), end)
        for j in range(shown, ready):
            yield state.out[:, j].reshape(batch)
        shown = ready


def _start(target: _Model, draft: _Model, prompt2: Tensor, end: int, k: int) -> _State:
    rows, n_prompt = prompt2.shape
    device = prompt2.device

    def cache(model: _Model) -> KVCache:
        return init_cache(model.cfg, rows, max_len=end + k, dtype=model.params["embed"]["tokens"].dtype, device=device)

    out = torch.zeros(rows, end + k + 1, dtype=prompt2.dtype, device=device)
    out[:, :n_prompt] = prompt2
    n = torch.full((rows,), n_prompt, dtype=torch.long, device=device)
    return _State(out, n, cache(target), cache(draft))


def _propose(
    draft: _Model, cache: KVCache, tokens: Tensor, k: int, sampling: Sampling, round_key: Tensor
) -> tuple[Tensor, Tensor, KVCache]:
    """The draft's ``k`` proposals after ``tokens``, drawn one by one, and the distributions ``q`` they came from."""
    logits, cache = forward_with_cache_in_place(draft.params, tokens, cache, draft.cfg)
    drafts, q = [], []
    for i in range(k):
        q.append(probs(logits[:, -1], sampling))
        drafts.append(draw(q[-1], random.fold_in(round_key, i)))
        if i + 1 < k:
            logits, cache = forward_with_cache_in_place(draft.params, drafts[-1][:, None], cache, draft.cfg)
    return torch.stack(drafts, 1), torch.stack(q, 1), cache


def _accept(
    p: Float[Tensor, "batch _ vocab"],
    q: Float[Tensor, "batch _ vocab"],
    drafts: Int[Tensor, "batch _"],
    round_key: Tensor,
) -> tuple[Int[Tensor, "batch _"], Int[Tensor, " batch"]]:
    """The rejection rule: each row's accepted prefix of ``drafts`` with one token of the target's own after
    it (``k + 1`` columns, the ones past it unused), and how many proposals it accepted."""
    k = drafts.shape[1]
    p_of_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_of_draft = q.gather(-1, drafts[..., None])[..., 0]
    u = random.uniform(random.fold_in(round_key, k), tuple(drafts.shape)).to(p.device)
    n_accepted = (u * q_of_draft < p_of_draft).long().cumprod(1).sum(1)
    # The replacement at the first rejection, drawn from max(0, p - q), or the bonus token after K acceptances.
    residual = (p - torch.cat([q, torch.zeros_like(q[:, :1])], 1)).clamp(min=0)
    at = n_accepted[:, None, None].expand(-1, 1, p.shape[-1])
    residual, fallback = residual.gather(1, at)[:, 0], p.gather(1, at)[:, 0]
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, fallback)
    last = draw(residual, random.fold_in(round_key, k + 1))
    new = torch.cat([drafts, torch.zeros_like(last[:, None])], 1).scatter(1, n_accepted[:, None], last[:, None])
    return new, n_accepted


def _round(
    target: _Model, draft: _Model, s: _State, prompt2: Tensor, round_key: Tensor, k: int, end: int, sampling: Sampling
) -> tuple[_State, int, int]:
    """One round: the draft proposes ``k`` tokens, the target scores them in one pass, the rule keeps a
    prefix. Returns the new state, and the proposals made and accepted by rows still generating."""
    n, offsets = s.n, torch.arange(k + 1, device=s.n.device)
    first = not bool(s.target_cache.lengths.any())  # nothing cached yet: both models read the prompt
    # The draft re-reads the last two tokens (re-writing a cached one changes nothing) so that a row
    # whose every proposal was accepted catches up on the one it never fed itself.
    if first:
        draft_in, draft_cache = prompt2, s.draft_cache
    else:
        draft_in = s.out.gather(1, (n - 2)[:, None] + offsets[None, :2])
        draft_cache = s.draft_cache._replace(lengths=n - 2)
    drafts, q, draft_cache = _propose(draft, draft_cache, draft_in, k, sampling, round_key)
    # One target pass scores every proposal: p[:, i] is its distribution after drafts[:, :i].
    target_in = torch.cat([prompt2 if first else s.out.gather(1, (n - 1)[:, None]), drafts], 1)
    logits, target_cache = forward_with_cache_in_place(target.params, target_in, s.target_cache, target.cfg)
    new, n_accepted = _accept(probs(logits[:, -(k + 1):], sampling), q, drafts, round_key)
    active = n < end
    at = n[:, None] + offsets
    out = s.out.scatter(1, at, torch.where(active[:, None], new, s.out.gather(1, at)))
    n = torch.where(active, torch.minimum(n + n_accepted + 1, torch.full_like(n, end)), n)
    state = _State(out, n, target_cache._replace(lengths=n - 1), draft_cache)
    return state, int(active.sum()) * k, int(n_accepted[active].sum())


__all__ = ["Draft", "SpeculativeStats", "speculative_generate"]
