"""Speculative decoding: greedy output equals plain greedy decoding; sampled output is distributed as the
target model's own sampling (a chi-square test on a tiny vocabulary)."""

import pytest
import torch

import ftransformer as ft
from ftransformer.sampling import GREEDY, probs
from ftransformer.speculative import Draft, speculative_generate

TARGET = ft.Config(vocab_size=11, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=48)
DRAFT = ft.Config.from_flat(vocab_size=11, d_model=16, n_heads=2, n_layers=1, d_ff=24, max_seq_len=40, positional="rope")


def spread(cfg: ft.Config, seed: int, scale: float) -> dict:
    """Random params with noise of ``scale``: logits far apart (no near-ties for rounding to flip)."""
    gen = torch.Generator().manual_seed(seed + 50)
    return ft.tree.map(lambda x: x + scale * torch.randn(x.shape, generator=gen), ft.init_params(cfg, seed=seed))


@pytest.fixture(scope="module")
def models():
    return spread(TARGET, 1, 0.5), spread(DRAFT, 2, 0.5)


def prompts(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_greedy(models, k):
    target, draft = models
    prompt = prompts(3, 5)
    want = ft.generate(target, prompt, TARGET, max_new_tokens=25, sampling=GREEDY)
    got, stats = speculative_generate(target, prompt, TARGET, draft=Draft(draft, DRAFT, tokens=k), max_new_tokens=25,
                                      sampling=GREEDY)
    assert torch.equal(got, want)
    assert stats.proposed >= 25 * k and 0 <= stats.accepted <= stats.proposed
    # A draft equal to the target is always right: every round yields k + 1 tokens.
    got, stats = speculative_generate(target, prompt, TARGET, draft=Draft(target, TARGET, tokens=k), max_new_tokens=25,
                                      sampling=GREEDY)
    assert torch.equal(got, want)
    assert stats.acceptance_rate == 1.0 and stats.rounds == -(-25 // (k + 1))


def test_generate_with_a_draft_keeps_generates_contract(models):
    target, draft = models
    prompt = prompts(4, 3, seed=1)
    for stops in ((), (3,), tuple(range(11))):
        want = ft.generate(target, prompt, TARGET, max_new_tokens=12, sampling=GREEDY, stop_tokens=stops, pad_id=0)
        got = ft.generate(target, prompt, TARGET, max_new_tokens=12, sampling=GREEDY, stop_tokens=stops, pad_id=0,
                          draft=Draft(draft, DRAFT, tokens=3))
        assert torch.equal(got, want), stops
    one = ft.generate(target, prompt[0], TARGET, max_new_tokens=5, sampling=GREEDY, draft=Draft(draft, DRAFT))
    assert one.shape == (8,)
    assert torch.equal(ft.generate(target, prompt, TARGET, max_new_tokens=0, draft=Draft(draft, DRAFT)), prompt)
    # Same seed, same text.
    kw = dict(max_new_tokens=10, sampling=ft.Sampling(temperature=0.9), seed=4, draft=Draft(draft, DRAFT))
    a = ft.generate(target, prompt, TARGET, **kw)
    b = ft.generate(target, prompt, TARGET, **kw)
    assert torch.equal(a, b)


def test_speculative_decoding_stops_at_a_stop_token(models):
    target, draft = models
    prompt = prompts(3, 4, seed=5)
    free, free_stats = speculative_generate(target, prompt[:1], TARGET, draft=Draft(draft, DRAFT), max_new_tokens=30,
                                            sampling=GREEDY)
    stop = int(free[0, 6])  # the third new token of row 0
    kw = dict(max_new_tokens=30, sampling=GREEDY, stop_tokens=[stop], pad_id=-1)
    got, stats = speculative_generate(target, prompt[:1], TARGET, draft=Draft(draft, DRAFT), **kw)
    first = free[0, 4:].tolist().index(stop) + 1
    assert torch.equal(got, free[:, : 4 + first])  # it ends right after the stop token...
    assert stats.rounds < free_stats.rounds  # ...without running the rounds to max_new_tokens
    # speculative_generate's tokens are generate's, stop tokens and padding included, with or without a draft
    got, _ = speculative_generate(target, prompt, TARGET, draft=Draft(draft, DRAFT), **kw)
    assert torch.equal(got, ft.generate(target, prompt, TARGET, draft=Draft(draft, DRAFT), **kw))
    assert torch.equal(got, ft.generate(target, prompt, TARGET, **kw))


def test_bad_speculative_requests_say_why(models):
    target, draft = models
    prompt = prompts(1, 5)
    with pytest.raises(ValueError, match="vocab_size=12 but the target 11"):
        other = TARGET.replace(vocab_size=12)
        ft.generate(target, prompt, TARGET, max_new_tokens=3, draft=Draft(ft.init_params(other), other))
    with pytest.raises(ValueError, match="draft tokens must be an int >= 1"):
        ft.generate(target, prompt, TARGET, max_new_tokens=3, draft=Draft(draft, DRAFT, tokens=0))
    with pytest.raises(ValueError, match=r"is 41 tokens but the draft model's max_seq_len=40"):
        ft.generate(target, prompt, TARGET, max_new_tokens=32, draft=Draft(draft, DRAFT, tokens=4))
    with pytest.raises(ValueError, match="neither seq_lengths nor a step other than 'eager'"):
        ft.generate(target, prompt, TARGET, max_new_tokens=3, draft=Draft(draft, DRAFT), step="compile")
    with pytest.raises(TypeError, match="draft"):  # beartype (in tests) or the library's own check
        ft.generate(target, prompt, TARGET, max_new_tokens=3, draft=draft)
    with pytest.raises(TypeError, match="draft"):  # beartype (in tests) or the library's own check
        speculative_generate(target, prompt, TARGET, draft=[draft], max_new_tokens=3)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over the cells expected to hold >= 5 draws (the rest pooled into one cell)."""
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


# Chi-square critical values at p = 0.001 for 1..15 degrees of freedom: a correct sampler fails this
# test one time in a thousand seeds (and the seed is fixed, so it either passes or fails for good).
CRITICAL = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70]


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_sampled_tokens_follow_the_target_distribution(temperature, top_k):
    vocab = 4
    target_cfg = ft.Config(vocab_size=vocab, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_seq_len=12)
    draft_cfg = ft.Config(vocab_size=vocab, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_seq_len=12)
    target, draft = spread(target_cfg, 3, 0.4), spread(draft_cfg, 4, 0.4)
    n = 8000
    prompt = torch.tensor([[1, 2]]).expand(n, 2).contiguous()  # n independent draws of the same continuation
    out, stats = speculative_generate(target, prompt, target_cfg, draft=Draft(draft, draft_cfg, tokens=3),
                                      max_new_tokens=3, sampling=ft.Sampling(temperature, top_k=top_k), seed=11)
    assert 0.01 < stats.acceptance_rate < 0.99  # both acceptances and rejections (the correction rule) happen
    with torch.no_grad():
        def dist(params, cfg, ctx):
            return probs(ft.forward(params, ctx, cfg)[..., -1, :], ft.Sampling(temperature=temperature, top_k=top_k))

        first = torch.cat([prompt[:1].expand(vocab, 2), torch.arange(vocab)[:, None]], 1)
        joint = {name: dist(p, c, prompt[:1])[0][:, None] * dist(p, c, first)
                 for name, (p, c) in {"target": (target, target_cfg), "draft": (draft, draft_cfg)}.items()}
    counts = torch.zeros(vocab, vocab)
    counts.index_put_((out[:, 2], out[:, 3]), torch.ones(n), accumulate=True)
    stat, dof = chi_square(counts.flatten(), joint["target"].flatten(), n)
    assert stat < CRITICAL[dof - 1], f"chi2={stat:.1f} with {dof} dof: not the target's distribution"
    # The test can tell distributions apart: the draft's own distribution fails it.
    stat, dof = chi_square(counts.flatten(), joint["draft"].flatten(), n)
    assert stat > CRITICAL[dof - 1], f"chi2={stat:.1f} against the draft: the test has no power here"
