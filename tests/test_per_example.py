"""vmap over examples: per-example gradients, DP-SGD and the gradient noise scale."""

import pytest
import torch

import ftransformer as ft
from ftransformer import optim, per_example
from ftransformer.train import make_train_step
from ftransformer.layers import attention_kernel


def _batch(gen, cfg, *shape):
    tokens = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    return tokens, targets


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)))


def _loop_grads(params, tokens, targets, cfg):
    return [torch.func.grad(lambda p: ft.loss_fn(p, tokens[i], targets[i], cfg))(params) for i in range(len(tokens))]


# ---------------------------------------------------------------- per-example gradients


def test_per_example_grads_equal_a_python_loop(tiny_cfg, gen, kernel):
    cfg = tiny_cfg.replace(n_kv_heads=1, positional="rope")
    params = ft.init_params(cfg, seed=0)
    tokens, targets = _batch(gen, cfg, 5, 11)
    grads = ft.per_example.per_example_grads(params, tokens, targets, cfg)
    loop = _loop_grads(params, tokens, targets, cfg)
    for path, leaf in ft.tree.flatten_with_paths(grads).items():
        assert leaf.shape[0] == 5, path
    for i in range(5):
        assert _max_diff(ft.tree.map(lambda x: x[i], grads), loop[i]) < 1e-6
    norms = ft.per_example.per_example_grad_norms(params, tokens, targets, cfg)
    expected = torch.stack([optim.global_norm(g) for g in loop])
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6)


@attention_kernel("einsum")
def test_per_example_grads_chunked_padding_and_dropout(tiny_cfg, gen):
    cfg = tiny_cfg.replace(dropout=0.2)
    params = ft.init_params(cfg, seed=1)
    tokens, targets = _batch(gen, cfg, 4, 9)
    targets[2] = -100  # an example of nothing but padding: zero gradient, not NaN
    targets[1, :4] = -100
    key = ft.random.key(7)
    grads = ft.per_example.per_example_grads(params, tokens, targets, cfg, key=key, chunk_size=3)
    assert all(leaf[2].abs().max() == 0 for leaf in ft.tree.leaves(grads))
    # example 1 with its own key (split from the key) equals a single-example gradient with that key
    k1 = ft.random.split(key, 4)[1]
    ref = torch.func.grad(lambda p: ft.loss_fn(p, tokens[1], targets[1], cfg, key=k1))(params)
    assert _max_diff(ft.tree.map(lambda x: x[1], grads), ref) < 1e-6
    # the same key gives the same gradients
    again = ft.per_example.per_example_grads(params, tokens, targets, cfg, key=key)
    assert _max_diff(grads, again) < 1e-6


def test_per_example_grads_checks_inputs(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 2, 5)
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        ft.per_example.per_example_grads(params, tokens[0], targets[0], tiny_cfg)
    with pytest.raises(ValueError, match="outside"):
        ft.per_example.per_example_grads(params, tokens + 100, targets, tiny_cfg)
    with pytest.raises(ValueError, match="targets must have the shape"):
        ft.per_example.per_example_grads(params, tokens, targets[:, :3], tiny_cfg)


# ---------------------------------------------------------------- DP-SGD


def test_dp_aggregate_clips_every_example(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 6, 8)
    grads = ft.per_example.per_example_grads(params, tokens, targets, tiny_cfg)
    clip = 0.5
    norms = optim.per_example_norms(grads)
    assert (norms > clip).all()  # the test means something: every example gets clipped
    # with one example at a time the aggregate is that example's clipped gradient
    for i in range(6):
        one = ft.tree.map(lambda x: x[i : i + 1], grads)
        dp = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0))
        out, _ = dp.update(one, dp.init(params), params)
        assert float(optim.global_norm(out)) <= clip * (1 + 1e-5)
    # and the mean of clipped gradients is no longer than C
    dp = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0))
    out, _ = dp.update(grads, dp.init(params), params)
    assert float(optim.global_norm(out)) <= clip * (1 + 1e-5)


@attention_kernel("einsum")
def test_dp_aggregate_without_noise_or_clipping_is_the_plain_mean(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 4, 8)
    grads = ft.per_example.per_example_grads(params, tokens, targets, tiny_cfg)
    dp = optim.dp_aggregate(1e9, 0.0, key=ft.random.key(0))
    out, state = dp.update(grads, dp.init(params), params)
    mean = ft.tree.map(lambda x: x.mean(0), grads)
    for a, b in zip(ft.tree.leaves(out), ft.tree.leaves(mean)):
        assert torch.equal(a, b)
    assert int(state.count) == 1
    # equal token counts per example: the mean of per-example gradients is the batch gradient
    cfg = tiny_cfg
    batch_grad = torch.func.grad(lambda p: ft.loss_fn(p, tokens, targets, cfg))(params)
    assert _max_diff(out, batch_grad) < 1e-6


