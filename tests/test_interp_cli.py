"""Interpretability plots (``ft.interp.plot_*``) and ``ftransformer inspect attention | heads | logit-lens |
patching | attribution | edges``."""

import re

import pytest
import torch

import ftransformer as ft
from ftransformer.cli import main
from ftransformer.data import BPETokenizer, CharTokenizer
from ftransformer.interop import save_hf_gpt2
from ftransformer.interp.plots import plot_patching

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


@pytest.mark.parametrize("by", [("layer", "position"), ("layer", "head"), ("layer",), ("head", "position", "layer")], ids=str)
def test_plot_patching_draws_every_kind_of_sweep(tmp_path, by):
    sizes = {"layer": 3, "position": 6, "head": 4}
    result = torch.randn([sizes[a] for a in by])
    labels = ["a", " b", "$x$", "\n", "c", "d"] if "position" in by else None
    path = plot_patching(result, tmp_path / "sweep.png", by=by, labels=labels, title="t", label="change")
    assert_png(path, min_bytes=3_000)


def test_plot_patching_reads_the_axes_in_the_order_by_names_them(tmp_path):
    """A sweep run with ``by=("head", "layer")`` is the transpose of one with ``("layer", "head")``: the same picture."""
    result = torch.randn(3, 4)
    a = plot_patching(result, tmp_path / "a.png", by=("layer", "head"))
    b = plot_patching(result.T, tmp_path / "b.png", by=("head", "layer"))
    assert a.read_bytes() == b.read_bytes()
    c = plot_patching(result.flip(0), tmp_path / "c.png", by=("layer", "head"))
    assert c.read_bytes() != a.read_bytes()


@pytest.mark.parametrize(
    ("shape", "kwargs", "message"),
    [
        ((3, 4), dict(by=("layer",)), r"result has 2 axes, shape \(3, 4\), but by names 1"),
        ((3, 4), dict(by=("position", "head")), "by must hold 'layer'"),
        ((3, 4), dict(by=("layer", "head"), labels=["a"] * 4), "no 'position' axis"),
        ((3, 4), dict(by=("layer", "position"), labels=["a"] * 3), "labels has 3 entries but the result has seq=4"),
    ],
)
def test_plot_patching_refuses_a_result_that_does_not_fit(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_patching(torch.zeros(shape), "unused.png", **kwargs)


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
    assert "--checkpoint DIR, --hf-dir DIR or --gguf FILE" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(checkpoint)]) == 2
    assert "need a VIEW" in capsys.readouterr().err
    assert main(["inspect", "heads", "--preset", "seed", "--checkpoint", str(checkpoint), "--out", "x.png"]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "weights"])
    assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ patching, attribution

CLEAN, CORRUPT = "the cat sat on", "the dog sat on"


def printed_rows(out: str) -> list[list[str]]:
    """The rows of the printed table of the largest effects: the index and value columns of each."""
    table = out.split("largest of")[1].split("\n\n")[0].splitlines()[2:]
    return [line.split() for line in table if line.startswith(" ")]


def run_view(view: str, checkpoint, out, capsys, *flags: str, min_bytes: int = 5_000) -> str:
    """``inspect VIEW`` on the checkpoint with the clean and corrupted prompts: what it printed (the PNG checked)."""
    argv = ["inspect", view, "--checkpoint", str(checkpoint), "--clean", CLEAN, "--corrupt", CORRUPT, "--out", str(out)]
    assert main([*argv, *flags]) == 0
    assert_png(out, min_bytes=min_bytes)
    return capsys.readouterr().out


def circuit_inputs(checkpoint, *texts):
    ckpt = ft.load_checkpoint(checkpoint, with_opt_state=False)
    tokens = [torch.tensor(ckpt.tokenizer.encode(t)) for t in texts]
    return ckpt.config, ckpt.params, ckpt.tokenizer, tokens


