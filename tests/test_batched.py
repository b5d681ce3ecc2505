"""vmap over whole models: per-example gradients, DP-SGD, the gradient noise scale, ensembles and sweeps."""

import re

import pytest
import torch

import ftransformer as ft
from ftransformer import batched, optim
from ftransformer.train import make_train_step


def _batch(gen, cfg, *shape):
    tokens = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    return tokens, targets


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(ft.tree_leaves(a), ft.tree_leaves(b)))


def _loop_grads(params, tokens, targets, cfg):
    return [torch.func.grad(lambda p: ft.loss_fn(p, tokens[i], targets[i], cfg))(params) for i in range(len(tokens))]


# ---------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize("attn_impl", ["sdpa", "einsum"])
def test_per_example_grads_equal_a_python_loop(tiny_cfg, gen, attn_impl):
    cfg = tiny_cfg.replace(attn_impl=attn_impl, n_kv_heads=1, positional="rope")
    params = ft.init_params(cfg, seed=0)
    tokens, targets = _batch(gen, cfg, 5, 11)
    grads = ft.per_example_grads(params, tokens, targets, cfg)
    loop = _loop_grads(params, tokens, targets, cfg)
    for path, leaf in ft.tree_flatten_with_paths(grads).items():
        assert leaf.shape[0] == 5, path
    for i in range(5):
        assert _max_diff(ft.tree_map(lambda x: x[i], grads), loop[i]) < 1e-6
    norms = ft.per_example_grad_norms(params, tokens, targets, cfg)
    expected = torch.stack([optim.global_norm(g) for g in loop])
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6)


def test_per_example_grads_chunked_padding_and_dropout(tiny_cfg, gen):
    cfg = tiny_cfg.replace(dropout=0.2)
    params = ft.init_params(cfg, seed=1)
    tokens, targets = _batch(gen, cfg, 4, 9)
    targets[2] = -100  # an example of nothing but padding: zero gradient, not NaN
    targets[1, :4] = -100
    key = ft.random.key(7)
    grads = ft.per_example_grads(params, tokens, targets, cfg, key=key, chunk_size=3)
    assert all(leaf[2].abs().max() == 0 for leaf in ft.tree_leaves(grads))
    # example 1 with its own key (split from the key) equals a single-example gradient with that key
    k1 = ft.random.split(key, 4)[1]
    ref = torch.func.grad(lambda p: ft.loss_fn(p, tokens[1], targets[1], cfg.replace(attn_impl="einsum"), key=k1))(params)
    assert _max_diff(ft.tree_map(lambda x: x[1], grads), ref) < 1e-6
    # the same key gives the same gradients
    again = ft.per_example_grads(params, tokens, targets, cfg, key=key)
    assert _max_diff(grads, again) < 1e-6


def test_per_example_grads_checks_inputs(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 2, 5)
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        ft.per_example_grads(params, tokens[0], targets[0], tiny_cfg)
    with pytest.raises(ValueError, match="outside"):
        ft.per_example_grads(params, tokens + 100, targets, tiny_cfg)
    with pytest.raises(ValueError, match="targets must have the shape"):
        ft.per_example_grads(params, tokens, targets[:, :3], tiny_cfg)


# ---------------------------------------------------------------- DP-SGD


def test_dp_aggregate_clips_every_example(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 6, 8)
    grads = ft.per_example_grads(params, tokens, targets, tiny_cfg)
    clip = 0.5
    norms = optim.per_example_norms(grads)
    assert (norms > clip).all()  # the test means something: every example gets clipped
    # with one example at a time the aggregate is that example's clipped gradient
    for i in range(6):
        one = ft.tree_map(lambda x: x[i : i + 1], grads)
        dp = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0))
        out, _ = dp.update(one, dp.init(params), params)
        assert float(optim.global_norm(out)) <= clip * (1 + 1e-5)
    # and the mean of clipped gradients is no longer than C
    dp = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0))
    out, _ = dp.update(grads, dp.init(params), params)
    assert float(optim.global_norm(out)) <= clip * (1 + 1e-5)


