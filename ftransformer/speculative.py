"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
``draft_tokens`` tokens one by one, the target model scores them all in ONE forward pass, and a
rejection rule keeps the longest prefix the target agrees with -- plus one token of its own.

The rule makes the output distributed exactly as the target's own sampling (greedy: token for token
the same), however bad the draft; a good draft only makes it faster, by turning ``K`` sequential
target steps into one. Draft token ``d`` drawn with probability ``q(d)`` is accepted with probability
``min(1, p(d) / q(d))``; at the first rejection the replacement is drawn from ``max(0, p - q)``
(renormalised), and when all are accepted a bonus token is drawn from the target's next distribution.

Rolling back rejected tokens costs nothing here because the cache is a value: the next round just
continues from a shorter ``lengths`` (slots past a row's length are masked, and overwritten before
they are read). Rows of a batch accept different numbers of tokens and move on at their own pace.
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer import random
from ftransformer.cache import KVCache, init_cache
from ftransformer.config import Config
from ftransformer.generate import (
    Sampling,
    _check_max_new_tokens,
    gumbel_noise,
    resolve_sampling,
    restrict_logits,
    untie_for_decoding,
)
from ftransformer.model import _forward_with_cache_in_place, check_tokens


class SpeculativeStats(NamedTuple):
    """How a speculative generation went: ``proposed`` and ``accepted`` draft tokens, target ``rounds``."""

    proposed: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (1.0: the target agreed with every proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0


def token_probs(logits: Float[Tensor, "*batch vocab"], sampling: Sampling) -> Float[Tensor, "*batch vocab"]:
    """The distribution ``sample`` draws from: one-hot on the argmax when greedy."""
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    restricted = restrict_logits(logits.float() / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return restricted.softmax(-1)


def draw(probs: Float[Tensor, "*batch vocab"], key: Tensor) -> Int[Tensor, " *batch"]:
    """One token per row from ``probs`` (Gumbel-max on log-probabilities; zero-probability ids never win)."""
    return (probs.log() + gumbel_noise(key, probs)).argmax(-1)


def _check_draft(draft, cfg: Config, draft_tokens: int) -> tuple[dict, Config]:
    if not (isinstance(draft, (tuple, list)) and len(draft) == 2 and isinstance(draft[1], Config)):
        raise TypeError(f"draft must be a (draft_params, draft_cfg) pair, got {type(draft).__name__}")
    draft_params, draft_cfg = draft
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"the draft model has vocab_size={draft_cfg.vocab_size} but the target {cfg.vocab_size}: "
            "both must share one tokenizer"
        )
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an int >= 1, got {draft_tokens!r}")
    return draft_params, draft_cfg


def speculative_generate(
    params: dict,
    prompt: Int[Tensor, "*batch seq"],
    cfg: Config,
    *,
    draft: tuple | list,
    draft_tokens: int = 4,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    temperature: float | int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> tuple[Int[Tensor, "*batch _"], SpeculativeStats]:
    """The prompt followed by ``max_new_tokens`` tokens of the target model, drafted by ``draft``.

    Args:
        draft: ``(draft_params, draft_cfg)``, a (smaller) model with the target's vocabulary.
        draft_tokens: tokens the draft proposes per round (``K``): each round costs ``K`` draft steps
            and one target pass over ``K + 1`` tokens, and yields 1 to ``K + 1`` tokens.

    Returns:
        ``(tokens, stats)``: ``tokens`` as ``generate`` returns them; ``stats`` counts proposals and
        acceptances. The prompt, the new tokens and ``draft_tokens`` must fit both models'
        ``max_seq_len`` (the last round may look ``K`` tokens past the end).
    """
    sampling = resolve_sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_max_new_tokens(max_new_tokens)
    draft_params, draft_cfg = _check_draft(draft, cfg, draft_tokens)
    check_tokens(prompt, cfg, name="prompt")
    n_prompt, k = prompt.shape[-1], draft_tokens
    need = n_prompt + max_new_tokens + k
    for name, c in (("target", cfg), ("draft", draft_cfg)):
        if need > c.max_seq_len:
            raise ValueError(
                f"prompt of seq={n_prompt} + max_new_tokens={max_new_tokens} + draft_tokens={k} is {need} tokens "
                f"but the {name} model's max_seq_len={c.max_seq_len}"
            )
    if max_new_tokens == 0:
        return prompt.clone(), SpeculativeStats(0, 0, 0)
    with torch.no_grad():
        return _speculate(params, cfg, draft_params, draft_cfg, prompt, k, max_new_tokens, sampling)


def _speculate(params, cfg, draft_params, draft_cfg, prompt, k, max_new_tokens, sampling):
    """The loop behind ``speculative_generate``, on checked arguments (under no_grad)."""
    batch, device = prompt.shape[:-1], prompt.device
    prompt2 = prompt.reshape(-1, prompt.shape[-1])
    rows, n_prompt = prompt2.shape
    end = n_prompt + max_new_tokens
    params, cfg = untie_for_decoding(params, cfg)
    draft_params, draft_cfg = untie_for_decoding(draft_params, draft_cfg)
    dtype = params["embed"]["tokens"].dtype
    target_cache = init_cache(cfg, rows, max_len=end + k, dtype=dtype, device=device)
    draft_cache = init_cache(draft_cfg, rows, max_len=end + k, dtype=draft_params["embed"]["tokens"].dtype, device=device)
    # Every row's tokens so far, and how many: the caches hold all of them but the last.
    out = torch.zeros(rows, end + k + 1, dtype=prompt.dtype, device=device)
    out[:, :n_prompt] = prompt2
    n = torch.full((rows,), n_prompt, dtype=torch.long, device=device)
    key = random.key(sampling.seed).to(device)
    offsets = torch.arange(k + 1, device=device)
    proposed = accepted = rounds = 0
    while bool((n < end).any()):
        round_key = random.fold_in(key, rounds)
        # The draft re-reads the last two tokens (re-writing a cached one changes nothing) so that a
        # row whose every proposal was accepted catches up on the one it never fed itself.
        if rounds == 0:
            draft_in = prompt2
        else:
            draft_in = out.gather(1, (n - 2)[:, None] + offsets[None, :2])
            draft_cache = draft_cache._replace(lengths=n - 2)
        logits, draft_cache = _forward_with_cache_in_place(draft_params, draft_in, draft_cache, draft_cfg)
        drafts, q = [], []
        for i in range(k):
            q.append(token_probs(logits[:, -1], sampling))
            drafts.append(draw(q[-1], random.fold_in(round_key, i)))
            if i + 1 < k:
                logits, draft_cache = _forward_with_cache_in_place(
                    draft_params, drafts[-1][:, None], draft_cache, draft_cfg
                )
        drafts, q = torch.stack(drafts, 1), torch.stack(q, 1)
        # One target pass scores every proposal: p[:, i] is its distribution after drafts[:, :i].
        target_in = torch.cat([prompt2 if rounds == 0 else out.gather(1, (n - 1)[:, None]), drafts], 1)
        logits, target_cache = _forward_with_cache_in_place(params, target_in, target_cache, cfg)
        p = token_probs(logits[:, -(k + 1):], sampling)
        p_of_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        q_of_draft = q.gather(-1, drafts[..., None])[..., 0]
        u = random.uniform(random.fold_in(round_key, k), (rows, k)).to(device)
        keep = (u * q_of_draft < p_of_draft).long().cumprod(1)
        n_accepted = keep.sum(1)
        # The replacement at the first rejection, or the bonus token after K acceptances.
        residual = (p - torch.cat([q, torch.zeros_like(q[:, :1])], 1)).clamp(min=0)
        residual = residual.gather(1, n_accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
        fallback = p.gather(1, n_accepted[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, fallback)
        last = draw(residual, random.fold_in(round_key, k + 1))
        new = torch.cat([drafts, torch.zeros_like(last[:, None])], 1).scatter(1, n_accepted[:, None], last[:, None])
        active = n < end
        out = out.scatter(1, n[:, None] + offsets, torch.where(active[:, None], new, out.gather(1, n[:, None] + offsets)))
        proposed += int(active.sum()) * k
        accepted += int(n_accepted[active].sum())
        n = torch.where(active, torch.minimum(n + n_accepted + 1, torch.full_like(n, end)), n)
        target_cache = target_cache._replace(lengths=n - 1)
        rounds += 1
    return out[:, :end].reshape(*batch, end), SpeculativeStats(proposed, accepted, rounds)