def test_inspect_patching_prints_the_largest_effects_of_the_exact_sweep(checkpoint, tmp_path, capsys):
    printed = run_view("patching", checkpoint, tmp_path / "patching.png", capsys,
                       "--answer", " ", "--wrong", "o", "--site", "attn.head_out", "--top", "4")
    cfg, params, tok, (clean, corrupt) = circuit_inputs(checkpoint, CLEAN, CORRUPT)
    answer, wrong = tok.encode(" ")[0], tok.encode("o")[0]

    def logit_diff(logits):
        return (logits[..., -1, answer] - logits[..., -1, wrong]).mean()

    base = logit_diff(ft.forward(params, corrupt, cfg))
    assert f"clean run {float(logit_diff(ft.forward(params, clean, cfg))):.4f}, corrupted run {float(base):.4f}" in printed
    change = ft.interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="attn.head_out", by=("layer", "head")) - base
    rows = printed_rows(printed)
    assert len(rows) == 4 and "exact patching: the 4 largest of 6 effects" in printed
    biggest = change.flatten().abs().argsort(descending=True)[:4]
    for row, j in zip(rows, biggest.tolist()):
        layer, head = divmod(j, cfg.n_heads)
        assert (int(row[0]), int(row[1])) == (layer, head), printed
        assert float(row[2]) == pytest.approx(float(change[layer, head]), rel=1e-3, abs=1e-6)


def test_inspect_attribution_compares_with_exact_patching(checkpoint, tmp_path, capsys):
    printed = run_view("attribution", checkpoint, tmp_path / "atp.png", capsys, "--metric", "logprob", "--answer", " ",
                       "--site", "attn.k", "--by", "layer,position,head", "--compare", "--top", "3")
    assert "AtP*: the 3 largest of 84 effects" in printed  # 2 layers x 14 positions x 3 heads
    assert re.search(r"AtP\* next to exact patching:\n84 patches, correlation -?\d\.\d{4}", printed), printed
    cfg, params, tok, (clean, corrupt) = circuit_inputs(checkpoint, CLEAN, CORRUPT)
    answer = tok.encode(" ")[0]

    def logprob(logits):
        return torch.log_softmax(logits[..., -1, :], dim=-1)[..., answer].mean()

    by = ("layer", "position", "head")
    estimate = ft.interp.attribution_patch(params, clean, corrupt, logprob, cfg, site="attn.k", by=by)
    exact = ft.interp.patch_sweep(params, clean, corrupt, logprob, cfg, site="attn.k", by=by) - logprob(ft.forward(params, corrupt, cfg))
    layer, position, head, token, got_estimate, got_exact = printed_rows(printed)[0]
    top = tuple(int(i) for i in torch.unravel_index(estimate.abs().argmax(), estimate.shape))
    assert (int(layer), int(position), int(head)) == top and token == repr(CLEAN[top[1]])
    assert float(got_estimate) == pytest.approx(float(estimate[top]), rel=1e-3, abs=1e-7)
    assert float(got_exact) == pytest.approx(float(exact[top]), rel=1e-3, abs=1e-7)


def test_inspect_patching_noise_direction_and_loss_metric(checkpoint, tmp_path, capsys):
    printed = run_view("patching", checkpoint, tmp_path / "noise.png", capsys, "--metric", "loss", "--direction", "noise",
                       "--site", "resid_mid", "--by", "layer", min_bytes=3_000)
    # Noising a whole residual stream makes the clean run the corrupted one: every change is corrupt - clean.
    clean_m, corrupt_m = map(float, re.search(r"clean run (-?\d+\.\d+), corrupted run (-?\d+\.\d+)", printed).groups())
    changes = [float(row[1]) for row in printed_rows(printed)]
    assert changes == pytest.approx([corrupt_m - clean_m] * 2, abs=2e-4)
    assert "noise (corrupted values into the clean run)" in printed


