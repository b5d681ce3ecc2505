"""EK-FAC influence functions over projection leaves: factors, preconditioned query gradients, pairwise scores.

Each chosen projection leaf ``w`` (``[d_in, d_out]``, used as ``x @ w``; a fused ``w_qkv`` is split by its
output columns into q, k and v blocks, GQA widths included) is one block of a block-diagonal curvature
(George et al. 2018, EK-FAC; Grosse et al. 2023, as kronfluence computes it):

* ``A = sum_tokens a a^T / tokens`` over the block's inputs ``a``, ``G = sum_tokens g g^T / tokens`` over the
  gradients ``g`` of the sequence-summed cross-entropy at its outputs (pseudo-gradients: labels sampled from
  the model with an explicit key, ``fisher="true"``, the default; or the data's own targets,
  ``fisher="empirical"``); every position of every sequence counts (no padding mask; biases are not modelled);
* eigenvectors ``Q_A``, ``Q_G`` and the eigenvalue correction ``lambdas = mean over sequences of
  (Q_A^T dW Q_G)^2``, ``dW = sum_tokens a g^T`` each sequence's gradient of the block;
* a gradient ``v`` is preconditioned as ``Q_A ((Q_A^T v Q_G) / (lambdas + damping)) Q_G^T``; damping None is
  kronfluence's heuristic ``0.1 * mean(lambdas)`` per block.

Inputs and output gradients come from one forward and backward pass per batch with ``layers.probe.Probe``
leaves in the parameter tree (no hooks); each layer's statistics are folded in as the backward pass reaches it
(an identity ``autograd.Function`` on its output), so no batch's output gradients are held all at once. Query and training gradients use the data's targets. Scores are
``query_grad . preconditioned(train_grad)`` (kronfluence's sign: positive when the training sequence
lowers the query's loss), computed from each layer's inputs and output gradients without forming per-example
gradients of the training set; memory holds the preconditioned query gradients and one batch's pass.
"""

import json
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ftransformer import io, random, tree, validate
from ftransformer.config import Config
from ftransformer.data import unpack_batch
from ftransformer.layers.adapter import LoRAWeight
from ftransformer.layers.probe import Probe
from ftransformer.model import cross_entropy, forward
from ftransformer.peft.adapters import is_weight_node, map_nodes
from ftransformer.shapes import Float, Key, Tensor, einsum_equation

FISHERS = ("true", "empirical")
PROJECTIONS = ("blocks.*.attn.w_qkv", "blocks.*.attn.w_o", "blocks.*.mlp.w_in", "blocks.*.mlp.w_gate",
               "blocks.*.mlp.w_out")
HEURISTIC_DAMPING = 0.1  # kronfluence's damping when none is given: this times the mean corrected eigenvalue

_PER_SEQUENCE = einsum_equation("batch seq d_in, batch seq d_out -> batch d_in d_out")
_SCORES = einsum_equation("queries d_in d_out, batch seq d_in, batch seq d_out -> queries batch")
_TOKEN_SCORES = einsum_equation("queries d_in d_out, batch seq d_in, batch seq d_out -> queries batch seq")


class Block(NamedTuple):
    """One Kronecker block: output columns ``start:stop`` of the weight node at ``path``; ``kind`` ``"weight"``, or
    ``"lora_a"`` / ``"lora_b"`` for a ``LoRAWeight``'s adapter matrices (``a``: ``[d_in, rank]``, ``b``: ``[rank, d_out]``)."""

    path: str
    start: int
    stop: int
    kind: str = "weight"


class BlockFactors(NamedTuple):
    """A block's covariances, their eigendecompositions (ascending) and the corrected eigenvalues."""

    a_cov: Float[Tensor, "d_in d_in"]
    g_cov: Float[Tensor, "d_out d_out"]
    a_values: Float[Tensor, " d_in"]
    a_vectors: Float[Tensor, "d_in d_in"]
    g_values: Float[Tensor, " d_out"]
    g_vectors: Float[Tensor, "d_out d_out"]
    lambdas: Float[Tensor, "d_in d_out"]


