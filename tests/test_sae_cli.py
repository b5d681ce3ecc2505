"""``ftransformer sae collect | train | eval | features`` and ``bench sae`` (run through their own parsers:
the lead registers them in ``cli/__init__.py`` and ``cli/bench_cmd.py``)."""

import argparse
import json

import pytest

import ftransformer as ft
from ftransformer.bench import sae as bench_sae
from ftransformer.cli import sae_cmd
from ftransformer.data import CharTokenizer

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "the cat sat on the mat; the dog sat on the log. " * 40


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-cli")
    tok = CharTokenizer.from_text(TEXT)
    cfg = ft.Config(vocab_size=tok.vocab_size, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=17)
    ft.save_checkpoint(root / "model", params=ft.init_params(cfg, seed=0), config=cfg, step=0, tokenizer=tok)
    (root / "corpus.txt").write_text(TEXT)
    return root


def test_collect_train_eval_features(model, tmp_path, capsys):
    common = ["--checkpoint", str(model / "model"), "--data", str(model / "corpus.txt")]
    assert _run(sae_cmd, ["collect", *common, "--site", "blocks.0.resid_post", "--tokens", "600",
                          "--out", str(tmp_path / "acts")]) == 0
    assert "wrote 600 x 24 activations of blocks.0.resid_post" in capsys.readouterr().out
    assert _run(sae_cmd, ["train", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "run"), "--d-sae", "48",
                          "--k", "2", "4", "--lr", "3e-3", "--steps", "20", "--batch-size", "64"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20 and len(json.loads(lines[-1])["l0"]) == 2
    capsys.readouterr()
    assert _run(sae_cmd, ["eval", *common, "--saes", str(tmp_path / "run"), "--sequences", "4"]) == 0
    out = capsys.readouterr().out
    assert "CE rec(0)" in out and "clean CE" in out and len(out.splitlines()) == 5
    assert _run(sae_cmd, ["features", *common, "--saes", str(tmp_path / "run"), "--member", "1", "--top", "2",
                          "--plot", str(tmp_path / "density.png"), "--sequences", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("latent ") == 5 and "[[" in out and "]]" in out
    assert (tmp_path / "density.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"--member must lie in \[0, 2\), got 5"):
        _run(sae_cmd, ["features", *common, "--saes", str(tmp_path / "run"), "--member", "5"])


def test_train_flag_errors(tmp_path):
    with pytest.raises(ValueError, match="sae train needs --acts, --out"):
        _run(sae_cmd, ["train"])
    with pytest.raises(ValueError, match=r"takes 1 value or 3 \(one per member\), got \{'--lr': 2\}"):
        _run(sae_cmd, ["train", "--acts", "a", "--out", "b", "--k", "1", "2", "3", "--lr", "1e-3", "1e-2"])


def test_bench_sae_prints_the_table(capsys):
    assert _run(bench_sae, ["--members", "3", "--d-in", "8", "--d-sae", "40", "--batch-size", "16",
                            "--repeats", "2", "--warmup", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "stack_step (one vmap)" in out and "3 x sae_step" in out and "SAELens" in out
    assert "one vmapped step equals the sequential steps" in out
    with pytest.raises(ValueError, match="--members must be >= 1, got 0"):
        _run(bench_sae, ["--members", "0"])
