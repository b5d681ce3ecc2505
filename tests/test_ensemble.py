"""vmap over models: ensembles and sweeps -- the vmapped step, evaluation, fit's Members adapter, the CLI."""

import re

import pytest
import torch
from test_per_example import _batch, _max_diff

import ftransformer as ft
from ftransformer import ensemble, optim
from ftransformer.train import make_train_step
from ftransformer.layers import attention_kernel


# ---------------------------------------------------------------- ensembles and sweeps


def test_stack_unstack_init_ensemble(tiny_cfg):
    trees = [ft.init_params(tiny_cfg, seed=s) for s in (0, 1, 2)]
    stacked = ft.ensemble.stack_params(trees)
    assert stacked["embed"]["tokens"].shape == (3, tiny_cfg.vocab_size, tiny_cfg.d_model)
    for a, b in zip(ft.ensemble.unstack_params(stacked), trees):
        assert _max_diff(a, b) == 0
    assert _max_diff(ft.ensemble.init_ensemble(tiny_cfg, [0, 1, 2]), stacked) == 0
    with pytest.raises(ValueError, match="models of one config"):
        ft.ensemble.stack_params([trees[0], ft.init_params(tiny_cfg.replace(d_model=30), seed=0)])
    with pytest.raises(ValueError, match="at least one"):
        ft.ensemble.stack_params([])
    # optimizer states stack too (NamedTuples)
    opt = optim.adamw(1e-3)
    s = ft.ensemble.stack_params([opt.init(t) for t in trees])
    assert s.count.shape == (3,) and isinstance(ft.ensemble.unstack_params(s)[1], optim.AdamWState)


# Why 1e-5 and not exact: the vmapped step adds and reduces in another order (batched matmuls), and
# under vmap AdamW computes its bias corrections in float32 tensors instead of float64 Python numbers;
# each gives float32 round-off (~1e-7 relative). Adam divides m by sqrt(v), so where a gradient is tiny
# a relative change in it moves the update by up to ~lr; with lr=1e-3 over three steps the parameters
# still agree to ~2e-7 in practice, well inside 1e-5.
@attention_kernel("einsum")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_ensemble_step_equals_separate_train_steps(tiny_cfg, gen, dropout):
    cfg = tiny_cfg.replace(dropout=dropout)
    seeds = [0, 1, 2]

    def make_opt():
        return optim.chain(optim.clip_by_global_norm(1.0),
                           optim.adamw(optim.warmup_cosine(1e-3, 2, 10), weight_decay=0.1))

    stacked = ft.ensemble.init_ensemble(cfg, seeds)
    step = ensemble.make_ensemble_step(cfg, make_opt())
    state = step.init(stacked)
    single = make_train_step(cfg, make_opt())
    members = ft.ensemble.unstack_params(stacked)
    states = [make_opt().init(p) for p in members]
    for t in range(3):
        tokens, targets = _batch(gen, cfg, 3, 4, 13)  # each member its own batch
        keys = torch.stack([ft.random.fold_in(ft.random.key(s), t) for s in seeds]) if dropout else None
        stacked, state, metrics = step.step(stacked, state, (tokens, targets), keys)
        for i in range(3):
            members[i], states[i], m = single(members[i], states[i], (tokens[i], targets[i]),
                                              None if keys is None else keys[i])
            assert abs(float(metrics["loss"][i]) - float(m["loss"])) < 1e-5
            assert abs(float(metrics["grad_norm"][i]) - float(m["grad_norm"])) < 1e-5
    for got, want in zip(ft.ensemble.unstack_params(stacked), members):
        assert _max_diff(got, want) < 1e-5
    for got, want in zip(ft.ensemble.unstack_params(state), states):
        assert _max_diff(got, want) < 1e-5
    assert metrics["loss"].shape == (3,) and metrics["lr"].shape == (3,)


def test_ensemble_step_with_sdpa_config(tiny_cfg, gen):
    # A config on the SDPA path trains on the einsum path inside vmap: the same model to ~1e-6.
    cfg = tiny_cfg
    opt = optim.sgd(0.1)
    stacked = ft.ensemble.init_ensemble(cfg, [0, 1])
    step = ensemble.make_ensemble_step(cfg, opt)
    tokens, targets = _batch(gen, cfg, 2, 3, 9)
    new, _, _ = step.step(stacked, step.init(stacked), (tokens, targets))
    ref = [make_train_step(cfg, opt)(p, opt.init(p), (tokens[i], targets[i]))[0]
           for i, p in enumerate(ft.ensemble.unstack_params(stacked))]
    assert _max_diff(new, ft.ensemble.stack_params(ref)) < 1e-5