class Factors(NamedTuple):
    """EK-FAC factors by block name (``"blocks.0.attn.w_qkv.q"``, ``"blocks.0.mlp.w_in"``), and how they were fit."""

    blocks: dict[str, Block]
    factors: dict[str, BlockFactors]
    fisher: str
    sequences: int
    tokens: int


def _weight_blocks(path: str, leaf, cfg: Config, split_qkv: bool) -> dict[str, Block]:
    if not isinstance(leaf, Tensor) or leaf.ndim != 2 or not leaf.is_floating_point():
        got = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
        raise ValueError(f"EK-FAC needs float [d_in, d_out] projection leaves or LoRA adapters; {path!r} is {got}")
    if not (split_qkv and path.endswith("attn.w_qkv")):
        return {path: Block(path, 0, leaf.shape[1])}
    widths = [n * cfg.head_dim for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
    starts = [0, widths[0], widths[0] + widths[1]]
    return {f"{path}.{part}": Block(path, start, start + width) for part, start, width in zip("qkv", starts, widths)}


def kfac_blocks(params: dict, cfg: Config, paths: Sequence[str] | None = None, *, split_qkv: bool = True) -> dict[str, Block]:
    """The blocks of the projection leaves matching ``paths`` (``fnmatch`` patterns; None: every projection).

    A pattern matching a ``LoRAWeight`` node (``"blocks.0.attn.w_qkv"``) gives its two adapter matrices (the frozen
    base is not a block); ``"....w_qkv.a"`` / ``".b"`` give one of them.
    """
    patterns = PROJECTIONS if paths is None else paths
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"paths must be a sequence of pattern strings, got {paths!r}")
    hit = lambda path: any(fnmatchcase(path, p) for p in patterns)  # noqa: E731
    blocks = {}
    for path, node in tree.flatten_with_paths(params, is_leaf=is_weight_node).items():
        if isinstance(node, LoRAWeight):
            for part, kind, width in (("a", "lora_a", node.a.shape[1]), ("b", "lora_b", node.b.shape[1])):
                if hit(path) or hit(f"{path}.{part}"):
                    blocks[f"{path}.{part}"] = Block(path, 0, width, kind)
        elif hit(path):
            blocks.update(_weight_blocks(path, node, cfg, split_qkv))
    if not blocks:
        raise ValueError(f"paths {list(patterns)} match no projection; expected patterns over "
                         f"{list(tree.flatten_with_paths(params, is_leaf=is_weight_node))[:6]} ...")
    return blocks


def sample_labels(logits: Float[Tensor, "*batch seq vocab"], key: Key) -> Tensor:
    """One label per position drawn from ``softmax(logits)`` with ``key`` (Gumbel-max)."""
    u = random.uniform(key, logits.shape, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-30)))
    return (logits.detach().double() + gumbel).argmax(-1)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to ``fold`` as it passes."""

    @staticmethod
    def forward(ctx, output, anchor, fold):
        ctx.fold = fold
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.fold(grad)
        return (grad if ctx.needs_input_grad[0] else None), None, None


def probe_pass(params: dict, cfg: Config, tokens: Tensor, targets: Tensor | None, leaf_paths: Iterable[str],
               on_input: Callable, on_grad: Callable, *, key: Key | None = None) -> None:
    """One forward and backward over ``tokens``: ``on_input(path, node, x)`` as each weight node at ``leaf_paths`` reads
    its input, ``on_grad(path, node, g)`` as the backward reaches its output (gradients of the summed cross-entropy).

    ``targets`` None: labels sampled from the model with ``key`` (the true Fisher's pseudo-gradients). Each output
    gradient is dropped once ``on_grad`` returns: memory holds one layer's, not the whole batch's.
    """
    wanted = set(leaf_paths)
    anchor = torch.zeros((), requires_grad=True)  # every tapped output needs a gradient, parameters frozen or not

    def probe(path, node):
        if path not in wanted:
            return node

        def tap(x, y):
            on_input(path, node, x.detach())
            return _Tap.apply(y, anchor, partial(on_grad, path, node))
        return Probe(node, tap)

    with torch.enable_grad():
        logits = forward(map_nodes(params, probe), tokens, cfg)
        labels = sample_labels(logits, key) if targets is None else targets
        loss = cross_entropy(logits, labels, reduction="sum")
        del logits
        torch.autograd.backward(loss, inputs=[anchor])


def _paired(fold: Callable) -> tuple[Callable, Callable]:
    """``probe_pass`` callbacks calling ``fold(path, node, x, g)``, each input held only until its gradient comes."""
    held: dict[str, Tensor] = {}
    return (lambda path, node, x: held.__setitem__(path, x),
            lambda path, node, g: fold(path, node, held.pop(path), g))


def _by_path(blocks: dict[str, Block]) -> dict[str, list[tuple[str, Block]]]:
    """The blocks of each weight node, by its path."""
    out: dict[str, list[tuple[str, Block]]] = {}
    for name, block in blocks.items():
        out.setdefault(block.path, []).append((name, block))
    return out


def _block_input(block: Block, node, x: Tensor) -> Tensor:
    """The block's inputs: the weight's, or a LoRA adapter's (``b`` reads ``scale * x @ a``)."""
    return node.scale.detach() * (x @ node.a.detach()) if block.kind == "lora_b" else x


def _block_grad(block: Block, node, g: Tensor) -> Tensor:
    """The block's output gradients: the weight's columns, or a LoRA adapter's (``a`` gets ``scale * g @ b^T``)."""
    # x @ base + scale * (x @ a) @ b: a reads x and gets scale * g @ b^T; b reads scale * x @ a and gets g.
    if block.kind == "weight":
        return g[..., block.start:block.stop]
    return node.scale.detach() * g @ node.b.detach().T if block.kind == "lora_a" else g


def _check_fit_args(batches, fisher: str, key: Key | None) -> None:
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "true" and key is None:
        raise ValueError("fisher='true' samples labels from the model: pass key=ftransformer.random.key(seed)")
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list, or a Sequence of batches): EK-FAC reads them twice")


