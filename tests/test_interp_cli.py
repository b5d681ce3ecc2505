"""Interpretability plots (``ft.interp.plot_*``) and ``ftransformer inspect attention | heads | logit-lens``."""

import re

import pytest
import torch

import ftransformer as ft
from ftransformer.cli import main
from ftransformer.data import BPETokenizer, CharTokenizer
from ftransformer.interop import save_hf_gpt2

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "the cat sat on the mat; the dog sat on the log. "


def assert_png(path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = CharTokenizer.from_text(TEXT)
    cfg = ft.Config(vocab_size=tok.vocab_size, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=17)
    path = tmp_path_factory.mktemp("ckpt") / "run"
    ft.save_checkpoint(path, params=ft.init_params(cfg, seed=0), config=cfg, step=0, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok = BPETokenizer.train(TEXT * 30, vocab_size=270)
    cfg = ft.Config(vocab_size=270, d_model=20, n_heads=2, n_layers=3, d_ff=28, max_seq_len=13, activation="gelu_tanh")
    return save_hf_gpt2(ft.init_params(cfg, seed=1), cfg, tmp_path_factory.mktemp("hf") / "gpt2", tokenizer=tok)


# ------------------------------------------------------------------------------------------ plots


def test_plot_attention_writes_a_png(tmp_path):
    pattern = torch.softmax(torch.randn(3, 7, 7).masked_fill(torch.ones(7, 7).triu(1).bool(), -torch.inf), -1)
    labels = ["a", " b", "$x$", "\n", "", "d\x1f", "\u4e2d"]  # mathtext, control characters and empty tokens
    path = ft.interp.plot_attention(pattern, labels, tmp_path / "sub" / "att.png", title="layer 1")
    assert path == tmp_path / "sub" / "att.png"
    assert_png(path)


def test_plot_attention_label_count_must_match():
    with pytest.raises(ValueError, match="labels has 2 entries but the pattern has kv_seq=4"):
        ft.interp.plot_attention(torch.full((1, 4, 4), 0.25), ["a", "b"], "unused.png")


def test_plot_head_scores_one_tensor_and_a_dict(tmp_path):
    assert_png(ft.interp.plot_head_scores(torch.rand(2, 5), tmp_path / "one.png", title="t"))
    scores = {"induction": torch.rand(3, 4), "previous_token": torch.rand(3, 4), "entropy": 2 * torch.rand(3, 4)}
    assert_png(ft.interp.plot_head_scores(scores, tmp_path / "three.png"))
    with pytest.raises(ValueError, match="empty"):
        ft.interp.plot_head_scores({}, tmp_path / "none.png")


def test_plot_logit_lens_writes_a_png(tmp_path):
    cfg = ft.Config(vocab_size=11, d_model=8, n_heads=2, n_layers=2, d_ff=12, max_seq_len=9)
    params = ft.init_params(cfg, seed=0)
    tokens = torch.arange(6)
    _, acts = ft.forward_with_activations(params, tokens, cfg)
    lens = ft.interp.logit_lens(params, acts, cfg)
    path = ft.interp.plot_logit_lens(lens, [str(int(t)) for t in tokens], lambda i: f"<{i}>", tmp_path / "lens.png")
    assert_png(path)


# ------------------------------------------------------------------------------------------ the CLI


def test_inspect_attention_on_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["inspect", "attention", "--checkpoint", str(checkpoint), "--text", "the cat", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer 1: 3 heads over 7 tokens" in printed and f"wrote {out}" in printed
    assert_png(out)
    assert main(["inspect", "attention", "--checkpoint", str(checkpoint), "--text", "the", "--layer", "0",
                 "--out", str(out)]) == 0
    assert "layer 0" in capsys.readouterr().out


def test_inspect_heads_prints_three_tables(checkpoint, tmp_path, capsys):
    out = tmp_path / "heads.png"
    assert main(["inspect", "heads", "--checkpoint", str(checkpoint), "--out", str(out), "--batch", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 random sequences of 8 tokens" in printed  # half = max_seq_len // 2
    for name in ("induction", "previous-token", "entropy (nats)"):
        table = re.search(rf"^{re.escape(name)}\n\s+layer\s+h0\s+h1\s+h2\s*\n\s+0(\s+\d\.\d\d){{3}}\n\s+1(\s+\d\.\d\d){{3}}$",
                          printed, flags=re.M)
        assert table, f"no {name} table in:\n{printed}"
    assert_png(out)


def test_inspect_logit_lens_on_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "lens.png"
    assert main(["inspect", "logit-lens", "--checkpoint", str(checkpoint), "--text", "the dog", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\s+embed\s+'.'$", printed, flags=re.M) and re.search(r"^\s+block 1\s+'.'$", printed, flags=re.M)
    assert_png(out)


def test_inspect_views_on_an_hf_dir(hf_dir, tmp_path, capsys):
    for view, extra in (("attention", ["--text", "the dog sat"]), ("heads", ["--half", "4", "--batch", "2"]),
                        ("logit-lens", ["--text", "the dog sat"])):
        out = tmp_path / f"{view}.png"
        assert main(["inspect", view, "--hf-dir", str(hf_dir), "--out", str(out), *extra]) == 0, view
        assert_png(out)
    assert "block 2" in capsys.readouterr().out


def test_inspect_crops_a_long_text_with_a_note(checkpoint, tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["inspect", "attention", "--checkpoint", str(checkpoint), "--text", TEXT, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: --text is 48 tokens and max_seq_len=17: using its last 17" in captured.err
    assert "over 17 tokens" in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "--text", "the", "--layer", "2", "--out", "x.png"], r"--layer must lie in \[0, n_layers=2\), got 2"),
        (["attention", "--text", "the"], "needs --out FILE.png"),
        (["attention", "--out", "x.png"], "needs --text TEXT"),
        (["heads", "--text", "the", "--out", "x.png"], "takes no --text"),
        (["heads", "--layer", "0", "--out", "x.png"], "--layer goes with the attention view"),
        (["attention", "--text", "zzz", "--out", "x.png"], "character"),  # not in the char vocabulary
    ],
)
def test_inspect_errors_are_one_line(checkpoint, argv, message, capsys):
    assert main(["inspect", argv[0], "--checkpoint", str(checkpoint), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftransformer inspect: error:") and "\n" not in err
    assert re.search(message, err), err


def test_inspect_needs_a_model_source_or_a_view(checkpoint, capsys):
    assert main(["inspect", "heads", "--out", "x.png"]) == 2
    assert "--checkpoint DIR or --hf-dir DIR" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(checkpoint)]) == 2
    assert "need a VIEW" in capsys.readouterr().err
    assert main(["inspect", "heads", "--preset", "seed", "--checkpoint", str(checkpoint), "--out", "x.png"]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "weights"])
    assert "invalid choice" in capsys.readouterr().err