@attention_kernel("einsum")
def test_sweep_per_member_lr_and_weight_decay(tiny_cfg, gen):
    cfg = tiny_cfg
    lrs, wds = [1e-3, 1e-2, 0.0], [0.0, 0.1, 0.5]

    def make_opt(lr, weight_decay):
        return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=weight_decay))

    hp = {"lr": torch.tensor(lrs), "weight_decay": torch.tensor(wds)}
    stacked = ft.ensemble.init_ensemble(cfg, [0, 0, 0])
    step = ensemble.make_ensemble_step(cfg, make_opt, hparams=hp)
    state = step.init(stacked)
    tokens, targets = _batch(gen, cfg, 1, 4, 13)
    tokens, targets = tokens.expand(3, 4, 13), targets.expand(3, 4, 13)  # a sweep: the same batches
    for _ in range(2):
        stacked, state, metrics = step.step(stacked, state, (tokens, targets))
    torch.testing.assert_close(metrics["lr"], hp["lr"])
    for i, p in enumerate(ft.ensemble.unstack_params(ft.ensemble.init_ensemble(cfg, [0, 0, 0]))):
        opt = make_opt(lrs[i], wds[i])
        single, s = make_train_step(cfg, opt), opt.init(p)
        for _ in range(2):
            p, s, _ = single(p, s, (tokens[i], targets[i]))
        assert _max_diff(ft.ensemble.unstack_params(stacked)[i], p) < 1e-5
    assert _max_diff(ft.ensemble.unstack_params(stacked)[2], ft.init_params(cfg, seed=0)) == 0  # lr 0: unchanged
    with pytest.raises(ValueError, match="one value per member"):
        ensemble.make_ensemble_step(cfg, make_opt, hparams={"lr": torch.tensor([1.0]), "weight_decay": torch.tensor(wds)})
    with pytest.raises(ValueError, match="one value per member"):  # 1 value each, 3 members
        ensemble.make_ensemble_step(cfg, make_opt, hparams={"lr": torch.tensor([1.0]), "weight_decay": torch.tensor([0.0])}
                                    ).step(stacked, state, (tokens, targets))
    with pytest.raises(ValueError, match="needs hparams"):
        ensemble.make_ensemble_step(cfg, make_opt)


def test_ensemble_step_checks_shapes(tiny_cfg, gen):
    stacked = ft.ensemble.init_ensemble(tiny_cfg, [0, 1])
    step = ensemble.make_ensemble_step(tiny_cfg, optim.sgd(0.1))
    tokens, targets = _batch(gen, tiny_cfg, 3, 4, 9)
    with pytest.raises(ValueError, match=r"members=2"):
        step.step(stacked, step.init(stacked), (tokens, targets))


