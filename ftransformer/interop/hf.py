"""Hugging Face checkpoints in and out: ``load_hf`` and ``save_hf`` for every family of ``interop.registry``.

``load_hf`` reads ``config.json``, finds its family in the registry (``model_type`` / ``architectures``),
checks every stored tensor's name and shape against the family's slots before reading any data, then
builds the parameters without copying what needs no change: a parameter that is one stored tensor
(an ``nn.Linear``'s ``[d_out, d_in]`` weight transposed to our ``[d_in, d_out]``, a block of its rows,
or the tensor as it is) *is* that tensor of the file, memory-mapped copy-on-write
(``safetensors_io.mapped``), or a transposed view of it (``linear`` transposes it back for free). Only
a value that must change is copied, into a parameter allocated once (a matrix in the file's
``[d_out, d_in]`` row order, transposed like the views, so rows are copied as they lie): a dtype cast,
a fused q/k/v concatenation, GPT-NeoX's interleave, or a device other than the CPU. The
``transformers`` model is never built, and no second full copy of the weights is ever held. ``fill_params`` is that for any
source: a directory's tensors, plain tensors in memory (``load_hf_gpt2``'s state dict), or ``Deferred``
ones made as each parameter is filled (a GGUF file's, dequantized one at a time), which become the
parameters themselves, or views of them, under the same rule.

Parameters mapped from a file are copy-on-write: an in-place update changes the process's own copy of
the touched pages, never the file (train steps here make new tensors anyway). Saving makes every tensor
contiguous, and ``save_hf`` replaces files by renaming, so saving over the directory a model was loaded
from is safe.

``save_hf`` writes ``config.json`` and ``model.safetensors`` (shards and an index above
``max_shard_size``) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads;
``hf_state_dict`` is the same tensors as a state dict ``load_state_dict(strict=True)`` accepts.
"""

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from ftransformer.config import Config
from ftransformer.interop.families import Slot
from ftransformer.interop.registry import FAMILIES, Family, family_for, family_of
from ftransformer.interop.safetensors_io import (
    StoredTensor, list_tensors, mapped, parse_size, read_rows, read_tensor, write_safetensors,
)
from ftransformer import tree
from ftransformer.params import init_params

# Converted tensors pass through a temporary of at most this many bytes (a few rows of a big table).
_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when its parameter is filled (a GGUF tensor dequantized); shape and dtype known before."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]


Stored = StoredTensor | Tensor | Deferred  # a tensor in a file (read when filled), in memory, or made when filled
# Looked for in this order; an index names the shards of a checkpoint split over several files.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


