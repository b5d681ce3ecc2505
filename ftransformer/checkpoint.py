"""Checkpoints: a directory of safetensors + JSON, written atomically, read back into the right structure.

::

    DIR/
      params.safetensors      the parameter tree, one tensor per dotted path ("blocks.0.attn.w_qkv")
      opt_state.safetensors   the optimizer state, one tensor per dotted path ("1.mu.blocks.0.attn.w_qkv")
      tokenizer.json          the tokenizer (see ``ftransformer.data``)
      checkpoint.json         config, step, metrics history and anything else JSON (data/RNG position, ...)

An int8 tree (``ftransformer.quantization``) keeps each ``Int8Weight`` as two tensors, ``....w_qkv.q`` and
``....w_qkv.scale``, and ``checkpoint.json`` records ``"quantization": "int8"``; loading rebuilds the leaves.

A save writes everything into a temporary sibling directory first and then renames it into place, so a
crash mid-save leaves the previous checkpoint as it was. Loading checks every tensor against the shapes
the config (and the optimizer) expect and names the first one that does not fit.

Tensors are named by ``ftransformer.tree``'s path convention, which ``checkpoint.json`` records
(``"paths"``, format version 2). Version 1 checkpoints (no ``"paths"``) are read as well.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.data import TOKENIZER_FILE, Tokenizer, tokenizer_from_json
from ftransformer.io import fsync, temp_sibling
from ftransformer import tree
from ftransformer.params import init_params
from ftransformer.quantization import is_quantized, quantize

PARAMS_FILE = "params.safetensors"
OPT_STATE_FILE = "opt_state.safetensors"
META_FILE = "checkpoint.json"
LATEST, BEST = "latest", "best"  # the two checkpoints a training run keeps in its directory
FORMAT = "ftransformer-checkpoint"
VERSION = 2  # 2: checkpoint.json names the path convention ("paths"); version 1 files are read too
PATHS = "ftransformer.tree"  # tensors are named by ftransformer.tree.flatten_with_paths


@dataclass
class Checkpoint:
    """Everything a checkpoint holds."""

    params: dict
    config: Config | dict  # load_tree: the dict saved with a tree that is not a model
    step: int
    # The optimizer state as saved: ``{dotted path: tensor (or plain number)}``, empty when none was saved or
    # read. One type whatever ``load_checkpoint`` was asked: ``optimizer_state(optimizer)`` rebuilds the
    # structure of ``optimizer.init(params)`` from it.
    opt_state: dict[str, Any] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    metrics: list[dict] = field(default_factory=list)  # history of evaluations
    extra: dict = field(default_factory=dict)  # JSON: data/RNG position, training settings, best val loss, ...
    path: Path | None = None

    def optimizer_state(self, optimizer) -> Any:
        """The saved optimizer state in the structure of ``optimizer.init(self.params)``, checked against it."""
        where = repr(str(self.path))
        if not self.opt_state:
            raise ValueError(f"checkpoint {where} holds no optimizer state (or it was loaded with with_opt_state=False)")
        return restore_opt_state(self.opt_state, optimizer.init(self.params), where=where)


# ---------------------------------------------------------------- helpers


def _shape(x) -> tuple:
    return tuple(x) if isinstance(x, torch.Size) else tuple(x.shape)


# ---------------------------------------------------------------- save


def _tensor_dict(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies safe for safetensors (which refuses tensors sharing memory)."""
    out, seen = {}, set()
    for name, t in flat.items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def _write_tensors(path: Path, flat: dict[str, Tensor]) -> None:
    # Serialized in memory and written with a plain open(): safetensors' own writer creates files
    # readable by the owner only, and checkpoints should get the usual permissions.
    data = safetensors_bytes(_tensor_dict(flat), metadata={"format": "pt"})
    with open(path, "xb") as f:
        f.write(data)


def _json_default(x):
    if isinstance(x, Tensor) and x.numel() == 1:
        return x.item()
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serializable")


def _check_save_args(config: Config | dict, step: int) -> None:
    if not isinstance(config, (Config, dict)):
        raise TypeError(f"config must be a Config (or, for a tree that is not a model, a JSON dict), got {type(config).__name__}")
    validate.non_negative_int("step", step)


