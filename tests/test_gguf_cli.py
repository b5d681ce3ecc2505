"""The CLI on a GGUF file: ``generate --gguf`` (plain and ``--chat``), ``inspect --gguf`` (describing the file, and
the attention view), ``train --init-from-gguf``. The file is a tiny random Llama with a byte-level tokenizer and
a Llama-3 chat template, written by ``save_gguf(tokenizer=...)`` (nothing downloaded)."""

import re

import pytest
import torch

import ftransformer as ft
from ftransformer.cli import main
from ftransformer.interop.gguf import load_gguf, save_gguf
from ftransformer.interop.gguf_tokenizer import load_gguf_tokenizer

import gguf_tiny
from test_hf_families import assert_cli_fine_tunes, assert_cli_generate_prints_what_generate_makes

pytest.importorskip("gguf")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    """A GGUF file holding a tiny Llama (256 positions) and its tokenizer with a chat template."""
    from test_gguf_tokenizer import hf_style
    from test_hf_tokenizer import LLAMA3_TEMPLATE, byte_level_backend

    tokenizer = hf_style(byte_level_backend(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         chat_template=LLAMA3_TEMPLATE)
    directory = tmp_path_factory.mktemp("gguf_cli")
    model = gguf_tiny.build_model("llama", seed=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    gguf_tiny.write(directory / "random.gguf", model, "llama")
    cfg, params = load_gguf(directory / "random.gguf")
    return save_gguf(params, cfg, directory / "chat.gguf", tokenizer=tokenizer, quant="f32")


@pytest.mark.parametrize("chat", [False, True])
def test_generate_from_a_gguf_file_prints_what_generate_makes(chat_gguf, chat, capsys):
    cfg, params = load_gguf(chat_gguf)
    assert_cli_generate_prints_what_generate_makes(["--gguf", str(chat_gguf)], cfg, params, load_gguf_tokenizer(chat_gguf),
                                                    chat, capsys)


def test_inspect_a_gguf_file_describes_its_config_from_the_header(chat_gguf, capsys, monkeypatch):
    from ftransformer.interop import gguf as gguf_io

    cfg, params = load_gguf(chat_gguf)
    monkeypatch.setattr(gguf_io, "_file_tensor", lambda *a: pytest.fail("inspect --gguf read a tensor"))
    assert main(["inspect", "--gguf", str(chat_gguf)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"GGUF model {chat_gguf} (general.architecture='llama')\n")
    for field in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len", "n_kv_heads"):
        assert re.search(rf"^  {field} +{getattr(cfg, field)}$", out, re.MULTILINE), field
    assert "exact total" in out and f"{ft.count_params(params):,}" in out
    assert main(["inspect", "--gguf", str(chat_gguf), "--preset", "tiny"]) == 2
    assert "--preset and --gguf each name a model to describe; give one" in capsys.readouterr().err


def test_inspect_attention_on_a_gguf_file(chat_gguf, tmp_path, capsys):
    from test_interp_cli import assert_png

    out = tmp_path / "attention.png"
    assert main(["inspect", "attention", "--gguf", str(chat_gguf), "--text", "the quick brown fox", "--out", str(out)]) == 0
    assert_png(out)
    assert f"wrote {out}" in capsys.readouterr().out


def test_train_init_from_gguf_fine_tunes_the_model_with_its_tokenizer(chat_gguf, tmp_path, capsys):
    cfg, params = load_gguf(chat_gguf)
    losses = assert_cli_fine_tunes(["--init-from-gguf", str(chat_gguf)], cfg, params, load_gguf_tokenizer(chat_gguf),
                                   tmp_path, capsys, steps=2)
    assert len(losses) >= 1
