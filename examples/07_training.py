"""Step 7 of the learning path: training -- a pure train step, gradient accumulation and validation.

Training is a loop around one pure function::

    params, opt_state, metrics = step(params, opt_state, (tokens, targets), key)

``torch.func.grad_and_value`` differentiates the loss with respect to the whole parameter tree, the
optimizer (AdamW, written as ``init``/``update`` functions) turns gradients into updates, and new trees
come back. Nothing is mutated, so a step can be replayed, compared, checkpointed or compiled.

This script trains a small character-level model on the built-in corpus (the source code of the Python
standard library that runs it: nothing to download) and shows three things:

1. the step is pure: the old parameters are still there after it;
2. gradient accumulation (several micro-batches, one update) gives the same update as the whole batch;
3. validation on a fixed, held-out set of batches is how you tell learning from memorising.

Run:  python examples/07_training.py [--out DIR]   (well under a minute on a laptop CPU)
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer import optim, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="DIR", help="keep the run (checkpoints, metrics.jsonl, loss.png) here")
    args = parser.parse_args()

    # ---------------------------------------------------------------- 1. data
    # One id per character, the vocabulary sorted so the same corpus always gives the same ids. The
    # split is contiguous -- the first 90% trains, the last 10% validates -- so no validation text
    # leaks into training through overlapping windows.
    seq_len = 64
    ds = ft.load_dataset(None, tokenizer="char", seq_len=seq_len)
    print("1. data: the built-in corpus (Python standard library source)")
    print(f"   {ds.n_chars:,} characters, vocab of {ds.tokenizer.vocab_size} characters")
    print(f"   {len(ds.train):,} train tokens | {len(ds.val):,} val tokens")
    sample = ds.tokenizer.decode(ds.train[1000:1060])
    print(f"   decode(encode(text)) is exact: {sample!r}")

    # A batch is a pure function of (seed, step): random windows of seq_len + 1 tokens, the targets
    # being the inputs shifted by one. The same (seed, step) always gives the same batch, which is
    # what makes a resumed run identical to an uninterrupted one.
    tokens, targets = ft.data.sample_batch(ds.train, 16, seq_len, seed=0, step=0)
    print(f"   batch: tokens {tuple(tokens.shape)}, targets {tuple(targets.shape)} (batch, seq); "
          f"targets[:, :-1] == tokens[:, 1:]: {torch.equal(targets[:, :-1], tokens[:, 1:])}")

    # ---------------------------------------------------------------- 2. the pure step
    cfg = ft.Config(vocab_size=ds.tokenizer.vocab_size, d_model=64, n_heads=4, n_layers=2, d_ff=256,
                    max_seq_len=seq_len, bias=False)
    steps = 200
    # The learning rate warms up linearly (large early updates on random weights are unstable), then
    # decays along a cosine to a tenth of its peak. Clipping bounds the global gradient norm.
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine(3e-3, 30, steps, 3e-4), betas=(0.9, 0.99), weight_decay=0.1),
    )
    params = ft.init_params(cfg, seed=0)
    opt_state = opt.init(params)
    step = train.make_train_step(cfg, opt)
    new_params, new_opt_state, metrics = step(params, opt_state, (tokens, targets), None)
    print()
    print(f"2. one step: {ft.count_params(params):,} parameters, loss {float(metrics['loss']):.4f} "
          f"(ln(vocab) = {math.log(cfg.vocab_size):.4f}), grad norm {float(metrics['grad_norm']):.3f}")
    # The first update's learning rate is 0 (the warm-up starts there), so only the optimizer state moved.
    print(f"   lr of this update {float(metrics['lr']):g}; optimizer step count {int(opt_state[1].count)} -> "
          f"{int(new_opt_state[1].count)}, and the old opt_state still says {int(opt_state[1].count)}: nothing mutated")

    # ---------------------------------------------------------------- 3. gradient accumulation
    # A big batch may not fit in memory. Accumulation splits it into micro-batches, adds their
    # gradients and updates once. Each micro-batch's loss is a *sum* over its tokens divided by the
    # whole batch's token count, so the sum of the micro-gradients is exactly the full batch's mean
    # gradient -- the same update, up to float32 round-off from adding in another order.
    # Plain SGD with lr 1 makes the update minus the gradient itself, so comparing updates compares
    # gradients (AdamW's first update is about lr * sign(gradient), which would hide differences).
    sgd = optim.sgd(1.0)
    full_params, _, full_metrics = train.make_train_step(cfg, sgd)(params, sgd.init(params), (tokens, targets), None)
    accumulating = train.make_train_step(cfg, sgd, accum_steps=4)
    acc_params, _, acc_metrics = accumulating(params, sgd.init(params), (tokens, targets), None)
    diff = max(float((a - b).abs().max()) for a, b in zip(ft.tree.leaves(acc_params), ft.tree.leaves(full_params)))
    size = max(float((a - b).abs().max()) for a, b in zip(ft.tree.leaves(full_params), ft.tree.leaves(params)))
    print()
    print("3. gradient accumulation: 4 micro-batches of 4 sequences vs one batch of 16 (SGD, lr 1)")
    print(f"   loss {float(acc_metrics['loss']):.6f} vs {float(full_metrics['loss']):.6f}; "
          f"largest gradient entry {size:.3f}")
    print(f"   max |accumulated update - full-batch update| = {diff:.1e}")

    # ---------------------------------------------------------------- 4. training with validation
    # fit runs the loop: every eval_every steps it measures the loss on fixed train and val batches
    # (the same batches each time, so the numbers are comparable), writes metrics.jsonl and loss.png,
    # saves a checkpoint to latest/ and, when the val loss improved, to best/. The step it runs is the
    # one above (a train.TrainStep: the step with its opt.init); a DP-SGD step or an ensemble's vmapped
    # step goes in the same place. TokenData says what it trains on, FitSettings how long and how often.
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ft-example-07-"))
    print()
    print(f"4. {steps} steps of 16 x {seq_len} tokens (in 2 micro-batches each), evaluated every 50 steps")
    result = ft.fit(
        params, train.make_train_step(cfg, opt, accum_steps=2),
        ft.loop.TokenData(cfg, ds.train, ds.val, tokenizer=ds.tokenizer),
        ft.loop.FitSettings(steps=steps, batch_size=16, seq_len=seq_len, accum_steps=2, eval_every=50, eval_batches=4),
        out_dir=out, progress=False, log=None,
    )
    print("   step   train loss   val loss   lr")
    for r in result.history:
        print(f"   {r['step']:>4}   {r['train_loss']:>10.4f}   {r['val_loss']:>8.4f}   {r['lr']:.2e}")
    # Train and val loss falling together means the model learns patterns of Python code that hold in
    # files it never trained on. (Val may even sit below train: the held-out files are simply easier
    # than the training mix.) A val loss that turns up while the train loss keeps falling is
    # overfitting: the last moment before it is what best/ keeps.
    best = ft.load_checkpoint(out / "best")
    val_batches = ft.data.fixed_batches(ds.val, 4, 16, seq_len, seed=0)
    again = train.evaluate(best.params, val_batches, cfg)
    print(f"   best checkpoint: step {best.step}, val loss {result.best_val_loss:.4f}; "
          f"evaluated again after loading: {again:.4f}")

    print(f"   files in {out}: {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}")


if __name__ == "__main__":
    main()
