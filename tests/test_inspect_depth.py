"""The interpretability views at depth: progress bars and estimates, the answer-token message, per-view help,
the faithfulness axis, the circuit-only edge graph, and the batched patching sweep equal to single patches."""

import itertools
import re

import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.cli import inspect_circuits, main
from ftransformer.interop.registry import FAMILIES
from ftransformer.interp import edges, patching, plots
from tests.test_interp import perturbed_params
from tests.test_interp_cli import checkpoint  # noqa: F401 (a fixture)

CLEAN, CORRUPT = "the cat sat on", "the dog sat on"


def view(checkpoint, tmp_path, name: str, *flags: str) -> list[str]:
    return ["inspect", name, "--checkpoint", str(checkpoint), "--clean", CLEAN, "--corrupt", CORRUPT,
            "--out", str(tmp_path / f"{name}.png"), *flags]


# ------------------------------------------------------------------------ progress bars and estimates


@pytest.mark.parametrize("name", ["patching", "attribution", "edges"])
def test_every_view_shows_a_progress_bar(checkpoint, tmp_path, capsys, name):
    flags = ("--answer", "m", "--wrong", "l") + (("--faithfulness", "--method", "eap") if name == "edges" else ())
    assert main(view(checkpoint, tmp_path, name, *flags)) == 0
    err = capsys.readouterr().err
    bars = {"patching": ["patching resid_pre"], "attribution": ["attribution resid_pre"],
            "edges": ["EAP", "faithfulness (corrupt)"]}[name]
    for bar in bars:
        assert bar in err, err


def test_edges_compare_says_the_count_and_estimate_and_warns_with_the_bounding_flag(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inspect_circuits, "BIG_SWEEP", 10)
    assert main(view(checkpoint, tmp_path, "edges", "--metric", "loss", "--method", "eap", "--compare")) == 0
    err = capsys.readouterr().err
    n = int(interp.graph(ft.load_checkpoint(checkpoint, with_opt_state=False).config).edges.sum())
    assert re.search(rf"--compare: exact patching of {n} edges, about \d+ s \(\d+\.\d min\)", err), err
    assert f"warning: {n} edges is a long sweep; --compare-edges N (the top N edges by the estimate) bounds it" in err
    assert "exact edge patching" in err  # its progress bar
    assert main(view(checkpoint, tmp_path, "edges", "--metric", "loss", "--method", "eap", "--compare", "--compare-edges", "4")) == 0
    captured = capsys.readouterr()
    assert "exact patching of 4 edges" in captured.err and "warning" not in captured.err
    assert "the 4 largest of 4 edges compared" in captured.out


def test_compare_edges_needs_compare(checkpoint, tmp_path, capsys):
    assert main(view(checkpoint, tmp_path, "edges", "--metric", "loss", "--compare-edges", "3")) == 2
    assert "--compare-edges N goes with --compare" in capsys.readouterr().err


