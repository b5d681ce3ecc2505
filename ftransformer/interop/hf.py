"""Hugging Face checkpoints in and out: ``load_hf`` and ``save_hf`` for every supported family.

``load_hf`` reads ``config.json``, dispatches on its ``model_type`` / ``architectures`` (GPT-2 goes
through ``interop.hf_gpt2``; Llama, Mistral, Qwen2 and Qwen3 through ``interop.families``; GPT-NeoX
through ``interop.neox``), checks
every stored tensor's name and shape against the config before reading any data, then fills
parameters allocated once at their final dtype and device, one stored tensor at a time. The
``transformers`` model is never built, and no second full copy of the weights is ever held: the peak
is the parameters plus the largest single tensor.

``save_hf`` writes ``config.json`` and ``model.safetensors`` (shards and an index above
``max_shard_size``) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

import json
import os
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from ftransformer.config import Config
from ftransformer.interop import families, gemma, hf_gpt2, neox
from ftransformer.interop.families import Slot
from ftransformer.interop.hf_gpt2 import _first_few
from ftransformer.interop.safetensors_io import (
    StoredTensor, list_tensors, parse_size, read_rows, read_tensor, write_safetensors,
)
from ftransformer import tree
from ftransformer.params import init_params

# Buffers older transformers versions saved beside the weights; they hold no learned numbers
# (GPT-NeoX's causal-mask buffers among them).
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")
# Converted tensors pass through a temporary of at most this many bytes (a few rows of a big table).
_CHUNK_BYTES = 16 * 2**20


def read_hf_config(directory: str | os.PathLike) -> dict:
    """``directory/config.json`` as a dict; a missing or broken file raises ``ValueError`` naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (expected a Hugging Face model directory)")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json (expected a Hugging Face model directory)")
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
    family = families.family_of(hf)
    if family == "gpt2":
        return hf_gpt2.config_from_hf(hf)
    return _reader(family).config_from_hf(hf)


def _reader(family: str):
    """The module that reads and writes ``family``'s configs and tensor names."""
    return neox if family == "gpt_neox" else gemma if family in gemma.GEMMAS else families


def load_hf(
    directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Config, dict]:
    """``(cfg, params)`` from a Hugging Face model directory of any supported family.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
        dtype: cast floating-point tensors to it as they are read (None keeps the stored dtype).
        device: where the parameters are allocated and filled.

    Missing, unexpected or mis-shaped tensors, an unsupported family or option, and a damaged file
    each raise one ``ValueError`` naming them.
    """
    hf = read_hf_config(directory)
    family = families.family_of(hf)
    if family == "gpt2":
        return hf_gpt2.load_hf_gpt2(directory, dtype=dtype, device=device)
    cfg = _reader(family).config_from_hf(hf)
    slots = neox.tensor_slots(cfg) if family == "gpt_neox" else families.tensor_slots(cfg, family)
    stored = _checked(list_tensors(directory), slots, cfg)
    flat = _allocate(cfg, slots, stored, dtype, torch.device(device))
    for slot in slots:
        _fill(flat[slot.path], stored[slot.hf_key], slot)
    return cfg, tree.unflatten_paths(flat)


def _checked(stored: dict[str, StoredTensor], slots: list[Slot], cfg: Config) -> dict[str, StoredTensor]:
    """The stored tensors the slots need, after checking names and shapes (before any data is read)."""
    expected = {s.hf_key: s for s in slots}
    ignored = {k for k in stored if k.endswith(_BUFFER_SUFFIXES)}
    if cfg.embeddings.tie:
        ignored |= {"lm_head.weight", "embed_out.weight"}  # some tied checkpoints store it anyway; the tie makes it the embedding
    missing = [f"{k!r} {s.hf_shape}" for k, s in expected.items() if k not in stored]
    extra = sorted(set(stored) - set(expected) - ignored)
    sizes = f"(n_layers={cfg.n_layers}, vocab={cfg.vocab_size}, d_model={cfg.d_model}, head_dim={cfg.head_dim})"
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config {sizes} needs: {_first_few(missing)}")
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} tensor(s) the config {sizes} has no place for: {_first_few(extra)}")
    for key, slot in expected.items():
        if stored[key].shape != slot.hf_shape:
            raise ValueError(f"tensor {key!r} has shape {stored[key].shape} but the config {sizes} expects {slot.hf_shape}")
    return {k: stored[k] for k in expected}