def read_hf_config(
    directory: str | os.PathLike, *, name: str = "config.json", what: str = "a Hugging Face model directory"
) -> dict:
    """``directory/name`` (a JSON object) as a dict; a missing or broken file raises ``ValueError`` naming it
    and saying the directory was expected to be ``what``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (expected {what})")
    path = directory / name
    if not path.is_file():
        raise ValueError(f"{directory} has no {name} (expected {what})")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}; expected a JSON object")
    return hf


def config_from_hf_dir(directory: str | os.PathLike) -> Config:
    """The ``Config`` of a Hugging Face directory, from its ``config.json`` alone (no weights are read)."""
    hf = read_hf_config(directory)
    return family_of(hf).config_in(hf)


def load_hf(
    directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Config, dict]:
    """``(cfg, params)`` from a Hugging Face model directory of any supported family.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``;
            without them an older ``pytorch_model.bin``, or its shards, which are read whole).
        dtype: cast floating-point tensors to it as they are read (None keeps the stored dtype).
        device: where the parameters are allocated and filled.

    Missing, unexpected or mis-shaped tensors, an unsupported family or option, and a damaged file
    each raise one ``ValueError`` naming them.
    """
    hf = read_hf_config(directory)
    family = family_of(hf)
    cfg = family.config_in(hf)
    return cfg, fill_params(_stored_tensors(Path(directory)), family, cfg, dtype=dtype, device=device)


def _stored_tensors(directory: Path) -> dict[str, Stored]:
    """A directory's safetensors, listed (read as they fill); else its older ``pytorch_model.bin``, read whole."""
    if not any((directory / name).is_file() for name in WEIGHT_FILES[:2]) and any(
            (directory / name).is_file() for name in WEIGHT_FILES[2:]):
        return read_weights(directory)
    return list_tensors(directory)


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a directory's weights, read whole, from the first of ``WEIGHT_FILES`` it has."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (expected a Hugging Face model directory)")
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path} has no 'weight_map' (expected a sharded checkpoint index)")
            sd: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(read_weights_file(directory / shard))
            return sd
        return read_weights_file(path)
    raise ValueError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """The tensors of one weights file; a damaged file raises ``ValueError`` naming it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code. A zip archive
        # (torch >= 1.6's format) is mapped copy-on-write, like safetensors; an older file is read whole.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except OSError:
        raise
    except Exception as e:  # safetensors, pickle and torch each raise their own types
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from None


def fill_params(
    stored: Mapping[str, Stored], family: Family, cfg: Config, *,
    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
) -> dict:
    """``cfg``'s parameter tree from ``stored`` (``{Hugging Face name: tensor}``) by ``family``'s slots;
    every name and shape is checked before any data is read.

    A tensor in memory that needs no change (dtype, device, concatenation) becomes its parameter itself,
    or a transposed view of it: memory mapped read-only (a ``numpy.memmap`` opened ``"r"``) would then
    crash an in-place update, so map it copy-on-write (``"c"``) or clone it first.
    """
    slots = family.slots(cfg)
    stored = _checked(_renamed(stored, family, slots), slots, cfg, family.base_prefix)
    flat, viewed = _allocate(cfg, slots, stored, dtype, torch.device(device))
    for slot in slots:
        leaf, entry = flat[slot.path], stored.get(slot.hf_key)
        if slot.tied and entry is not None and not _same(leaf, entry):
            shown = [k.removeprefix(family.base_prefix) for k in (slot.hf_key, _source_key(slots, slot))]
            raise ValueError(
                f"{shown[0]} differs from {shown[1]} but the config ties them (tie_word_embeddings=True); "
                "pass a config with tie_word_embeddings=False / tie_embeddings=False"
            )
        if not slot.tied and slot.path not in viewed:
            _fill(leaf, entry, slot)
    return tree.unflatten_paths(flat)


def _source_key(slots: list[Slot], tied: Slot) -> str:
    """The name of the tensor a tied slot copies (the slot that fills the same leaf)."""
    return next(s.hf_key for s in slots if s.path == tied.path and not s.tied)


def _renamed(stored: Mapping[str, Stored], family: Family, slots: list[Slot]) -> dict[str, Stored]:
    """The stored tensors under the slots' names: buffers left out, a base model's names put under the prefix."""
    keys, prefix = {s.hf_key for s in slots}, family.base_prefix
    out: dict[str, Stored] = {}
    for name, entry in stored.items():
        if family.buffers and name.endswith(family.buffers):
            continue
        key = prefix + name if name not in keys and prefix + name in keys else name
        if key in out:
            raise ValueError(f"{name!r} is stored both with and without the {prefix!r} prefix")
        out[key] = entry
    return out


def _checked(stored: dict[str, Stored], slots: list[Slot], cfg: Config, prefix: str) -> dict[str, Stored]:
    """The stored tensors the slots need, after checking names and shapes (before any data is read).
    Names are shown without ``prefix``; a state dict in memory is worded as ``load_hf_gpt2`` always has."""
    memory = any(isinstance(v, Tensor) for v in stored.values())
    noun, missing_as, extra_as = ("state dict", "{!r} (expected shape {})", "{!r}") if memory else ("checkpoint", "{!r} {}", "{}")
    expected = {s.hf_key: s for s in slots}
    missing = [missing_as.format(k.removeprefix(prefix), s.hf_shape) for k, s in expected.items() if k not in stored and not s.tied]
    extra = [extra_as.format(k.removeprefix(prefix)) for k in sorted(set(stored) - set(expected))]
    sizes = f"(n_layers={cfg.n_layers}, vocab={cfg.vocab_size}, d_model={cfg.d_model}, head_dim={cfg.head_dim})"
    if missing:
        raise ValueError(f"{noun} is missing {len(missing)} tensor(s) the config {sizes} needs: {_first_few(missing)}")
    if extra:
        raise ValueError(f"{noun} has {len(extra)} tensor(s) the config {sizes} has no place for: {_first_few(extra)}")
    for key, slot in expected.items():
        if key in stored and tuple(stored[key].shape) != slot.hf_shape:
            raise ValueError(
                f"tensor {key.removeprefix(prefix)!r} has shape {tuple(stored[key].shape)} but the config "
                f"expects {slot.hf_shape} {sizes}"
            )
    return {k: stored[k] for k in expected if k in stored}


def _first_few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _allocate(
    cfg: Config, slots: list[Slot], stored: dict[str, Stored], dtype: torch.dtype | None, device: torch.device
) -> tuple[dict[str, Tensor], set[str]]:
    """Leaves in ``init_params``' order and shapes, and the paths of those that are views already: a
    stored tensor (mapped from its file, or in memory) or a view of it where it is the whole leaf's
    values already (``_viewable``), else empty (built on the meta device first: no memory), of ``dtype``
    or of the dtype its first stored tensor has."""
    filling: dict[str, list[Slot]] = {}
    for slot in slots:
        if not slot.tied:
            filling.setdefault(slot.path, []).append(slot)
    views = {path: group[0] for path, group in filling.items()
             if len(group) == 1 and _viewable(group[0], stored[group[0].hf_key], dtype, device)}
    tensors = {path: _made(stored[slot.hf_key]) for path, slot in views.items()}
    in_files = [path for path, entry in tensors.items() if isinstance(entry, StoredTensor)]
    tensors.update(zip(in_files, mapped(tensors[path] for path in in_files)))  # one map per file
    flat = {}
    for path, leaf in _template(cfg).items():
        if path in views:
            flat[path] = _view(tensors[path], views[path])
        else:
            first = stored[filling[path][0].hf_key]
            want = first.dtype if dtype is None else dtype
            flat[path] = _empty(leaf.shape, want, device, all(s.transpose for s in filling[path]))
    return flat, set(views)


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device, transposed: bool) -> Tensor:
    """A new leaf; ``transposed``: laid out as the file's ``[d_out, d_in]`` rows (a ``.t()`` view, as a
    mapped matrix is), so the stored rows are copied in as they are, not scattered by a strided copy."""
    if not transposed:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape[::-1], dtype=dtype, device=device).t()


def _viewable(slot: Slot, entry: Stored, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether the leaf ``slot`` fills alone can be ``entry`` itself or a view of it: no value changes
    (dtype, device, interleave), only a transpose or a block of rows."""
    if slot.cols is not None or slot.heads is not None or (dtype is not None and entry.dtype != dtype):
        return False
    where = entry.device if isinstance(entry, Tensor) else torch.device("cpu")
    return where == device