def test_sweep_cost_counts_the_blocks_of_each_edge():
    cfg = ft.PRESETS["tiny"].replace(n_layers=3, n_heads=4, n_kv_heads=2)
    g = edges.graph(cfg)
    per_layer = edges._sizes(cfg)[2]
    expected = sum(int(g.edges[:, v].sum()) * (1 if v == len(g.readers) - 1 else cfg.n_layers - v // per_layer)
                   for v in range(len(g.readers)))
    assert edges.sweep_cost(cfg) == expected


# ------------------------------------------------------------------------ --answer and its token


def test_answer_says_which_token_it_became(checkpoint, tmp_path, capsys):
    assert main(view(checkpoint, tmp_path, "patching", "--answer", "m", "--wrong", "l")) == 0
    tok = ft.load_checkpoint(checkpoint, with_opt_state=False).tokenizer
    out = capsys.readouterr().out
    assert f"--answer 'm' is token {tok.encode('m')[0]} 'm'" in out and f"--wrong 'l' is token {tok.encode('l')[0]} 'l'" in out


class Words:
    """A tokenizer of whole words, ``Mary`` and `` Mary`` two tokens (as in SmolLM2's and GPT-2's vocabularies)."""

    vocab = ["Mary", " Mary", "John", " John"]

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(text)] if text in self.vocab else [0, 0]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def test_answer_warns_when_the_leading_space_variant_is_far_likelier(capsys):
    logits = torch.zeros(4)
    logits[1] = 8.0
    assert inspect_circuits.one_token("answer", "Mary", Words(), logits) == 0
    captured = capsys.readouterr()
    assert "--answer 'Mary' is token 0 'Mary'" in captured.out
    assert ("warning: --answer 'Mary' (token 0) is 2.98e+03x less likely at the last position than ' Mary' (token 1), "
            "its leading-space variant; did you mean --answer ' Mary'?") in captured.err
    logits[1] = 1.0  # e^1 < SPACE_RATIO: no warning
    assert inspect_circuits.one_token("answer", "Mary", Words(), logits) == 0
    assert inspect_circuits.one_token("wrong", " John", Words(), logits) == 3
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------ help texts


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_inspect_view_help_is_that_views_help_only(capsys):
    patching_help = help_of(capsys, "inspect", "patching")
    assert "usage: ftransformer inspect patching" in patching_help and "exact activation patching" in patching_help
    assert "--clean" in patching_help and "--site" in patching_help and "--chunk" in patching_help
    for other in ("--half", "--text", "--method", "--faithfulness", "--preset", "--layer"):
        assert other not in patching_help, other
    edges_help = help_of(capsys, "inspect", "edges")
    assert "--faithfulness" in edges_help and "--compare-edges" in edges_help and "--site" not in edges_help
    heads_help = help_of(capsys, "inspect", "heads")
    assert "--half" in heads_help and "--clean" not in heads_help
    whole = help_of(capsys, "inspect")
    assert "--half" in whole and "--clean" in whole and "--preset" in whole


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_hf_dir_help_lists_every_family_of_the_registry(capsys, command):
    text = re.sub(r"\s+", " ", help_of(capsys, command))
    assert "GPT-2 directory" not in text
    listed = text.split("--hf-dir DIR", 2)[-1]
    for family in FAMILIES:
        assert family in listed, family


# ------------------------------------------------------------------------ plots


