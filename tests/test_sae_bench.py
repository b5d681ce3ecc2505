"""``ftransformer bench sae`` against SAELens: the skip path (always) and the comparison itself (only where
``import sae_lens`` works, e.g. ``/tmp/saevenv/bin/python -m pytest tests/test_sae_bench.py``)."""

import argparse
import sys

import pytest
import torch

from ftransformer.bench import sae as bench_sae
from ftransformer.interp.sae.architectures import unit_rows

SMALL = ["--members", "2", "--d-in", "8", "--d-sae", "32", "--batch-size", "16", "--repeats", "2", "--warmup", "1",
         "--threads", "1"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench_sae.add_arguments(parser)
    return bench_sae.run(parser.parse_args(argv))


def _saelens():
    sl, why = bench_sae.load_saelens()
    if sl is None:
        pytest.skip(why)
    return sl


def test_without_sae_lens_its_rows_say_skipped_with_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` raises ImportError, installed or not
    assert _run([*SMALL, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    why = "skipped: sae_lens is not installed (pip install sae-lens"  # both tables and the loss line
    assert out.count(why) == 3 and "2 x SAELens SAETrainer.step" in out and "SAELens SAETrainer.step (1 SAE)" in out
    assert "loss comparison with SAELens skipped: sae_lens is not installed" in out
    assert "stack_step (one vmap)" in out and "2 x sae_step" in out and "sae_step (1 SAE)" in out


def test_other_architectures_skip_sae_lens_with_the_reason(capsys):
    assert _run([*SMALL, "--steps", "2", "--architecture", "relu"]) == 0
    out = capsys.readouterr().out
    assert "loss comparison with SAELens skipped: the SAELens comparison trains TopK SAEs (--architecture topk), " \
           "got relu" in out
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        _run([*SMALL, "--steps", "0"])


def test_sae_lens_rows_and_the_loss_table(capsys):
    _saelens()
    assert _run([*SMALL, "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out
    table = out[out.index("loss after the same 4 steps"):].splitlines()
    rows = [line.split() for line in table[3:]]
    assert len(rows) == 2 and [r[1] for r in rows] == ["4", "8"]  # member k
    assert all(r[3] == r[4] for r in rows)  # step 1: the same MSE, printed to 4 decimals


def test_sae_lens_with_our_training_rules_follows_our_trajectory(monkeypatch):
    """SAELens' TopK with its gradient clipping off and its decoder rows renormalized after every step (our
    rules) gives our MSE step for step: the two libraries train the same architecture on the same batches."""
    sl = _saelens()
    step = bench_sae.saelens_step

    def unit_rows_step(trainer, x):
        mse = step(trainer, x)
        with torch.no_grad():
            trainer.sae.W_dec.copy_(unit_rows(trainer.sae.W_dec))
        return mse

    parser = argparse.ArgumentParser()
    bench_sae.add_arguments(parser)
    cfg, hp, state, batches = bench_sae._setup(parser.parse_args([*SMALL, "--steps", "12"]))
    gap = max(abs(r["last_saelens"] / r["last"] - 1) for r in bench_sae.compare_losses(sl, cfg, hp, state, batches))
    assert gap > 1e-3  # with SAELens' own rules the trajectories part (what the bench's loss table shows)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_sae, "saelens_step", unit_rows_step)
    rows = bench_sae.compare_losses(sl, cfg, hp, state, batches)
    assert len(rows) == 2
    for row in rows:
        assert row["last_saelens"] == pytest.approx(row["last"], rel=1e-4)
