"""Batches: a train/val split, deterministic random batches, exact whole-split windows, and a whole dataset.

Batches are a pure function of ``(seed, step)``: a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ftransformer import validate
from ftransformer.data.corpus import load_corpus, tokenize_cached
from ftransformer.data.tokenizers import Tokenizer, build_tokenizer


def split_ids(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous train/val split: the first ``1 - val_fraction`` of the ids train, the rest validate."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def min_tokens(seq_len: int, val_fraction: float) -> int:
    """The fewest tokens that leave both splits at least one window of ``seq_len + 1`` tokens."""
    n = seq_len + 1
    while True:
        n_train = int(n * (1.0 - val_fraction))
        if n_train >= seq_len + 1 and n - n_train >= seq_len + 1:
            return n
        n += 1


def unpack_batch(batch) -> tuple[Tensor, Tensor]:
    """``(tokens, targets)`` from a batch, or ``TypeError`` saying what a batch must be."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"batch must be a (tokens, targets) pair, got {type(batch).__name__}")
    tokens, targets = batch
    for name, x in (("tokens", tokens), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"batch {name} must be a torch.Tensor, got {type(x).__name__}")
    return tokens, targets


def sample_batch(
    ids: np.ndarray | Tensor, batch_size: int, seq_len: int, *, seed: int, step: int, stream: int = 0
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """``batch_size`` random windows of ``ids``: ``(tokens, targets)``, targets shifted by one position.

    The windows depend on ``(seed, stream, step)`` only, so any step's batch can be drawn again
    (exact resume) and the train (stream 0) and validation (stream 1) draws never collide.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        validate.positive_int(name, value)
    for name, value in (("seed", seed), ("step", step), ("stream", stream)):
        validate.non_negative_int(name, value)
    if len(ids) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens to draw a batch, got {len(ids)}")
    rng = np.random.default_rng([seed, stream, step])
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    if isinstance(ids, Tensor):
        index = torch.as_tensor(starts)[:, None] + torch.arange(seq_len + 1)
        window = ids[index.to(ids.device)].long()
    else:
        window = torch.from_numpy(np.asarray(ids[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
    return window[:, :-1], window[:, 1:]


def fixed_batches(
    ids: np.ndarray | Tensor, n_batches: int, batch_size: int, seq_len: int, *, seed: int, stream: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """The same ``n_batches`` batches every time (for evaluation)."""
    return [sample_batch(ids, batch_size, seq_len, seed=seed, step=i, stream=stream) for i in range(n_batches)]


class SplitWindows(Sequence):
    """Every target of a split exactly once: batches of non-overlapping ``seq_len`` windows, for exact evaluation.

    Window ``i`` holds tokens ``ids[i*seq_len : (i+1)*seq_len]`` and the next token of each as targets,
    so each token predicts the next with the context since its window began (nanoGPT's protocol for a
    whole-split loss). When ``len(ids) - 1`` targets do not fill whole windows, the remaining ``r``
    targets are scored by one more window, the split's last ``seq_len`` tokens, whose first
    ``seq_len - r`` targets (already scored) are ``ignore_index``: every window has the same shape, so
    the tail batches with the rest, and its few targets see a full context instead of a short one.
    ``drop_last=True`` leaves those ``r`` targets out instead. A split shorter than ``seq_len + 1``
    tokens is one window of ``len(ids) - 1`` tokens.

    Items are ``(tokens, targets)`` int64 pairs of shape ``[batch, seq]`` (the last batch may be
    smaller); ``len`` is the number of batches and ``n_targets`` the number of targets scored.
    """

    def __init__(
        self, ids: np.ndarray | Tensor, seq_len: int, batch_size: int, *, drop_last: bool = False,
        ignore_index: int = -100,
    ):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            validate.positive_int(name, value)
        if len(ids) < 2:
            raise ValueError(f"need at least 2 tokens to score one target, got {len(ids)}")
        self.ids, self.batch_size, self.ignore_index = ids, batch_size, ignore_index
        n_targets = len(ids) - 1
        self.seq_len = min(seq_len, n_targets)
        self.n_full, self.tail = divmod(n_targets, self.seq_len)
        if drop_last:
            self.tail = 0
        self.n_windows = self.n_full + (1 if self.tail else 0)
        self.n_targets = self.n_full * self.seq_len + self.tail

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __getitem__(self, i: int) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        if not validate.is_int(i):
            raise TypeError(f"SplitWindows indices must be ints, got {type(i).__name__}")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} is out of range for {len(self)} batches")
        first, last = i * self.batch_size, min((i + 1) * self.batch_size, self.n_windows)
        seq = self.seq_len
        starts = [w * seq for w in range(first, min(last, self.n_full))]
        if last > self.n_full:  # the tail window: the split's last seq_len + 1 tokens
            starts.append(len(self.ids) - 1 - seq)
        offsets = np.asarray(starts)[:, None] + np.arange(seq + 1)
        if isinstance(self.ids, Tensor):
            window = self.ids[torch.as_tensor(offsets).to(self.ids.device)].long()
        else:
            window = torch.from_numpy(np.asarray(self.ids[offsets], dtype=np.int64))
        tokens, targets = window[:, :-1], window[:, 1:].clone()
        if last > self.n_full:
            targets[-1, : seq - self.tail] = self.ignore_index
        return tokens, targets

    def __repr__(self) -> str:
        return (f"SplitWindows({self.n_windows} windows of seq_len={self.seq_len}, {self.n_targets} targets, "
                f"{len(self)} batches of up to {self.batch_size})")


def to_device(batch: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
    """``batch`` on ``device``; to a CUDA device from pinned host memory without blocking the host."""
    if device.type == "cuda":
        return tuple(x.pin_memory().to(device, non_blocking=True) if x.device.type == "cpu" else x.to(device)
                     for x in batch)
    return tuple(x.to(device) for x in batch)


class Prefetcher:
    """Batches by step, each copied to ``device`` ahead of its use: ``prefetcher(step)`` is ``draw(step)`` there.

    ``prefetch(step)`` draws ``step``'s batch on the host and queues its copy (from pinned memory,
    non-blocking on CUDA), so the copy and the host-side sampling overlap the running step; the
    following ``prefetcher(step)`` returns it. Any other step is drawn and copied on the spot: the
    batches are the same either way, only the waiting differs.
    """

    def __init__(self, draw, device: str | torch.device):
        self.draw, self.device = draw, torch.device(device)
        self.ahead: dict[int, tuple[Tensor, ...]] = {}

    def prefetch(self, step: int) -> None:
        self.ahead = {step: to_device(tuple(self.draw(step)), self.device)}

    def __call__(self, step: int) -> tuple[Tensor, ...]:
        batch = self.ahead.pop(step, None)
        return to_device(tuple(self.draw(step)), self.device) if batch is None else batch


@dataclass(frozen=True)
class Dataset:
    """A tokenized corpus, split for training."""

    name: str  # the data file, or "python-stdlib" for the built-in corpus
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, contiguous first part of the corpus
    val: np.ndarray  # token ids, the rest
    n_chars: int  # characters in the corpus


def load_dataset(
    path: str | os.PathLike | None = None,
    *,
    tokenizer: str | Tokenizer = "char",
    seq_len: int,
    val_fraction: float = 0.1,
    bpe_vocab_size: int = 2048,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Read a corpus (a file, or the built-in one when ``path`` is None), tokenize it (cached), split it.

    ``tokenizer`` is ``"char"``/``"bpe"`` (fitted to this corpus) or a tokenizer to reuse (resume).
    A corpus too short for one ``seq_len + 1`` window in each split raises ``ValueError`` naming it.
    """
    name, text = load_corpus(path)
    where = "the built-in corpus" if path is None else f"data file {name!r}"
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer, text, vocab_size=bpe_vocab_size)
    elif not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be 'char', 'bpe' or a Tokenizer, got {type(tokenizer).__name__}")
    try:
        ids = tokenize_cached(text, tokenizer, cache_dir)
    except ValueError as e:
        raise ValueError(f"{where} cannot be tokenized with the checkpoint's tokenizer: {e}") from None
    need = min_tokens(seq_len, val_fraction)
    if len(ids) < need:
        raise ValueError(
            f"{where} is too short: {len(ids)} tokens, but a {1 - val_fraction:.0%}/{val_fraction:.0%} "
            f"train/val split with seq_len={seq_len} needs at least {need}"
        )
    train, val = split_ids(ids, val_fraction)
    return Dataset(name=name, tokenizer=tokenizer, train=train, val=val, n_chars=len(text))


__all__ = [
    "Dataset", "Prefetcher", "SplitWindows", "fixed_batches", "load_dataset", "min_tokens", "sample_batch", "split_ids", "to_device",
    "unpack_batch",
]