def test_evaluate_ensemble_equals_evaluate_per_member(tiny_cfg, gen):
    stacked = ft.ensemble.init_ensemble(tiny_cfg, [0, 1, 2])
    shared = [_batch(gen, tiny_cfg, 4, 10) for _ in range(2)]
    losses = ensemble.evaluate_ensemble(stacked, shared, tiny_cfg)
    members = ft.ensemble.unstack_params(stacked)
    expected = torch.tensor([ft.evaluate(p, shared, tiny_cfg) for p in members])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    own = [_batch(gen, tiny_cfg, 3, 4, 10)]
    losses = ensemble.evaluate_ensemble(stacked, own, tiny_cfg)
    expected = torch.tensor([ft.evaluate(p, [(own[0][0][i], own[0][1][i])], tiny_cfg) for i, p in enumerate(members)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


@attention_kernel("einsum")
def test_ensemble_step_with_accumulation_equals_the_whole_batch(tiny_cfg, gen):
    # the same core as make_train_step: accum_steps splits each member's batch, same update
    cfg = tiny_cfg
    opt = optim.sgd(0.1)
    stacked = ft.ensemble.init_ensemble(cfg, [0, 1])
    tokens, targets = _batch(gen, cfg, 2, 4, 9)
    whole = ensemble.make_ensemble_step(cfg, opt)
    split = ensemble.make_ensemble_step(cfg, opt, accum_steps=2)
    a, _, ma = whole.step(stacked, whole.init(stacked), (tokens, targets))
    b, _, mb = split.step(stacked, split.init(stacked), (tokens, targets))
    assert isinstance(whole, ft.train.TrainStep) and _max_diff(a, b) < 1e-6
    torch.testing.assert_close(ma["loss"], mb["loss"])


# ---------------------------------------------------------------- loop.fit with the Members adapter


FIT_CFG = ft.Config(vocab_size=23, d_model=18, n_heads=3, n_layers=2, d_ff=30, max_seq_len=14, dropout=0.1)
FIT_RUN = dict(steps=6, batch_size=4, seq_len=10, eval_every=3, eval_batches=2, seed=5)
FIT_IDS = (torch.arange(1500) % 23).numpy().astype("uint16")


def _make_opt(lr, weight_decay):
    return optim.adamw(lr, weight_decay=weight_decay)


def _fit_members(out, *, resume=False, **kw):
    members = ensemble.Members(FIT_CFG, FIT_IDS[:1300], FIT_IDS[1300:], _make_opt,
                               [{"lr": 1e-2, "weight_decay": 0.0, "seed": 0}, {"lr": 3e-3, "weight_decay": 0.1, "seed": 1}],
                               seed=5)
    settings = ft.loop.FitSettings(**{**FIT_RUN, **kw})
    return members, ft.fit(members.init_params(), members.train_step(accum_steps=settings.accum_steps or 1), members,
                           settings, out_dir=out, resume=resume, progress=False, log=None)


@attention_kernel("einsum")
def test_fit_trains_members_with_per_member_checkpoints_records_and_plot(tmp_path):
    members, result = _fit_members(tmp_path)
    assert result.step == 6 and not result.interrupted
    assert [(r["step"], r["member"]) for r in result.history] == [(s, i) for s in (0, 3, 6) for i in (0, 1)]
    assert set(result.history[0]) == {"step", "member", "name", "seed", "hparams", "train_loss", "val_loss", "lr",
                                      "tokens_per_s", "elapsed_s"}
    assert (tmp_path / "loss.png").exists() and result.files["latest"] == tmp_path / "member-0" / "latest"
    for i, p in enumerate(ft.ensemble.unstack_params(result.params)):
        ck = ft.load_checkpoint(tmp_path / f"member-{i}" / "latest")
        assert ck.step == 6 and _max_diff(ck.params, p) == 0
        assert [r["member"] for r in ck.metrics] == [i, i, i]
    # each member trained as make_train_step would train it alone (its seed's batches and dropout keys)
    from ftransformer.loop import TRAIN_STREAM

    p0, opt = ft.init_params(FIT_CFG, seed=1), _make_opt(3e-3, 0.1)
    step, state = make_train_step(FIT_CFG, opt), opt.init(p0)
    for t in range(6):
        batch = ft.data.sample_batch(FIT_IDS[:1300], 4, 10, seed=1, step=t, stream=TRAIN_STREAM)
        p0, state, _ = step(p0, state, batch, ft.random.fold_in(ft.random.key(1), t))
    assert _max_diff(ft.ensemble.unstack_params(result.params)[1], p0) < 1e-5
    table = ensemble.format_ranking(members.summary(result))
    assert "lr=0.01" in table and "member-1" in table


def test_fit_members_resume_is_exact(tmp_path):
    _, reference = _fit_members(tmp_path / "a")
    _fit_members(tmp_path / "b", steps=3)
    _, resumed = _fit_members(tmp_path / "b", resume=True)
    assert resumed.history == [r | {"elapsed_s": s["elapsed_s"], "tokens_per_s": s["tokens_per_s"]}
                               for r, s in zip(reference.history, resumed.history)]
    assert _max_diff(resumed.params, reference.params) == 0
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _fit_members(tmp_path / "b")
    m = ensemble.Members(FIT_CFG, FIT_IDS[:1300], FIT_IDS[1300:], _make_opt, [{"lr": 1e-2, "weight_decay": 0.0}])
    with pytest.raises(TypeError, match="compile"):  # compilation is the step builder's: fit takes no compile=
        ft.fit(m.init_params(), m.train_step(), m, ft.loop.FitSettings(**FIT_RUN), out_dir=tmp_path / "c", compile=True)


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


@attention_kernel("einsum")
def test_sweep_optimizer_is_the_recipes_optimizer_per_member(tiny_cfg, gen):
    from ftransformer.cli.train_ensemble import sweep_optimizer
    from ftransformer.recipes import get_recipe, optimizer_for

    cfg = tiny_cfg
    recipe = get_recipe("tiny").replace(warmup_steps=2, steps=6)
    hp = {"lr": torch.tensor([recipe.lr]), "weight_decay": torch.tensor([recipe.weight_decay])}
    stacked = ft.ensemble.init_ensemble(cfg, [0])
    step = ensemble.make_ensemble_step(cfg, sweep_optimizer(recipe, recipe.steps), hparams=hp)
    state = step.init(stacked)
    opt = optimizer_for(recipe)
    p, s = ft.init_params(cfg, seed=0), opt.init(ft.init_params(cfg, seed=0))
    single = make_train_step(cfg, opt)
    for _ in range(4):
        tokens, targets = _batch(gen, cfg, 1, 4, 13)
        stacked, state, m = step.step(stacked, state, (tokens, targets))
        p, s, m1 = single(p, s, (tokens[0], targets[0]))
        assert abs(float(m["lr"][0]) - float(m1["lr"])) < 1e-9
    assert _max_diff(ft.ensemble.unstack_params(stacked)[0], p) < 1e-5
