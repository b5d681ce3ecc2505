"""Curvature of a loss as transforms: Hessian- and Gauss-Newton-vector products, and their spectra.

A sub-tree of the parameters is a flat dict ``{path: tensor}`` (``select``; paths as in
``tree.flatten_with_paths``, chosen by ``fnmatch`` patterns such as ``"blocks.0.*"``); the rest of the
parameters is held fixed. Products are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), so
attention runs on its einsum kernel there automatically (``layers.attention.kernel_here``: the fused kernel
has no double backward). The spectra take any symmetric ``matvec`` on trees like ``like``:

* ``top_eigenvalues``: Lanczos with full reorthogonalisation;
* ``hutchinson_trace``: the trace from Rademacher probes;
* ``spectral_density``: stochastic Lanczos quadrature, smoothed by a Gaussian.

Every random probe comes from an explicit key (``ftransformer.random``).
"""

import math
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch

from ftransformer import random, tree, validate
from ftransformer.config import Config
from ftransformer.model import forward
from ftransformer.shapes import Float, Key, Tensor

Flat = dict[str, Tensor]
MatVec = Callable[[Flat], Flat]


def select(params: dict, paths: Sequence[str] | None = None) -> Flat:
    """The leaves of ``params`` whose path matches one of the ``fnmatch`` patterns ``paths`` (all if None)."""
    flat = tree.flatten_with_paths(params)
    if paths is None:
        return dict(flat)
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise TypeError(f"paths must be a sequence of pattern strings, got {paths!r}")
    chosen = {path: leaf for path, leaf in flat.items() if any(fnmatchcase(path, p) for p in paths)}
    if not chosen:
        raise ValueError(f"paths {list(paths)} match no parameter; expected patterns over {list(flat)[:6]} ...")
    return chosen


def layer_paths(params: dict) -> dict[str, list[str]]:
    """Patterns for each layer: ``{"blocks.0": ["blocks.0.*"], ...}``, and one per other top-level entry."""
    groups: dict[str, list[str]] = {}
    for path in tree.flatten_with_paths(params):
        parts = path.split(".")
        name = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        groups.setdefault(name, [name if name == path else f"{name}.*"])
    return groups


def restrict(fn: Callable[[dict], Tensor], params: dict, paths: Sequence[str] | None = None) -> tuple[Callable, Flat]:
    """``fn`` as a function of the selected sub-tree alone (the rest of ``params`` held fixed), and that sub-tree."""
    flat = tree.flatten_with_paths(params)
    chosen = {path: leaf.detach() for path, leaf in select(params, paths).items()}

    def of_sub(sub: Flat):
        _check_like(sub, chosen, "the sub-tree")
        return fn(tree.unflatten_paths({**flat, **sub}, params))

    return of_sub, chosen


def _check_like(vector: Flat, like: Flat, name: str) -> None:
    if not isinstance(vector, dict) or list(vector) != list(like):
        got = list(vector) if isinstance(vector, dict) else type(vector).__name__
        raise ValueError(f"{name} must hold the selected paths {list(like)}, got {got}")
    for path, v in vector.items():
        if v.shape != like[path].shape:
            raise ValueError(f"{name}[{path!r}] has shape {tuple(v.shape)} "
                             f"but the parameter has {tuple(like[path].shape)}")


def hvp(loss: Callable[[dict], Tensor], params: dict, vector: Flat, *, paths: Sequence[str] | None = None) -> Flat:
    """The Hessian of ``loss(params)`` over the selected sub-tree times ``vector`` (a ``select``-shaped dict)."""
    of_sub, chosen = restrict(loss, params, paths)
    _check_like(vector, chosen, "vector")
    return torch.func.jvp(torch.func.grad(of_sub), (chosen,), (vector,))[1]


def ggn_vp(params: dict, tokens: Tensor, cfg: Config, vector: Flat, *, paths: Sequence[str] | None = None) -> Flat:
    """The Gauss-Newton matrix ``J^T H J`` of the mean next-token cross-entropy times ``vector``.

    ``J``: the logits' Jacobian over the selected sub-tree; ``H``: the cross-entropy's Hessian in the logits,
    ``(diag(p) - p p^T) / positions`` at each position (it does not depend on the targets).
    """
    of_sub, chosen = restrict(lambda p: forward(p, tokens, cfg), params, paths)
    _check_like(vector, chosen, "vector")
    logits, jv = torch.func.jvp(of_sub, (chosen,), (vector,))
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    positions = logits.numel() // logits.shape[-1]
    pjv = p * jv
    hjv = (pjv - p * pjv.sum(-1, keepdim=True)) / positions
    _, pullback = torch.func.vjp(of_sub, chosen)
    return pullback(hjv.to(logits.dtype))[0]


# ---------------------------------------------------------------- spectra of any symmetric matvec


def _flat_matvec(matvec: MatVec, like: Flat) -> Callable[[Tensor], Tensor]:
    """``matvec`` on one long vector: split into ``like``'s leaves, applied, and joined again."""
    paths = list(like)
    sizes = [like[p].numel() for p in paths]

    def apply(v: Tensor) -> Tensor:
        parts = torch.split(v, sizes)
        out = matvec({p: part.view_as(like[p]) for p, part in zip(paths, parts)})
        _check_like(out, like, "matvec's result")
        return torch.cat([out[p].reshape(-1) for p in paths])

    return apply


def _key_on(key: Key, device: torch.device) -> Key:
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.ndim != 0:
        raise TypeError(f"key must be a key (ftransformer.random.key(seed): a 0-d int64 tensor), got {key!r}")
    return key.to(device)


def _dimension(like: Flat) -> tuple[int, torch.dtype, torch.device]:
    if not isinstance(like, dict) or not like:
        raise ValueError(f"like must be a non-empty dict of tensors (select's result), got {type(like).__name__}")
    first = next(iter(like.values()))
    return sum(v.numel() for v in like.values()), first.dtype, first.device


