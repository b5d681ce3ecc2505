"""``bench influence``: our EK-FAC factors and scores against kronfluence's on the same tiny Llama (values only)."""

import argparse
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ftransformer.bench import influence  # noqa: E402


def _args(**kw):
    parser = argparse.ArgumentParser()
    influence.add_arguments(parser)
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in kw.items()]
    return parser.parse_args(flags)


def test_ours_match_kronfluence_eigenvalues_and_scores():
    pytest.importorskip("kronfluence")
    args = _args(train=12, queries=3, seq_len=6, batch_size=4, vocab=40, d_model=16, layers=1, damping=1e-3)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg, params = influence.tiny_llama(Path(tmp) / "llama", vocab=40, d_model=16, layers=1, seed=0)
        train, queries = influence.data(40, 12, 6, 1), influence.data(40, 3, 6, 2)
        ours = influence.run_ours(cfg, params, train, queries, args, device, time.perf_counter)
        theirs = influence.run_kronfluence(model, train, queries, args, device, time.perf_counter, Path(tmp) / "k")
    assert set(theirs["lambdas"]) == set(ours["lambdas"])
    assert ours["scores"].shape == theirs["scores"].shape == (3, 12)
    corr = influence.compare(ours, theirs)
    assert corr["eigenvalues"] >= influence.GOAL_CORRELATION and corr["scores"] >= influence.GOAL_CORRELATION, corr


def test_cli_prints_the_table_and_says_why_kronfluence_is_skipped(capsys, monkeypatch):
    monkeypatch.setattr(influence, "kronfluence_missing", lambda: "kronfluence not installed (test)")
    assert influence.run(_args(train=8, queries=2, seq_len=5, batch_size=4, vocab=30, d_model=16, layers=1, no_memory=True)) == 0
    out = capsys.readouterr().out
    assert "ftransformer" in out and "fit s" in out and "skipped: kronfluence not installed (test)" in out
