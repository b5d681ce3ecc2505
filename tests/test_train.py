import math

import pytest
import torch
import torch.utils._pytree as pytree

import ftransformer as ft
from ftransformer import optim
from ftransformer.train import evaluate, make_train_step
from ftransformer.layers import attention_kernel

# tiny: vocab 37, d_model 24, heads 3, layers 2, d_ff 40, max_seq_len 16; batches below use batch 4-6, seq 11.
CFG = ft.PRESETS["tiny"]
SEQ = 11


def make_batch(seed, batch=4, seq=SEQ, vocab=CFG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def padded_batch(seed, batch=4):
    """Targets padded unevenly: the first rows are mostly padding, so micro-batches count different tokens."""
    tokens, targets = make_batch(seed, batch)
    targets = targets.clone()
    targets[0, 2:] = -100
    targets[1, 5:] = -100
    return tokens, targets


def assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
    fa, fb = ft.tree.flatten_with_paths(a), ft.tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def assert_params_after_adam_close(a, b, *, total_lr):
    """Parameters after Adam updates whose gradients differ only by float32 summation order.

    They cannot be held to float32 rounding: Adam divides each gradient component by its own running
    scale, so a component that is small against the rounding noise of the sums it comes from gets an
    update of up to ~lr whose size follows that noise, and another summation order (vmap, accumulation,
    compiled kernels, another CPU's vector units) changes it. Each update moves a parameter by at most
    ~lr, so no element may differ by more than 1% of the summed lr (a real bug is off by O(lr)), and all
    but 1% of the elements must still agree to float32 rounding (a systematic error moves them all).
    Compare loss, gradient norm and first moments tightly alongside: those are not amplified. Tests
    using this drop biases: the key bias's true gradient is exactly 0, so its update is pure noise.
    """
    assert_trees_close(a, b, atol=1e-2 * total_lr, rtol=0)
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b))])
    assert torch.quantile(diff, 0.99) <= 1e-6


# ---------------------------------------------------------------- the step against torch.autograd


def test_step_matches_autograd_and_torch_adamw():
    # No biases: the key bias's true gradient is zero (softmax ignores a constant shift), so it gets
    # rounding noise that Adam scales up to full-size steps -- equal programs, unequal noise.
    cfg = CFG.replace(bias=False)
    params = ft.init_params(cfg, seed=0)
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    step = make_train_step(cfg, opt)
    state = opt.init(params)

    flat = ft.tree.flatten_with_paths(params)
    torch_leaves = {k: torch.nn.Parameter(v.clone()) for k, v in flat.items()}
    torch_tree = ft.tree.unflatten_paths(torch_leaves)
    decay = [p for p in torch_leaves.values() if p.ndim >= 2]
    no_decay = [p for p in torch_leaves.values() if p.ndim < 2]
    topt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.99)
    )

    for i in range(3):
        batch = make_batch(i)
        params, state, metrics = step(params, state, batch, None)

        loss = ft.loss_fn(torch_tree, *batch, cfg)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(torch_leaves.values()), 0.5)
        topt.step()
        topt.zero_grad(set_to_none=True)

        torch.testing.assert_close(metrics["loss"], loss.detach())
        torch.testing.assert_close(metrics["grad_norm"], grad_norm)
        assert float(metrics["lr"]) == pytest.approx(1e-2)
        assert int(metrics["tokens"]) == 4 * SEQ
        assert_trees_close(params, ft.tree.unflatten_paths({k: v.detach() for k, v in torch_leaves.items()}))


def test_metrics_are_zero_dim_tensors():
    params = ft.init_params(CFG)
    opt = optim.adamw(optim.warmup_cosine(1e-3, 10, 100))
    _, state, metrics = make_train_step(CFG, opt)(params, opt.init(params), make_batch(0), None)
    assert set(metrics) == {"loss", "grad_norm", "lr", "tokens"}
    assert all(isinstance(v, torch.Tensor) and v.shape == () for v in metrics.values())
    assert float(metrics["lr"]) == 0.0  # the schedule's value at step 0: warm-up starts from zero
    assert float(optim.current_lr(state)) == 0.0
    assert int(state.count) == 1