def test_dp_aggregate_noise_is_reproducible_by_key_and_has_the_right_scale(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 4, 8)
    grads = ft.per_example.per_example_grads(params, tokens, targets, tiny_cfg)
    clip, sigma, b = 0.5, 2.0, 4

    def noisy(key, steps=1):
        dp = optim.dp_aggregate(clip, sigma, key=key)
        state = dp.init(params)
        for _ in range(steps):
            out, state = dp.update(grads, state, params)
        return out

    plain = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0))
    clean, _ = plain.update(grads, plain.init(params), params)
    a, again, other, later = noisy(ft.random.key(3)), noisy(ft.random.key(3)), noisy(ft.random.key(4)), noisy(
        ft.random.key(3), steps=2)
    assert _max_diff(a, again) == 0
    assert _max_diff(a, other) > 0.1 and _max_diff(a, later) > 0.1  # another key, another step: other noise
    noise = torch.cat([(x - y).flatten() for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(clean))])
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / (sigma * clip / b) - 1) < 0.1
    assert abs(float(noise.mean())) < 0.1 * sigma * clip / b


def test_dp_aggregate_checks(tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        optim.dp_aggregate(0.0, 1.0, key=ft.random.key(0))
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        optim.dp_aggregate(1.0, -1.0, key=ft.random.key(0))
    with pytest.raises(TypeError, match="key"):
        optim.dp_aggregate(1.0, 1.0, key=0)
    dp = optim.dp_aggregate(1.0, 1.0, key=ft.random.key(0))
    with pytest.raises(ValueError, match=r"per-example gradients"):
        dp.update(params, dp.init(params), params)


@attention_kernel("einsum")
def test_dp_train_step_composes_with_adamw_and_learns(tiny_cfg, gen):
    cfg = tiny_cfg
    params = ft.init_params(cfg, seed=0)
    tokens, targets = _batch(gen, cfg, 8, 12)
    targets = tokens.roll(-1, dims=1)  # learnable: predict the next token of the same row, cyclically
    opt = optim.chain(optim.dp_aggregate(1.0, 0.0, key=ft.random.key(0)), optim.adamw(1e-2, weight_decay=0.0))
    step = per_example.make_per_example_train_step(cfg, opt)
    state = opt.init(params)
    first = None
    for _ in range(15):
        params, state, m = step(params, state, (tokens, targets))
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first - 0.3
    assert set(m) >= {"loss", "grad_norm", "mean_example_grad_norm", "lr", "tokens"}
    # with huge C and no noise, one DP step is the plain step (SGD: no Adam amplification)
    p0 = ft.init_params(cfg, seed=0)
    dp_sgd = optim.chain(optim.dp_aggregate(1e9, 0.0, key=ft.random.key(0)), optim.sgd(0.1))
    a, _, _ = per_example.make_per_example_train_step(cfg, dp_sgd).__call__(p0, dp_sgd.init(p0), (tokens, targets))
    plain = optim.sgd(0.1)
    b, _, _ = make_train_step(cfg, plain)(p0, plain.init(p0), (tokens, targets))
    assert _max_diff(a, b) < 1e-6
    # an optimizer that does not reduce the batch axis is refused
    with pytest.raises(ValueError, match="dp_aggregate"):
        per_example.make_per_example_train_step(cfg, optim.sgd(0.1))(p0, optim.sgd(0.1).init(p0), (tokens, targets))


# ---------------------------------------------------------------- noise scale


def test_gradient_noise_scale_unbiased_estimator(gen):
    # Synthetic per-example "gradients" g_i = G + noise with known |G|^2 and tr(Sigma).
    true_g = torch.randn(50, generator=gen) * 0.2
    sigma = 0.7
    traces, g2s = [], []
    for _ in range(400):
        g = {"w": true_g + sigma * torch.randn(8, 50, generator=gen)}
        est = ft.per_example.gradient_noise_scale(g)
        traces.append(est.trace_cov)
        g2s.append(est.grad_sq_norm)
    trace, g2 = torch.stack(traces).mean(), torch.stack(g2s).mean()
    torch.testing.assert_close(trace, torch.tensor(50 * sigma**2), rtol=0.03, atol=0)
    torch.testing.assert_close(g2, true_g.square().sum(), rtol=0.1, atol=0)
    # the formula itself, on one batch: sample covariance trace with B - 1
    g = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(5, 2, 2, generator=gen)}
    flat = torch.cat([g["a"], g["b"].reshape(5, 4)], dim=1)
    est = ft.per_example.gradient_noise_scale(g)
    expected_trace = flat.var(dim=0, unbiased=True).sum()
    torch.testing.assert_close(est.trace_cov, expected_trace)
    torch.testing.assert_close(est.grad_sq_norm, flat.mean(0).square().sum() - expected_trace / 5)
    torch.testing.assert_close(est.b_simple, est.trace_cov / est.grad_sq_norm)
    with pytest.raises(ValueError, match="at least 2"):
        ft.per_example.gradient_noise_scale({"w": torch.ones(1, 3)})


def test_noise_scale_of_a_model(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    batches = [_batch(gen, tiny_cfg, 4, 8) for _ in range(2)]
    est = per_example.noise_scale(params, batches, tiny_cfg)
    assert est.trace_cov > 0 and torch.isfinite(est.b_simple)
