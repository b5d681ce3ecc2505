"""Data for training: tokenizers, corpora, a cached token array, a train/val split and deterministic batches.

Two tokenizers share one small interface (``encode``, ``decode``, ``vocab_size``, ``save(dir)``,
``load_tokenizer(dir)``): ``CharTokenizer`` (one id per character of the corpus) and ``BPETokenizer``
(byte-level BPE trained locally with the ``tokenizers`` library). Corpora are a UTF-8 text file or the
built-in default corpus: the source of the running Python's standard library, which every Python
install carries, so training needs no download.

Batches are a pure function of ``(seed, step)``: a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

import hashlib
import json
import os
import sysconfig
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

TOKENIZER_FILE = "tokenizer.json"
BUILTIN_CORPUS = "python-stdlib"
# The built-in corpus: whole stdlib files in sorted order until this many characters (a few MB: a
# small model cannot use more in a CPU-sized run, and it keeps the first tokenization quick).
BUILTIN_MAX_CHARS = 4_000_000
# Tests, GUI demos and vendored code are left out: they are either huge generated data or not typical code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
     "tkinter", "turtledemo", "ensurepip", "venv"}
)


# ---------------------------------------------------------------- tokenizers


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


def _ids_list(ids, vocab_size: int) -> list[int]:
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


def _smallest_uint(vocab_size: int) -> np.dtype:
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
        return idx.astype(_smallest_uint(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """See ``Tokenizer.encode``."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """See ``Tokenizer.decode``."""
        return "".join(self.chars[i] for i in _ids_list(ids, self.vocab_size))

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

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
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
        return np.asarray(ids, dtype=_smallest_uint(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """See ``Tokenizer.encode``."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        """See ``Tokenizer.decode``."""
        return self.tokenizer.decode(_ids_list(ids, self.vocab_size), skip_special_tokens=False)

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


# ---------------------------------------------------------------- corpora


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; a missing, empty or non-UTF-8 file raises a one-line ``ValueError`` naming it."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"data file {str(p)!r} is a directory, expected a UTF-8 text file")
    raw = p.read_bytes()
    if not raw:
        raise ValueError(f"data file {str(p)!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} cannot be decoded)"
        ) from None


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files that make the built-in corpus, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise OSError(f"the Python standard library directory {str(root)!r} is missing; pass --data FILE instead")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def builtin_corpus(max_chars: int = BUILTIN_MAX_CHARS) -> str:
    """The built-in default corpus: whole standard-library source files, in sorted order, up to ``max_chars``.

    The same Python install gives the same text on every call (different Python versions give different text).
    """
    parts, total = [], 0
    for f in stdlib_files():
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable file is skipped the same way every time
        if total and total + len(text) > max_chars:
            break
        parts.append(text)
        total += len(text)
    if not parts:
        raise OSError("found no readable .py files in the Python standard library; pass --data FILE instead")
    return "\n".join(parts)


def load_corpus(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(name, text)`` of a text file, or of the built-in corpus when ``path`` is None."""
    if path is None:
        return BUILTIN_CORPUS, builtin_corpus()
    return str(path), read_text_file(path)


