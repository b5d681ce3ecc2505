"""Safetensors files read tensor by tensor and written shard by shard, without a second full copy in memory.

Reading: ``safe_open`` checks each file (a damaged header or a truncated file is refused before any
data is read) and lists its tensors. A tensor used as it is stored (or as a transposed view of it)
comes from ``mapped``: ``safe_open``'s own copy-on-write memory map of the file (``MAP_PRIVATE``), so
no byte is copied, a page is read only when first used, and writing into the tensor (an in-place
update) copies that page privately instead of changing the file. A tensor whose values must change
(a cast, a concatenation) is read with ``readinto`` straight into its destination instead, so its
pages of the file are never mapped and never count twice.

Writing: ``save_pretrained``'s layout -- one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
shards and a ``model.safetensors.index.json`` mapping every tensor to its shard. Each file is written
beside its place and renamed over it: parameters mapped from the file being replaced keep reading the
old one (truncating a mapped file in place would crash whoever reads those parameters next).
"""

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ftransformer import validate

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: its file, dtype, shape, byte range in the file and name there."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int
    name: str = ""


def list_tensors(directory: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of a directory's ``model.safetensors`` or of the shards its index names."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    elif (directory / INDEX_FILE).is_file():
        files = _shards_of(directory / INDEX_FILE)
    else:
        raise ValueError(f"{directory} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")
    stored: dict[str, StoredTensor] = {}
    for path in files:
        for name, entry in _read_header(path).items():
            if name in stored:
                raise ValueError(f"tensor {name!r} is stored twice: in {stored[name].path.name} and {path.name}")
            stored[name] = entry
    return stored


def _shards_of(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index_path} is not a sharded checkpoint index ({e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' (expected a sharded checkpoint index)")
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise ValueError(f"{index_path.name} names the shard {path.name}, which {index_path.parent} does not have")
    return files


def _read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one file; ``safe_open`` vouches for the header before its offsets are trusted."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    stored = {}
    for name in names:
        entry = header[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(DTYPES)}")
        start, end = entry["data_offsets"]
        stored[name] = StoredTensor(
            path, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + start, 8 + length + end, name)
    return stored


def mapped(entries: Iterable[StoredTensor]) -> list[Tensor]:
    """The stored tensors themselves, memory-mapped copy-on-write by ``safe_open`` (one map per file)."""
    from safetensors import safe_open

    entries = list(entries)
    out: dict[StoredTensor, Tensor] = {}
    for path in dict.fromkeys(e.path for e in entries):
        with safe_open(str(path), framework="pt") as f:  # the map outlives the handle: the tensors hold it
            out.update({e: f.get_tensor(e.name) for e in entries if e.path == path})
    return [out[e] for e in entries]


def read_tensor(entry: StoredTensor, out: Tensor | None = None) -> Tensor:
    """The stored tensor's values, read into ``out`` (contiguous, on the CPU, of the stored dtype and
    shape) or into a new tensor."""
    if not entry.shape:
        out = torch.empty((), dtype=entry.dtype) if out is None else out
        return _read_bytes(entry, entry.start, out)
    return read_rows(entry, 0, entry.shape[0], out)


def read_rows(entry: StoredTensor, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """Rows ``start:stop`` (of the first axis) of a stored tensor: a contiguous run of its bytes."""
    shape = (stop - start, *entry.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=entry.dtype)
    row_bytes = out[:1].numel() * entry.dtype.itemsize if stop > start else 0
    return _read_bytes(entry, entry.start + start * row_bytes, out)


def _read_bytes(entry: StoredTensor, offset: int, out: Tensor) -> Tensor:
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(entry.path, "rb", buffering=0) as f:
        f.seek(offset)
        got = f.readinto(view) if len(view) else 0
    if got != len(view):
        raise ValueError(f"{entry.path} is truncated: expected {len(view)} bytes of data at offset {offset}, got {got}")
    return out


# ---------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"5GB"``, ``"2GiB"`` (as ``save_pretrained`` reads it)."""
    if validate.is_int(size):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '500MB' / '5GB' / '2GiB', got {size!r}")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


Producer = Callable[[], Tensor]  # makes one tensor when its shard is written (so only a shard is ever in memory)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Names grouped into shards of at most ``max_shard_size`` bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, Producer]], directory: Path, max_shard_size: int
) -> list[Path]:
    """Write ``{name: (shape, dtype, producer)}`` as one file or as shards with an index; returns the files."""
    from safetensors.torch import save_file

    sizes = [(name, _nbytes(shape, dtype)) for name, (shape, dtype, _) in tensors.items()]
    shards = plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in [SINGLE_FILE, INDEX_FILE, *(p.name for p in directory.glob("model-*-of-*.safetensors"))]:
        if stale not in names and (directory / stale).exists():
            (directory / stale).unlink()  # a previous save's files would be read instead of, or beside, these
    for file_name, members in zip(names, shards):
        shard = {name: tensors[name][2]().detach().to("cpu").contiguous() for name in members}
        part = directory / f".{file_name}.partial"
        try:
            save_file(shard, str(part), metadata={"format": "pt"})
            os.replace(part, directory / file_name)  # a new file: maps of the old one keep their bytes
        finally:
            part.unlink(missing_ok=True)
        del shard
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(n for _, n in sizes)},
            "weight_map": {name: file_name for file_name, members in zip(names, shards) for name in members},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [directory / n for n in names]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize
