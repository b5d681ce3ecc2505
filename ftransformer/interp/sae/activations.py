"""An SAE's training data: one site's activations, collected into a memory-mapped float file.

``site_activations`` runs the model only as far as the site: the embedding and blocks ``0..i`` for a
``blocks.{i}.*`` path (the unembedding and later blocks never run), with a tap that keeps the one
value asked for, so memory holds one site, not every intermediate of the model. It is built on the
layer functions (``model.embed``, ``layers.block.block``) and ``layers.tap.Tap``, the very pieces
``forward_with_activations`` runs, so the value is the same (tested).

``collect_activations`` writes a token stream's activations (position 0 of each sequence dropped: its
activations are outliers in most models) to ``DIR/activations.f32`` (row-major ``[tokens, d_in]``
float32) and ``DIR/activations.json`` (shape, site, the model config, and the normalization ``scale``
fitted on the first rows: ``x * scale`` has mean norm ``sqrt(d_in)``, so one set of SAE
hyperparameters fits any site). ``open_activations`` maps them back without reading them into RAM.
"""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from ftransformer.config import Config
from ftransformer.io import atomic_write
from ftransformer.interp.activations import activation_paths, forward_with_activations
from ftransformer.interp.sae.metrics import site_value
from ftransformer.layers.block import block
from ftransformer.layers.tap import Tap
from ftransformer.model import block_inputs, check_tokens, embed

DATA_FILE, META_FILE = "activations.f32", "activations.json"


class _SiteTap(Tap):
    """A tap that records only the paths asked for (the rest flows through untouched and unkept)."""

    def __init__(self, wanted: set[str]):
        super().__init__()
        self.wanted = wanted

    def scope(self, name: str) -> Tap:
        child = super().scope(name)
        child.wanted = self.wanted
        return child

    def __call__(self, name: str, value: Tensor) -> Tensor:
        if self.prefix + name in self.wanted:
            self.acts[self.prefix + name] = value
        return value


def site_activations(params: dict, tokens: Int[Tensor, "*batch seq"], cfg: Config, path: str) -> Tensor:
    """The value at activation ``path`` (see ``interp.activations``), running no block after the site's."""
    if path not in activation_paths(cfg):
        raise ValueError(f"unknown activation path {path!r}; valid paths are: {', '.join(activation_paths(cfg))}")
    if path == "final":
        return site_value(forward_with_activations(params, tokens, cfg)[1], path)
    check_tokens(tokens, cfg)
    tap = _SiteTap({path})
    inputs = block_inputs(tokens, cfg)
    masks, rotaries = inputs.masks, inputs.rotaries
    x = tap("embed", embed(params, tokens, cfg, positions=inputs.positions))
    last = int(path.split(".")[1]) if path.startswith("blocks.") else -1
    for i in range(last + 1):
        x = block(params["blocks"][i], x, cfg, mask=masks[i], rotary=rotaries[i], tap=tap.scope(f"blocks.{i}"))
    return tap.acts[path]


def fit_scale(x: Float[Tensor, "rows d_in"]) -> float:
    """The factor that gives ``x`` a mean L2 norm of ``sqrt(d_in)``."""
    return float(x.shape[-1] ** 0.5 / torch.linalg.vector_norm(x.double(), dim=-1).mean().clamp_min(1e-12))


@dataclass(frozen=True)
class ActivationFile:
    """A collected activation file: ``data`` is a read-only ``np.memmap`` of shape ``[tokens, d_in]``."""

    data: np.ndarray
    path: str  # the activation site
    scale: float  # normalization: feed the SAE ``x * scale``
    meta: dict

    def rows(self, index: np.ndarray) -> Float[Tensor, "rows d_in"]:
        """The rows at ``index``, scaled, as a float32 tensor (only these rows are read from disk)."""
        return torch.from_numpy(np.asarray(self.data[np.sort(index)], dtype=np.float32)) * self.scale


def collect_activations(
    params: dict, batches: Iterable[Tensor], cfg: Config, path: str, directory: str | os.PathLike, n_tokens: int,
    *, drop_first: bool = True, scale_rows: int = 4096, normalize: bool = True,
) -> ActivationFile:
    """Fill ``n_tokens`` rows of ``DIR/activations.f32`` from ``batches`` (token tensors ``[batch, seq]``,
    a list or a stream; it stops as soon as the file is full) and write the metadata next to it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if ".attn." in path:
        raise ValueError(f"SAEs read sites of shape [*batch, seq, width] (residual, mlp.hidden, final), got {path!r}")
    d_in = cfg.d_ff if path.endswith("mlp.hidden") else cfg.d_model
    data = np.memmap(directory / DATA_FILE, np.float32, "w+", shape=(n_tokens, d_in))
    filled = 0
    with torch.no_grad():
        for tokens in batches:
            acts = site_activations(params, tokens, cfg, path)
            rows = rearrange(acts[..., 1:, :] if drop_first else acts, "... d_in -> (...) d_in", d_in=d_in)
            take = min(rows.shape[0], n_tokens - filled)
            data[filled : filled + take] = rows[:take].to(torch.float32).numpy()
            filled += take
            if filled == n_tokens:
                break
    if filled < n_tokens:
        raise ValueError(f"the batches gave {filled} activation rows, expected n_tokens={n_tokens}")
    data.flush()
    scale = fit_scale(torch.from_numpy(np.asarray(data[:scale_rows]))) if normalize else 1.0
    meta = {"format": "ftransformer-sae-activations", "shape": [n_tokens, d_in], "dtype": "float32", "path": path,
            "scale": scale, "drop_first": drop_first, "config": cfg.to_dict()}
    atomic_write(directory / META_FILE, json.dumps(meta, indent=1))
    return open_activations(directory)


def open_activations(directory: str | os.PathLike) -> ActivationFile:
    """Map a collected activation file (read-only) with its metadata."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {META_FILE} in {directory}: collect activations there first") from None
    shape = tuple(meta["shape"])
    size = (directory / DATA_FILE).stat().st_size
    if size != 4 * shape[0] * shape[1]:
        raise ValueError(f"{directory / DATA_FILE} has {size} bytes, expected {4 * shape[0] * shape[1]} for shape {shape}")
    data = np.memmap(directory / DATA_FILE, np.float32, "r", shape=shape)
    return ActivationFile(data=data, path=meta["path"], scale=float(meta["scale"]), meta=meta)