def lanczos(apply: Callable[[Tensor], Tensor], start: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """The tridiagonal matrix's diagonal and off-diagonal after ``iters`` Lanczos steps from ``start``
    (full reorthogonalisation; stops early when the Krylov space is exhausted)."""
    basis = [start / torch.linalg.vector_norm(start)]
    alphas, betas = [], []
    steps = min(iters, start.numel())
    for i in range(steps):
        w = apply(basis[-1])
        alphas.append(torch.dot(w, basis[-1]))
        q = torch.stack(basis)
        for _ in range(2):  # Kahan's "twice is enough": the basis stays orthonormal to rounding
            w = w - q.T @ (q @ w)
        beta = torch.linalg.vector_norm(w)
        scale = torch.stack(alphas).abs().max() + (betas[-1] if betas else 0.0)
        if i == steps - 1 or beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    return torch.stack(alphas), torch.stack(betas) if betas else start.new_zeros(0)


def _ritz(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """The eigenvalues of the Lanczos tridiagonal matrix and their eigenvectors' first components squared."""
    t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    values, vectors = torch.linalg.eigh(t)
    return values, vectors[0] ** 2


def top_eigenvalues(matvec: MatVec, like: Flat, k: int, *, key: Key, iters: int = 64) -> Float[Tensor, " k"]:
    """The ``k`` largest eigenvalues (largest first) of the symmetric operator ``matvec`` on trees like ``like``."""
    n, dtype, device = _dimension(like)
    validate.int_in("k", k, 1, n, closed=True, high_name="the dimension")
    validate.int_at_least("iters", iters, k)
    start = random.normal(_key_on(key, device), (n,), dtype=dtype)
    alphas, betas = lanczos(_flat_matvec(matvec, like), start, iters)
    values = _ritz(alphas, betas)[0]
    if values.numel() < k:
        raise ValueError(f"the Krylov space from this key has dimension {values.numel()}, fewer than k={k}")
    return values.flip(0)[:k]


class Trace(NamedTuple):
    """A Hutchinson trace estimate and its standard error (from the spread of the probes)."""

    estimate: Float[Tensor, ""]
    stderr: Float[Tensor, ""]


def rademacher(key: Key, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Independent signs (+1 or -1, equally likely) of the given shape from ``key``."""
    return torch.where(random.uniform(key, shape) < 0.5, -1.0, 1.0).to(dtype)


def hutchinson_trace(matvec: MatVec, like: Flat, *, key: Key, samples: int = 32) -> Trace:
    """The trace of ``matvec`` as the mean of ``z^T A z`` over Rademacher probes ``z`` from ``key``."""
    n, dtype, device = _dimension(like)
    validate.int_at_least("samples", samples, 2)
    apply = _flat_matvec(matvec, like)
    keys = random.split(_key_on(key, device), samples)
    values = []
    for i in range(samples):
        z = rademacher(keys[i], (n,), dtype=dtype)
        values.append(torch.dot(z, apply(z)))
    values = torch.stack(values)
    return Trace(values.mean(), values.std() / math.sqrt(samples))


class Density(NamedTuple):
    """A spectral density on ``grid``, and the quadrature it smooths: Ritz ``nodes`` with ``weights`` (per probe,
    each probe's weights summing to 1), so ``(weights * nodes).sum(-1).mean()`` estimates ``trace / n``."""

    grid: Float[Tensor, " grid"]
    density: Float[Tensor, " grid"]
    nodes: Float[Tensor, "probes iters"]
    weights: Float[Tensor, "probes iters"]


def _quadrature(apply: Callable[[Tensor], Tensor], keys: Tensor, n: int, iters: int, dtype) -> tuple[Tensor, Tensor]:
    """Each probe's Ritz values and weights (zero-weight padding where its Krylov space ran out early)."""
    nodes, weights = [], []
    for k in keys:
        values, w = _ritz(*lanczos(apply, random.normal(k, (n,), dtype=dtype), iters))
        pad = iters - values.numel()
        nodes.append(torch.cat([values, values[-1:].expand(pad)]))
        weights.append(torch.cat([w, w.new_zeros(pad)]))
    return torch.stack(nodes), torch.stack(weights)


def spectral_density(
    matvec: MatVec, like: Flat, *, key: Key, probes: int = 8, iters: int = 32, grid: int = 256,
    sigma: float | None = None,
) -> Density:
    """The eigenvalue density of ``matvec`` by stochastic Lanczos quadrature, smoothed by Gaussians of width ``sigma``.

    ``probes`` Gaussian start vectors from ``key``, ``iters`` Lanczos steps each; the density is drawn on ``grid``
    points spanning the Ritz values plus 5 ``sigma`` either side (``sigma``: 1% of that span when None).
    """
    n, dtype, device = _dimension(like)
    validate.positive_int("probes", probes)
    validate.positive_int("iters", iters)
    validate.int_at_least("grid", grid, 2)
    if sigma is not None:
        validate.positive_number("sigma", sigma)
    iters = min(iters, n)
    keys = random.split(_key_on(key, device), probes)
    nodes, weights = _quadrature(_flat_matvec(matvec, like), keys, n, iters, dtype)
    low, high = nodes.min(), nodes.max()
    width = float(sigma) if sigma is not None else max(float(high - low), float(abs(high)), 1e-12) * 0.01
    points = torch.linspace(float(low) - 5 * width, float(high) + 5 * width, grid, dtype=dtype, device=device)
    bumps = torch.exp(-0.5 * ((points[:, None, None] - nodes) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    density = (bumps * weights).sum(-1).mean(-1)
    return Density(points, density, nodes, weights)
