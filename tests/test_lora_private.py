"""Private adapters (ftransformer.peft.private): per-example gradients of the adapters alone equal a loop over
examples, DP clipping and noise, a DP-SGD step that never touches the base, Opacus' accountant where installed."""

import pytest
import torch

import ftransformer as ft
from ftransformer import peft
from tests.typecheck import unchecked

F64 = torch.float64
CFG = ft.PRESETS["tiny"].replace(positional="rope", n_kv_heads=1, activation="swiglu", norm="rmsnorm", bias=False)
CLIP, SIGMA = 0.05, 1.3


def adapters(dora: bool) -> tuple[dict, dict, dict]:
    """``(base params, trainable, frozen)`` with every ``b`` moved off zero, so every adapter tensor has a gradient."""
    params = ft.init_params(CFG, seed=0, dtype=F64)
    trainable, frozen = peft.split(peft.lora(params, CFG, rank=3, alpha=6.0, key=ft.random.key(1), dora=dora))
    gen = torch.Generator().manual_seed(2)
    return params, ft.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=gen, dtype=F64), trainable), frozen


def batch(gen: torch.Generator, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG.vocab_size, (n, 8), generator=gen)
    targets = torch.randint(0, CFG.vocab_size, (n, 8), generator=gen)
    targets[1, :3] = -100  # an example with ignored targets: its mean is over its counted ones
    return tokens, targets


@pytest.mark.parametrize("dora", [False, True])
def test_per_example_grads_of_the_adapters_equal_a_loop(gen, dora):
    _, trainable, frozen = adapters(dora)
    tokens, targets = batch(gen)
    grads = peft.adapter_per_example_grads(trainable, frozen, tokens, targets, CFG)
    assert list(ft.tree.flatten_with_paths(grads)) == list(ft.tree.flatten_with_paths(trainable))  # adapters only
    for i in range(tokens.shape[0]):
        one = torch.func.grad(peft.adapter_loss)(trainable, frozen, tokens[i : i + 1], targets[i : i + 1], CFG)
        for g, want in zip(ft.tree.leaves(grads), ft.tree.leaves(one)):
            assert g.shape == (tokens.shape[0], *want.shape)
            torch.testing.assert_close(g[i], want, rtol=0, atol=1e-12)


def test_dp_aggregate_clips_each_example_and_adds_noise_of_the_stated_std(gen):
    _, trainable, frozen = adapters(False)
    tokens, targets = batch(gen)
    grads = peft.adapter_per_example_grads(trainable, frozen, tokens, targets, CFG)
    norms = ft.optim.per_example_norms(grads)
    assert bool((norms > CLIP).all())  # every example is clipped here
    factor = torch.clamp(CLIP / (norms + 1e-6), max=1.0)
    clipped = [ft.tree.map(lambda g: g[i] * factor[i], grads) for i in range(tokens.shape[0])]
    assert all(float(ft.optim.global_norm(c)) <= CLIP for c in clipped)  # the clip norm is respected
    want = ft.tree.map(lambda *xs: torch.stack(xs).mean(0), *clipped)

    def aggregate(sigma):
        dp = ft.optim.dp_aggregate(CLIP, sigma, key=ft.random.key(3))
        return dp.update(grads, dp.init(trainable), trainable)[0]

    quiet = aggregate(0.0)
    for g, w in zip(ft.tree.leaves(quiet), ft.tree.leaves(want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-15)
    noise = torch.cat([(n - q).flatten() for n, q in zip(ft.tree.leaves(aggregate(SIGMA)), ft.tree.leaves(quiet))])
    assert noise.numel() > 1500  # the std is estimated to ~2%
    std = SIGMA * CLIP / tokens.shape[0]
    assert abs(float(noise.std()) / std - 1) < 0.08 and abs(float(noise.mean())) < 4 * std / noise.numel() ** 0.5


def test_private_step_trains_the_adapters_and_never_the_base(gen):
    params, trainable, frozen = adapters(False)
    before = [x.clone() for x in ft.tree.leaves(params)]
    opt = peft.private_optimizer(1.0, 0.01, key=ft.random.key(4), lr=1e-2)
    step = peft.make_private_adapter_step(CFG, opt, frozen)
    state = step.init(trainable)
    tokens, targets = batch(gen, 6)
    losses = []
    with unchecked():
        for k in range(8):
            trainable, state, metrics = step(trainable, state, (tokens, targets), ft.random.key(k))
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert float(metrics["mean_example_grad_norm"]) > 0
    assert all(p.endswith((".a", ".b")) for p in ft.tree.flatten_with_paths(trainable))
    n_adapter = ft.count_params(trainable)
    assert sum(t.numel() for t in ft.tree.leaves(state) if t.is_floating_point() and t.ndim) == 2 * n_adapter
    for x, b in zip(ft.tree.leaves(params), before):
        assert torch.equal(x, b) and not x.requires_grad and x.grad is None


def test_dp_epsilon_validates_and_asks_opacus():
    with pytest.raises(ValueError, match="sample_rate"):
        peft.dp_epsilon(noise_multiplier=1.0, sample_rate=1.5, steps=10, delta=1e-5)
    pytest.importorskip("opacus")
    # Opacus' own test value (opacus/tests/accountants_test.py): sigma 1.5, q 0.04, 90 epochs, delta 1e-5.
    eps = peft.dp_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04), delta=1e-5)
    assert eps == pytest.approx(7.32911117143, rel=1e-6)
