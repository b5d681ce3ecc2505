"""GGUF file headers, read without ``gguf``'s reader: the metadata, each tensor's name, shape, type and offset.

A GGUF file is a header (magic, version, counts), its key/value metadata, one info record per tensor (name,
dims, ggml type, offset into the data section) and the data section, which starts at the next multiple of
``general.alignment`` (32 by default). ``gguf.GGUFReader`` parses every value through numpy (8 s for
SmolLM2's 49k-token vocabulary); reading it here with ``struct`` over a memory map takes well under a
second, and values the caller does not keep (the tokenizer's arrays when a model is loaded) are stepped
over without being decoded. ``load_gguf`` and ``load_gguf_tokenizer`` both read through ``read_gguf_header``.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF's value types: the numbers as struct/numpy codes, then strings and arrays.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its name, shape (row-major: GGUF's dims reversed), ggml type and data offset."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int  # absolute byte offset in the file


def read_value(data, offset: int, kind: int, order: str, *, skip: bool = False):
    """The GGUF value of type ``kind`` at ``offset`` (None when ``skip``: stepped over), and the offset past it."""
    if kind in SCALARS:
        fmt = order + SCALARS[kind]
        return None if skip else struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
    if kind == STRING:
        (n,) = struct.unpack_from(order + "Q", data, offset)
        if offset + 8 + n > len(data):
            raise ValueError(f"a string of {n} bytes at offset {offset} runs past the end of the file")
        return None if skip else data[offset + 8:offset + 8 + n].decode("utf-8"), offset + 8 + n
    if kind != ARRAY:
        raise ValueError(f"unknown GGUF value type {kind} at offset {offset}")
    item, n = struct.unpack_from(order + "IQ", data, offset)
    offset += 12
    if item in SCALARS:  # numbers in one read
        dtype = np.dtype(order + SCALARS[item])
        end = offset + n * dtype.itemsize
        return None if skip else np.frombuffer(data, dtype, n, offset).tolist(), end
    values = []
    for _ in range(n):
        value, offset = read_value(data, offset, item, order, skip=skip)
        values.append(value)
    return None if skip else values, offset


def read_gguf_header(path: str | os.PathLike, keep=lambda key: True) -> tuple[dict, dict[str, TensorInfo]]:
    """``(metadata, {name: TensorInfo})`` of a GGUF file: the metadata keys ``keep`` accepts, every tensor's info.

    A file that is not GGUF, is damaged, or whose tensors run past its end raises ``ValueError`` naming it.
    """
    path = _checked_path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file: it starts with {data[:4]!r}, not {GGUF_MAGIC!r}")
        order = "<" if struct.unpack_from("<I", data, 4)[0] < 2**16 else ">"  # the version says the byte order
        version, n_tensors, n_kv = struct.unpack_from(order + "IQQ", data, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported; expected 2 or 3")
        offset = 24
        try:
            meta, alignment, offset = _read_metadata(data, offset, n_kv, order, keep)
            infos, offset = _read_tensor_infos(data, offset, n_tensors, order)
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: malformed GGUF metadata near offset {offset}: {e}") from None
    base = -(-offset // alignment) * alignment  # the data section starts aligned
    return meta, {name: TensorInfo(name, shape, kind, base + at) for name, shape, kind, at in infos}


def read_gguf_metadata(path: str | os.PathLike, keep=lambda key: True) -> dict:
    """The metadata of a GGUF file (the keys ``keep`` accepts) as Python values, tensors left unread."""
    return read_gguf_header(path, keep)[0]


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file: expected a GGUF model file")
    if path.stat().st_size < 24:
        raise ValueError(f"{path} is not a GGUF file: {path.stat().st_size} bytes, shorter than a GGUF header")
    return path


def _read_metadata(data, offset: int, n_kv: int, order: str, keep) -> tuple[dict, int, int]:
    """The kept key/value pairs, ``general.alignment`` (kept or not), and the offset past the metadata."""
    meta, alignment = {}, DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, offset = read_value(data, offset, STRING, order)
        (kind,), offset = struct.unpack_from(order + "I", data, offset), offset + 4
        wanted = keep(key) or key == "general.alignment"
        value, offset = read_value(data, offset, kind, order, skip=not wanted)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"general.alignment must be a positive integer, got {value!r}")
            alignment = value
        if keep(key):
            meta[key] = value
    return meta, alignment, offset


def _read_tensor_infos(data, offset: int, n_tensors: int, order: str) -> tuple[list, int]:
    """``[(name, shape, ggml type, offset in the data section)]`` and the offset past the infos."""
    infos = []
    for _ in range(n_tensors):
        name, offset = read_value(data, offset, STRING, order)
        (n_dims,) = struct.unpack_from(order + "I", data, offset)
        dims = struct.unpack_from(order + "Q" * n_dims, data, offset + 4)
        kind, at = struct.unpack_from(order + "IQ", data, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(n) for n in reversed(dims)), kind, at))
    return infos, offset
