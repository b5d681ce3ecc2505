"""Projected-gradient data attribution (TRAK / LoGra style): per-sequence gradients, randomly projected and indexed.

Each training sequence's gradient (of its summed next-token loss) over the chosen leaves is taken by ``vmap`` of
``grad`` -- no hooks -- and projected to a few thousand numbers by a random matrix drawn from an explicit key:

* ``kind="dense"`` (TRAK): ``g @ P`` with ``P`` ``[parameters, k]`` of Rademacher or Gaussian entries over
  ``sqrt(k)``, drawn in blocks of ``ROWS`` rows from keys folded from the leaf's path and the block's number, so
  the whole matrix is never held and the same key gives the same matrix whatever the batch;
* ``kind="kronecker"`` (LoGra): each chosen ``[d_in, d_out]`` matrix ``W`` read by ``linear`` gets
  ``P_a^T (dL/dW) P_g`` (``k x k``), taken as the gradient of a zero ``k x k`` matrix ``S`` in
  ``W + P_a S P_g^T`` (a ``LoRAWeight``), so the full per-example gradient is never formed.

The features of a training set go into an ``Index`` on disk (a memory-mapped ``.npy`` and a JSON description);
a query's scores against every training sequence are one matrix product, optionally preconditioned TRAK-style by
``(Phi^T Phi + lambda I)^-1``. A positive score says training on that sequence lowered the query's loss.
"""

import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ftransformer import random, tree, validate
from ftransformer.attribution.curvature import rademacher, select
from ftransformer.config import Config
from ftransformer.io import atomic_write
from ftransformer.layers.adapter import LoRAWeight
from ftransformer.model import loss_fn
from ftransformer.peft.adapters import DEFAULT_TARGETS, map_nodes
from ftransformer.peft.adapters import select as select_matrices
from ftransformer.shapes import Float, Int, Key, Tensor

ROWS = 1024  # rows of the dense projection drawn at once (part of its definition: the key decides every block)
DISTRIBUTIONS, KINDS = ("rademacher", "gaussian"), ("dense", "kronecker")
FEATURES_FILE, META_FILE = "features.npy", "index.json"
IGNORE = -100


class Projection(NamedTuple):
    """A random projection: ``key`` (``random.key(seed)``), size ``k``, entry ``distribution`` and ``kind``.

    ``dense``: ``k`` numbers per sequence; ``kronecker``: ``k x k`` per chosen matrix.
    """

    key: Key
    k: int
    distribution: str = "rademacher"
    kind: str = "dense"


def check_projection(projection: Projection) -> None:
    """ValueError / TypeError naming the field of a ``Projection`` that is out of range."""
    if not isinstance(projection, Projection):
        raise TypeError(f"projection must be a projected.Projection, got {type(projection).__name__}")
    key = projection.key
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.ndim != 0:
        raise TypeError(f"Projection.key must be a key (ftransformer.random.key(seed)), got {key!r}")
    validate.positive_int("Projection.k", projection.k)
    validate.one_of("Projection.distribution", projection.distribution, DISTRIBUTIONS)
    validate.one_of("Projection.kind", projection.kind, KINDS)


def _path_key(key: Key, path: str) -> Key:
    return random.fold_in(key, zlib.crc32(path.encode()))


def random_block(key: Key, rows: int, k: int, distribution: str, dtype: torch.dtype) -> Float[Tensor, "rows k"]:
    """``rows x k`` independent entries of variance ``1 / k`` (signs or Gaussian) from ``key``."""
    draw = rademacher if distribution == "rademacher" else random.normal
    return draw(key, (rows, k), dtype=dtype) / math.sqrt(k)


def _blocks(projection: Projection, path: str, n: int, dtype, device) -> Iterator[tuple[slice, Tensor]]:
    leaf_key = _path_key(projection.key.to(device), path)
    for c in range(math.ceil(n / ROWS)):
        rows = slice(c * ROWS, min(n, (c + 1) * ROWS))
        yield rows, random_block(random.fold_in(leaf_key, c), rows.stop - rows.start, projection.k,
                                 projection.distribution, dtype)


def dense_matrix(projection: Projection, like: dict[str, Tensor]) -> Float[Tensor, "rows k"]:
    """The dense projection's whole matrix for the leaves ``like`` (``select``'s dict), rows in their order.

    For checks and small models only: ``project_dense`` applies the same matrix block by block.
    """
    check_projection(projection)
    parts = []
    for path, leaf in like.items():
        parts += [block for _, block in _blocks(projection, path, leaf.numel(), leaf.dtype, leaf.device)]
    return torch.cat(parts)


