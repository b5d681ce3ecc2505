"""Adapters in Hugging Face PEFT's format: ``save_peft`` and ``load_peft`` (``adapter_config.json`` +
``adapter_model.safetensors``).

PEFT keeps one ``lora_A`` ``[rank, in]`` and one ``lora_B`` ``[out, rank]`` (and, for DoRA, one
``lora_magnitude_vector`` ``[out]``) per ``transformers`` module, named ``base_model.model.<module>.lora_A.weight``.
Our matrices map to those modules through the family's tensor slots (``interop.registry``, the table
``load_hf`` and ``save_hf`` use), and a module and a matrix need not be one to one:

* a fused ``w_qkv`` holds Llama's separate ``q_proj`` / ``k_proj`` / ``v_proj``: saving gives each module a copy
  of our ``a`` and its columns of ``b`` (and of DoRA's ``m``: the column norms are per output, so this is exact);
  loading three modules with different ``A`` puts them side by side (rank ``3 r``, ``b`` block-diagonal),
  equal ones (our own saves) back into one ``a``.
* a module whose outputs several of our matrices hold (Phi-3's ``gate_up_proj``: ``w_gate`` and ``w_in``) is the
  same thing the other way round.

Rank rows whose ``b`` is zero on a module are left out of that module (so an adapter PEFT made on ``q_proj`` and
``v_proj`` only comes back as it was), and a module whose update is zero is not written, unless the whole adapter
is still at its initial ``b = 0``. Ranks and alphas that differ between modules go to ``rank_pattern`` /
``alpha_pattern``. ``PeftModel.from_pretrained(base, directory)`` then computes our logits, and an adapter
trained with PEFT loads into ours with its logits.
"""

import json
import os
from collections import Counter
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from ftransformer import tree
from ftransformer.config import Config
from ftransformer.interop.families import Slot
from ftransformer.interop.hf import read_hf_config
from ftransformer.interop.registry import FAMILIES, Family, family_for
from ftransformer.io import atomic_write
from ftransformer.layers.adapter import ADAPTERS, DoRAWeight, LoRAWeight, column_norm
from ftransformer.layers.int8 import Int8Weight
from ftransformer.peft.adapters import is_weight_node, map_nodes

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's names: the wrapped transformers model's module names under it
SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m",
            "lora_magnitude_vector.weight": "m"}
# adapter_config.json settings whose tensors are not LoRA's alone: loading them would drop part of the adapter
REFUSED = {"bias": "none", "lora_bias": False, "modules_to_save": None, "trainable_token_indices": None}


def _family(cfg: Config, family: str | None) -> Family:
    if family is None:
        return family_for(cfg)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def module_slots(cfg: Config, family: str | None = None) -> dict[str, list[Slot]]:
    """``{transformers module name: the slots of its weight matrix}`` for ``cfg`` written as ``family``."""
    out: dict[str, list[Slot]] = {}
    for s in _family(cfg, family).slots(cfg):
        if s.hf_key.endswith(".weight") and len(s.hf_shape) == 2 and not s.tied:
            out.setdefault(s.hf_key.removesuffix(".weight"), []).append(s)
    return out


def _out_rows(slot: Slot) -> tuple[int, int]:
    """The rows of the module's output axis (``lora_B``'s first) that ``slot`` holds."""
    out = slot.hf_shape[0] if slot.transpose else slot.hf_shape[1]
    if not slot.transpose and (slot.rows or slot.cols):
        raise ValueError(f"{slot.hf_key}: a [d_in, d_out] module split into parts has no PEFT form here")
    return slot.rows or (0, out)


def _cols(slot: Slot, x: Tensor) -> Tensor:
    """``x``'s last axis cut to ``slot``'s columns, as rows in the module's output order (``[out_part, ...]``)."""
    part = x if slot.cols is None else x[..., slot.cols[0]:slot.cols[1]]
    part = part.T if part.ndim == 2 else part
    if slot.heads is not None:
        part = rearrange(part, "(qkv heads head_dim) ... -> (heads qkv head_dim) ...", qkv=3, heads=slot.heads)
    return part


def _uncols(slot: Slot, rows: Tensor) -> Tensor:
    """``_cols``' inverse: module-order rows back to our column order (still as rows)."""
    if slot.heads is not None:
        rows = rearrange(rows, "(heads qkv head_dim) ... -> (qkv heads head_dim) ...", qkv=3, heads=slot.heads)
    return rows


# ---------------------------------------------------------------- save


def _kept_rows(w, slots: list[Slot], fresh: bool) -> Tensor | None:
    """The rank rows of ``w`` this module needs: those with a non-zero ``b`` on its columns (all while the
    adapter is fresh); None when the module's update is zero (and, for DoRA, its magnitudes the base's)."""
    nonzero = torch.stack([_cols(s, w.b).abs().sum(0) > 0 for s in slots]).any(0)
    if fresh:
        return torch.arange(w.b.shape[0])
    if not nonzero.any():
        if isinstance(w, DoRAWeight) and not all(torch.equal(_cols(s, w.m), _cols(s, column_norm(w))) for s in slots):
            return torch.arange(w.b.shape[0])
        return None
    return nonzero.nonzero().flatten()


