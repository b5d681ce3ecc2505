"""Corpora: a UTF-8 text file or the built-in one, and their token ids cached on disk.

The built-in default corpus is the source of the running Python's standard library, which every
Python install carries, so training needs no download.
"""

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from ftransformer.data.tokenizers import Tokenizer
from ftransformer.io import replacing

BUILTIN_CORPUS = "python-stdlib"
# The built-in corpus: whole stdlib files in sorted order until this many characters (a few MB: a
# small model cannot use more in a CPU-sized run, and it keeps the first tokenization quick).
BUILTIN_MAX_CHARS = 4_000_000
# Tests, GUI demos and vendored code are left out: they are either huge generated data or not typical code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
     "tkinter", "turtledemo", "ensurepip", "venv"}
)


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
    with replacing(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=ids.dtype, shape=ids.shape)
        out[:] = ids
        out.flush()
        del out
    return np.load(path, mmap_mode="r")


__all__ = [
    "BUILTIN_CORPUS", "BUILTIN_MAX_CHARS", "builtin_corpus", "cache_key", "load_corpus", "read_text_file", "stdlib_files", "tokenize_cached",
]