def test_step_does_not_mutate_its_inputs():
    params = ft.init_params(CFG)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    step = make_train_step(CFG, opt)
    state = opt.init(params)
    params, state, _ = step(params, state, make_batch(0), None)  # non-zero moments from here on
    batch = padded_batch(1)
    inputs = (params, state, batch)
    before = [x.clone() for x in ft.tree.leaves(inputs)]
    new_params, new_state, _ = step(params, state, batch, None)
    for a, b in zip(before, ft.tree.leaves(inputs)):
        assert torch.equal(a, b)
    # The outputs are new tensors, not the inputs written over.
    old = {x.data_ptr() for x in ft.tree.leaves((params, state))}
    assert not old & {x.data_ptr() for x in ft.tree.leaves(new_params)}
    # Replaying the same inputs gives the same outputs.
    again, _, _ = step(params, state, batch, None)
    assert_trees_close(new_params, again, atol=0, rtol=0)


def test_updates_held_elsewhere_are_not_written_over():
    # A transformation whose updates are a tensor of its own state: the step must copy, not add in place.
    params = ft.init_params(CFG)
    fixed = ft.tree.map(lambda x: torch.full_like(x, 0.5), params)

    def init(p):
        return (fixed,)

    def update(grads, state, p=None):
        return state[0], state

    step = make_train_step(CFG, optim.GradientTransformation(init, update))
    new_params, state, metrics = step(params, init(params), make_batch(0), None)
    assert all(bool((x == 0.5).all()) for x in ft.tree.leaves(state))
    assert_trees_close(new_params, ft.tree.map(lambda x: x + 0.5, params))
    assert math.isnan(float(metrics["lr"]))  # this optimizer keeps no learning rate


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_equals_full_batch_with_uneven_padding(accum):
    params = ft.init_params(CFG, seed=1)
    batch = padded_batch(2)
    # SGD with lr 1 makes the update the gradient itself: the strictest comparison.
    opt = optim.sgd(1.0)
    full_p, _, full_m = make_train_step(CFG, opt)(params, opt.init(params), batch, None)
    acc_p, _, acc_m = make_train_step(CFG, opt, accum_steps=accum)(params, opt.init(params), batch, None)
    assert_trees_close(full_p, acc_p, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(full_m["loss"], acc_m["loss"])
    torch.testing.assert_close(full_m["grad_norm"], acc_m["grad_norm"])
    assert int(acc_m["tokens"]) == int((batch[1] != -100).sum()) == 4 * SEQ - 9 - 6

    # The naive average of micro-batch means is a different number: the weighting matters here.
    micro = [ft.loss_fn(params, t, y, CFG) for t, y in zip(batch[0].chunk(accum), batch[1].chunk(accum))]
    assert abs(float(sum(micro) / accum) - float(full_m["loss"])) > 1e-3


def test_accumulation_with_adamw_and_an_uneven_split():
    cfg = CFG.replace(bias=False)  # no key bias: its true gradient is 0, so Adam turns its rounding noise into ~lr
    params = ft.init_params(cfg, seed=2)
    batch = padded_batch(3, batch=5)  # 5 rows into 2 micro-batches: 3 + 2
    lr = 1e-3
    opt = optim.adamw(lr, weight_decay=0.1)
    full_p, full_s, _ = make_train_step(cfg, opt)(params, opt.init(params), batch, None)
    acc_p, acc_s, _ = make_train_step(cfg, opt, accum_steps=2)(params, opt.init(params), batch, None)
    assert_trees_close(full_s.mu, acc_s.mu, atol=1e-7, rtol=1e-5)  # the gradients: summation order only
    assert_params_after_adam_close(full_p, acc_p, total_lr=lr)


def test_accumulation_needs_enough_rows():
    params = ft.init_params(CFG)
    opt = optim.sgd(0.1)
    step = make_train_step(CFG, opt, accum_steps=3)
    with pytest.raises(ValueError, match="accum_steps=3 needs tokens with batch >= 3, got batch=2"):
        step(params, opt.init(params), make_batch(0, batch=2), None)
    with pytest.raises(ValueError, match="accum_steps must be an int >= 1"):
        make_train_step(CFG, opt, accum_steps=0)


# ---------------------------------------------------------------- dropout keys


def test_key_drives_dropout():
    cfg = CFG.replace(dropout=0.2)
    params = ft.init_params(cfg)
    opt = optim.sgd(0.1)
    step = make_train_step(cfg, opt, accum_steps=2)
    state = opt.init(params)
    batch = make_batch(0)
    a, _, ma = step(params, state, batch, ft.random.key(1))
    b, _, mb = step(params, state, batch, ft.random.key(1))
    c, _, mc = step(params, state, batch, ft.random.key(2))
    assert_trees_close(a, b, atol=0, rtol=0)
    assert float(ma["loss"]) == float(mb["loss"]) != float(mc["loss"])
    # No key: no dropout, the same step as a config without dropout.
    _, _, m_none = step(params, state, batch, None)
    _, _, m_off = make_train_step(CFG, opt, accum_steps=2)(params, state, batch, None)
    torch.testing.assert_close(m_none["loss"], m_off["loss"])


# ---------------------------------------------------------------- input errors


def test_step_rejects_bad_batches():
    params = ft.init_params(CFG)
    opt = optim.sgd(0.1)
    step = make_train_step(CFG, opt)
    state = opt.init(params)
    tokens, targets = make_batch(0)
    with pytest.raises(TypeError, match=r"batch must be a \(tokens, targets\) pair"):
        step(params, state, tokens, None)
    with pytest.raises(ValueError, match="tokens contains id 37, outside"):
        step(params, state, (tokens.clone().fill_(37), targets), None)
    with pytest.raises(ValueError, match="targets contains id -1, outside"):
        step(params, state, (tokens, targets.clone().fill_(-1)), None)
    with pytest.raises(TypeError, match="GradientTransformation"):  # the test hook's message or ours
        make_train_step(CFG, torch.optim.SGD)


# ---------------------------------------------------------------- evaluate


def test_evaluate_is_the_token_weighted_mean():
    params = ft.init_params(CFG, seed=3)
    batches = [padded_batch(4), make_batch(5, batch=2), padded_batch(6, batch=3)]
    tokens = torch.cat([t.flatten() for t, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    # One long "batch" of single-token rows would need seq 1; instead sum the per-batch sums by hand.
    total = sum(float(ft.loss_fn(params, t, y, CFG, reduction="sum")) for t, y in batches)
    expected = total / int((targets != -100).sum())
    assert evaluate(params, batches, CFG) == pytest.approx(expected, rel=1e-6)
    assert tokens.numel() == targets.numel()
    # Not the mean of the batch means.
    means = [float(ft.loss_fn(params, t, y, CFG)) for t, y in batches]
    assert abs(sum(means) / len(means) - expected) > 1e-4


def test_evaluate_uses_no_dropout_and_no_grad():
    cfg = CFG.replace(dropout=0.5)
    params = ft.tree.map(lambda x: x.requires_grad_(), ft.init_params(cfg))
    batches = [make_batch(0)]
    first = evaluate(params, batches, cfg)
    assert first == evaluate(params, batches, cfg)
    expected = ft.loss_fn(params, *batches[0], cfg.replace(dropout=0.0)).detach()
    assert first == pytest.approx(float(expected), rel=1e-6)
    assert isinstance(first, float)


def test_evaluate_whole_split_matches_a_hand_loop_over_the_windows():
    params = ft.init_params(CFG, seed=2)
    ids = torch.randint(0, CFG.vocab_size, (200,), generator=torch.Generator().manual_seed(7))
    seq = 13  # 199 targets: 15 windows of 13 and 4 left over
    # By hand: each non-overlapping window on its own, then the 4 last targets with the context before them.
    total, count = 0.0, 0
    for start in range(0, 15 * seq, seq):
        window = ids[start : start + seq + 1]
        total += float(ft.loss_fn(params, window[:-1], window[1:], CFG, reduction="sum"))
        count += seq
    tail = ids[-seq - 1 :]
    logits = ft.forward(params, tail[:-1], CFG)
    total += float(torch.nn.functional.cross_entropy(logits[-4:], tail[-4:], reduction="sum"))
    count += 4
    for batch_size in (1, 4, 16):
        windows = ft.data.SplitWindows(ids, seq, batch_size)
        assert evaluate(params, windows, CFG, progress=False) == pytest.approx(total / count, rel=1e-6)
    # progress bar or not, the same number
    assert evaluate(params, ft.data.SplitWindows(ids, seq, 2), CFG, progress=True) == pytest.approx(
        total / count, rel=1e-6)


def test_evaluate_rejects_empty_input():
    params = ft.init_params(CFG)
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(params, [], CFG)
    tokens, targets = make_batch(0)
    with pytest.raises(ValueError, match="only ignore_index=-100"):
        evaluate(params, [(tokens, torch.full_like(targets, -100))], CFG)


# ---------------------------------------------------------------- transforms of the step


@attention_kernel("einsum")
def test_vmap_over_the_step_trains_an_ensemble():
    # SDPA's backward has no batching rule; no key bias (see assert_params_after_adam_close)
    cfg = CFG.replace(bias=False)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    step = make_train_step(cfg, opt)
    members = [ft.init_params(cfg, seed=s) for s in range(2)]
    stack = lambda trees: pytree.tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    batch = make_batch(0)
    params, state = stack(members), stack([opt.init(m) for m in members])
    params, state, metrics = torch.func.vmap(step, in_dims=(0, 0, None, None))(params, state, batch, None)
    for j, member in enumerate(members):
        alone, _, m = step(member, opt.init(member), batch, None)
        assert_params_after_adam_close(alone, ft.tree.map(lambda x: x[j], params), total_lr=1e-2)
        torch.testing.assert_close(m["loss"], metrics["loss"][j])
        torch.testing.assert_close(m["grad_norm"], metrics["grad_norm"][j], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_step_matches_eager(no_typecheck):  # conftest: jaxtyping off while compiling
    cfg = CFG.replace(bias=False)  # no key bias (see assert_params_after_adam_close)
    schedule = optim.warmup_cosine(1e-2, 1, 10)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=0.1))
    eager = make_train_step(cfg, opt, accum_steps=2)
    compiled = make_train_step(cfg, opt, accum_steps=2, compile=True)
    p_e = p_c = ft.init_params(cfg)
    s_e = s_c = opt.init(p_e)
    for i in range(3):
        batch = padded_batch(i)
        p_e, s_e, m_e = eager(p_e, s_e, batch, None)
        p_c, s_c, m_c = compiled(p_c, s_c, batch, None)
        # Loss, gradient norm and the first moment (an average of the clipped gradients, linear in them)
        # differ only by float32 summation order: tight tolerances.
        torch.testing.assert_close(m_c["loss"], m_e["loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m_c["grad_norm"], m_e["grad_norm"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m_c["lr"], m_e["lr"])
        assert_trees_close(s_e[1].mu, s_c[1].mu, atol=1e-7, rtol=1e-4)
    # On an AVX-512/AMX CPU the parameters once differed by 1.2e-5 here: see assert_params_after_adam_close.
    assert_params_after_adam_close(p_e, p_c, total_lr=sum(schedule(i) for i in range(3)))
    assert int(s_c[1].count) == 3


def test_evaluate_streams_a_generator_also_with_a_progress_bar():
    cfg = ft.Config(vocab_size=11, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_seq_len=8)
    params = ft.init_params(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (2, 8), generator=gen), torch.randint(0, 11, (2, 8), generator=gen)) for _ in range(3)]
    expected = evaluate(params, batches, cfg)
    assert evaluate(params, (b for b in batches), cfg, progress=True) == expected
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(params, iter([]), cfg)


@attention_kernel("einsum")
def test_every_step_builder_returns_the_one_step_type(gen):
    """make_train_step, the ensemble step and the per-example (DP-SGD) step are all a TrainStep(init, step):
    init gives the optimizer state, and calling the TrainStep is calling its step."""
    cfg = CFG
    opt = optim.sgd(0.1)
    dp = optim.chain(optim.dp_aggregate(1.0, 0.0, key=ft.random.key(0)), optim.sgd(0.1))
    params = ft.init_params(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 9), generator=gen)
    batch = (tokens[:, :-1], tokens[:, 1:])
    stacked = ft.ensemble.init_ensemble(cfg, [0, 1])
    steps = {
        "plain": (make_train_step(cfg, opt), params, batch),
        "dp": (ft.per_example.make_per_example_train_step(cfg, dp), params, batch),
        "ensemble": (ft.ensemble.make_ensemble_step(cfg, opt), stacked, tuple(x.expand(2, 3, 8) for x in batch)),
    }
    for name, (step, p, b) in steps.items():
        assert type(step) is ft.train.TrainStep, name
        a = step(p, step.init(p), b)
        c = step.step(p, step.init(p), b, None)
        assert all(torch.equal(x, y) for x, y in zip(ft.tree.leaves(a[0]), ft.tree.leaves(c[0]))), name
        assert set(a[2]) >= {"loss", "grad_norm", "lr", "tokens"}, name


@pytest.mark.parametrize("chained", [False, True])
def test_donated_step_equals_the_pure_step_in_float64(chained):
    """``donate=True`` writes the update into the buffers passed in (torch's fused AdamW where the layouts agree,
    the single-tensor update where a weight is a transposed view): the same params, state and metrics."""
    params = ft.tree.map(lambda x: x.double(), ft.init_params(CFG, seed=0))
    params["blocks"][0]["attn"]["w_o"] = params["blocks"][0]["attn"]["w_o"].t().contiguous().t()  # a view
    adamw = optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1)
    opt = optim.chain(optim.clip_by_global_norm(0.5), adamw) if chained else adamw
    pure, donating = make_train_step(CFG, opt), make_train_step(CFG, opt, donate=True)
    mine = ft.tree.map(lambda x: x.clone(), params)
    mine["blocks"][0]["attn"]["w_o"] = params["blocks"][0]["attn"]["w_o"].t().clone().t()
    given = mine["blocks"][0]["attn"]["w_o"]
    a_state, b_state = pure.init(params), donating.init(mine)
    for i in range(3):
        tokens, targets = make_batch(i)
        tokens, targets = tokens[:, :8], targets[:, :8]
        params, a_state, a_metrics = pure(params, a_state, (tokens, targets))
        mine, b_state, b_metrics = donating(mine, b_state, (tokens, targets))
        assert_trees_close(params, mine, atol=1e-13, rtol=1e-12)
        assert_trees_close(a_state, b_state, atol=1e-13, rtol=1e-12)
        assert_trees_close(a_metrics, b_metrics, atol=1e-13, rtol=1e-12)
    assert mine["blocks"][0]["attn"]["w_o"] is given  # written in place: the buffer given is the one returned


def test_donate_must_be_a_bool(no_typecheck):
    with pytest.raises(ValueError, match="donate must be a bool"):
        make_train_step(CFG, optim.adamw(1e-3), donate="yes")
