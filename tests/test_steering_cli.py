"""``ftransformer inspect steer`` on a tiny checkpoint: the vector, the sweep heatmap, samples with and without."""

import pytest

from ftransformer.cli import main

from tests.test_interp_cli import checkpoint  # noqa: F401  (the fixture: a 2-layer char-level checkpoint)


def test_inspect_steer_prints_the_sweep_and_both_samples_and_writes_the_heatmap(checkpoint, tmp_path, capsys):
    out = tmp_path / "steer.png"
    argv = ["inspect", "steer", "--checkpoint", str(checkpoint), "--positive", "the cat sat", "--negative",
            "the dog sat", "--prompt", "the ", "--layer", "1", "--scale", "6", "--sweep", "0,1:-6,0,6",
            "--max-new-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mean next-token log-prob of --positive" in text
    rows = [line.split() for line in text.splitlines() if line.strip().split(" ")[0] in ("0", "1")]
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) == 4 for r in rows)
    assert rows[0][2] == rows[1][2]  # scale 0 steers nothing: the same score at every layer
    assert "plain" in text and "layer  1 x 6" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--positive", "a"], "inspect steer needs --negative --prompt"),
    (["--sweep", "0,1"], "--sweep must be LAYERS:SCALES, comma-separated (e.g. 0,1:-4,0,4), got '0,1'"),
    (["--sweep", "5:1"], "--sweep layers must lie in [0, n_layers=2), got [5]"),
    (["--layer", "7"], "--layer must lie in [0, n_layers=2), got 7"),
])
def test_inspect_steer_names_what_is_missing_or_wrong(checkpoint, tmp_path, capsys, extra, message):
    texts = [] if extra[0] == "--positive" else ["--positive", "the cat", "--negative", "the dog", "--prompt", "the"]
    argv = ["inspect", "steer", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.png"), *texts, *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"ftransformer inspect: error: {message}"


def test_the_steer_flags_go_with_the_steer_view_only(checkpoint, tmp_path, capsys):
    argv = ["inspect", "heads", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "h.png"), "--positive", "a"]
    assert main(argv) == 2
    assert "--positive go with the steer view, not 'heads'" in capsys.readouterr().err


def test_plot_steering_sweep_checks_the_shape(tmp_path):
    import torch

    from ftransformer.interp.plots import plot_steering_sweep

    path = plot_steering_sweep(torch.rand(2, 3), [0, 2], [-1.0, 0.0, 1.0], tmp_path / "s.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"shape \(layers, scales\) = \(2, 2\), got \(2, 3\)"):
        plot_steering_sweep(torch.rand(2, 3), [0, 2], [-1.0, 1.0], tmp_path / "t.png")