def _module_tensors(slots: list[Slot], adapters: dict, fresh: bool) -> dict | None:
    """One module's ``A``, ``B``, ``m``, scale and rank from the adapters its slots hold (None: nothing to write)."""
    by_path: dict[str, list[Slot]] = {}
    for s in slots:
        by_path.setdefault(s.path, []).append(s)
    kinds = {type(adapters[p]) for p in by_path}
    if len(kinds) > 1 or (DoRAWeight in kinds and len(by_path) < len({s.path for s in slots})):
        raise ValueError(f"{slots[0].hf_key}: its parts are not all DoRA or all LoRA; PEFT has one kind per module")
    blocks = [(p, adapters[p], keep) for p in by_path if (keep := _kept_rows(adapters[p], by_path[p], fresh)) is not None]
    if not blocks:
        return None
    scale = float(blocks[0][1].scale)
    out = max(_out_rows(s)[1] for s in slots)
    a = torch.cat([w.a[:, keep].T for _, w, keep in blocks])
    b = a.new_zeros(out, a.shape[0])
    m = a.new_zeros(out) if DoRAWeight in kinds else None
    offset = 0
    for path, w, keep in blocks:
        for s in by_path[path]:
            lo, hi = _out_rows(s)
            b[lo:hi, offset:offset + len(keep)] = _cols(s, w.b[keep]) * (float(w.scale) / scale)
            if m is not None:
                m[lo:hi] = _cols(s, w.m)
        offset += len(keep)
    return {"A": a.contiguous(), "B": b, "m": m, "scale": scale, "rank": a.shape[0]}


def _nice(x: float) -> float | int:
    """An alpha as PEFT users write it: an int when the product scale * rank is one (to float32 rounding)."""
    return round(x) if abs(x - round(x)) <= 1e-5 * max(1.0, abs(x)) else x


def _adapter_config(modules: dict, slots: dict, family: Family, dora: bool) -> dict:
    """``adapter_config.json`` for the modules written: the common rank and alpha, the others as patterns."""
    ranks = {name: t["rank"] for name, t in modules.items()}
    alphas = {name: _nice(t["scale"] * t["rank"]) for name, t in modules.items()}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    short = {name.rsplit(".", 1)[-1] for name in modules}
    every = all(name in modules for name in slots if name.rsplit(".", 1)[-1] in short)
    transposed = {s.transpose for name in modules for s in slots[name]}
    if len(transposed) > 1:
        raise ValueError("the adapted modules mix nn.Linear and Conv1D layouts; PEFT's fan_in_fan_out is one setting")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
        "target_modules": sorted(short) if every else sorted(modules), "use_dora": dora, "use_rslora": False,
        "fan_in_fan_out": transposed == {False}, "bias": "none", "lora_dropout": 0.0, "modules_to_save": None,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "init_lora_weights": True, "inference_mode": True, "peft_version": "0.22.0",
        "auto_mapping": {"base_model_class": family.architecture, "parent_library": "transformers"},
    }


def _adapters(params: dict) -> dict:
    if not isinstance(params, dict):
        raise TypeError(f"params must be a parameter tree (dict), got {type(params).__name__}")
    nodes = tree.flatten_with_paths(params, is_leaf=is_weight_node)
    adapters = {p: x for p, x in nodes.items() if isinstance(x, ADAPTERS)}
    if not adapters:
        raise ValueError("params hold no adapter (LoRAWeight or DoRAWeight): wrap them with peft.lora first")
    return adapters


def save_peft(
    directory: str | os.PathLike, params: dict, cfg: Config, *, family: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the adapters of ``params`` as PEFT writes them (``family``: the transformers family of the base,
    None: the one ``save_hf`` writes ``cfg`` as); ``base_model`` goes to ``base_model_name_or_path``."""
    from safetensors.torch import save as safetensors_bytes

    adapters = _adapters(params)
    slots = module_slots(cfg, family)
    covered = {s.path for group in slots.values() for s in group}
    unmapped = sorted(set(adapters) - covered)
    if unmapped:
        raise ValueError(f"adapters at {unmapped[:4]} have no transformers module to go to (modules: {list(slots)[:4]}...)")
    fresh = all(not w.b.any() for w in adapters.values())
    modules = {}
    for name, group in slots.items():
        if any(s.path in adapters for s in group):
            made = _module_tensors(group, adapters, fresh)
            if made is not None:
                modules[name] = made
    dora = any(isinstance(w, DoRAWeight) for w in adapters.values())
    tensors = {}
    for name, t in modules.items():
        tensors |= {f"{PREFIX}{name}.lora_A.weight": t["A"], f"{PREFIX}{name}.lora_B.weight": t["B"]}
        if t["m"] is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = t["m"]
    config = _adapter_config(modules, slots, _family(cfg, family), dora) | {"base_model_name_or_path": base_model}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------- load


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a PEFT LoRA / DoRA adapter, refused by name where it holds more than LoRA."""
    config = read_hf_config(directory, name=CONFIG_FILE, what="a PEFT adapter directory")
    path = Path(directory) / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} has peft_type={config.get('peft_type')!r}; supported: 'LORA' (LoRA and DoRA)")
    for key, expected in REFUSED.items():
        value = config.get(key, expected)
        if value != expected and value not in ([], {}):
            raise ValueError(f"{path} has {key}={config[key]!r}; supported: {expected!r} (adapter matrices only)")
    return config