def project_dense(grads: dict[str, Tensor], projection: Projection) -> Float[Tensor, "batch k"]:
    """Per-example gradients (each leaf ``[batch, *shape]``) times the dense projection, one block at a time."""
    check_projection(projection)
    first = next(iter(grads.values()))
    out = first.new_zeros(first.shape[0], projection.k)
    for path, g in grads.items():
        flat = g.reshape(g.shape[0], -1)
        for rows, block in _blocks(projection, path, flat.shape[1], flat.dtype, flat.device):
            out += flat[:, rows] @ block
    return out


def kronecker_factors(projection: Projection, path: str, d_in: int, d_out: int, dtype, device) -> tuple[Tensor, Tensor]:
    """LoGra's ``P_a`` ``[d_in, k]`` and ``P_g`` ``[d_out, k]`` for the matrix at ``path``."""
    leaf_key = _path_key(projection.key.to(device), path)
    k, dist = projection.k, projection.distribution
    return (random_block(random.fold_in(leaf_key, 0), d_in, k, dist, dtype),
            random_block(random.fold_in(leaf_key, 1), d_out, k, dist, dtype))


# ---------------------------------------------------------------- per-sequence gradients


def pad_sequences(sequences: Sequence, *, device=None) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Token-id sequences (each >= 2 ids) as ``(tokens, targets)``: inputs and next tokens, ``-100``-padded targets."""
    ids = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    short = [i for i, s in enumerate(ids) if s.numel() < 2]
    if not ids or short:
        raise ValueError(f"sequences must be a non-empty list of id sequences of >= 2 ids each, got "
                         f"{len(ids)} sequences (too short: {short[:5]})")
    width = max(s.numel() for s in ids) - 1
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    targets = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(ids):
        tokens[i, : s.numel() - 1], targets[i, : s.numel() - 1] = s[:-1], s[1:]
    return tokens.to(device), targets.to(device)


def _summed_loss(cfg: Config, build):
    def loss(sub, tokens, targets):
        return loss_fn(build(sub), tokens, targets, cfg, reduction="sum")

    return loss


def example_grads(params: dict, tokens: Tensor, targets: Tensor, cfg: Config,
                  paths: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Each sequence's gradient of its summed loss over the leaves ``paths`` selects: ``{path: [batch, *shape]}``."""
    flat = tree.flatten_with_paths(params)
    chosen = {p: x.detach() for p, x in select(params, paths).items()}
    loss = _summed_loss(cfg, lambda sub: tree.unflatten_paths({**flat, **sub}, params))
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(chosen, tokens, targets)


def kronecker_grads(params: dict, tokens: Tensor, targets: Tensor, cfg: Config, projection: Projection,
                    paths: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Tensor]:
    """LoGra: each sequence's ``P_a^T (dL/dW) P_g`` (``[batch, k, k]``) for every matrix ``paths`` matches."""
    check_projection(projection)
    nodes = tree.flatten_with_paths(params)
    factors = {p: kronecker_factors(projection, p, *nodes[p].shape, nodes[p].dtype, nodes[p].device)
               for p in select_matrices(params, paths)}
    one = tokens.new_ones((), dtype=next(iter(factors.values()))[0].dtype)

    def build(sub):
        def adapt(path, w):
            if path not in factors:
                return w
            p_a, p_g = factors[path]
            return LoRAWeight(w.detach(), p_a, sub[path] @ p_g.T, one)

        return map_nodes(params, adapt)

    zeros = {p: p_a.new_zeros(projection.k, projection.k) for p, (p_a, _) in factors.items()}
    return torch.func.vmap(torch.func.grad(_summed_loss(cfg, build)), in_dims=(None, 0, 0))(zeros, tokens, targets)


def features(params: dict, tokens: Tensor, targets: Tensor, cfg: Config, projection: Projection,
             paths: Sequence[str] | None = None) -> Float[Tensor, "batch _"]:
    """The projected gradient of each sequence: ``k`` numbers (dense) or ``k * k`` per chosen matrix (kronecker)."""
    check_projection(projection)
    if projection.kind == "dense":
        return project_dense(example_grads(params, tokens, targets, cfg, paths), projection)
    grads = kronecker_grads(params, tokens, targets, cfg, projection, DEFAULT_TARGETS if paths is None else paths)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def featurize(params: dict, cfg: Config, sequences: Sequence, projection: Projection, *,
              paths: Sequence[str] | None = None, batch_size: int = 32, progress: bool = False,
              desc: str = "gradients") -> Iterator[tuple[int, Tensor]]:
    """``(start, features)`` for consecutive batches of ``sequences`` (token-id lists), with a tqdm bar."""
    validate.positive_int("batch_size", batch_size)
    device = next(iter(tree.leaves(params))).device
    bar = tqdm(total=len(sequences), desc=desc, unit="seq", disable=not progress, leave=False)
    with bar:
        for start in range(0, len(sequences), batch_size):
            tokens, targets = pad_sequences(sequences[start: start + batch_size], device=device)
            yield start, features(params, tokens, targets, cfg, projection, paths).detach()
            bar.update(tokens.shape[0])