def test_dp_aggregate_without_noise_or_clipping_is_the_plain_mean(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 4, 8)
    grads = ft.per_example_grads(params, tokens, targets, tiny_cfg)
    dp = optim.dp_aggregate(1e9, 0.0, key=ft.random.key(0))
    out, state = dp.update(grads, dp.init(params), params)
    mean = ft.tree_map(lambda x: x.mean(0), grads)
    for a, b in zip(ft.tree_leaves(out), ft.tree_leaves(mean)):
        assert torch.equal(a, b)
    assert int(state.count) == 1
    # equal token counts per example: the mean of per-example gradients is the batch gradient
    cfg = tiny_cfg.replace(attn_impl="einsum")
    batch_grad = torch.func.grad(lambda p: ft.loss_fn(p, tokens, targets, cfg))(params)
    assert _max_diff(out, batch_grad) < 1e-6


def test_dp_aggregate_noise_is_reproducible_by_key_and_has_the_right_scale(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens, targets = _batch(gen, tiny_cfg, 4, 8)
    grads = ft.per_example_grads(params, tokens, targets, tiny_cfg)
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
    noise = torch.cat([(x - y).flatten() for x, y in zip(ft.tree_leaves(a), ft.tree_leaves(clean))])
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


def test_dp_train_step_composes_with_adamw_and_learns(tiny_cfg, gen):
    cfg = tiny_cfg
    params = ft.init_params(cfg, seed=0)
    tokens, targets = _batch(gen, cfg, 8, 12)
    targets = tokens.roll(-1, dims=1)  # learnable: predict the next token of the same row, cyclically
    opt = optim.chain(optim.dp_aggregate(1.0, 0.0, key=ft.random.key(0)), optim.adamw(1e-2, weight_decay=0.0))
    step = batched.make_per_example_train_step(cfg, opt)
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
    a, _, _ = batched.make_per_example_train_step(cfg, dp_sgd).__call__(p0, dp_sgd.init(p0), (tokens, targets))
    plain = optim.sgd(0.1)
    b, _, _ = make_train_step(cfg.replace(attn_impl="einsum"), plain)(p0, plain.init(p0), (tokens, targets))
    assert _max_diff(a, b) < 1e-6
    # an optimizer that does not reduce the batch axis is refused
    with pytest.raises(ValueError, match="dp_aggregate"):
        batched.make_per_example_train_step(cfg, optim.sgd(0.1))(p0, optim.sgd(0.1).init(p0), (tokens, targets))


# ---------------------------------------------------------------- noise scale


def test_gradient_noise_scale_unbiased_estimator(gen):
    # Synthetic per-example "gradients" g_i = G + noise with known |G|^2 and tr(Sigma).
    true_g = torch.randn(50, generator=gen) * 0.2
    sigma = 0.7
    traces, g2s = [], []
    for _ in range(400):
        g = {"w": true_g + sigma * torch.randn(8, 50, generator=gen)}
        est = ft.gradient_noise_scale(g)
        traces.append(est.trace_cov)
        g2s.append(est.grad_sq_norm)
    trace, g2 = torch.stack(traces).mean(), torch.stack(g2s).mean()
    torch.testing.assert_close(trace, torch.tensor(50 * sigma**2), rtol=0.03, atol=0)
    torch.testing.assert_close(g2, true_g.square().sum(), rtol=0.1, atol=0)
    # the formula itself, on one batch: sample covariance trace with B - 1
    g = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(5, 2, 2, generator=gen)}
    flat = torch.cat([g["a"], g["b"].reshape(5, 4)], dim=1)
    est = ft.gradient_noise_scale(g)
    expected_trace = flat.var(dim=0, unbiased=True).sum()
    torch.testing.assert_close(est.trace_cov, expected_trace)
    torch.testing.assert_close(est.grad_sq_norm, flat.mean(0).square().sum() - expected_trace / 5)
    torch.testing.assert_close(est.b_simple, est.trace_cov / est.grad_sq_norm)
    with pytest.raises(ValueError, match="at least 2"):
        ft.gradient_noise_scale({"w": torch.ones(1, 3)})


def test_noise_scale_of_a_model(tiny_cfg, gen):
    params = ft.init_params(tiny_cfg, seed=0)
    batches = [_batch(gen, tiny_cfg, 4, 8) for _ in range(2)]
    est = batched.noise_scale(params, batches, tiny_cfg)
    assert est.trace_cov > 0 and torch.isfinite(est.b_simple)


# ---------------------------------------------------------------- ensembles and sweeps


