"""``ftransformer bench patching`` runs on a tiny model in a few seconds, checks its contenders agree first,
and prints one row per contender."""

import argparse

import pytest
import torch

from ftransformer.bench import patching as bench_patching
from ftransformer.cli import build_parser

TINY = ["--layers", "2", "--d-model", "32", "--seq-len", "6", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]


def _args(argv):
    parser = argparse.ArgumentParser()
    bench_patching.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_bench_runs_on_a_tiny_model_and_prints_every_contender(capsys):
    assert bench_patching.run(_args(TINY)) == 0
    out = capsys.readouterr().out
    assert "every contender equals the loop to" in out
    for name in (bench_patching.LOOP, bench_patching.VMAP, bench_patching.ALL_POSITIONS, bench_patching.SWEEP):
        assert name in out
    assert "12 patches" in out  # 2 layers x 6 positions


def test_its_contenders_compute_the_same_sweep():
    args = _args(TINY + ["--site", "resid_mid"])
    fns = bench_patching.contenders(*bench_patching.setup(args), args.site)
    values = {name: fn() for name, fn in fns.items()}
    assert values[bench_patching.SWEEP].shape == (2, 6)
    for value in values.values():
        torch.testing.assert_close(value, values[bench_patching.LOOP], atol=1e-5, rtol=1e-5)
    assert bench_patching.check_equal(fns) <= bench_patching.TOL


def test_a_contender_that_disagrees_is_refused_before_timing():
    args = _args(TINY)
    fns = bench_patching.contenders(*bench_patching.setup(args), args.site)
    fns[bench_patching.SWEEP] = lambda: fns[bench_patching.LOOP]() + 1.0
    with pytest.raises(AssertionError, match=r"patch_sweep differs from the loop by 1 \(expected <= 0.0001\)"):
        bench_patching.check_equal(fns)


def test_it_is_a_bench_command():
    args = build_parser().parse_args(["bench", "patching"] + TINY)
    assert args.bench == "patching"
