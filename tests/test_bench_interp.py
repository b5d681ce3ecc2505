"""``ftransformer bench interp`` on a tiny random GPT-2: our sweeps equal a loop of single interventions (and
TransformerLens' loops, where it is importable) before anything is timed, and the table says met/missed."""

import argparse
import tempfile

import pytest
import torch

import ftransformer as ft
from ftransformer.bench import interp as bench_interp
from ftransformer.cli import build_parser
from ftransformer.interop.hf import load_hf

TINY = ["--size", "tiny", "--seq-len", "6", "--repeats", "1", "--warmup", "0"]


def _args(argv):
    parser = argparse.ArgumentParser()
    bench_interp.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny():
    """``(args, directory, hf_model, cfg, params, tokens)`` of the tiny size, saved once for the module."""
    args = _args(TINY)
    with tempfile.TemporaryDirectory() as directory:
        hf_model = bench_interp._hf_model(args, directory)
        cfg, params = load_hf(directory)
        yield args, directory, hf_model, cfg, params, bench_interp._tokens(args, cfg.vocab_size)


def test_our_sweeps_equal_the_loop_of_single_interventions(tiny):
    _, _, _, cfg, params, tokens = tiny
    mine = {task: fn() for task, fn in bench_interp.ours(cfg, params, *tokens).items()}
    loop = bench_interp.loops(cfg, params, *tokens)
    assert set(loop) == set(bench_interp.EXACT)
    assert mine["head ablation"].shape == loop["head ablation"].shape == (2, 4)
    assert mine["resid_pre patching"].shape == (2, 6)
    for task, want in loop.items():
        torch.testing.assert_close(mine[task], want, atol=1e-5, rtol=1e-5)
    assert bool((loop["head ablation"].abs() > 1e-4).any())  # the sweep has something to get right
    # AtP estimates the exact head patching: close on this near-linear random model, not equal.
    base = bench_interp.logit_diff(ft.forward(params, tokens[1], cfg))
    exact, estimate = loop["head_out patching"] - base, mine["attribution, all heads"].detach()
    assert exact.shape == estimate.shape == (2, 4)
    assert torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1] > 0.9
    diffs = bench_interp.check_values(mine, loop, "the loop")
    assert max(diffs.values()) <= bench_interp.TOL


def test_a_sweep_that_disagrees_is_refused_before_timing(tiny):
    _, _, _, cfg, params, tokens = tiny
    loop = bench_interp.loops(cfg, params, *tokens)
    wrong = {**loop, "resid_pre patching": loop["resid_pre patching"] + 1.0}
    with pytest.raises(AssertionError, match=r"resid_pre patching: ours differs from the loop by 1 \(expected <= 0.0001\)"):
        bench_interp.check_values(wrong, loop, "the loop")


def test_the_table_says_met_or_by_how_much_it_missed():
    times = {bench_interp.key("ours", task): [10.0, 30.0] for task in bench_interp.TASKS}
    times.update({bench_interp.key("tl", task): [50.0] for task in set(bench_interp.TL_TASK.values())})
    table = bench_interp.rows(times, "gpt2-small")
    assert [r["speedup"] for r in table] == [2.5] * 6 and [r["goal"] for r in table] == [2.0, 2.0, 2.0, 2.0, 20.0, 20.0]
    text = bench_interp.format_rows(table, None)
    assert text.count(" met") == 4 and text.count("missed by 8.00x") == 2
    alone = bench_interp.format_rows(bench_interp.rows({k: v for k, v in times.items() if k.startswith("ours")}, "4x256"),
                                     "transformer_lens is not importable")
    assert alone.count("TL skipped") == 6 and "TransformerLens rows skipped: transformer_lens is not importable" in alone


def test_the_bench_runs_without_transformer_lens_and_says_so(capsys):
    assert bench_interp.run(_args(TINY + ["--no-tl"])) == 0
    out = capsys.readouterr().out
    assert "values equal first (largest differences): vs loop: head ablation" in out
    assert "TransformerLens rows skipped: --no-tl" in out
    for task in bench_interp.TASKS:
        assert task in out


def test_transformer_lens_computes_the_same_values(tiny):
    pytest.importorskip("transformer_lens")
    _, directory, hf_model, cfg, params, tokens = tiny
    bridge, why = bench_interp.transformer_lens_model(directory, hf_model)
    assert why is None
    fns, diffs = bench_interp._fns(cfg, params, tokens, bridge)
    # TL's three contenders are timed once each: its exact head patching stands for the attribution too
    assert set(fns) == {bench_interp.key("ours", task) for task in bench_interp.TASKS} | {
        bench_interp.key("tl", task) for task in ("head ablation", "resid_pre patching", "head_out patching")
    }
    assert max(diffs["transformer_lens"].values()) <= bench_interp.TOL
    assert "correlation" in diffs["atp_vs_exact"]


def test_it_is_a_bench_command():
    args = build_parser().parse_args(["bench", "interp"] + TINY)
    assert args.bench == "interp" and args.size == "tiny"