# ---------------------------------------------------------------- token ids on disk


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name next to ``path`` (same filesystem, so ``os.replace`` onto ``path`` is atomic)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file so that readers see the old contents or the new, never a torn mix (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual permissions (umask)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_key(text: str, tokenizer: Tokenizer) -> str:
    """A short hash of the text and the tokenizer: the name of their cached token array."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    h.update(tokenizer.fingerprint().encode())
    return h.hexdigest()[:24]


def tokenize_cached(text: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None) -> np.ndarray:
    """Token ids of ``text``, read from (or written to) ``cache_dir`` as a numpy memmap.

    The file is keyed by a hash of the text and the tokenizer, so a changed corpus or vocabulary never
    reads stale ids. ``cache_dir=None`` tokenizes in memory.
    """
    if cache_dir is None:
        return tokenizer.encode_array(text)
    cache = Path(cache_dir)
    path = cache / f"tokens-{cache_key(text, tokenizer)}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache file is rebuilt, not trusted
    ids = tokenizer.encode_array(text)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=ids.dtype, shape=ids.shape)
        out[:] = ids
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------- split and batches


def split_ids(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous train/val split: the first ``1 - val_fraction`` of the ids train, the rest validate."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def min_tokens(seq_len: int, val_fraction: float) -> int:
    """The fewest tokens that leave both splits at least one window of ``seq_len + 1`` tokens."""
    n = seq_len + 1
    while True:
        n_train = int(n * (1.0 - val_fraction))
        if n_train >= seq_len + 1 and n - n_train >= seq_len + 1:
            return n
        n += 1


def unpack_batch(batch) -> tuple[Tensor, Tensor]:
    """``(tokens, targets)`` from a batch, or ``TypeError`` saying what a batch must be."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"batch must be a (tokens, targets) pair, got {type(batch).__name__}")
    tokens, targets = batch
    for name, x in (("tokens", tokens), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"batch {name} must be a torch.Tensor, got {type(x).__name__}")
    return tokens, targets


def sample_batch(
    ids: np.ndarray | Tensor, batch_size: int, seq_len: int, *, seed: int, step: int, stream: int = 0
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """``batch_size`` random windows of ``ids``: ``(tokens, targets)``, targets shifted by one position.

    The windows depend on ``(seed, stream, step)`` only, so any step's batch can be drawn again
    (exact resume) and the train (stream 0) and validation (stream 1) draws never collide.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("seed", seed), ("step", step), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens to draw a batch, got {len(ids)}")
    rng = np.random.default_rng([seed, stream, step])
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    if isinstance(ids, Tensor):
        index = torch.as_tensor(starts)[:, None] + torch.arange(seq_len + 1)
        window = ids[index.to(ids.device)].long()
    else:
        window = torch.from_numpy(np.asarray(ids[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
    return window[:, :-1], window[:, 1:]


def fixed_batches(
    ids: np.ndarray | Tensor, n_batches: int, batch_size: int, seq_len: int, *, seed: int, stream: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """The same ``n_batches`` batches every time (for evaluation)."""
    return [sample_batch(ids, batch_size, seq_len, seed=seed, step=i, stream=stream) for i in range(n_batches)]


class SplitWindows(Sequence):
    """Every target of a split exactly once: batches of non-overlapping ``seq_len`` windows, for exact evaluation.

    Window ``i`` holds tokens ``ids[i*seq_len : (i+1)*seq_len]`` and the next token of each as targets,
    so each token predicts the next with the context since its window began (nanoGPT's protocol for a
    whole-split loss). When ``len(ids) - 1`` targets do not fill whole windows, the remaining ``r``
    targets are scored by one more window, the split's last ``seq_len`` tokens, whose first
    ``seq_len - r`` targets (already scored) are ``ignore_index``: every window has the same shape, so
    the tail batches with the rest, and its few targets see a full context instead of a short one.
    ``drop_last=True`` leaves those ``r`` targets out instead. A split shorter than ``seq_len + 1``
    tokens is one window of ``len(ids) - 1`` tokens.

    Items are ``(tokens, targets)`` int64 pairs of shape ``[batch, seq]`` (the last batch may be
    smaller); ``len`` is the number of batches and ``n_targets`` the number of targets scored.
    """

    def __init__(
        self, ids: np.ndarray | Tensor, seq_len: int, batch_size: int, *, drop_last: bool = False,
        ignore_index: int = -100,
    ):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(ids) < 2:
            raise ValueError(f"need at least 2 tokens to score one target, got {len(ids)}")
        self.ids, self.batch_size, self.ignore_index = ids, batch_size, ignore_index
        n_targets = len(ids) - 1
        self.seq_len = min(seq_len, n_targets)
        self.n_full, self.tail = divmod(n_targets, self.seq_len)
        if drop_last:
            self.tail = 0
        self.n_windows = self.n_full + (1 if self.tail else 0)
        self.n_targets = self.n_full * self.seq_len + self.tail

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __getitem__(self, i: int) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"SplitWindows indices must be ints, got {type(i).__name__}")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} is out of range for {len(self)} batches")
        first, last = i * self.batch_size, min((i + 1) * self.batch_size, self.n_windows)
        seq = self.seq_len
        starts = [w * seq for w in range(first, min(last, self.n_full))]
        if last > self.n_full:  # the tail window: the split's last seq_len + 1 tokens
            starts.append(len(self.ids) - 1 - seq)
        offsets = np.asarray(starts)[:, None] + np.arange(seq + 1)
        if isinstance(self.ids, Tensor):
            window = self.ids[torch.as_tensor(offsets).to(self.ids.device)].long()
        else:
            window = torch.from_numpy(np.asarray(self.ids[offsets], dtype=np.int64))
        tokens, targets = window[:, :-1], window[:, 1:].clone()
        if last > self.n_full:
            targets[-1, : seq - self.tail] = self.ignore_index
        return tokens, targets

    def __repr__(self) -> str:
        return (f"SplitWindows({self.n_windows} windows of seq_len={self.seq_len}, {self.n_targets} targets, "
                f"{len(self)} batches of up to {self.batch_size})")


# ---------------------------------------------------------------- everything at once


@dataclass(frozen=True)
class Dataset:
    """A tokenized corpus, split for training."""

    name: str  # the data file, or "python-stdlib" for the built-in corpus
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, contiguous first part of the corpus
    val: np.ndarray  # token ids, the rest
    n_chars: int  # characters in the corpus


def load_dataset(
    path: str | os.PathLike | None = None,
    *,
    tokenizer: str | Tokenizer = "char",
    seq_len: int,
    val_fraction: float = 0.1,
    bpe_vocab_size: int = 2048,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Read a corpus (a file, or the built-in one when ``path`` is None), tokenize it (cached), split it.

    ``tokenizer`` is ``"char"``/``"bpe"`` (fitted to this corpus) or a tokenizer to reuse (resume).
    A corpus too short for one ``seq_len + 1`` window in each split raises ``ValueError`` naming it.
    """
    name, text = load_corpus(path)
    where = "the built-in corpus" if path is None else f"data file {name!r}"
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer, text, vocab_size=bpe_vocab_size)
    elif not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be 'char', 'bpe' or a Tokenizer, got {type(tokenizer).__name__}")
    try:
        ids = tokenize_cached(text, tokenizer, cache_dir)
    except ValueError as e:
        raise ValueError(f"{where} cannot be tokenized with the checkpoint's tokenizer: {e}") from None
    need = min_tokens(seq_len, val_fraction)
    if len(ids) < need:
        raise ValueError(
            f"{where} is too short: {len(ids)} tokens, but a {1 - val_fraction:.0%}/{val_fraction:.0%} "
            f"train/val split with seq_len={seq_len} needs at least {need}"
        )
    train, val = split_ids(ids, val_fraction)
    return Dataset(name=name, tokenizer=tokenizer, train=train, val=val, n_chars=len(text))


__all__ = [
    "BUILTIN_CORPUS", "BPETokenizer", "CharTokenizer", "Dataset", "SplitWindows", "TOKENIZER_KINDS", "Tokenizer", "atomic_write",
    "build_tokenizer", "builtin_corpus", "cache_key", "fixed_batches", "load_corpus", "load_dataset", "load_tokenizer",
    "min_tokens", "read_text_file", "sample_batch", "split_ids", "stdlib_files", "temp_sibling", "tokenize_cached",
    "tokenizer_from_json",
]