def test_inspect_patching_and_attribution_on_an_hf_dir(hf_dir, tmp_path, capsys):
    for view in ("patching", "attribution"):
        out = tmp_path / f"{view}.png"
        argv = ["inspect", view, "--hf-dir", str(hf_dir), "--clean", "the mat sat", "--corrupt", "the log sat",
                "--metric", "loss", "--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        assert_png(out)
    printed = capsys.readouterr().out
    assert "resid_pre by layer x position" in printed and re.search(r"^\s+2\s+\d+\s+'", printed, flags=re.M)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["patching", "--clean", "the cat", "--corrupt", "the", "--answer", "a", "--wrong", "o"],
         "--clean and --corrupt must be the same number of tokens, got 7 and 3 tokens"),
        (["patching", "--clean", "the cat"], "needs --clean TEXT and --corrupt TEXT"),
        (["patching", "--clean", "a", "--corrupt", "t", "--answer", "at", "--wrong", "o"],
         r"--answer must be one token, got 'at', which encodes to 2 tokens"),
        (["patching", "--clean", "a", "--corrupt", "t", "--answer", "a"], "--metric logit-diff needs --wrong TOKEN"),
        (["patching", "--clean", "a", "--corrupt", "t", "--metric", "loss", "--answer", "a"], "--answer does not go with --metric loss"),
        (["patching", "--clean", "a", "--corrupt", "t", "--metric", "loss", "--compare"], "--compare goes with the attribution and edges views, not 'patching'"),
        (["patching", "--clean", "a", "--corrupt", "t", "--metric", "loss", "--by", "position"], "by must hold 'layer'"),
        (["attribution", "--clean", "a", "--corrupt", "t", "--metric", "loss", "--text", "a"], "not --text"),
        (["heads", "--clean", "a"], "--clean go with the patching, attribution, edges views, not 'heads'"),
    ],
)
def test_inspect_patching_errors_are_one_line(checkpoint, argv, message, capsys):
    assert main(["inspect", argv[0], "--checkpoint", str(checkpoint), "--out", "x.png", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftransformer inspect: error:") and "\n" not in err
    assert re.search(message, err), err


# ------------------------------------------------------------------------------------------ edges


def edge_rows(out: str) -> list[tuple[str, list[float]]]:
    """The rows of the printed top-edges table: ``("writer -> reader", [its values])`` each."""
    table = out.split("largest of")[1].split("\n\n")[0].splitlines()[2:]
    rows = [re.fullmatch(r"\s+\d+\s+(\S+ -> \S+)((?:\s+\S+)+)", line) for line in table if not line.startswith("wrote")]
    return [(m.group(1), [float(v) for v in m.group(2).split()]) for m in rows]


def logit_diff_of(tok):
    answer, wrong = tok.encode(" ")[0], tok.encode("o")[0]

    def logit_diff(logits):
        return (logits[..., -1, answer] - logits[..., -1, wrong]).mean()

    return logit_diff


def named(scores, graph, edge: str) -> float:
    writer, reader = edge.split(" -> ")
    return float(scores[graph.writers.index(writer), graph.readers.index(reader)])


def test_inspect_edges_prints_eap_ig_next_to_exact_edge_patching(checkpoint, tmp_path, capsys):
    printed = run_view("edges", checkpoint, tmp_path / "edges.png", capsys, "--answer", " ", "--wrong", "o",
                       "--steps", "3", "--compare", "--top", "4", min_bytes=3_000)
    cfg, params, tok, (clean, corrupt) = circuit_inputs(checkpoint, CLEAN, CORRUPT)
    metric = logit_diff_of(tok)
    g = ft.interp.graph(cfg)
    n = int(g.edges.sum())
    assert f"EAP-IG (3 steps): the 4 largest of {n} edges ({len(g.writers)} writers, {len(g.readers)} readers)" in printed
    estimate = ft.interp.edge_attribution(params, clean, corrupt, metric, cfg, method="eap-ig", steps=3).scores.detach()
    exact = ft.interp.edge_patch_sweep(params, clean, corrupt, metric, cfg)
    rows = edge_rows(printed)
    biggest = estimate[g.edges].abs().sort(descending=True).values[:4]
    assert [abs(score) for _, (score, _) in rows] == pytest.approx(biggest.tolist(), rel=1e-3, abs=1e-6), printed
    for edge, (score, got_exact) in rows:
        assert score == pytest.approx(named(estimate, g, edge), rel=1e-3, abs=1e-6), edge
        assert got_exact == pytest.approx(named(exact, g, edge), rel=1e-3, abs=1e-6), edge
    report = ft.interp.atp_report(exact[g.edges], estimate[g.edges], top=4).splitlines()[0]
    assert report.replace(" patches,", " edges,") in printed, printed
    assert re.search(r"next to exact edge patching:\n.*\n\s+edge\s+exact\s+estimate\s+miss\n\s+\S+ -> \S+\s", printed), printed


def test_inspect_edges_exact_with_the_faithfulness_curves(checkpoint, tmp_path, capsys):
    curve = tmp_path / "curve.png"
    printed = run_view("edges", checkpoint, tmp_path / "edges.png", capsys, "--metric", "logprob", "--answer", " ",
                       "--method", "exact", "--direction", "noise", "--faithfulness", "--ablation", "zero,corrupt",
                       "--curve-out", str(curve), "--top", "3", min_bytes=3_000)
    assert_png(curve)
    cfg, params, tok, (clean, corrupt) = circuit_inputs(checkpoint, CLEAN, CORRUPT)
    answer = tok.encode(" ")[0]

    def logprob(logits):
        return torch.log_softmax(logits[..., -1, :], dim=-1)[..., answer].mean()

    g = ft.interp.graph(cfg)
    sweep = ft.interp.edge_patch_sweep(params, clean, corrupt, logprob, cfg, direction="noise")
    rows = edge_rows(printed)
    assert len(rows) == 3, printed
    for edge, (change,) in rows:
        assert change == pytest.approx(named(sweep, g, edge), rel=1e-3, abs=1e-6), edge
    scores = ft.interp.EdgeScores(sweep, g)
    table = printed.split("normalized: (M - M(empty)) / (M(full) - M(empty)))\n")[1].splitlines()[2:]
    for kind, column in (("zero", 1), ("corrupt", 3)):
        want = ft.interp.faithfulness(params, clean, corrupt, logprob, cfg, scores, ablation=kind)
        ks = [int(line.split()[0]) for line in table if re.match(r"\s+\d+\s", line)]
        assert tuple(ks) == want.ks
        got = [float(line.split()[column]) for line in table[: len(ks)]]
        assert got == pytest.approx(want.metric.tolist(), abs=2e-4), kind
        assert f"{kind}: full {want.full:.4f}, empty {want.empty:.4f}" in printed
    assert f"wrote {curve}" in printed


def test_inspect_edges_writes_the_curve_beside_the_graph_by_default(hf_dir, tmp_path, capsys):
    out = tmp_path / "graph.png"
    argv = ["inspect", "edges", "--hf-dir", str(hf_dir), "--clean", "the mat sat", "--corrupt", "the log sat",
            "--metric", "loss", "--method", "eap", "--faithfulness", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert_png(out, min_bytes=3_000)
    assert_png(tmp_path / "graph-faithfulness.png")
    printed = capsys.readouterr().out
    assert "EAP: the 10 largest of" in printed and "corrupt ablation" in printed and "a2.h1" in printed  # the default ablation


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["edges", "--method", "eap", "--steps", "3"], "--steps goes with --method eap-ig, not eap"),
        (["edges", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["edges", "--method", "exact", "--compare"], "--method exact is the exact sweep itself"),
        (["edges", "--ablation", "mean"], "--ablation goes with --faithfulness"),
        (["edges", "--curve-out", "c.png"], "--curve-out goes with --faithfulness"),
        (["edges", "--faithfulness", "--ablation", "mean,half"], "--ablation must be one or more of mean, zero, corrupt .*got 'half'"),
        (["edges", "--site", "attn.k"], "--site goes with the patching and attribution views, not 'edges'"),
        (["edges", "--no-correction"], "--correction goes with the attribution view, not 'edges'"),
        (["patching", "--method", "eap"], "--method goes with the edges view, not 'patching'"),
        (["attribution", "--faithfulness"], "--faithfulness goes with the edges view, not 'attribution'"),
        (["heads", "--method", "eap"], "--method go with the patching, attribution, edges views, not 'heads'"),
    ],
)
def test_inspect_edges_errors_are_one_line(checkpoint, argv, message, capsys):
    flags = [] if argv[0] == "heads" else ["--clean", "a", "--corrupt", "t", "--metric", "loss"]
    assert main(["inspect", argv[0], "--checkpoint", str(checkpoint), "--out", "x.png", *flags, *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftransformer inspect: error:") and "\n" not in err
    assert re.search(message, err), err