# ---------------------------------------------------------------- the index on disk


class Index(NamedTuple):
    """Projected training gradients: ``features`` ``[rows, dim]`` (a view of the memory-mapped file) and ``meta``."""

    features: Float[Tensor, "rows _"]
    meta: dict
    path: Path


def _describe(projection: Projection, paths, n: int, dim: int, texts, extra) -> dict:
    return {"format": 1, "rows": n, "dim": dim, "seed_key": int(projection.key), "k": projection.k,
            "distribution": projection.distribution, "kind": projection.kind,
            "paths": None if paths is None else list(paths), "texts": texts, "extra": extra or {}}


def build_index(params: dict, cfg: Config, sequences: Sequence, projection: Projection, directory: str | os.PathLike,
                *, paths: Sequence[str] | None = None, texts: Sequence[str] | None = None, batch_size: int = 32,
                progress: bool = True, extra: dict | None = None) -> Index:
    """Project every training sequence's gradient into ``directory`` (``features.npy`` memory-mapped, then
    ``index.json``, written last: an index without it is incomplete) and open it."""
    check_projection(projection)
    if len(sequences) == 0:
        raise ValueError("build_index needs at least one sequence, got none")
    if texts is not None and len(texts) != len(sequences):
        raise ValueError(f"texts must hold one text per sequence ({len(sequences)}), got {len(texts)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    store = None
    for start, feats in featurize(params, cfg, sequences, projection, paths=paths, batch_size=batch_size,
                                  progress=progress, desc="index"):
        if store is None:
            store = np.lib.format.open_memmap(directory / FEATURES_FILE, mode="w+", dtype=np.float32,
                                              shape=(len(sequences), feats.shape[1]))
        store[start: start + feats.shape[0]] = feats.float().cpu().numpy()
    store.flush()
    meta = _describe(projection, paths, len(sequences), store.shape[1], None if texts is None else list(texts), extra)
    del store
    atomic_write(directory / META_FILE, json.dumps(meta))
    return load_index(directory)


def load_index(directory: str | os.PathLike) -> Index:
    """An index ``build_index`` wrote, its features memory-mapped (copy-on-write: the file is never changed)."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise ValueError(f"{directory} holds no complete index (no {META_FILE}); build one with build_index")
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    store = np.load(directory / FEATURES_FILE, mmap_mode="c")
    if store.shape != (meta["rows"], meta["dim"]):
        raise ValueError(f"{directory / FEATURES_FILE} has shape {store.shape} but {META_FILE} says "
                         f"({meta['rows']}, {meta['dim']})")
    return Index(torch.from_numpy(store), meta, directory)


def index_projection(index: Index) -> Projection:
    """The ``Projection`` an index was built with (same key: same matrix), to project queries alike."""
    m = index.meta
    return Projection(torch.tensor(m["seed_key"], dtype=torch.int64), m["k"], m["distribution"], m["kind"])


# ---------------------------------------------------------------- scores


def _chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def gram(feats: Tensor, *, rows: int = 4096) -> Float[Tensor, "k k"]:
    """``Phi^T Phi`` (float64) of the index's features, streamed ``rows`` at a time."""
    out = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
    for part in _chunks(feats.shape[0], rows):
        block = feats[part].double()
        out += block.T @ block
    return out


def precondition(queries: Tensor, feats: Tensor, damping: float) -> Tensor:
    """TRAK's ``q (Phi^T Phi + lambda I)^-1``, ``lambda = damping * trace(Phi^T Phi) / dim`` (relative damping)."""
    validate.positive_number("damping", damping)
    g = gram(feats)
    lam = damping * float(torch.trace(g)) / g.shape[0]
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g + lam * eye, queries.double().cpu().T).T


def scores(index: Index | Tensor, queries: Float[Tensor, "batch _"], *, damping: float | None = None,
           rows: int = 4096) -> Float[Tensor, "batch rows"]:
    """Every query's score against every indexed sequence: ``queries @ Phi^T`` (preconditioned with ``damping``)."""
    feats = index.features if isinstance(index, Index) else index
    if queries.ndim != 2 or queries.shape[1] != feats.shape[1]:
        raise ValueError(f"queries must be [batch, dim={feats.shape[1]}] (projected like the index), "
                         f"got {tuple(queries.shape)}")
    q = queries.double().cpu() if damping is None else precondition(queries, feats, damping)
    return torch.cat([q @ feats[part].double().T for part in _chunks(feats.shape[0], rows)], dim=1)


__all__ = [
    "Index", "Projection", "build_index", "dense_matrix", "example_grads", "featurize", "features", "gram",
    "index_projection", "kronecker_factors", "kronecker_grads", "load_index", "pad_sequences", "precondition",
    "project_dense", "random_block", "scores",
]
