import json
import math

import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer import checkpoint, loop, optim

# every axis a different size: vocab 23, d_model 18, heads 3, d_ff 30, max_seq 14, seq 10, batch 6, layers 2
CFG = ft.Config(vocab_size=23, d_model=18, n_heads=3, n_layers=2, d_ff=30, max_seq_len=14, dropout=0.1)
RUN = dict(steps=10, batch_size=6, seq_len=10, eval_every=4, eval_batches=2, seed=5)


def corpus(n=2000):
    # a noisy repeating pattern: learnable, so the loss moves
    rng = np.random.default_rng(0)
    ids = np.arange(n) % CFG.vocab_size
    noise = rng.random(n) < 0.2
    ids[noise] = rng.integers(0, CFG.vocab_size, int(noise.sum()))
    return ids.astype(np.uint16)


IDS = corpus()
TRAIN, VAL = IDS[:1800], IDS[1800:]


def make_optimizer(steps=10):
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, steps, 1e-3)))


def run_fit(out, *, step=None, train=TRAIN, resume=False, progress=False, log=None, **kw):
    settings = loop.FitSettings(**{**RUN, **kw})
    if step is None:
        step = ft.train.make_train_step(CFG, make_optimizer(settings.steps), accum_steps=settings.accum_steps or 1)
    return loop.fit(ft.init_params(CFG, seed=1), step, loop.TokenData(CFG, train, VAL), settings, out_dir=out,
                    resume=resume, progress=progress, log=log)


def misbehaving_step(at_call, action, accum_steps=1):
    """fit's default train step, misbehaving on its ``at_call``-th call (counting from 1): pass it as ``step=``."""
    opt = make_optimizer(RUN["steps"])
    real = ft.train.make_train_step(CFG, opt, accum_steps=accum_steps)
    calls = {"n": 0}

    def wrapped(params, opt_state, batch, key):
        calls["n"] += 1
        if calls["n"] == at_call:
            return action(real, params, opt_state, batch, key)
        return real(params, opt_state, batch, key)

    return ft.train.TrainStep(opt.init, wrapped)


def assert_trees_equal(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        assert torch.equal(x, y)


def same_numbers(history):
    return [(r["step"], r["train_loss"], r["val_loss"], r["lr"]) for r in history]


def test_fit_writes_metrics_plot_and_checkpoints(tmp_path):
    result = run_fit(tmp_path)
    assert result.step == 10 and not result.interrupted
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 4, 8, 10]  # step 0, every eval_every, and the end
    assert lines == result.history
    for r in lines:
        assert set(r) == {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    assert lines[0]["tokens_per_s"] is None and lines[-1]["tokens_per_s"] > 0
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]  # it learned something
    assert lines[0]["lr"] == 0.0 and math.isclose(lines[-1]["lr"], optim.warmup_cosine(1e-2, 2, 10, 1e-3)(9), rel_tol=1e-6)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latest = checkpoint.load_checkpoint(tmp_path / "latest", config=CFG)
    latest.optimizer_state(make_optimizer())
    assert latest.step == 10 and latest.metrics == lines
    assert_trees_equal(latest.params, result.params)
    best = checkpoint.load_checkpoint(tmp_path / "best")
    best_val = min(r["val_loss"] for r in lines)
    assert result.best_val_loss == best_val
    assert best.step == next(r["step"] for r in lines if r["val_loss"] == best_val)


def test_resume_is_exact(tmp_path):
    reference = run_fit(tmp_path / "a", accum_steps=2)

    def interrupt(step, *args):
        raise KeyboardInterrupt

    # the 7th step: after the step-4 evaluation
    stopped = run_fit(tmp_path / "b", accum_steps=2, step=misbehaving_step(7, interrupt, accum_steps=2))
    assert stopped.interrupted and stopped.step == 6
    saved = checkpoint.load_checkpoint(tmp_path / "b" / "latest")
    assert saved.step == 6 and [r["step"] for r in saved.metrics] == [0, 4]

    resumed = run_fit(tmp_path / "b", accum_steps=2, resume=True)
    assert resumed.step == 10 and not resumed.interrupted
    assert same_numbers(resumed.history) == same_numbers(reference.history)
    assert_trees_equal(resumed.params, reference.params)
    assert_trees_equal(resumed.opt_state, reference.opt_state)
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert same_numbers(lines) == same_numbers(reference.history)
    assert resumed.best_val_loss == reference.best_val_loss


@pytest.mark.parametrize(
    ("change", "field"),
    [({"batch_size": 4}, "batch_size"), ({"seed": 6}, "seed"), ({"seq_len": 8}, "seq_len"),
     ({"train": TRAIN[:1500]}, "train_tokens")],
)
def test_resume_refuses_settings_that_change_the_batches(tmp_path, change, field):
    run_fit(tmp_path, steps=4)
    kw = dict(change)
    train_ids = kw.pop("train", TRAIN)
    with pytest.raises(ValueError, match=rf"cannot resume .* with {field}=.*saved with {field}="):
        run_fit(tmp_path, train=train_ids, resume=True, steps=10, **kw)