def captured_figures(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    return figures


def test_faithfulness_axis_starts_at_zero_with_no_negative_ticks(monkeypatch, tmp_path):
    figures = captured_figures(monkeypatch)
    ks = edges.default_ks(70651)
    curve = edges.Faithfulness(ks, torch.linspace(0, 1, len(ks)), torch.linspace(0, 1, len(ks)), 1.0, 0.0, "corrupt")
    plots.plot_faithfulness([curve], tmp_path / "f.png")
    ax = figures[0].axes[0]
    figures[0].canvas.draw()
    left, right = ax.get_xlim()
    assert ax.get_xscale() == "symlog" and left == 0 and right >= 70651
    shown = [t for t in ax.get_xticks() if left <= t <= right]
    assert shown and min(shown) >= 0
    labels = [t.get_text() for t in ax.get_xticklabels() if left <= t.get_position()[0] <= right]
    assert not any(label.startswith(("-", "\u2212")) for label in labels), labels


def test_edge_graph_draws_only_the_circuits_nodes_by_layer_at_30_layers(monkeypatch, tmp_path):
    figures = captured_figures(monkeypatch)
    cfg = ft.PRESETS["tiny"].replace(n_layers=30, n_heads=9, n_kv_heads=3, d_model=36)
    g = edges.graph(cfg)
    scores = torch.randn(g.edges.shape, generator=torch.Generator().manual_seed(0)) * g.edges
    plots.plot_edges(edges.EdgeScores(scores, g), tmp_path / "e.png", k=12)
    fig = figures[0]
    ax = fig.axes[0]
    keep = edges.top_edges(edges.EdgeScores(scores, g), 12)
    names = {t.get_text() for t in ax.texts if t.get_text() not in ("", "q", "k", "v")}  # arrows are empty annotations
    writers = {g.writers[u] for u, _ in keep.nonzero().tolist()}
    assert writers <= names and len(names) <= 2 * 12 + 1  # the circuit's nodes, not all 301 writers
    columns = len({plots._layer_of(n, cfg.n_layers) for n in names})
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 110 * columns + 300 and height < 1200  # a column per layer of the circuit, not 2 per layer of the model
    # laid out by layer: the x of a node grows with its layer
    places = {t.get_text(): t.get_position() for t in ax.texts if t.get_text() in names}
    layer = {n: plots._layer_of(n, cfg.n_layers) for n in places}
    ordered = sorted(places, key=lambda n: places[n][0])
    assert [layer[n] for n in ordered] == sorted(layer[n] for n in ordered)
    # an MLP sits below its layer's heads, never in a head's row
    for n in places:
        if n.startswith("m"):
            heads = [places[h][1] for h in places if h.startswith(f"a{n[1:]}.h")]
            assert all(places[n][1] > y for y in heads)


# ------------------------------------------------------------------------ the batched sweep, exactly


def single_patches(params, clean, corrupt, cfg, site, by, metric):
    """One ``forward_with_activations`` per patch (float64): the reference the batched passes must equal."""
    _, acts = ft.forward_with_activations(params, clean, cfg)
    values = [patching.site_value(acts, i, site) for i in range(cfg.n_layers)]
    heads = values[0].shape[-3] if site.startswith("attn.") else 0
    seq = clean.shape[-1]
    out = torch.zeros([{"layer": cfg.n_layers, "position": seq, "head": heads}[a] for a in by], dtype=torch.float64)
    for i, value in enumerate(values):
        sizes = {"layer": [i], "position": range(seq), "head": range(heads)}
        for index in itertools.product(*(sizes[a] for a in by)):
            named = dict(zip(by, index))
            fix = interp.patch(f"blocks.{i}.{site}", value, positions=named.get("position"), heads=named.get("head"))
            out[index] = metric(ft.forward_with_activations(params, corrupt, cfg, interventions=fix)[0])
    return out


@pytest.mark.parametrize(("site", "by", "chunk"), [("resid_pre", ("layer", "position"), None), ("resid_post", ("layer", "position"), 3),
                                                   ("attn.k", ("layer", "position", "head"), 5), ("attn.head_out", ("layer", "head"), 1)])
def test_batched_passes_equal_single_patches_in_float64(site, by, chunk):
    cfg = ft.PRESETS["tiny"].replace(n_layers=4, n_heads=4, n_kv_heads=2, positional="rope", activation="swiglu")
    params = ft.tree.map(lambda x: x.to(torch.float64), perturbed_params(cfg))
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 7) % cfg.vocab_size

    def metric(logits):
        return (logits[..., -1, 3] - logits[..., -1, 11]).mean()

    swept = interp.patch_sweep(params, clean, corrupt, metric, cfg, site=site, by=by, chunk=chunk, logits_at=[-1])
    torch.testing.assert_close(swept, single_patches(params, clean, corrupt, cfg, site, by, metric), atol=1e-10, rtol=1e-10)


@pytest.mark.real
def test_answer_mary_on_smollm2_names_its_token_and_warns_of_the_likelier_leading_space(capsys):
    """The new user's case: SmolLM2 predicts ' Mary' after the IOI prompt; ``--answer Mary`` is another token."""
    from ftransformer.cli.generate_cmd import load_gguf_model
    from tests.real_models import smollm2_path

    cfg, params, tok = load_gguf_model(str(smollm2_path()), torch.device("cpu"))
    prompt = torch.tensor(tok.encode("When Mary and John went to the store, John gave a drink to"))
    with torch.no_grad():
        logits = ft.forward(params, prompt, cfg)[-1]
    assert inspect_circuits.one_token("answer", "Mary", tok, logits) == tok.encode("Mary")[0]
    captured = capsys.readouterr()
    assert f"--answer 'Mary' is token {tok.encode('Mary')[0]} 'Mary'" in captured.out
    assert "its leading-space variant; did you mean --answer ' Mary'?" in captured.err
