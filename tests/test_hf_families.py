"""Parity with transformers for every supported Llama-like family, every feature on.

Each family's tiny model (``hf_tiny``: every parameter re-randomized, eager attention) switches on its
features: llama3 rope scaling (llama), a sliding window shorter than the test sequences and
head_dim != d_model / n_heads (mistral), q/k/v biases and a sliding window on one layer of two (qwen2),
q/k RMSNorm and head_dim != d_model / n_heads with tied embeddings (qwen3).
"""

import pytest
import torch

import ftransformer as ft
from ftransformer.interop.hf import load_hf, save_hf
from ftransformer.sampling import GREEDY
from hf_tiny import FAMILY_OPTIONS, assert_bfloat16_within_rounding, assert_chunked_cache_equals_forward, build, hf_logits, tokens

transformers = pytest.importorskip("transformers")

FAMILIES = list(FAMILY_OPTIONS)
SEQ = 14  # longer than the windows (5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (transformers model, cfg, params) for each family's tiny random model."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        model = build(family, root / family, seed=1)
        out[family] = (model, *load_hf(root / family))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits_equal_transformers(models, family, kernel):
    model, cfg, params = models[family]
    x = tokens(2, SEQ)
    torch.testing.assert_close(ft.forward(params, x, cfg), hf_logits(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_feature_changes_the_logits(models, family):
    """The parity above would hold vacuously if a feature did nothing on these models: each one does."""
    _, cfg, params = models[family]
    a = cfg.attention
    off = {
        "llama": dict(rope_scaling=None),
        "mistral": dict(attention=a.__class__(head_dim=a.head_dim, window=None)),
        "qwen2": dict(attention=a.__class__(qkv_bias=True, window=None)),
        "qwen3": dict(attention=a.__class__(head_dim=a.head_dim, qk_norm=False)),
    }[family]
    if family == "qwen3":
        params = {**params, "blocks": [{**b, "attn": {k: v for k, v in b["attn"].items() if not k.endswith("_norm")}}
                                       for b in params["blocks"]]}
    x = tokens(2, SEQ)
    base = ft.forward(models[family][2], x, cfg)
    assert (ft.forward(params, x, cfg.replace(**off)) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_transformers_past_the_window(models, family):
    model, cfg, params = models[family]
    prompt = tokens(2, 4, seed=1)
    with torch.no_grad():
        # eos_token_id=None: no stop token (a GenerationConfig object would let the saved eos back in)
        expected = model.generate(prompt, max_new_tokens=SEQ, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert expected.shape == (2, 4 + SEQ)  # past the window of 5
    assert torch.equal(ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_cache_in_chunks_equals_forward(models, family):
    _, cfg, params = models[family]
    x = tokens(2, SEQ, seed=2)
    assert_chunked_cache_equals_forward(params, cfg, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_then_transformers_gives_the_same_logits(models, family, tmp_path):
    model, cfg, params = models[family]
    save_hf(params, cfg, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = tokens(2, SEQ, seed=3)
    assert torch.equal(hf_logits(again, x), hf_logits(model, x))
    torch.testing.assert_close(ft.forward(params, x, cfg), hf_logits(again, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_are_within_bfloat16_rounding_of_transformers(models, family, tmp_path):
    model, cfg, params = models[family]
    save_hf(params, cfg, tmp_path)
    assert_bfloat16_within_rounding(model, tmp_path, tokens(2, SEQ, seed=4))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_activations_show_the_window_and_the_logits_stay_the_same(models, family):
    _, cfg, params = models[family]
    x = tokens(1, SEQ, seed=5)
    logits, acts = ft.forward_with_activations(params, x, cfg)
    assert torch.equal(logits, ft.forward(params, x, cfg))
    for i in range(cfg.n_layers):
        pattern = acts["blocks"][i]["attn"]["pattern"][0]  # [heads, seq, kv_seq]
        window = cfg.layer_window(i)
        q, k = torch.meshgrid(torch.arange(SEQ), torch.arange(SEQ), indexing="ij")
        visible = (k <= q) & ((k > q - window) if window is not None else True)
        assert torch.all(pattern[:, ~visible] == 0)
        assert torch.all(pattern[:, visible] > 0)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(cfg.n_heads, SEQ))


# ---------------------------------------------------------------- the CLI on a checkpoint directory


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A llama checkpoint with a Llama-3-style byte-level tokenizer and chat template in one directory."""
    from test_hf_tokenizer import LLAMA3_TEMPLATE, byte_level_backend
    from test_hf_tokenizer import save_hf as save_tokenizer

    directory = tmp_path_factory.mktemp("chat")
    backend = byte_level_backend()
    build("llama", directory, seed=2, vocab_size=backend.get_vocab_size(), max_position_embeddings=256)
    save_tokenizer(directory, backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                   chat_template=LLAMA3_TEMPLATE, generation_eos=["<|end_of_text|>", "<|eot_id|>"])
    return directory


def assert_cli_generate_prints_what_generate_makes(source: list[str], cfg, params, tok, chat: bool, capsys) -> None:
    """``ftransformer generate SOURCE --prompt ... --temperature 0`` (``--chat``) prints ``ft.generate``'s greedy
    reply, cut at the first stop token (``source``: e.g. ``["--hf-dir", DIR]``)."""
    from ftransformer.cli import main

    text = "Hello there, world"
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True) if chat else tok.encode(text)
    out = ft.generate(params, torch.tensor([ids]), cfg, max_new_tokens=10, sampling=GREEDY, stop_tokens=tok.stop_tokens)
    reply = [t for t in out[0, len(ids):].tolist()]
    reply = reply[: next((i for i, t in enumerate(reply) if t in tok.stop_tokens), len(reply))]
    flags = ["--chat"] if chat else []
    assert main(["generate", *source, "--prompt", text, "--max-new-tokens", "10", "--temperature", "0", *flags]) == 0
    printed = capsys.readouterr().out
    assert printed == ("" if chat else text) + tok.decode(reply) + "\n"


@pytest.mark.parametrize("chat", [False, True])
def test_cli_generate_from_an_hf_dir_prints_what_generate_makes(chat_dir, chat, capsys):
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer

    cfg, params = load_hf(chat_dir)
    assert_cli_generate_prints_what_generate_makes(["--hf-dir", str(chat_dir)], cfg, params, load_hf_tokenizer(chat_dir),
                                                    chat, capsys)


def test_cli_chat_needs_a_chat_template(models, tmp_path, capsys):
    from ftransformer.cli import main

    model, cfg, params = models["qwen3"]
    save_hf(params, cfg, tmp_path)
    assert main(["generate", "--hf-dir", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no vocab.json + merges.txt (GPT-2) nor tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("step", ["compile", "aot"])
def test_compiled_decoding_keeps_the_windows(models, step, no_typecheck):
    """The compiled decode steps (torch.compile, AOTInductor) build the same per-layer window masks."""
    model, cfg, params = models["qwen2"]  # one windowed layer, one full: both kinds of mask in one step
    prompt = tokens(2, 4, seed=1)
    eager = ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY)
    assert torch.equal(ft.generate(params, prompt, cfg, max_new_tokens=SEQ, sampling=GREEDY, step=step), eager)


def assert_cli_fine_tunes(source: list[str], cfg, params, tok, tmp_path, capsys, steps: int = 3) -> list[float]:
    """``ftransformer train SOURCE --preset tiny --steps N``: the checkpoint has the model's config, its
    tokenizer and changed weights; returns the printed validation losses (``source``: e.g. ``["--init-from-hf", DIR]``)."""
    from ftransformer.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "run"
    assert main(["train", *source, "--data", str(corpus), "--preset", "tiny", "--steps", str(steps), "--batch-size", "2",
                 "--set", "seq_len=16", "--eval-every", str(steps), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"model: {source[1]}" in printed
    ckpt = ft.load_checkpoint(out / "latest", with_opt_state=False)
    assert ckpt.config == cfg
    # The checkpoint keeps the model's vocabulary (its ids for the text itself).
    assert ckpt.tokenizer.encode("the lazy dog") == tok.encode("the lazy dog", add_special_tokens=False)
    before, after = ft.tree.flatten_with_paths(params), ft.tree.flatten_with_paths(ckpt.params)
    assert list(before) == list(after) and not torch.equal(before["blocks.0.attn.w_qkv"], after["blocks.0.attn.w_qkv"])
    return [float(line.split("val loss ")[1].split()[0].rstrip(";")) for line in printed.splitlines() if line.startswith("step ")]


def test_cli_train_init_from_hf_fine_tunes_the_model_with_its_tokenizer(chat_dir, tmp_path, capsys):
    from ftransformer.interop.hf_tokenizer import load_hf_tokenizer

    cfg, params = load_hf(chat_dir)
    losses = assert_cli_fine_tunes(["--init-from-hf", str(chat_dir)], cfg, params, load_hf_tokenizer(chat_dir), tmp_path, capsys)
    assert losses[-1] < losses[0]  # it learned from the corpus


def test_cli_train_init_from_hf_refuses_a_shape_change(chat_dir, tmp_path, capsys):
    from ftransformer.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words to tokenize. " * 200)
    assert main(["train", "--init-from-hf", str(chat_dir), "--data", str(corpus), "--set", "n_layers=3",
                 "--out", str(tmp_path / "run")]) == 2
    assert "would change the shapes of the model" in capsys.readouterr().err


def test_example_12_loads_chats_looks_inside_and_writes_back():
    from test_examples import ROOT, run_example

    done = run_example(ROOT / "examples" / "12_pretrained.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |activations logits - forward logits| = 0.0e+00" in done.stdout
    assert "layer 1: pattern (4, 48, 48), window 16, keys seen by a query: at most 16" in done.stdout
    assert "save_hf -> load_hf: identical" in done.stdout