def test_stack_unstack_init_ensemble(tiny_cfg):
    trees = [ft.init_params(tiny_cfg, seed=s) for s in (0, 1, 2)]
    stacked = ft.stack_params(trees)
    assert stacked["embed"]["tokens"].shape == (3, tiny_cfg.vocab_size, tiny_cfg.d_model)
    for a, b in zip(ft.unstack_params(stacked), trees):
        assert _max_diff(a, b) == 0
    assert _max_diff(ft.init_ensemble(tiny_cfg, [0, 1, 2]), stacked) == 0
    with pytest.raises(ValueError, match="same config"):
        ft.stack_params([trees[0], ft.init_params(tiny_cfg.replace(d_model=30), seed=0)])
    with pytest.raises(ValueError, match="at least one"):
        ft.stack_params([])
    # optimizer states stack too (NamedTuples)
    opt = optim.adamw(1e-3)
    s = ft.stack_params([opt.init(t) for t in trees])
    assert s.count.shape == (3,) and isinstance(ft.unstack_params(s)[1], optim.AdamWState)


# Why 1e-5 and not exact: the vmapped step adds and reduces in another order (batched matmuls), and
# under vmap AdamW computes its bias corrections in float32 tensors instead of float64 Python numbers;
# each gives float32 round-off (~1e-7 relative). Adam divides m by sqrt(v), so where a gradient is tiny
# a relative change in it moves the update by up to ~lr; with lr=1e-3 over three steps the parameters
# still agree to ~2e-7 in practice, well inside 1e-5.
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_ensemble_step_equals_separate_train_steps(tiny_cfg, gen, dropout):
    cfg = tiny_cfg.replace(attn_impl="einsum", dropout=dropout)
    seeds = [0, 1, 2]

    def make_opt():
        return optim.chain(optim.clip_by_global_norm(1.0),
                           optim.adamw(optim.warmup_cosine(1e-3, 2, 10), weight_decay=0.1))

    stacked = ft.init_ensemble(cfg, seeds)
    step = ft.train.make_ensemble_step(cfg, make_opt())
    state = step.init(stacked)
    single = make_train_step(cfg, make_opt())
    members = ft.unstack_params(stacked)
    states = [make_opt().init(p) for p in members]
    for t in range(3):
        tokens, targets = _batch(gen, cfg, 3, 4, 13)  # each member its own batch
        keys = torch.stack([ft.random.fold_in(ft.random.key(s), t) for s in seeds]) if dropout else None
        stacked, state, metrics = step(stacked, state, (tokens, targets), keys)
        for i in range(3):
            members[i], states[i], m = single(members[i], states[i], (tokens[i], targets[i]),
                                              None if keys is None else keys[i])
            assert abs(float(metrics["loss"][i]) - float(m["loss"])) < 1e-5
            assert abs(float(metrics["grad_norm"][i]) - float(m["grad_norm"])) < 1e-5
    for got, want in zip(ft.unstack_params(stacked), members):
        assert _max_diff(got, want) < 1e-5
    for got, want in zip(ft.unstack_params(state), states):
        assert _max_diff(got, want) < 1e-5
    assert metrics["loss"].shape == (3,) and metrics["lr"].shape == (3,)


def test_ensemble_step_with_sdpa_config(tiny_cfg, gen):
    # A config on the SDPA path trains on the einsum path inside vmap: the same model to ~1e-6.
    cfg = tiny_cfg
    opt = optim.sgd(0.1)
    stacked = ft.init_ensemble(cfg, [0, 1])
    step = ft.train.make_ensemble_step(cfg, opt)
    tokens, targets = _batch(gen, cfg, 2, 3, 9)
    new, _, _ = step(stacked, step.init(stacked), (tokens, targets))
    ref = [make_train_step(cfg, opt)(p, opt.init(p), (tokens[i], targets[i]))[0]
           for i, p in enumerate(ft.unstack_params(stacked))]
    assert _max_diff(new, ft.stack_params(ref)) < 1e-5


