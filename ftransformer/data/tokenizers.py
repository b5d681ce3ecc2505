"""Tokenizers: one small interface, a character tokenizer and a byte-level BPE.

Both share ``encode``, ``decode``, ``vocab_size``, ``save(dir)`` and ``load_tokenizer(dir)``:
``CharTokenizer`` (one id per character of the corpus) and ``BPETokenizer`` (byte-level BPE trained
locally with the ``tokenizers`` library, imported on first use).
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from ftransformer import validate
from ftransformer.io import atomic_write

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What training, checkpoints and generation need from a tokenizer."""

    kind: str  # "char" or "bpe": how ``load_tokenizer`` rebuilds it

    @property
    def vocab_size(self) -> int:
        """Number of token ids: every id lies in ``[0, vocab_size)``."""
        ...

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        ...

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a numpy array of the smallest unsigned dtype that holds the vocabulary."""
        ...

    def decode(self, ids) -> str:
        """The text of a sequence of ids (a list or a 1-d tensor/array)."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (``load_tokenizer`` reads it back); returns its path."""
        ...

    def fingerprint(self) -> str:
        """A hash of the vocabulary: the same tokenizer gives the same fingerprint (token caches are keyed by it)."""
        ...


def ids_list(ids, vocab_size: int) -> list[int]:
    """Token ids as a flat list of ints, each checked against ``[0, vocab_size)``."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().reshape(-1).tolist()
    elif isinstance(ids, np.ndarray):
        ids = ids.reshape(-1).tolist()
    else:
        ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside [0, vocab_size={vocab_size})")
    return ids


def smallest_uint(vocab_size: int) -> np.dtype:
    """The smallest unsigned numpy dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class CharTokenizer:
    """One id per distinct character; ids follow the sorted characters, so the same corpus gives the same ids."""

    kind = "char"

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character, got none")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer expects single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = sorted(chars)
        # Sorted code points let encode map a whole text at once with one searchsorted.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text``: its distinct characters, sorted."""
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a numpy array (uint16, or uint32 past 65536 characters)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, cps)
        idx_clipped = np.minimum(idx, len(self._codepoints) - 1)
        unknown = self._codepoints[idx_clipped] != cps
        if unknown.any():
            pos = int(np.argmax(unknown))
            ch = text[pos]
            raise ValueError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the tokenizer's vocabulary "
                f"of {self.vocab_size} characters"
            )
        return idx.astype(smallest_uint(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """See ``Tokenizer.encode``."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """See ``Tokenizer.decode``."""
        return "".join(self.chars[i] for i in ids_list(ids, self.vocab_size))

    def to_json(self) -> str:
        """The tokenizer as the JSON text ``save`` writes."""
        return json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=True)

    def fingerprint(self) -> str:
        """See ``Tokenizer.fingerprint``."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json``; returns its path."""
        return atomic_write(Path(directory) / TOKENIZER_FILE, self.to_json())

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style): every string round-trips exactly, whatever characters it holds."""

    kind = "bpe"

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(f"BPETokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 2048, *, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges from ``text`` until ``vocab_size`` ids (the 256 byte symbols included) or no pair repeats."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not validate.is_int(vocab_size) or vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be an int >= 257 (256 byte symbols + merges), got {vocab_size!r}")
        if not text:
            raise ValueError("cannot train a BPE tokenizer on empty text")
        tok = HFTokenizer(models.BPE())
        # No prefix space and no normalizer: decode(encode(s)) == s for every string.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer, length=None)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_array(self, text: str) -> np.ndarray:
        """See ``Tokenizer.encode_array``."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=smallest_uint(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """See ``Tokenizer.encode``."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        """See ``Tokenizer.decode``."""
        return self.tokenizer.decode(ids_list(ids, self.vocab_size), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer as the JSON text ``save`` writes."""
        return self.tokenizer.to_str()

    def fingerprint(self) -> str:
        """See ``Tokenizer.fingerprint``."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` in the ``tokenizers`` format (``Tokenizer.from_file`` reads it)."""
        return atomic_write(Path(directory) / TOKENIZER_FILE, self.to_json())

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and other.to_json() == self.to_json()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _chunks(text: str, size: int = 1 << 16):
    """Pieces of ``text`` ending at line breaks, for the trainer (which then counts them in parallel)."""
    start = 0
    while start < len(text):
        end = text.find("\n", min(start + size, len(text)))
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


TOKENIZER_KINDS = ("char", "bpe")


def build_tokenizer(kind: str, text: str, *, vocab_size: int = 2048) -> Tokenizer:
    """A tokenizer of ``kind`` fitted to ``text`` (``vocab_size`` is used by BPE only)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZER_KINDS))}, got {kind!r}")


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from the contents of a ``tokenizer.json``."""
    data = json.loads(text)
    if isinstance(data, dict) and data.get("kind") == "char":
        return CharTokenizer(data["chars"])
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("type") == "BPE":
        return BPETokenizer.from_json(text)
    raise ValueError("tokenizer.json holds neither a char tokenizer nor a BPE tokenizer")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in ``directory`` (by ``save`` or with a checkpoint)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"no tokenizer in {directory}: {TOKENIZER_FILE} is missing")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None


__all__ = [
    "BPETokenizer", "CharTokenizer", "TOKENIZER_FILE", "TOKENIZER_KINDS", "Tokenizer", "build_tokenizer",
    "load_tokenizer", "tokenizer_from_json",
]