def _allocate(
    cfg: Config, slots: list[Slot], stored: dict[str, StoredTensor], dtype: torch.dtype | None, device: torch.device
) -> dict[str, Tensor]:
    """Empty leaves in ``init_params``' order and shapes (built on the meta device: no memory), each of
    ``dtype`` or of the dtype its first stored tensor has."""
    template = _template(cfg)
    source = {}
    for slot in slots:
        source.setdefault(slot.path, stored[slot.hf_key].dtype)
    return {
        path: torch.empty(leaf.shape, dtype=dtype if dtype is not None else source[path], device=device)
        for path, leaf in template.items()
    }


def _template(cfg: Config) -> dict[str, Tensor]:
    """``init_params``' leaves for ``cfg`` on the meta device (shapes and order, no memory)."""
    with torch.device("meta"):
        return tree.flatten_with_paths(init_params(cfg))


def _fill(leaf: Tensor, entry: StoredTensor, slot: Slot) -> None:
    """Read one stored tensor into its place in ``leaf``: straight into its memory when the layout,
    dtype and device already agree, else a block of rows at a time through a small temporary (so a
    transposed or cast vocabulary-sized table never needs a second full-size buffer)."""
    direct = slot.cols is None and not slot.transpose and slot.heads is None and slot.rows is None
    if direct and leaf.dtype == entry.dtype and leaf.device.type == "cpu":
        read_tensor(entry, leaf)
        return
    target = leaf if slot.cols is None else leaf[..., slot.cols[0]:slot.cols[1]]
    if slot.transpose:
        target = target.T  # now in the stored [d_out, d_in] layout, a view into leaf
    if slot.heads is not None:  # a fused q/k/v projection (d_model rows at most): read whole, un-interleave
        target.copy_(_interleaved(read_tensor(entry), slot.heads, inverse=True))
        return
    first, rows = slot.rows or (0, entry.shape[0])  # the stored rows this slot holds
    row_bytes = max(1, target[:1].numel() * entry.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(first, rows, step):
        stop = min(start + step, rows)
        target[start - first:stop - first].copy_(read_rows(entry, start, stop))


# ---------------------------------------------------------------- save


def save_hf(
    params: dict, cfg: Config, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB"
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (shards + index above ``max_shard_size``) for
    ``transformers`` to load (and ``load_hf`` to read back bit for bit). Returns the directory.

    The family is chosen from ``cfg``'s features (``families.family_for``); GPT-2-shaped configs are
    written as GPT-2. A config no supported family can express raises ``ValueError`` naming the field.
    Only one shard's worth of converted tensors is in memory at a time.
    """
    limit = parse_size(max_shard_size)
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict init_params returns, got {type(params).__name__}")
    if neox.expresses(cfg):
        neox.check(cfg)  # a config GPT-NeoX cannot express is refused before the params are looked at
        tensors = _hf_tensors(tree.flatten_with_paths(params), _template(cfg), neox.tensor_slots(cfg))
        hf = neox.config_to_hf(cfg, dtype_name=str(tensors["gpt_neox.embed_in.weight"][1]).removeprefix("torch."))
    elif cfg.positional.kind == "learned":
        hf = hf_gpt2.config_to_hf(cfg)
        tensors = {k: (tuple(v.shape), v.dtype, lambda v=v: v) for k, v in hf_gpt2.to_hf_gpt2(params, cfg).items()}
        if cfg.embeddings.tie:
            del tensors["lm_head.weight"]  # safetensors refuses two names for one tensor; HF re-ties it
    else:
        writer = gemma if gemma.expresses(cfg) else families
        family = writer.family_for(cfg)  # a config no family expresses is refused before the params are looked at
        tensors = _hf_tensors(tree.flatten_with_paths(params), _template(cfg), families.tensor_slots(cfg, family))
        hf = writer.config_to_hf(cfg, dtype_name=str(tensors["model.embed_tokens.weight"][1]).removeprefix("torch."))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, directory, limit)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return directory


def _hf_tensors(flat: dict[str, Tensor], template: dict[str, Tensor], slots: list[Slot]) -> dict:
    """``{hf_key: (shape, dtype, producer)}``; each producer cuts and transposes its tensor when called."""
    missing = [p for p in template if p not in flat]
    extra = [p for p in flat if p not in template]
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