def _each_batch(params, cfg, batches, blocks, fisher, key, bar, on_input, on_grad) -> tuple[int, int]:
    """``probe_pass`` over every batch, the same labels on every pass (keys folded from the batch index); the
    sequences and tokens seen."""
    paths = _by_path(blocks)
    sequences = tokens_seen = 0
    for i, batch in enumerate(batches):
        tokens, targets = unpack_batch(batch)
        sampled = fisher == "true"
        probe_pass(params, cfg, tokens, None if sampled else targets, paths, on_input, on_grad,
                   key=random.fold_in(key, i) if sampled else None)
        sequences, tokens_seen = sequences + tokens.shape[0], tokens_seen + tokens.numel()
        bar.update(1)
    if not sequences:
        raise ValueError("batches is empty: EK-FAC needs at least one batch of sequences")
    return sequences, tokens_seen


def _covariances(params, cfg, batches, blocks, fisher, key, bar) -> tuple[dict, int, int]:
    """Input and output-gradient covariances, each layer's folded in as the pass reaches it."""
    by_path = _by_path(blocks)
    sums: dict[str, list] = {name: [0, 0] for name in blocks}

    def fold(side: int, block_side: Callable, path: str, node, x: Tensor) -> None:
        for name, block in by_path[path]:
            flat = rearrange(block_side(block, node, x), "... width -> (...) width")
            sums[name][side] = sums[name][side] + flat.T @ flat

    sequences, tokens_seen = _each_batch(params, cfg, batches, blocks, fisher, key, bar,
                                         partial(fold, 0, _block_input), partial(fold, 1, _block_grad))
    return {name: (a / tokens_seen, g / tokens_seen) for name, (a, g) in sums.items()}, sequences, tokens_seen


def _lambdas(params, cfg, batches, blocks, eig, fisher, key, bar) -> dict[str, Tensor]:
    """The corrected eigenvalues: mean over sequences of the squared rotated gradients, folded in layer by layer."""
    by_path = _by_path(blocks)
    sums: dict[str, Tensor | int] = dict.fromkeys(blocks, 0)

    def fold(path: str, node, x: Tensor, g: Tensor) -> None:
        for name, block in by_path[path]:
            _, a_vectors, _, g_vectors = eig[name]
            rotated = rotated_grads(_block_input(block, node, x), _block_grad(block, node, g), a_vectors, g_vectors)
            sums[name] = sums[name] + rotated.square().sum(0)

    sequences, _ = _each_batch(params, cfg, batches, blocks, fisher, key, bar, *_paired(fold))
    return {name: total / sequences for name, total in sums.items()}


def _eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a covariance, symmetrised and decomposed in float64."""
    values, vectors = torch.linalg.eigh(((cov + cov.T) / 2).double())
    return values.to(cov.dtype), vectors.to(cov.dtype)


def rotated_grads(a: Tensor, g: Tensor, a_vectors: Tensor, g_vectors: Tensor) -> Float[Tensor, "batch d_in d_out"]:
    """Each sequence's gradient ``sum_tokens a g^T`` in the eigenbases: ``Q_A^T dW Q_G``."""
    return torch.einsum(_PER_SEQUENCE, a @ a_vectors, g @ g_vectors)


def fit_factors(
    params: dict, cfg: Config, batches: Iterable, *, paths: Sequence[str] | None = None, split_qkv: bool = True,
    fisher: str = "true", key: Key | None = None, progress: bool = True,
) -> Factors:
    """EK-FAC factors of the projection leaves ``paths`` over ``batches`` of ``(tokens, targets)`` (read twice).

    ``fisher="true"`` (default) samples labels from the model with ``key`` (the same labels on both passes);
    ``"empirical"`` uses the batches' targets. See the module note for what is computed.
    """
    _check_fit_args(batches, fisher, key)
    blocks = kfac_blocks(params, cfg, paths, split_qkv=split_qkv)
    total = 2 * len(batches) if hasattr(batches, "__len__") else None
    with tqdm(total=total, desc="EK-FAC factors", unit="batch", disable=not progress) as bar:
        covs, sequences, tokens_seen = _covariances(params, cfg, batches, blocks, fisher, key, bar)
        eig = {name: (*_eigh(a), *_eigh(g)) for name, (a, g) in covs.items()}
        lambdas = _lambdas(params, cfg, batches, blocks, eig, fisher, key, bar)
    factors = {name: BlockFactors(*covs[name], *eig[name], lambdas[name]) for name in blocks}
    return Factors(blocks, factors, fisher, sequences, tokens_seen)


def _check_factors(factors: Factors) -> None:
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be ekfac.Factors (fit_factors / load_factors), got {type(factors).__name__}")


def sequence_grads(params: dict, cfg: Config, factors: Factors, batch) -> dict[str, Float[Tensor, "batch d_in d_out"]]:
    """Each sequence's gradient of its summed cross-entropy (the batch's targets) at every block of ``factors``."""
    _check_factors(factors)
    tokens, targets = unpack_batch(batch)
    by_path, out = _by_path(factors.blocks), {}

    def fold(path: str, node, x: Tensor, g: Tensor) -> None:
        for name, block in by_path[path]:
            out[name] = torch.einsum(_PER_SEQUENCE, _block_input(block, node, x), _block_grad(block, node, g))

    probe_pass(params, cfg, tokens, targets, by_path, *_paired(fold))
    return {name: out[name] for name in factors.blocks}


def block_damping(factor: BlockFactors, damping: float | None) -> float | Tensor:
    """The damping added to a block's corrected eigenvalues: ``damping``, or None for 0.1 * their mean."""
    if damping is None:
        return HEURISTIC_DAMPING * factor.lambdas.mean()
    if not validate.is_number(damping) or damping < 0:
        raise ValueError(f"damping must be a float >= 0 or None (kronfluence's heuristic), got {damping!r}")
    return float(damping)


def precondition(grads: dict[str, Tensor], factors: Factors, damping: float | None = None) -> dict[str, Tensor]:
    """``(EK-FAC + damping)^-1`` times each block's gradients ``[*batch, d_in, d_out]`` (``sequence_grads``)."""
    _check_factors(factors)
    if not isinstance(grads, dict) or set(grads) != set(factors.factors):
        got = sorted(grads) if isinstance(grads, dict) else type(grads).__name__
        raise ValueError(f"grads must hold the factors' blocks {sorted(factors.factors)}, got {got}")
    out = {}
    for name, grad in grads.items():
        f = factors.factors[name]
        if grad.shape[-2:] != f.lambdas.shape:
            raise ValueError(f"grads[{name!r}] ends in {tuple(grad.shape[-2:])}, expected {tuple(f.lambdas.shape)}")
        rotated = f.a_vectors.T @ grad @ f.g_vectors
        out[name] = f.a_vectors @ (rotated / (f.lambdas + block_damping(f, damping))) @ f.g_vectors.T
    return out


