"""``ftransformer bench das`` on a tiny sweep: ours alone always; against pyvene where it imports (the bench
extra), the two finding the same IIA per hypothesis on the planted model."""

import argparse

import pytest

from ftransformer.bench import das as bench_das
from tests.typecheck import unchecked

TINY = ["--layers", "2", "--seq", "2", "--d-model", "8", "--pairs", "16", "--test-pairs", "64", "--steps", "40", "--lr", "0.1"]


def _args(argv):
    parser = argparse.ArgumentParser()
    bench_das.add_arguments(parser)
    return parser.parse_args(argv)


def test_ours_alone_prints_its_row_and_finds_the_planted_site(capsys):
    with unchecked():
        assert bench_das.run(_args(TINY + ["--no-pyvene"])) == 0
    out = capsys.readouterr().out
    assert "pyvene skipped (--no-pyvene)" in out and "ftransformer (one stacked step)" in out
    assert "[[0.0, 1.0], [0.0, 1.0]]" in out  # IIA 1 at the last position of both layers, 0 at position 0


def test_pyvene_finds_the_same_iia_per_hypothesis(capsys):
    pytest.importorskip("pyvene")
    with unchecked():
        assert bench_das.run(_args(TINY)) == 0
    out = capsys.readouterr().out
    assert "pyvene (one at a time)" in out and "largest IIA gap: 0.0 points" in out
