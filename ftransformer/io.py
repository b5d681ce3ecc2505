"""Writing files so that a reader sees the old contents or the new, never a torn mix.

Every helper writes to a hidden temp file next to the target (same filesystem) and ``os.replace``s
it onto the target only once it is complete; an error on the way removes the temp file and leaves
the old file as it was. Checkpoints, tokenizers, token caches, histories and plots all write through here.
"""

import io
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name next to ``path`` (same filesystem, so ``os.replace`` onto ``path`` is atomic)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) contents to disk; a no-op where the filesystem does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and directories on some systems) do not support fsync
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temp sibling of ``path`` to write; on a clean exit it replaces ``path``, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (parent folders made); returns the path."""
    with replacing(path) as tmp:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual permissions (umask)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as a PNG at ``path`` atomically (parent folders made); returns the path."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A token in a script the default font lacks is drawn as a box; that is no reason to stop.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


__all__ = ["atomic_write", "fsync", "replacing", "save_figure", "temp_sibling"]