def _split_opt_state(opt_state: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state's tensors and its other leaves (plain numbers, rare: JSON keeps them), both by path."""
    flat = tree.flatten_with_paths(opt_state)
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    return tensors, {k: v for k, v in flat.items() if not isinstance(v, Tensor)}


def _meta(config: Config | dict, step: int, params: dict, metrics, extra, tokenizer, opt_flat) -> dict:
    """The checkpoint.json of a save; ``opt_flat`` is ``_split_opt_state``'s result or None."""
    opt_meta = None if opt_flat is None else {"tensors": list(opt_flat[0]), "other": opt_flat[1]}
    return {
        "format": FORMAT,
        "version": VERSION,
        "paths": PATHS,
        "step": step,
        "config": config.to_dict() if isinstance(config, Config) else dict(config),
        "model": isinstance(config, Config),  # False: another tree (e.g. an SAE stack), read with load_tree
        "metrics": list(metrics),
        "extra": dict(extra or {}),
        "tokenizer": tokenizer.kind if tokenizer is not None else None,
        "opt_state": opt_meta,
        "quantization": "int8" if is_quantized(params) else None,
    }


def _write_files(d: Path, params: dict, opt_flat, tokenizer: Tokenizer | None, meta: dict) -> None:
    _write_tensors(d / PARAMS_FILE, tree.flatten_with_paths(params))
    if opt_flat is not None:
        _write_tensors(d / OPT_STATE_FILE, opt_flat[0])
    if tokenizer is not None:
        tokenizer.save(d)
    # checkpoint.json last: a directory holding it is complete.
    (d / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
    for f in d.iterdir():
        fsync(f)
    fsync(d)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    params: dict,
    config: Config | dict,
    step: int,
    opt_state: Any = None,
    tokenizer: Tokenizer | None = None,
    metrics: list[dict] | tuple = (),
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (the previous one survives a failed save).

    ``config`` is the model's ``Config``; for a tree that is not a model (an SAE stack), a JSON dict that
    describes it, and ``load_tree`` reads the checkpoint back.
    """
    _check_save_args(config, step)
    opt_flat = None if opt_state is None else _split_opt_state(opt_state)
    meta = _meta(config, step, params, metrics, extra, tokenizer, opt_flat)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        _write_files(tmp, params, opt_flat, tokenizer, meta)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(path.parent)
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is set aside first and deleted afterwards.

    POSIX cannot rename a directory over a non-empty one, so there is one moment with the old
    checkpoint set aside and the new one not yet in place; ``_resolve`` recovers from a crash there.
    """
    if not path.exists():
        os.replace(tmp, path)
        return
    old = temp_sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _complete(d: Path) -> bool:
    return (d / META_FILE).is_file() and (d / PARAMS_FILE).is_file()


def _resolve(path: Path) -> Path | None:
    """The complete checkpoint at ``path``, or the one set aside by a save that crashed mid-swap."""
    if _complete(path):
        return path
    if path.exists():
        return None
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in aside:
        if _complete(candidate):
            try:
                os.replace(candidate, path)
                return path
            except OSError:
                return candidate
    return None


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete checkpoint (or a recoverable one)."""
    return _resolve(Path(path)) is not None


def run_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else the best (or latest) checkpoint of the run directory it is."""
    path = Path(path)
    if checkpoint_exists(path):
        return path
    for name in (BEST, LATEST):
        if checkpoint_exists(path / name):
            return path / name
    raise ValueError(f"no checkpoint at {str(path)!r} (expected a checkpoint directory, or a run directory "
                     f"holding {BEST}/ or {LATEST}/)")


# ---------------------------------------------------------------- load


def _mismatch(where: str, what: str, key: str, got, expected) -> ValueError:
    return ValueError(
        f"checkpoint {where} does not fit the {what}: {key} has shape {got} in the checkpoint "
        f"but the {what} expects {expected}"
    )


def _check_against(where: str, what: str, saved: dict[str, Tensor], expected: dict[str, Any]) -> None:
    for key, exp in expected.items():
        if key not in saved:
            raise ValueError(
                f"checkpoint {where} does not fit the {what}: {key} (shape {_shape(exp)}) is expected "
                f"but missing from the checkpoint"
            )
        if _shape(saved[key]) != _shape(exp):
            raise _mismatch(where, what, key, _shape(saved[key]), _shape(exp))
    for key in saved:
        if key not in expected:
            raise ValueError(
                f"checkpoint {where} does not fit the {what}: the checkpoint holds {key} "
                f"(shape {_shape(saved[key])}), which the {what} does not have"
            )


def _expected_params(config: Config, quantization: str | None) -> dict:
    """The params tree ``config`` builds, ``quantize``d when ``quantization`` names a scheme, on the meta
    device (no memory): the template a checkpoint's tensors are checked against and put back into."""
    with torch.device("meta"):
        params = init_params(config)
        if quantization is not None:
            params = quantize(params, config, quantization)
    return params


def expected_param_shapes(config: Config, quantization: str | None = None) -> dict[str, torch.Size]:
    """``{dotted path: shape}`` of the parameters ``config`` builds, ``quantize``d when ``quantization``
    names a scheme (computed on the meta device: no memory)."""
    return {k: v.shape for k, v in tree.flatten_with_paths(_expected_params(config, quantization)).items()}


def restore_opt_state(flat: dict[str, Tensor], template: Any, *, where: str = "") -> Any:
    """Put saved ``{dotted path: tensor}`` back into the structure of ``template`` (``optimizer.init(params)``)."""
    expected = tree.flatten_with_paths(template)
    expected_tensors = {k: v for k, v in expected.items() if isinstance(v, Tensor)}
    _check_against(where, "optimizer", {k: v for k, v in flat.items() if isinstance(v, Tensor)}, expected_tensors)
    # A plain number the save did not record keeps the template's value.
    saved = {k: flat.get(k, leaf) for k, leaf in expected.items()}
    return tree.map(_like, tree.unflatten_paths(saved, like=template), template)


def _like(x, leaf):
    return x.to(device=leaf.device, dtype=leaf.dtype) if isinstance(leaf, Tensor) else x


def _read(where: str, filename: str, read):
    """``read()``, with any failure of a damaged file turned into one ``ValueError`` that names the file."""
    try:
        return read()
    except (ValueError, TypeError) as e:
        if str(e).startswith("checkpoint "):
            raise
        raise ValueError(f"checkpoint {where}: {filename} is damaged ({e})") from None
    except OSError:
        raise
    except Exception as e:  # safetensors and tokenizers raise their own exception types
        raise ValueError(f"checkpoint {where}: {filename} is damaged ({type(e).__name__}: {e})") from None


def _locate(path: str | os.PathLike) -> tuple[Path, str]:
    """The complete checkpoint directory ``path`` names (a run directory: its ``latest``), and how
    errors name it."""
    requested = Path(path)
    if not _complete(requested) and _resolve(requested / LATEST) is not None:
        requested = requested / LATEST  # a run directory: its latest checkpoint
    resolved = _resolve(requested)
    if resolved is None:
        if not requested.exists():
            raise ValueError(f"no checkpoint at {str(requested)!r}")
        raise ValueError(f"{str(requested)!r} is not a complete checkpoint ({META_FILE} or {PARAMS_FILE} missing)")
    return resolved, repr(str(requested))


def _read_meta(resolved: Path, where: str) -> dict:
    """checkpoint.json, checked to be one this code reads: format version 1 or 2.

    Version 2 names every tensor by ``ftransformer.tree``'s path convention and says so (``"paths"``).
    Version 1 had two walkers, one for params and one for the optimizer state; on every tree the library
    builds (params, their int8 form, its optimizer states) they gave exactly the names that convention
    gives, so version 1 files are read by the same code.
    """
    try:
        meta = json.loads((resolved / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {where}: {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {where}: {META_FILE} is not an ftransformer checkpoint")
    if meta.get("version", 0) > VERSION:
        raise ValueError(
            f"checkpoint {where} has format version {meta['version']}; this ftransformer reads <= {VERSION}"
        )
    if meta.get("paths", PATHS) != PATHS:
        raise ValueError(f"checkpoint {where} names its tensors by {meta['paths']!r}; expected {PATHS!r}")
    return meta


def _read_params(resolved: Path, where: str, meta: dict, config: Config, device) -> dict:
    """The params, checked against the tree ``config`` builds and rebuilt in its structure: its key order
    (safetensors sorts keys, and trees with another key order have another pytree structure, which
    optimizers and torch.compile guards tell apart) and its ``Int8Weight`` leaves."""
    flat = _read(where, PARAMS_FILE, lambda: load_file(resolved / PARAMS_FILE, device="cpu"))
    template = _read(where, META_FILE, lambda: _expected_params(config, meta.get("quantization")))
    _check_against(where, "config", flat, {k: v.shape for k, v in tree.flatten_with_paths(template).items()})
    return tree.to(tree.unflatten_paths(flat, like=template), device=device)


def _read_opt_state(resolved: Path, where: str, meta: dict, device) -> dict[str, Any]:
    """The optimizer state as a flat ``{path: leaf}`` dict (empty when none was saved)."""
    opt_meta = meta.get("opt_state")
    if opt_meta is None:
        return {}
    flat: dict[str, Any] = dict(_read(where, OPT_STATE_FILE, lambda: load_file(resolved / OPT_STATE_FILE, device="cpu")))
    flat.update(opt_meta.get("other", {}))
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in flat.items()}


def _read_tokenizer(resolved: Path, where: str) -> Tokenizer | None:
    if not (resolved / TOKENIZER_FILE).is_file():
        return None
    return _read(where, TOKENIZER_FILE, lambda: tokenizer_from_json((resolved / TOKENIZER_FILE).read_text(encoding="utf-8")))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config: Config | None = None,
    device: str | torch.device | None = None,
    with_opt_state: bool = True,
) -> Checkpoint:
    """Read a checkpoint directory (format version 1 or 2).

    ``path`` is a checkpoint directory or a training run's directory (its ``latest`` checkpoint is read).

    Args:
        config: the config the parameters must fit (default: the one saved); a tensor that does not fit
            raises ``ValueError`` naming its key and both shapes.
        device: where the tensors go (default: CPU).
        with_opt_state: False skips reading the optimizer state (inference: it is twice the params' size).

    ``opt_state`` comes back flat (``{dotted path: tensor}``); ``Checkpoint.optimizer_state(optimizer)``
    puts it into the optimizer's structure, checking every tensor's shape.

    A damaged file (truncated tensors, a broken tokenizer, missing fields) raises ``ValueError`` naming it.
    """
    resolved, where = _locate(path)
    meta = _read_meta(resolved, where)
    if meta.get("model") is False:
        raise ValueError(f"checkpoint {where} holds a tree that is not a model; read it with checkpoint.load_tree")
    saved_config = _read(where, META_FILE, lambda: Config.from_dict(meta["config"]))
    config = saved_config if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, got {type(config).__name__}")
    params = _read_params(resolved, where, meta, config, device)
    return Checkpoint(
        params=params,
        config=config,
        step=_read(where, META_FILE, lambda: int(meta["step"])),
        opt_state=_read_opt_state(resolved, where, meta, device) if with_opt_state else {},
        tokenizer=_read_tokenizer(resolved, where),
        metrics=list(meta.get("metrics", [])),
        extra=dict(meta.get("extra", {})),
        path=resolved,
    )


def load_tree(path: str | os.PathLike, like: Any, *, device: str | torch.device | None = None) -> Checkpoint:
    """A checkpoint of a tree that is not a model (``save_checkpoint`` with a dict ``config``), read into the
    structure of ``like`` and checked against its shapes; ``Checkpoint.config`` is the saved dict."""
    resolved, where = _locate(path)
    meta = _read_meta(resolved, where)
    flat = _read(where, PARAMS_FILE, lambda: load_file(resolved / PARAMS_FILE, device="cpu"))
    _check_against(where, "tree", flat, {k: v.shape for k, v in tree.flatten_with_paths(like).items()})
    return Checkpoint(
        params=tree.to(tree.unflatten_paths(flat, like=like), device=device), config=meta["config"],
        step=int(meta["step"]), opt_state=_read_opt_state(resolved, where, meta, device),
        metrics=list(meta.get("metrics", [])), extra=dict(meta.get("extra", {})), path=resolved,
    )


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """The JSON part of a checkpoint (config, step, metrics, extra) without reading any tensor."""
    resolved = _resolve(Path(path))
    if resolved is None:
        raise ValueError(f"no checkpoint at {str(path)!r}")
    return json.loads((resolved / META_FILE).read_text(encoding="utf-8"))


__all__ = [
    "BEST", "LATEST", "Checkpoint", "checkpoint_exists", "run_checkpoint", "expected_param_shapes", "load_checkpoint", "load_tree",
    "read_checkpoint_info", "restore_opt_state", "save_checkpoint",
]