def test_sweep_per_member_lr_and_weight_decay(tiny_cfg, gen):
    cfg = tiny_cfg.replace(attn_impl="einsum")
    lrs, wds = [1e-3, 1e-2, 0.0], [0.0, 0.1, 0.5]

    def make_opt(lr, weight_decay):
        return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=weight_decay))

    hp = {"lr": torch.tensor(lrs), "weight_decay": torch.tensor(wds)}
    stacked = ft.init_ensemble(cfg, [0, 0, 0])
    step = ft.train.make_ensemble_step(cfg, make_opt)
    state = step.init(stacked, hp)
    tokens, targets = _batch(gen, cfg, 1, 4, 13)
    tokens, targets = tokens.expand(3, 4, 13), targets.expand(3, 4, 13)  # a sweep: the same batches
    for _ in range(2):
        stacked, state, metrics = step(stacked, state, (tokens, targets), hparams=hp)
    torch.testing.assert_close(metrics["lr"], hp["lr"])
    for i, p in enumerate(ft.unstack_params(ft.init_ensemble(cfg, [0, 0, 0]))):
        opt = make_opt(lrs[i], wds[i])
        single, s = make_train_step(cfg, opt), opt.init(p)
        for _ in range(2):
            p, s, _ = single(p, s, (tokens[i], targets[i]))
        assert _max_diff(ft.unstack_params(stacked)[i], p) < 1e-5
    assert _max_diff(ft.unstack_params(stacked)[2], ft.init_params(cfg, seed=0)) == 0  # lr 0: unchanged
    with pytest.raises(ValueError, match="one value per member"):
        step(stacked, state, (tokens, targets), hparams={"lr": torch.tensor([1.0]), "weight_decay": torch.tensor(wds)})
    with pytest.raises(ValueError, match="needs hparams"):
        step(stacked, state, (tokens, targets))


def test_ensemble_step_checks_shapes(tiny_cfg, gen):
    stacked = ft.init_ensemble(tiny_cfg, [0, 1])
    step = ft.train.make_ensemble_step(tiny_cfg, optim.sgd(0.1))
    tokens, targets = _batch(gen, tiny_cfg, 3, 4, 9)
    with pytest.raises(ValueError, match=r"members=2"):
        step(stacked, step.init(stacked), (tokens, targets))


def test_evaluate_ensemble_equals_evaluate_per_member(tiny_cfg, gen):
    stacked = ft.init_ensemble(tiny_cfg, [0, 1, 2])
    shared = [_batch(gen, tiny_cfg, 4, 10) for _ in range(2)]
    losses = batched.evaluate_ensemble(stacked, shared, tiny_cfg)
    members = ft.unstack_params(stacked)
    expected = torch.tensor([ft.evaluate(p, shared, tiny_cfg) for p in members])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    own = [_batch(gen, tiny_cfg, 3, 4, 10)]
    losses = batched.evaluate_ensemble(stacked, own, tiny_cfg)
    expected = torch.tensor([ft.evaluate(p, [(own[0][0][i], own[0][1][i])], tiny_cfg) for i, p in enumerate(members)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CLI


SMALL_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))
FAST = ["--preset", "tiny", "--quiet", "--set", "eval_batches=2", "--batch-size", "4"]


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_sweep_grid_trains_members_in_one_loop(tmp_path, small_file, capsys):
    from ftransformer import checkpoint
    from ftransformer.cli import main

    out = tmp_path / "sweep"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "4", "--eval-every", "2", "--out", str(out),
               "--sweep", "lr=1e-3,1e-2", "--sweep", "weight_decay=0,0.1"])
    printed = capsys.readouterr().out
    assert rc == 0
    records = _metrics(out)
    assert sorted({r["member"] for r in records}) == [0, 1, 2, 3]
    assert [r["step"] for r in records if r["member"] == 3] == [0, 2, 4]
    assert {(r["hparams"]["lr"], r["hparams"]["weight_decay"]) for r in records} == {
        (1e-3, 0.0), (1e-3, 0.1), (1e-2, 0.0), (1e-2, 0.1)}
    assert (out / "loss.png").is_file()
    assert "rank" in printed and "lr=0.01,weight_decay=0.1" in printed
    # the table ranks by val loss
    table = [line for line in printed.splitlines() if line[:1].isdigit()]
    vals = [float(line.split()[3]) for line in table]
    assert len(table) == 4 and vals == sorted(vals)
    # each member is its own checkpoint, loadable by generate, holding that member's recipe
    for i in range(4):
        ck = checkpoint.load_checkpoint(out / f"member-{i}" / "latest")
        assert ck.step == 4 and ck.extra["member"]["member"] == i
    ck = checkpoint.load_checkpoint(out / "member-3" / "latest")
    assert ck.extra["train"]["recipe"]["lr"] == 1e-2 and ck.extra["train"]["recipe"]["weight_decay"] == 0.1
    rc = main(["generate", "--checkpoint", str(out / "member-2"), "--prompt", "line", "--max-new-tokens", "5"])
    assert rc == 0


