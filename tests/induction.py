"""A trained two-layer induction circuit for ground-truth tests of the interpretability methods.

``induction_model()`` trains (once per test session, ~8 s on one thread, shape checks off) the attention-only model of
example 09 at a small size: 2 layers of 2 heads, d_model 32, 32 ids, 24 positions, on
``ft.interp.repeated_stretches``. With strong weight decay one head of layer 0 becomes a previous-token
head and one head of layer 1 the induction head that reads it through its keys (K-composition); the
other two heads stay small. The fixture checks that the circuit formed and says so if it did not.
"""

import functools
from typing import NamedTuple

import torch

import ftransformer as ft
from ftransformer import optim, train
from ftransformer.layers import attention_kernel
from tests.typecheck import unchecked

STEPS = 1200


class Induction(NamedTuple):
    params: dict
    cfg: ft.Config
    previous_head: int  # the previous-token head of layer 0
    induction_head: int  # the induction head of layer 1
    scores: dict  # ft.interp.head_scores of the trained model


@functools.lru_cache(maxsize=1)
@attention_kernel("einsum")  # trained (and its scores read) on the kernel the interp tools use
def induction_model() -> Induction:
    cfg = ft.Config.from_flat(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=1, max_seq_len=24, mlp=False,
                    bias=False, positional="rope", tie_embeddings=False)
    params = ft.init_params(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine(3e-3, 30, STEPS, 3e-3), weight_decay=1.0),
    )
    state, step = opt.init(params), train.make_train_step(cfg, opt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest
    try:
        # Training is not under test and is ~4x slower with the runtime shape checks on: train without them
        # (the tests then check every call they make on the trained model).
        with unchecked():
            for _ in range(STEPS):
                params, state, _ = step(params, state, ft.interp.repeated_stretches(cfg, 32, gen))
    finally:
        torch.set_num_threads(threads)
    scores = ft.interp.head_scores(params, cfg, batch=16, seed=1)
    previous, induction = scores["previous_token"][0], scores["induction"][1]
    if previous.max() < 0.5 or induction.max() < 0.5:
        raise AssertionError(
            "the induction circuit did not form in training: best previous-token score of layer 0 "
            f"{float(previous.max()):.2f}, best induction score of layer 1 {float(induction.max()):.2f} "
            "(expected > 0.5 each)"
        )
    return Induction(params, cfg, int(previous.argmax()), int(induction.argmax()), scores)


def induction_prompts(cfg: ft.Config, batch: int = 8, half: int = 10, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, corrupt)``: ``half`` random ids repeated once, and the same rows with every other token of
    the FIRST copy (positions 0, 2, 4, ...) replaced by other ids. In the corrupted rows the tokens at the
    odd positions of the first copy are unchanged but follow different tokens, so an induction head can
    no longer find them through the previous-token head's writes (the K-composition path), while what it
    would copy from there is the same: ``induction_metric`` scores those predictions."""
    clean = ft.interp.repeated_random_tokens(cfg, half=half, batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    corrupt = clean.clone()
    even = torch.arange(0, half, 2)
    corrupt[:, even] = (clean[:, even] + torch.randint(1, cfg.vocab_size, (batch, len(even)), generator=gen)) % cfg.vocab_size
    return clean, corrupt


def induction_metric(clean: torch.Tensor, half: int = 10):
    """The mean log-probability of the correct next token at the positions of the second copy whose target
    sits at an odd position of the first copy (the predictions only the K-composition path can fix)."""
    positions = torch.arange(half, 2 * half - 1)
    positions = positions[(positions - half) % 2 == 0]  # query token x_j, j even: its target x_{j+1}, j+1 odd
    targets = clean[:, positions + 1]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[..., positions, :], dim=-1)
        return logp.gather(-1, targets[..., None]).mean()

    return metric