def _view(t: Tensor, slot: Slot) -> Tensor:
    """The leaf as a view of its stored tensor: its rows ``slot.rows``, transposed if ``slot.transpose``."""
    t = t if slot.rows is None else t[slot.rows[0]:slot.rows[1]]
    return t.t() if slot.transpose else t


def _template(cfg: Config) -> dict[str, Tensor]:
    """``init_params``' leaves for ``cfg`` on the meta device (shapes and order, no memory)."""
    with torch.device("meta"):
        return tree.flatten_with_paths(init_params(cfg))


def _fill(leaf: Tensor, entry: Stored, slot: Slot) -> None:
    """Read one stored tensor into its place in ``leaf`` (whose values differ from it: a cast, a column
    block, an interleave), a block of rows at a time: straight into the leaf where that block is
    contiguous and of the stored dtype, else through a small temporary (so a cast vocabulary-sized
    table never needs a second full-size buffer)."""
    target = leaf if slot.cols is None else leaf[..., slot.cols[0]:slot.cols[1]]
    entry = _made(entry)
    if slot.transpose:
        target = target.T  # now in the stored [d_out, d_in] layout, a view into leaf
    if slot.heads is not None:  # a fused q/k/v projection (d_model rows at most): read whole, un-interleave
        whole = entry if isinstance(entry, Tensor) else read_tensor(entry)
        target.copy_(_interleaved(whole, slot.heads, inverse=True))
        return
    first, rows = slot.rows or (0, entry.shape[0])  # the stored rows this slot holds
    for start, stop in _blocks(target, entry, first, rows):
        block = target[start - first:stop - first]
        if isinstance(entry, StoredTensor) and block.is_contiguous() and (block.dtype, block.device.type) == (
                entry.dtype, "cpu"):
            read_rows(entry, start, stop, block)  # straight into the leaf's memory
        else:
            block.copy_(_rows(entry, start, stop))


def _same(leaf: Tensor, entry: Stored) -> bool:
    """Whether a stored tied copy holds the leaf's values (compared a block of rows at a time)."""
    entry = _made(entry)
    return all(
        torch.equal(leaf[start:stop], _rows(entry, start, stop).to(leaf.device, leaf.dtype))
        for start, stop in _blocks(leaf, entry, 0, entry.shape[0])
    )


