"""The linear datamodeling score (LDS): does an attribution predict what retraining on a subset does to a query?

Draw random subsets of the training sequences (``random_subsets``), retrain a model on each from several seeds
(``train_on_subsets``: every subset and seed one member of ONE vmapped ensemble step, full batch, the excluded
sequences' targets set to ``-100``), measure each member's query loss (``query_losses``), and rank-correlate
(``lds``) the measured losses with the attribution's prediction: the summed scores of each subset's sequences
(a positive score lowers the query's loss, so the correlation is taken with the negated loss).
"""

from collections.abc import Sequence

import torch

from ftransformer import optim, random, validate
from ftransformer.config import Config
from ftransformer.ensemble import make_ensemble_step
from ftransformer.model import loss_fn
from ftransformer.shapes import Bool, Float, Int, Key, Tensor

IGNORE = -100


def random_subsets(key: Key, n: int, count: int, fraction: float = 0.5) -> Bool[Tensor, "k rows"]:
    """``count`` random subsets of ``n`` sequences, each exactly ``round(fraction * n)`` of them, as masks."""
    validate.positive_int("n", n)
    validate.positive_int("count", count)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    size = max(1, round(fraction * n))
    keys = random.split(key, count)
    order = torch.stack([random.uniform(k, (n,)).argsort() for k in keys])
    masks = torch.zeros(count, n, dtype=torch.bool)
    return masks.scatter_(1, order[:, :size], True)


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1, ties given their average rank."""
    x = x.double()
    less = (x[None, :] < x[:, None]).sum(1).double()
    equal = (x[None, :] == x[:, None]).sum(1).double()
    return less + (equal - 1) / 2


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equal-length vectors (ties averaged)."""
    if a.ndim != 1 or a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"spearman needs two vectors of one length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def lds(scores: Float[Tensor, " rows"], masks: Bool[Tensor, "k rows"], measured: Float[Tensor, " k"]) -> float:
    """Spearman correlation of each subset's summed scores with its measured query loss, negated."""
    if scores.ndim != 1 or masks.ndim != 2 or masks.shape[1] != scores.shape[0] or measured.shape != masks.shape[:1]:
        raise ValueError(f"lds needs scores [rows], masks [subsets, rows], measured [subsets]; got "
                         f"{tuple(scores.shape)}, {tuple(masks.shape)}, {tuple(measured.shape)}")
    predicted = masks.double() @ scores.double().cpu()
    return spearman(predicted, -measured.double().cpu())


def subset_targets(targets: Int[Tensor, "batch seq"], masks: Bool[Tensor, "k rows"]) -> Int[Tensor, "k batch seq"]:
    """``targets`` once per subset, the sequences outside it set to ``-100`` (they count for nothing)."""
    if masks.ndim != 2 or masks.shape[1] != targets.shape[0]:
        raise ValueError(f"masks must be [subsets, {targets.shape[0]}] (one flag per sequence), got {tuple(masks.shape)}")
    keep = masks.to(targets.device)[:, :, None]
    return torch.where(keep, targets[None], torch.full_like(targets[None], IGNORE))


def train_on_subsets(cfg: Config, stacked: dict, tokens: Int[Tensor, "batch seq"], targets: Int[Tensor, "k batch seq"],
                     optimizer: optim.GradientTransformation, steps: int) -> dict:
    """Train every member of ``stacked`` full batch on ``tokens`` with its own ``targets`` for ``steps`` steps."""
    validate.positive_int("steps", steps)
    step = make_ensemble_step(cfg, optimizer)
    members = targets.shape[0]
    state = step.init(stacked)
    batch = (tokens[None].expand(members, *tokens.shape), targets)
    for _ in range(steps):
        stacked, state, _ = step(stacked, state, batch)
    return stacked


def query_losses(cfg: Config, stacked: dict, tokens: Int[Tensor, "batch seq"],
                 targets: Int[Tensor, "batch seq"]) -> Float[Tensor, "member batch"]:
    """Each member's summed loss on each query sequence (``-100`` targets count for nothing)."""

    def one(params, tok, tgt):
        return loss_fn(params, tok, tgt, cfg, reduction="sum")

    per_query = torch.func.vmap(one, in_dims=(None, 0, 0))
    with torch.no_grad():
        return torch.func.vmap(per_query, in_dims=(0, None, None))(stacked, tokens, targets)


def seeds_for(count: int, seeds: Sequence[int]) -> list[int]:
    """The init seed of every member when each of ``count`` subsets is trained from each of ``seeds``."""
    return [s for _ in range(count) for s in seeds]


def progressions(seed: int, n: int) -> list[list[int]]:
    """A synthetic corpus for checks: ``n`` sequences of a marker ``12 + step`` (step 1-3), then 8 terms of
    ``start + i * step`` mod 12 (ids < 16; ids 16 and up are free for planted facts)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, step = int(torch.randint(0, 12, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        out.append([12 + step] + [(start + i * step) % 12 for i in range(8)])
    return out