def test_cli_ensemble_members_differ_by_seed(tmp_path, small_file, capsys):
    from ftransformer.cli import main

    out = tmp_path / "ens"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--eval-every", "2", "--out", str(out),
               "--ensemble", "2", "--seed", "5"])
    assert rc == 0
    records = _metrics(out)
    assert {r["seed"] for r in records} == {5, 6}
    step0 = [r["val_loss"] for r in records if r["step"] == 0]
    assert step0[0] != step0[1]  # other seeds, other initial models


def test_cli_dp_and_noise_scale(tmp_path, small_file, capsys):
    from ftransformer import checkpoint
    from ftransformer.cli import main

    out = tmp_path / "dp"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--eval-every", "2", "--out", str(out),
               "--dp-clip", "1.0", "--dp-noise", "0.5", "--log-noise-scale"])
    assert rc == 0
    assert "privacy accounting" in capsys.readouterr().out
    records = _metrics(out)
    assert [r["step"] for r in records] == [0, 2] and all("noise_scale" in r for r in records)
    ck = checkpoint.load_checkpoint(out / "latest")
    assert ck.extra["train"]["dp_clip"] == 1.0 and ck.extra["train"]["dp_noise"] == 0.5
    assert int(ck.opt_state["0.count"]) == 2  # the DP state: two aggregations, two draws of noise


@pytest.mark.parametrize("flags, message", [
    (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
    (["--ensemble", "2", "--dp-clip", "1.0"], "--dp-clip is not supported with --ensemble"),
    (["--sweep", "d_model=8,16"], "can sweep only"),
    (["--sweep", "lr=1e-3,abc"], "is not a number"),
    (["--ensemble", "2", "--sweep", "seed=0,1"], "--ensemble N sets the seeds"),
])
def test_cli_refuses_bad_vmap_flags(tmp_path, small_file, capsys, flags, message):
    from ftransformer.cli import main

    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(tmp_path / "x"), *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_train_help_lists_vmap_options():
    from ftransformer.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--ensemble", "--sweep", "--dp-clip", "--dp-noise", "--log-noise-scale"):
        assert flag in text


# ---------------------------------------------------------------- bench vmap


def test_bench_vmap_runs_on_the_tiny_preset(capsys):
    from ftransformer.cli import main

    rc = main(["bench", "vmap", "--preset", "tiny", "--batch-size", "3", "--members", "2", "--repeats", "1",
               "--warmup", "0", "--no-memory"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "per-example gradients vs the loop's" in out
    for row in ("vmap (einsum attention)", "python loop", "make_ensemble_step (vmap)", "8 x make_train_step"):
        assert row in out
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        assert "skipped: opacus not installed" in out
    else:
        assert re.search(r"opacus \d\.\de-(0[5-9]|[1-9]\d)", out)  # Opacus' per-sample grads agree with ours


def test_bench_vmap_memory_of_one_contender(capsys):
    import json

    from ftransformer.bench.vmap import measure_memory_here

    measure_memory_here(json.dumps({"preset": "tiny", "seq": 8, "batch": 3, "members": 2, "seed": 0,
                                    "name": "vmap (einsum attention)", "threads": 1}))
    assert json.loads(capsys.readouterr().out)["peak_mib"] >= 0


def test_sweep_optimizer_is_the_recipes_optimizer_per_member(tiny_cfg, gen):
    from ftransformer.cli.train_ensemble import sweep_optimizer
    from ftransformer.recipes import get_recipe, optimizer_for

    cfg = tiny_cfg.replace(attn_impl="einsum")
    recipe = get_recipe("tiny").replace(warmup_steps=2, steps=6)
    hp = {"lr": torch.tensor([recipe.lr]), "weight_decay": torch.tensor([recipe.weight_decay])}
    stacked = ft.init_ensemble(cfg, [0])
    step = ft.train.make_ensemble_step(cfg, sweep_optimizer(recipe, recipe.steps))
    state = step.init(stacked, hp)
    opt = optimizer_for(recipe)
    p, s = ft.init_params(cfg, seed=0), opt.init(ft.init_params(cfg, seed=0))
    single = make_train_step(cfg, opt)
    for _ in range(4):
        tokens, targets = _batch(gen, cfg, 1, 4, 13)
        stacked, state, m = step(stacked, state, (tokens, targets), hparams=hp)
        p, s, m1 = single(p, s, (tokens[0], targets[0]))
        assert abs(float(m["lr"][0]) - float(m1["lr"])) < 1e-9
    assert _max_diff(ft.unstack_params(stacked)[0], p) < 1e-5
