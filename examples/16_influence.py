"""Step 16: which training data made the model say this? Projected-gradient attribution, checked by retraining.

A model's parameters are a function of its training data. Data attribution asks the reverse question for one
output: which training sequences lowered the loss of *this* text? Removing each one and retraining answers it
exactly, at the cost of one training run per sequence. TRAK (Park et al. 2023) and LoGra (Choe et al. 2024)
answer it to first order from gradients:

* every training sequence's gradient (of its summed loss) is taken by ``vmap`` of ``grad`` -- no hooks --
  and projected by a random matrix drawn from an explicit key to k numbers (``kind="dense"``), or, LoGra's
  way, each projection matrix's gradient squeezed to ``P_a^T dL/dW P_g`` (``kind="kronecker"``) without ever
  forming the full gradient;
* the projections go into an index on disk (a memory-mapped array), built once;
* a query's score against every training sequence is one matrix product, preconditioned by
  ``(Phi^T Phi + lambda I)^-1`` (TRAK), summed over a few models trained from different seeds.

Two checks that the scores mean something:

1. a *planted fact*: a sequence of tokens seen nowhere else, repeated three times in training; asked for
   it, the attribution should rank its three copies first;
2. the *linear datamodeling score* (LDS): retrain on 20 random halves of the data (every half and seed one
   member of ONE vmapped training step) and rank-correlate the measured query loss with the summed scores
   of each half's sequences. 1 is perfect; random scores give about 0.

Run:  python examples/16_influence.py [--quick] [--out DIR]   (about 15 s of CPU with --quick, a minute without)
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer.attribution import lds, projected

PLANTED = [16, 17, 5, 1, 9, 3, 7, 2, 8]  # tokens 16 and 17 appear in no other sequence
DAMPING = 0.01


def train_models(cfg, train, seeds, masks, steps):
    """One model per (mask, seed), all trained at once: full batch, the sequences outside a mask ignored."""
    tokens, targets = projected.pad_sequences(train)
    stacked = ft.ensemble.init_ensemble(cfg, lds.seeds_for(masks.shape[0], seeds))
    member_targets = lds.subset_targets(targets, masks.repeat_interleave(len(seeds), 0))
    return lds.train_on_subsets(cfg, stacked, tokens, member_targets, ft.optim.adamw(1e-2, weight_decay=0.0), steps)


def attribute(cfg, models, train, queries, projection, where: Path):
    """Scores of every query against every training sequence, summed over the models (one index each)."""
    total = 0
    for i, params in enumerate(models):
        index = projected.build_index(params, cfg, train, projection, where / f"index-{projection.kind}-{i}",
                                      progress=False)
        q = projected.features(params, *projected.pad_sequences(queries), cfg, projection)
        total = total + projected.scores(index, q, damping=DAMPING)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed instead of 3 (the test suite's run)")
    parser.add_argument("--out", default=None, help="where the indexes go (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors this small run fastest on one thread (more only add fork/join waits)
    seeds, subsets, steps = ((0,) if args.quick else (0, 1, 2)), 20, 100
    base = lds.progressions(0, 48)
    train = base[:20] + [PLANTED] + base[20:30] + [PLANTED] + base[30:] + [PLANTED]
    planted_at = [i for i, s in enumerate(train) if s == PLANTED]
    queries = lds.progressions(99, 8)
    cfg = ft.Config(vocab_size=20, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=12, init_std=0.1)
    print(f"{len(train)} training sequences (the planted one at {planted_at}), a {ft.count_params(ft.init_params(cfg))}"
          f"-parameter model, {len(seeds)} seeds")

    start = time.perf_counter()
    full = ft.tree.unstack(train_models(cfg, train, seeds, torch.ones(1, len(train), dtype=torch.bool), steps))
    masks = lds.random_subsets(ft.random.key(0), len(train), subsets)
    retrained = train_models(cfg, train, seeds, masks, steps)
    q_tokens, q_targets = projected.pad_sequences(queries)
    measured = lds.query_losses(cfg, retrained, q_tokens, q_targets).reshape(subsets, len(seeds), -1).mean(1)
    print(f"trained {len(seeds)} full-data models and {subsets} x {len(seeds)} on random halves in one vmapped step "
          f"({time.perf_counter() - start:.0f} s)")

    with tempfile.TemporaryDirectory() as scratch:
        where = Path(args.out) if args.out else Path(scratch)
        for kind, k in (("dense", 256), ("kronecker", 8)):
            projection = projected.Projection(ft.random.key(1), k, kind=kind)
            scores = attribute(cfg, full, train, [PLANTED, *queries], projection, where)
            top = scores[0].argsort(descending=True)[:3].tolist()
            found = sorted(top) == planted_at
            values = [lds.lds(scores[1 + q], masks, measured[:, q]) for q in range(len(queries))]
            print(f"\n{kind} projection (k={k}): the planted fact's top 3 training sequences {top} "
                  f"-> {'all three copies' if found else 'NOT the copies'}")
            print(f"  LDS per query {[round(v, 2) for v in values]}")
            print(f"  LDS ({kind}, k={k}, damping {DAMPING}) = {sum(values) / len(values):.2f}")


if __name__ == "__main__":
    main()
