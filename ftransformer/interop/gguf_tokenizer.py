"""GGUF tokenizers in and out: llama.cpp's ``tokenizer.*`` metadata as an ``HFTokenizer``, and back.

A GGUF file carries no ``tokenizer.json``: it stores the vocabulary (``tokenizer.ggml.tokens``), the merges,
the scores, each token's type, the special token ids, the BOS/EOS flags and the chat template under
llama.cpp's key names. ``load_gguf_tokenizer(path)`` rebuilds from them the ``tokenizers`` pipeline that
transformers' GGUF conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``) builds, so the ids
are the same:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (one
  that is not is respelled from its UTF-8 bytes); the text is split by the regex that
  ``tokenizer.ggml.pre`` names (``SPLITS``), or by GPT-2's own regex for any other name.
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback (``<0x41>``): ``"▁"`` for
  spaces and one before the text (``Metaspace``); Phi-3 files prepend it in a normalizer instead. Without
  merges in the file, they are recovered from the vocabulary, best score first. ``add_bos_token`` defaults
  to true here, as llama.cpp and transformers default it for such files.
- control tokens (type 3) stay whole as special tokens, user-defined ones (type 4) as plain added tokens;
  ``bos/eos/unk/pad`` come from their ids.

Unlike transformers, no ``<|endoftext|>`` is added to a byte-level vocabulary that lacks it (GPT-2's
class default): every id stays inside the model's vocabulary. ``add_tokenizer(writer, tokenizer)`` writes
an ``HFTokenizer`` as this metadata (``save_gguf`` calls it).
"""

import os
from collections.abc import Mapping
from pathlib import Path

from ftransformer.interop.hf_tokenizer import HFTokenizer, configure_backend, special_tokens

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SUPPORTED_MODELS = ("gpt2", "llama")
# The named special tokens GGUF stores by id, and the key of each.
SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# Tokens that end a turn besides ``eos``: generation stops at them too (as llama.cpp does).
STOP_ID_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

_LETTERS_1_3_DIGITS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LETTERS_1_DIGIT = _LETTERS_1_3_DIGITS.replace(r"\p{N}{1,3}", r"\p{N}")
_MARKS_1_DIGIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
_UPPER = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_TEKKEN = f"{_CASED}|{_UPPER}" + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    f"{_CASED}{_CONTRACTION}|{_UPPER}{_CONTRACTION}" + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> the regex the text is split by before byte-level BPE (as transformers maps them).
SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"], _LETTERS_1_3_DIGITS,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _LETTERS_1_DIGIT),
    "qwen35": _MARKS_1_DIGIT,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}


# ---------------------------------------------------------------- reading the metadata


def byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as the printable character byte-level BPE writes it as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_tokenizer_metadata(path: Path) -> dict:
    """``general.architecture`` and every ``tokenizer.*`` key of a GGUF file, as Python values."""
    import gguf

    if not path.is_file():
        raise ValueError(f"{path} is not a file: expected a GGUF model file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, ... for a file that is not GGUF
        raise ValueError(f"{path} is not a GGUF file: {e}") from None
    return {
        key: field.contents() for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }


def merges_from_scores(tokens: list[str], scores) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every split of a token into two tokens, the best-scored token first.

    Splits of one token go in id order of their halves; ties keep vocabulary order, then longer halves first.
    """
    ids = {token: i for i, token in enumerate(tokens)}
    found = []
    for token, score in dict(zip(tokens, scores)).items():
        halves = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        found += [(left, right, score) for left, right in sorted(halves, key=lambda h: (ids[h[0]], ids[h[1]]))]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def file_merges(meta: Mapping, tokens: list[str]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as pairs, or the merges the tokens and their scores imply."""
    if "tokenizer.ggml.merges" in meta:
        pairs = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        bad = [m for m in pairs if len(m) != 2]
        if bad:
            raise ValueError(f"tokenizer.ggml.merges: each merge must be two tokens split by one space, got {bad[0]}")
        return pairs
    if "tokenizer.ggml.scores" not in meta:
        raise ValueError("a GGUF tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores, found neither")
    return merges_from_scores(tokens, meta["tokenizer.ggml.scores"])


def byte_level_backend(meta: Mapping, tokens: list[str]):
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``), split as ``tokenizer.ggml.pre`` says."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = byte_spelling()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    model = models.BPE(vocab, file_merges(meta, spelled), continuing_subword_prefix="", end_of_word_suffix="")
    backend = Tokenizer(model)
    split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def sentencepiece_backend(meta: Mapping, tokens: list[str], architecture: str):
    """SentencePiece BPE with byte fallback (``tokenizer.ggml.model == "llama"``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, file_merges(meta, tokens), fuse_unk=True, byte_fallback=True))
    if architecture == "phi3":  # the prefix "▁" comes from a normalizer (once per piece between special tokens)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def add_typed_tokens(backend, tokens: list[str], types, alphabet: set[str] | None) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (kept whole in text).

    In a byte-level vocabulary (``alphabet`` given) a control token spelled outside the byte alphabet is a
    mislabel and is left alone, as transformers leaves it.
    """
    from tokenizers import AddedToken

    typed = list(zip(tokens, types))
    control = [t for t, kind in typed if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    vocab = backend.get_vocab()
    user = [t for t, kind in typed if kind == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def gguf_config(meta: Mapping, tokens: list[str]) -> dict:
    """The tokenizer config (``tokenizer_config.json``'s keys) the metadata describes."""
    config = {}
    for name, key in SPECIAL_ID_KEYS.items():
        if key in meta:
            config[name] = tokens[token_index(meta, key, len(tokens))]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            config[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    if meta["tokenizer.ggml.model"] == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary by default
        config.setdefault("add_bos_token", True)
    return config


def token_index(meta: Mapping, key: str, n_tokens: int) -> int:
    """The token id stored under ``key``, checked against the vocabulary."""
    i = meta[key]
    if not 0 <= i < n_tokens:
        raise ValueError(f"{key} is {i}, outside the vocabulary of {n_tokens} tokens")
    return i


def gguf_templates(meta: Mapping) -> dict[str, str]:
    """The chat templates by name: ``tokenizer.chat_template`` is ``"default"``, ``.NAME`` ones their own."""
    named = {name: meta.get(f"tokenizer.chat_template.{name}") for name in meta.get("tokenizer.chat_templates", [])}
    default = meta.get("tokenizer.chat_template")
    return {**({} if default is None else {"default": default}), **{k: v for k, v in named.items() if v is not None}}


def build_backend(meta: Mapping, tokens: list[str], path: Path):
    """The ``tokenizers`` pipeline of the file's tokenizer model, control and user tokens added."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; supported: {list(SUPPORTED_MODELS)}")
    architecture = meta.get("general.architecture", "")
    if kind == "llama" and architecture.startswith("gemma"):
        raise ValueError(f"{path}: the SentencePiece tokenizer of {architecture!r} files is not supported yet")
    if kind == "gpt2":
        backend, alphabet = byte_level_backend(meta, tokens)
    else:
        backend, alphabet = sentencepiece_backend(meta, tokens, architecture), None
    types = meta.get("tokenizer.ggml.token_type", [])
    if len(types) not in (0, len(tokens)):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    add_typed_tokens(backend, tokens, types, alphabet)
    return backend


def load_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a GGUF file, encoding as transformers' GGUF conversion does (see the module docstring)."""
    path = Path(path)
    meta = read_tokenizer_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path} holds no tokenizer: tokenizer.ggml.tokens is missing or empty")
    tokens = list(tokens)
    backend = build_backend(meta, tokens, path)
    config = gguf_config(meta, tokens)
    configure_backend(backend, config, special_tokens(config))
    stop_keys = (SPECIAL_ID_KEYS["eos_token"], *STOP_ID_KEYS)
    stops = [token_index(meta, key, len(tokens)) for key in stop_keys if key in meta]
    templates = gguf_templates(meta)
    return HFTokenizer(backend, config, templates=templates, eos_ids=stops, source=str(path))
