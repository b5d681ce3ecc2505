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
  spaces and one before the text (``Metaspace``); Phi-3 files prepend it in a normalizer instead, Gemma 1-3
  files not at all (``GEMMA_ARCHITECTURES``). Without merges in the file, they are recovered from the
  vocabulary, best score first (Gemma: vocabulary order). ``add_bos_token`` defaults to true here, as
  llama.cpp and transformers default it for such files.
- control tokens (type 3) stay whole as special tokens, user-defined ones (type 4) as plain added tokens;
  ``bos/eos/unk/pad`` come from their ids.

transformers' tokenizer classes make their default special tokens special (``<|endoftext|>`` for byte-level
BPE, ``<unk> <s> </s>`` for SentencePiece, Gemma's five): so do we where the vocabulary has them, but unlike
transformers we add none the file lacks, so every id stays inside the model's vocabulary.

``add_tokenizer(writer, tokenizer)`` writes an ``HFTokenizer`` as this metadata (``save_gguf`` calls it); the
file's ``general.architecture`` picks the SentencePiece flavour it is read back as. The metadata is read by
``interop.gguf_file.read_gguf_metadata`` (no tensors touched; 0.7 s against gguf's own reader's 9 s for
SmolLM2's 49k-token vocabulary).
"""

import os
from collections.abc import Mapping
from pathlib import Path

from ftransformer.interop.gguf_file import read_gguf_metadata
from ftransformer.interop.hf_tokenizer import (
    HFTokenizer, add_missing_special_tokens, configure_backend, special_tokens,
)

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SUPPORTED_MODELS = ("gpt2", "llama")
# Architectures whose "llama" tokenizer is Gemma's SentencePiece (no prefix space, merges in vocabulary order).
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
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
_SYMBOLS_AND_SPACES = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = f"{_CASED}|{_UPPER}|" + r"\p{N}|" + _SYMBOLS_AND_SPACES
_GPT4O = f"{_CASED}{_CONTRACTION}|{_UPPER}{_CONTRACTION}|" + r"\p{N}{1,3}|" + _SYMBOLS_AND_SPACES
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
    """``general.architecture`` and every ``tokenizer.*`` key of a GGUF file."""
    return read_gguf_metadata(path, lambda key: key.startswith("tokenizer.") or key == "general.architecture")


def merges_from_scores(tokens: list[str], scores) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every split of a token into two tokens, the best-scored token first.

    Splits of one token go in id order of their halves; among equal scores the longer left half goes first,
    then the longer right half, then vocabulary order.
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
        known = set(tokens)
        bad = [m for m in pairs if len(m) != 2 or not {m[0], m[1], m[0] + m[1]} <= known]
        if bad:
            raise ValueError(
                f"tokenizer.ggml.merges: each merge must be two tokens split by one space that make a token of "
                f"the vocabulary, got {' '.join(bad[0])!r}"
            )
        return pairs
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("a GGUF tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores, found neither")
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    return merges_from_scores(tokens, scores)


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


def gemma_backend(meta: Mapping, tokens: list[str]):
    """Gemma's SentencePiece BPE (``"llama"`` tokenizer, ``gemma*`` architecture): spaces become "▁", no prefix.

    Gemma files spell a token of two or more spaces with real spaces; it is the "▁" token the text meets.
    Without merges in the file they are recovered in vocabulary order (Gemma's scores do not follow it).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = {**meta, "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))]}
    model = models.BPE(vocab, file_merges(ranked, tokens), fuse_unk=True, unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
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
        if meta.get("general.architecture") in GEMMA_ARCHITECTURES and "<mask>" in tokens:
            config["mask_token"] = "<mask>"  # the one default of Gemma's tokenizer class no GGUF key overrides
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
    if kind == "gpt2":
        (backend, alphabet), defaults = byte_level_backend(meta, tokens), ("<|endoftext|>",)
    elif architecture in GEMMA_ARCHITECTURES:
        backend, alphabet, defaults = gemma_backend(meta, tokens), None, ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
    else:
        backend, alphabet, defaults = sentencepiece_backend(meta, tokens, architecture), None, ("<unk>", "<s>", "</s>")
    # transformers' tokenizer class makes its default special tokens special (we: only those in the vocabulary)
    vocab = backend.get_vocab()
    add_missing_special_tokens(backend, [t for t in defaults if t in vocab])
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


# ---------------------------------------------------------------- writing the metadata


def gguf_tokenizer_model(backend) -> tuple[str, str | None]:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` for a BPE backend: byte-level is gpt2, byte fallback llama."""
    import json

    pipeline = json.loads(backend.to_str())
    model, pre = pipeline["model"], pipeline.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be written to GGUF, got a {model.get('type')} model")
    if model.get("byte_fallback"):
        return "llama", None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2", "gpt2"
    parts = pre.get("pretokenizers", [])
    if [p.get("type") for p in parts] == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        names = [name for name, split in SPLITS.items() if split == regex]
        if names:
            return "gpt2", names[0]
    raise ValueError(
        "the tokenizer is neither byte-level BPE (a ByteLevel pre-tokenizer, or a Split by one of the regexes of "
        f"{sorted(set(SPLITS))} then ByteLevel) nor SentencePiece BPE with byte fallback; got pre-tokenizer "
        f"{json.dumps(pre)[:200]}"
    )


def vocabulary_list(backend) -> list[str]:
    """Every token (added ones included) in id order; ids must be 0..n-1 without gaps."""
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    gaps = [i for i, t in enumerate(tokens) if vocab[t] != i]
    if gaps:
        raise ValueError(f"GGUF stores token ids 0..n-1; this vocabulary has no token with id {gaps[0]}")
    return tokens


def token_types(backend, tokens: list[str], unk: str | None) -> list[int]:
    """llama.cpp's type of each token: control (special added), user-defined (added), byte, unknown, normal."""
    added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}

    def kind(token: str) -> int:
        if token == unk:
            return UNKNOWN
        if token in added:
            return CONTROL if added[token] else USER_DEFINED
        return BYTE if token in byte_tokens else NORMAL

    return [kind(t) for t in tokens]


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp: minus the rank of the merge that makes a token, 0 for the rest."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def bos_eos_flags(tokenizer: HFTokenizer) -> tuple[bool, bool]:
    """Whether encoding adds ``bos_token`` in front and ``eos_token`` at the end (what add_bos/eos_token say)."""
    ends = tokenizer.encode("", add_special_tokens=True)
    bos, eos = tokenizer.bos_id, tokenizer.special_tokens.get("eos_token")
    eos = None if eos is None else tokenizer.token_id(eos)
    add_bos = bos is not None and ends[:1] == [bos]
    add_eos = eos is not None and len(ends) > add_bos and ends[-1] == eos
    if len(ends) != add_bos + add_eos:
        raise ValueError(f"GGUF can only say 'add BOS' and 'add EOS'; this tokenizer adds {ends} to an empty text")
    return add_bos, add_eos


def add_tokenizer(writer, tokenizer: HFTokenizer) -> None:
    """Write ``tokenizer`` as GGUF ``tokenizer.*`` metadata: vocabulary, merges, types, specials, template."""
    import json

    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"add_tokenizer writes an HFTokenizer, got {type(tokenizer).__name__}")
    backend = tokenizer.tokenizer
    kind, pre = gguf_tokenizer_model(backend)
    tokens = vocabulary_list(backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types(backend, tokens, tokenizer.special_tokens.get("unk_token")))
    writer.add_token_merges(merges)
    if kind == "llama":
        writer.add_token_scores(merge_scores(tokens, merges))
    for name, key in SPECIAL_ID_KEYS.items():
        if name in tokenizer.special_tokens:
            writer.add_uint32(key, tokenizer.token_id(tokenizer.special_tokens[name]))
    stops = [i for i in tokenizer.eos_ids if tokens[i] != tokenizer.special_tokens.get("eos_token")]
    if stops:
        writer.add_eot_token_id(stops[0])
    add_bos, add_eos = bos_eos_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    templates = tokenizer.chat_templates
    if templates:
        writer.add_chat_template([{"name": name, "template": source} for name, source in templates.items()])