def _stream_scores(params, cfg, factors, queries, train_batches, damping, progress, equation) -> Tensor:
    """Preconditioned query gradients against each training batch's inputs and output gradients, layer by layer."""
    pre = precondition(sequence_grads(params, cfg, factors, queries), factors, damping)
    by_path, batch_score = _by_path(factors.blocks), {}

    def fold(path: str, node, x: Tensor, g: Tensor) -> None:
        for name, block in by_path[path]:
            part = torch.einsum(equation, pre[name], _block_input(block, node, x), _block_grad(block, node, g))
            batch_score["sum"] = batch_score["sum"] + part if "sum" in batch_score else part

    total = len(train_batches) if hasattr(train_batches, "__len__") else None
    parts = []
    for batch in tqdm(train_batches, total=total, desc="influence scores", unit="batch", disable=not progress):
        tokens, targets = unpack_batch(batch)
        probe_pass(params, cfg, tokens, targets, by_path, *_paired(fold))
        parts.append(batch_score.pop("sum"))
    if not parts:
        raise ValueError("train_batches is empty: nothing to score")
    return torch.cat(parts, dim=1)


def pairwise_scores(
    params: dict, cfg: Config, factors: Factors, queries, train_batches: Iterable, *,
    damping: float | None = None, progress: bool = True,
) -> Float[Tensor, "queries batch"]:
    """Influence of every training sequence on every query: ``[queries, train sequences]``.

    Args:
        queries: one ``(tokens, targets)`` batch; each row's summed cross-entropy is a measurement.
        train_batches: ``(tokens, targets)`` batches, streamed once (one batch in memory at a time); the
            columns are their sequences in order.
        damping: added to the corrected eigenvalues; None: ``0.1 * mean`` per block (kronfluence's default).

    Score ``[i, j] = grad_query_i . (EK-FAC + damping)^-1 grad_train_j`` summed over the factors' blocks.
    """
    _check_factors(factors)
    return _stream_scores(params, cfg, factors, queries, train_batches, damping, progress, _SCORES)


def pairwise_token_scores(
    params: dict, cfg: Config, factors: Factors, queries, train_batches: Iterable, *,
    damping: float | None = None, progress: bool = True,
) -> Float[Tensor, "queries batch seq"]:
    """``pairwise_scores`` split over each training sequence's tokens (they sum to it); one ``seq`` for all batches."""
    _check_factors(factors)
    return _stream_scores(params, cfg, factors, queries, train_batches, damping, progress, _TOKEN_SCORES)


# ---------------------------------------------------------------- factors as safetensors


def save_factors(factors: Factors, path: str | Path) -> Path:
    """Write ``factors`` to one safetensors file (tensors ``"{block}/{field}"``, the rest as metadata)."""
    _check_factors(factors)
    tensors = {f"{name}/{field}": t.detach().cpu().contiguous()
               for name, f in factors.factors.items() for field, t in f._asdict().items()}
    meta = {"blocks": {n: list(b) for n, b in factors.blocks.items()}, "fisher": factors.fisher,
            "sequences": factors.sequences, "tokens": factors.tokens}
    return io.atomic_write(path, safetensors_bytes(tensors, metadata={"ekfac": json.dumps(meta)}))


def load_factors(path: str | Path, *, device: str | torch.device = "cpu") -> Factors:
    """The ``Factors`` ``save_factors`` wrote at ``path``."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = (f.metadata() or {}).get("ekfac")
        if meta is None:
            raise ValueError(f"{path} holds no EK-FAC factors (no 'ekfac' metadata; written by save_factors?)")
        meta = json.loads(meta)
        factors = {name: BlockFactors(*(f.get_tensor(f"{name}/{field}") for field in BlockFactors._fields))
                   for name in meta["blocks"]}
    blocks = {name: Block(*b) for name, b in meta["blocks"].items()}
    return Factors(blocks, factors, meta["fisher"], meta["sequences"], meta["tokens"])