def _module_scale(config: dict, name: str, rank: int) -> float:
    """PEFT's ``scaling`` of one module: alpha / rank (alpha / sqrt(rank) with rsLoRA), patterns first."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            alpha = value
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _read_modules(directory: Path, config: dict, slots: dict) -> dict:
    """``{module: {"A", "B", "m"?, "scale"}}`` from the adapter's tensors, each checked against its module."""
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {WEIGHTS_FILE} (expected a PEFT adapter directory)")
    modules: dict[str, dict] = {}
    for key, t in load_file(str(path)).items():
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA tensor ({PREFIX}<module>.lora_A.weight, ...)")
        modules.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[SUFFIXES[suffix]] = t
    for name, t in modules.items():
        if name not in slots:
            raise ValueError(f"{path}: module {name!r} is not a weight matrix of this model (e.g. {list(slots)[:3]})")
        out, d_in = (slots[name][0].hf_shape if slots[name][0].transpose else slots[name][0].hf_shape[::-1])
        if "A" not in t or "B" not in t or (config.get("use_dora") and "m" not in t):
            raise ValueError(f"{path}: module {name!r} has {sorted(t)}; expected A, B" + (" and m (DoRA)" if config.get("use_dora") else ""))
        rank = t["A"].shape[0]
        want = {"A": (rank, d_in), "B": (out, rank), "m": (out,)}
        for k, x in t.items():
            if tuple(x.shape) != want[k]:
                raise ValueError(f"{path}: {name} {k} has shape {tuple(x.shape)}, expected {want[k]}")
        t["scale"] = _module_scale(config, name, rank)
    return modules


def _adapter_for(base, parts: list[tuple[str, Slot, dict]], dora: bool):
    """The adapter over ``base`` that the PEFT modules ``parts`` (name, slot, tensors) hold, exactly."""
    if isinstance(base, ADAPTERS) or not (isinstance(base, Int8Weight) or (isinstance(base, Tensor) and base.ndim == 2)):
        raise ValueError(f"{parts[0][1].path} is not a plain matrix (already adapted?), got {type(base).__name__}")
    like = base.scale if isinstance(base, Int8Weight) else base
    names = list(dict.fromkeys(name for name, _, _ in parts))
    tensors = {name: t for name, _, t in parts}
    shared = all(torch.equal(tensors[n]["A"], tensors[names[0]]["A"]) for n in names)
    blocks = names[:1] if shared else names  # equal A's (our own saves of a fused matrix) are one a again
    offsets, start = {}, 0
    for n in blocks:
        offsets[n], start = start, start + tensors[n]["A"].shape[0]
    offsets = dict.fromkeys(names, 0) if shared else offsets
    a = torch.cat([tensors[n]["A"] for n in blocks]).T
    b = a.new_zeros(a.shape[1], base.shape[1])
    scale = tensors[names[0]]["scale"]
    for name, slot, t in parts:
        lo, hi = _out_rows(slot)
        rows = _uncols(slot, t["B"][lo:hi] * (t["scale"] / scale)).T
        cols = slot.cols or (0, base.shape[1])
        b[offsets[name]:offsets[name] + t["A"].shape[0], cols[0]:cols[1]] = rows
    w = LoRAWeight(base, a.to(like), b.to(like), torch.tensor(scale, dtype=like.dtype, device=like.device))
    if not dora:
        return w
    m = column_norm(w).clone()
    for name, slot, t in parts:
        lo, hi = _out_rows(slot)
        cols = slot.cols or (0, base.shape[1])
        m[cols[0]:cols[1]] = _uncols(slot, t["m"][lo:hi]).to(like)
    return DoRAWeight(*w, m=m)


def load_peft(directory: str | os.PathLike, params: dict, cfg: Config, *, family: str | None = None) -> dict:
    """``params`` (plain, as ``load_hf`` gives them) with the adapters of the PEFT directory put on the matrices
    they adapt; the same logits as ``PeftModel.from_pretrained(base, directory)``."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a parameter tree (dict), got {type(params).__name__}")
    directory = Path(directory)
    config = read_adapter_config(directory)
    slots = module_slots(cfg, family)
    modules = _read_modules(directory, config, slots)
    parts: dict[str, list] = {}
    for name, t in modules.items():
        for s in slots[name]:
            parts.setdefault(s.path, []).append((name, s, t))
    dora = bool(config.get("use_dora", False))
    return map_nodes(params, lambda p, x: _adapter_for(x, parts[p], dora) if p in parts else x)


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_peft", "module_slots", "read_adapter_config", "save_peft"]