def test_resume_may_extend_the_run(tmp_path):
    run_fit(tmp_path, steps=4)
    assert run_fit(tmp_path, steps=6, resume=True).step == 6


def test_interrupt_during_evaluation_redoes_it_on_resume(tmp_path, monkeypatch):
    reference = run_fit(tmp_path / "a")
    real_evaluate = loop.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the val half of the step-4 evaluation
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    stopped = run_fit(tmp_path / "b")
    monkeypatch.undo()
    assert stopped.interrupted and stopped.step == 4 and [r["step"] for r in stopped.history] == [0]
    resumed = run_fit(tmp_path / "b", resume=True)
    assert same_numbers(resumed.history) == same_numbers(reference.history)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def diverge(step, params, opt_state, batch, key):
        params, opt_state, metrics = step(params, opt_state, batch, key)
        bad = ft.tree.map(lambda x: torch.full_like(x, float("nan")), params)
        return bad, opt_state, {**metrics, "loss": torch.tensor(float("nan"))}

    with pytest.raises(loop.NonFiniteLossError, match=r"loss became nan at step 7 .*last good checkpoint is .*latest.* \(step 4\)"):
        run_fit(tmp_path, step=misbehaving_step(7, diverge))
    ck = checkpoint.load_checkpoint(tmp_path / "latest")
    assert ck.step == 4
    assert all(torch.isfinite(x).all() for x in ft.tree.leaves(ck.params))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 4]


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        run_fit(tmp_path, resume=True)
    run_fit(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(step 2\)"):
        run_fit(tmp_path, steps=2)


def test_eval_batches_all_scores_the_whole_val_split(tmp_path):
    result = run_fit(tmp_path, eval_batches="all", accum_steps=2)
    # the val loss is exact: every target of the val split once, in non-overlapping seq_len windows
    exact = loop.evaluate(result.params, ft.data.SplitWindows(VAL, 10, 3), CFG)
    assert result.history[-1]["val_loss"] == pytest.approx(exact, rel=1e-6)
    assert result.history[-1]["val_loss"] != run_fit(tmp_path / "b", accum_steps=2).history[-1]["val_loss"]
    with pytest.raises(ValueError, match="eval_batches must be an int >= 1 or 'all', got 'every'"):
        run_fit(tmp_path / "c", eval_batches="every")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seq_len=20 but the model's max_seq_len=14"):
        run_fit(tmp_path, seq_len=20)
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by accum_steps=4"):
        run_fit(tmp_path, accum_steps=4)
    with pytest.raises(ValueError, match="eval_every must be an int >= 1"):
        run_fit(tmp_path, eval_every=0)


def test_accum_steps_is_given_once_or_the_same_on_the_step_and_the_settings(tmp_path):
    """The step's accum_steps is fit's when FitSettings leaves it out; given on both, the two must agree."""
    step = ft.train.make_train_step(CFG, make_optimizer(), accum_steps=2)
    assert step.accum_steps == 2 and loop.FitSettings(**RUN).accum_steps is None
    with pytest.raises(ValueError, match="FitSettings.accum_steps=3 but the step was built with accum_steps=2"):
        run_fit(tmp_path / "a", step=step, accum_steps=3)
    with pytest.raises(ValueError, match="batch_size=5 must be divisible by accum_steps=2"):
        run_fit(tmp_path / "b", step=step, batch_size=5)
    both = run_fit(tmp_path / "c", accum_steps=2)
    from_step = run_fit(tmp_path / "d", step=ft.train.make_train_step(CFG, make_optimizer(), accum_steps=2))
    assert same_numbers(from_step.history) == same_numbers(both.history)
    assert checkpoint.load_checkpoint(tmp_path / "d" / "latest").extra["fit"]["accum_steps"] == 2
    plain = ft.train.make_train_step(CFG, make_optimizer())
    neither = run_fit(tmp_path / "e", step=ft.train.TrainStep(plain.init, plain.step))  # a step that does not say: 1
    assert checkpoint.load_checkpoint(tmp_path / "e" / "latest").extra["fit"]["accum_steps"] == 1
    assert same_numbers(neither.history) == same_numbers(run_fit(tmp_path / "f", accum_steps=1).history)


def test_fit_takes_a_train_step_and_settings_and_no_step_options(tmp_path):
    """Precision and compilation belong to whoever builds the step: fit has no argument it could ignore."""
    step, data = ft.train.make_train_step(CFG, make_optimizer()), loop.TokenData(CFG, TRAIN, VAL)
    settings = loop.FitSettings(**RUN)
    with pytest.raises(TypeError, match="step"):  # beartype (tests) or fit's own check
        loop.fit(ft.init_params(CFG), step.step, data, settings, out_dir=tmp_path)
    with pytest.raises(TypeError, match="settings"):
        loop.fit(ft.init_params(CFG), step, data, RUN, out_dir=tmp_path)
    for option in ("compile", "precision"):
        with pytest.raises(TypeError, match=option):
            loop.fit(ft.init_params(CFG), step, data, settings, out_dir=tmp_path, **{option: None})
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        loop.FitSettings(steps=0, batch_size=2)
