"""Sampling: greedy, temperature, top-k, top-p against their definitions; ``probs`` is the distribution
``sample`` draws from (and speculative decoding compares); the options' one home, ``Sampling``."""

import pytest
import torch

import ftransformer as ft
from ftransformer.sampling import Sampling, draw, probs, restrict_logits


def test_temperature_zero_is_greedy(gen):
    logits = torch.randn(5, 37, generator=gen)
    assert torch.equal(ft.sample(logits, None, Sampling(temperature=0)), logits.argmax(-1))
    assert torch.equal(ft.sample(logits, ft.random.key(0), Sampling(temperature=0.0)), logits.argmax(-1))
    assert torch.equal(ft.sample(logits, None, Sampling(temperature=1.0, top_k=1)), logits.argmax(-1))


def test_samples_follow_the_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    for temperature in (1.0, 0.5):
        draws = ft.sample(logits.expand(20000, 5), ft.random.key(3), Sampling(temperature=temperature))
        freq = torch.bincount(draws, minlength=5).float() / draws.numel()
        torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


def test_top_k_restricts_the_support_to_the_k_largest(gen):
    logits = torch.randn(3, 37, generator=gen)
    draws = ft.sample(logits[:, None].expand(3, 4000, 37), ft.random.key(1), Sampling(temperature=5.0, top_k=4))
    top = logits.topk(4, dim=-1).indices
    for row in range(3):
        seen = set(draws[row].unique().tolist())
        assert seen == set(top[row].tolist())  # all four appear at a high temperature, nothing else


def test_top_p_keeps_the_smallest_set_holding_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log()
    assert torch.isinf(restrict_logits(logits, top_p=0.5)).tolist() == [False, True, True, True, True]
    assert torch.isinf(restrict_logits(logits, top_p=0.7)).tolist() == [False, False, True, True, True]
    assert torch.isinf(restrict_logits(logits, top_p=0.85)).tolist() == [False, False, False, True, True]
    assert not torch.isinf(restrict_logits(logits, top_p=1.0)).any()
    shuffled = torch.tensor([3, 0, 4, 1, 2])
    mask = torch.isinf(restrict_logits(logits[shuffled], top_p=0.7))
    assert mask.tolist() == [True, False, True, False, True]
    draws = ft.sample(logits[shuffled].expand(5000, 5), ft.random.key(2), Sampling(temperature=1.0, top_p=0.7))
    assert set(draws.unique().tolist()) == {1, 3}


def test_sampling_needs_a_key_and_valid_settings(gen):
    logits = torch.randn(2, 37, generator=gen)
    with pytest.raises(ValueError, match="needs a random key"):
        ft.sample(logits, None, Sampling(temperature=1.0))
    for bad in (dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ft.sample(logits, ft.random.key(0), Sampling(**{"temperature": 1.0, **bad}))
    # A wrong type is a TypeError: from beartype with the jaxtyping hook on, else a ValueError naming it.
    with pytest.raises((TypeError, ValueError), match="temperature"):
        ft.sample(logits, ft.random.key(0), Sampling(temperature="hot"))


def test_probs_is_the_distribution_sample_draws_from(gen):
    logits = torch.randn(3, 37, generator=gen)
    for sampling in (Sampling(temperature=0.7), Sampling(temperature=1.3, top_k=5), Sampling(top_p=0.6)):
        p = probs(logits, sampling)
        torch.testing.assert_close(p.sum(-1), torch.ones(3))
        n = 6000
        draws = ft.sample(logits[:, None].expand(3, n, 37), ft.random.key(5), sampling)
        freq = torch.stack([torch.bincount(row, minlength=37) for row in draws]).float() / n
        torch.testing.assert_close(freq, p, atol=0.03, rtol=0)
        assert bool((freq[p == 0] == 0).all())  # nothing outside the support is ever drawn
    # greedy: one-hot on the argmax, and the draw from it is the argmax whatever the key
    one_hot = probs(logits, Sampling(temperature=0))
    assert torch.equal(one_hot.argmax(-1), logits.argmax(-1)) and torch.equal(one_hot.sum(-1), torch.ones(3))
    assert torch.equal(draw(one_hot, ft.random.key(9)), logits.argmax(-1))


def test_sample_is_a_draw_from_probs_with_the_same_key(gen):
    logits = torch.randn(4, 37, generator=gen)
    sampling = Sampling(temperature=0.9, top_k=10)
    key = ft.random.key(3)
    want = draw(probs(logits, sampling), key)
    assert torch.equal(ft.sample(logits, key, Sampling(temperature=0.9, top_k=10)), want)
    assert torch.equal(ft.sample(logits, None, Sampling(top_k=1)), logits.argmax(-1))


def test_sampling_is_passed_one_way(gen):
    # The options come as one Sampling (the seed goes to whoever draws: generate(seed=...), a key here).
    logits = torch.randn(2, 37, generator=gen)
    with pytest.raises(TypeError, match="temperature"):
        ft.sample(logits, ft.random.key(0), temperature=0.5)
    with pytest.raises(TypeError, match="seed"):
        Sampling(seed=2)
