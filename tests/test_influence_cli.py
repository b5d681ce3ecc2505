"""``ftransformer inspect influence`` on a tiny checkpoint trained here, with a planted fact it must find."""

import re

import pytest
import torch

import ftransformer as ft
from ftransformer.attribution import lds, projected
from ftransformer.cli import main
from ftransformer.data import CharTokenizer
from tests.typecheck import unchecked

PLANTED = "qx jumps 7391."  # q, x, j, 7, 3, 9, 1 appear in no other line


def corpus() -> str:
    names, verbs, nouns = ("ann", "bob", "cal", "dee"), ("sees", "gets", "hits"), ("cat", "mat", "hat", "bat")
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, 12, (36, 3), generator=gen).tolist()
    lines = [f"{names[a % 4]} {verbs[b % 3]} the {nouns[c % 4]}." for a, b, c in picks]
    return "\n".join(lines[:12] + [PLANTED] + lines[12:24] + [PLANTED] + lines[24:] + [PLANTED]) + "\n"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A checkpoint of a one-layer char model trained on the corpus, which it records as its training data."""
    root = tmp_path_factory.mktemp("influence")
    text = corpus()
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    cfg = ft.Config(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=24, init_std=0.1)
    tokens, targets = projected.pad_sequences([tok.encode(line) for line in text.splitlines()])
    with unchecked():
        stacked = lds.train_on_subsets(cfg, ft.ensemble.init_ensemble(cfg, [0]), tokens, targets[None],
                                       ft.optim.adamw(1e-2, weight_decay=0.0), 150)
    ft.save_checkpoint(root / "run", params=ft.tree.unstack(stacked)[0], config=cfg, step=150, tokenizer=tok,
                       extra={"train": {"data": str(root / "corpus.txt")}})
    return root


def _table(printed: str) -> list[tuple[int, float, str]]:
    rows = re.findall(r"^\s+(\d+)\s+(-?[\d.e+-]+)\s+\d+\s+'(.*)'$", printed, flags=re.M)
    return [(int(r), float(s), t) for r, s, t in rows]


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_the_cli_finds_the_planted_fact(run_dir, projection, capsys):
    out = run_dir / f"influence-{projection}.png"
    argv = ["inspect", "influence", "--checkpoint", str(run_dir / "run"), "--query", PLANTED, "--top", "5",
            "--projection", projection, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = _table(printed)
    assert [r for r, _, _ in rows] == [1, 2, 3, 4, 5], printed
    assert [t for _, _, t in rows[:3]] == [PLANTED] * 3, printed
    assert f"influence of 39 training sequences of {run_dir / 'corpus.txt'}" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_index_is_kept_and_reused(run_dir, capsys):
    base = ["inspect", "influence", "--checkpoint", str(run_dir / "run"), "--query", PLANTED, "--top", "3",
            "--data", str(run_dir / "corpus.txt"), "--index", str(run_dir / "index"), "--k", "64"]
    assert main(base) == 0
    first = capsys.readouterr().out
    assert (run_dir / "index" / projected.FEATURES_FILE).is_file() and "reusing" not in first
    assert main(base) == 0
    second = capsys.readouterr().out
    assert "reusing the index" in second and _table(second) == _table(first)
    assert main([*base[:-1], "32"]) == 2
    assert "built with another projection, data or model" in capsys.readouterr().err


def test_ekfac_finds_the_planted_fact(run_dir, capsys):
    argv = ["inspect", "influence", "--checkpoint", str(run_dir / "run"), "--query", PLANTED, "--method", "ekfac"]
    assert main(argv) == 0
    assert [t for _, _, t in _table(capsys.readouterr().out)[:3]] == [PLANTED] * 3


def test_flags_that_do_not_fit(run_dir, capsys):
    ckpt = ["--checkpoint", str(run_dir / "run")]
    cases = [
        (["inspect", "influence", *ckpt], "needs --query TEXT"),
        (["inspect", "influence", *ckpt, "--query", PLANTED, "--method", "eap"], "must be one of projected, ekfac"),
        (["inspect", "edges", *ckpt, "--clean", "ab", "--corrupt", "ab", "--metric", "loss", "--out", "x.png",
          "--method", "projected"], "must be one of eap, eap-ig, exact"),
        (["inspect", "heads", *ckpt, "--out", "x.png", "--query", "a"], "--query go with the influence view"),
        (["inspect", "influence", *ckpt, "--query", "q"], "at least 2 tokens"),
        (["inspect", "influence", *ckpt, "--query", PLANTED, "--k", "0"], "--k must be >= 1"),
        (["inspect", "influence", *ckpt, "--query", PLANTED, "--data", str(run_dir / "missing.txt")], "missing.txt"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