def _blocks(target: Tensor, entry: Stored, first: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges of ``entry`` of at most ``_CHUNK_BYTES`` each, from ``first`` to ``rows``."""
    step = max(1, _CHUNK_BYTES // max(1, target[:1].numel() * entry.dtype.itemsize))
    return [(start, min(start + step, rows)) for start in range(first, rows, step)]


def _made(entry: Stored) -> StoredTensor | Tensor:
    """A deferred tensor made now; any other entry as it is."""
    if not isinstance(entry, Deferred):
        return entry
    made = entry.make()
    if (tuple(made.shape), made.dtype) != (tuple(entry.shape), entry.dtype):
        raise ValueError(f"a deferred tensor promised {tuple(entry.shape)} {entry.dtype}, made {tuple(made.shape)} {made.dtype}")
    return made


def _rows(entry: Stored, start: int, stop: int) -> Tensor:
    return entry[start:stop] if isinstance(entry, Tensor) else read_rows(entry, start, stop)


# ---------------------------------------------------------------- save


def save_hf(
    params: dict, cfg: Config, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB"
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (shards + index above ``max_shard_size``) for
    ``transformers`` to load (and ``load_hf`` to read back bit for bit). Returns the directory.

    The family is chosen from ``cfg``'s features (``registry.family_for``); GPT-2-shaped configs are
    written as GPT-2. A config no supported family can express raises ``ValueError`` naming the field.
    Only one shard's worth of converted tensors is in memory at a time.
    """
    limit = parse_size(max_shard_size)
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict init_params returns, got {type(params).__name__}")
    family = family_for(cfg)
    hf = family.config_json(cfg)  # a config the family cannot express is refused before the params are looked at
    slots = family.slots(cfg)
    tensors = _hf_tensors(tree.flatten_with_paths(params), _template(cfg), [s for s in slots if not s.tied])
    hf["dtype"] = str(tensors[slots[0].hf_key][1]).removeprefix("torch.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, directory, limit)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return directory


def hf_state_dict(params: dict, cfg: Config, family: str | None = None) -> dict[str, Tensor]:
    """``family``'s checkpoint (None: the family ``save_hf`` would write) of ``params`` as a state dict
    that the ``transformers`` model's ``load_state_dict(sd, strict=True)`` accepts (transformers 5's
    GPT-NeoX module alone renames a name: ``embed_out`` is its ``lm_head``). Tensors are ``params``' own
    where no conversion is needed, and a tied head is the embedding itself, as in the model."""
    entry = family_for(cfg) if family is None else FAMILIES[family]
    entry.config_json(cfg)  # refuses a config the family cannot express, naming the field
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict init_params returns, got {type(params).__name__}")
    slots = entry.slots(cfg)
    tensors = _hf_tensors(tree.flatten_with_paths(params), _template(cfg), [s for s in slots if not s.tied])
    sd = {key: make() for key, (_, _, make) in tensors.items()}
    for slot in slots:
        if slot.tied:
            sd[slot.hf_key] = sd[_source_key(slots, slot)]
    return sd


def _hf_tensors(flat: dict[str, Tensor], template: dict[str, Tensor], slots: list[Slot]) -> dict:
    """``{hf_key: (shape, dtype, producer)}``; each producer cuts and transposes its tensor when called."""
    written_as = {s.path: s.hf_key for s in slots}
    missing = [f"{p!r} (written as {written_as.get(p)})" for p in template if p not in flat]
    extra = [repr(p) for p in flat if p not in template]
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {_first_few(missing)}; unexpected {_first_few(extra)}")
    for path, leaf in template.items():
        if flat[path].shape != leaf.shape:
            raise ValueError(f"params {path!r} has shape {tuple(flat[path].shape)} but the config expects {tuple(leaf.shape)}")
    parts: dict[str, list[Slot]] = {}
    for s in slots:
        parts.setdefault(s.hf_key, []).append(s)  # several slots of one key: its row blocks, in order
    return {
        key: (group[0].hf_shape, flat[group[0].path].dtype,
              lambda group=group: torch.cat([_cut(flat[s.path], s) for s in group]) if len(group) > 1
              else _cut(flat[group[0].path], group[0]))
        for key, group in parts.items()
    }


def _cut(leaf: Tensor, slot: Slot) -> Tensor:
    part = leaf if slot.cols is None else leaf[..., slot.cols[0]:slot.cols[1]]
    part = part.T if slot.transpose else part
    return part if slot.heads is None else _interleaved(part, slot.heads)


def _interleaved(t: Tensor, heads: int, *, inverse: bool = False) -> Tensor:
    """First axis from ``(qkv heads head_dim)`` (``w_qkv``'s) to ``(heads qkv head_dim)`` (GPT-NeoX's
    ``query_key_value``), or back with ``inverse``."""
    if inverse:
        return rearrange(t, "(heads qkv head_dim) ... -> (qkv heads head_dim) ...", qkv=3, heads=heads).contiguous()
    return rearrange(t, "(qkv heads head_dim) ... -> (heads qkv head_dim) ...", qkv=3, heads=heads).contiguous()
