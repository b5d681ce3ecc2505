"""Explicit random keys: reproducible, independent after a split, uniform, and the same under vmap."""

import pytest
import torch

from ftransformer import random


def test_same_key_gives_the_same_numbers():
    assert torch.equal(random.uniform(random.key(7), (5, 3)), random.uniform(random.key(7), (5, 3)))
    assert torch.equal(random.split(random.key(7), 4), random.split(random.key(7), 4))


def test_different_seeds_give_different_numbers():
    draws = [random.uniform(random.key(s), (64,)) for s in (0, 1, 2, -1, 2**40)]
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j])


def test_split_keys_differ_from_each_other_and_from_the_parent():
    parent = random.key(0)
    keys = random.split(parent, 16)
    assert keys.shape == (16,) and keys.dtype == torch.int64
    assert len(set(keys.tolist()) | {int(parent)}) == 17
    draws = torch.stack([random.uniform(k, (32,)) for k in keys])
    assert not torch.equal(draws[0], random.uniform(parent, (32,)))
    # Independent-looking streams: no two members correlate noticeably.
    corr = torch.corrcoef(draws)
    assert (corr - torch.eye(16)).abs().max() < 0.7
    # Splitting again goes on giving fresh keys: the children of two siblings share none.
    assert not set(random.split(keys[0], 8).tolist()) & set(random.split(keys[1], 8).tolist())


def test_fold_in_gives_a_new_key_per_step():
    k = random.key(3)
    folded = [int(random.fold_in(k, step)) for step in range(10)]
    assert len(set(folded)) == 10 and int(k) not in folded
    assert int(random.fold_in(k, 4)) == folded[4]


def test_uniform_is_in_unit_interval_with_the_right_moments():
    u = random.uniform(random.key(11), (200, 100))
    assert u.shape == (200, 100) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.003)
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert float((counts / u.numel() - 0.1).abs().max()) < 0.01
    assert random.uniform(random.key(0), (3,), dtype=torch.float64).dtype == torch.float64


def test_key_rejects_non_integers():
    for bad in (1.5, "3", True, torch.tensor(3)):
        with pytest.raises(TypeError, match="seed"):
            random.key(bad)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_keeps_about_one_minus_rate_and_rescales(rate):
    x = torch.full((100, 300), 2.0)
    y = random.dropout(x, rate, random.key(1))
    kept = y != 0
    assert float(kept.float().mean()) == pytest.approx(1 - rate, abs=0.01)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - rate)))
    assert float(y.mean()) == pytest.approx(2.0, rel=0.03)  # inverted dropout keeps the expectation
    assert torch.equal(y, random.dropout(x, rate, random.key(1)))
    assert not torch.equal(y, random.dropout(x, rate, random.key(2)))


def test_dropout_is_the_identity_without_a_key_or_at_rate_zero():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert random.dropout(x, 0.5, None) is x
    assert random.dropout(x, 0.0, random.key(0)) is x


def test_vmap_over_keys_equals_the_loop():
    keys = random.split(random.key(5), 6)
    batched = torch.func.vmap(lambda k: random.uniform(k, (4, 7)))(keys)
    looped = torch.stack([random.uniform(k, (4, 7)) for k in keys])
    assert torch.equal(batched, looped)
    x = torch.ones(6, 4, 7)
    dropped = torch.func.vmap(lambda xi, k: random.dropout(xi, 0.3, k))(x, keys)
    assert torch.equal(dropped, torch.stack([random.dropout(x[i], 0.3, keys[i]) for i in range(6)]))
    split = torch.func.vmap(lambda k: random.split(k, 3))(keys)
    assert torch.equal(split, torch.stack([random.split(k, 3) for k in keys]))
    folded = torch.func.vmap(lambda k: random.fold_in(k, 9))(keys)
    assert torch.equal(folded, torch.stack([random.fold_in(k, 9) for k in keys]))
