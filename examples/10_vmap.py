"""vmap over whole models: per-example gradients, the gradient noise scale, and a sweep trained in one loop.

A model here is a *function* of a parameter pytree, so ``torch.func.vmap`` can batch it along any axis:

* over **examples**: ``vmap(grad(loss))`` gives every sequence its own gradient in one call -- what
  DP-SGD clips and what the gradient noise scale is measured from;
* over **models**: stack N parameter trees on a leading axis and one vmapped step trains all N,
  each with its own batch and, in a sweep, its own learning rate.

This script trains a small character model on a text file, then

1. ranks held-out sequences by their gradient norm (which ones the model finds "hard"), and checks the
   vmapped gradients against a plain Python loop;
2. estimates the gradient noise scale B_simple (McCandlish et al. 2018): the batch size beyond which
   bigger batches stop buying proportionally faster training;
3. clips per-example gradients as DP-SGD does (``optim.dp_aggregate``);
4. trains a 4-member learning-rate sweep in ONE vmapped step per step, through the same ``fit`` as one
   model, and ranks and plots the members.

Run:  python examples/10_vmap.py [--data FILE] [--plot sweep.png]
      (FILE: e.g. tiny shakespeare; default: the built-in corpus. A few minutes on a laptop CPU.)
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer import ensemble, optim, per_example, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="FILE", default=None, help="UTF-8 text to train on (default: built-in corpus)")
    parser.add_argument("--plot", metavar="FILE", default=None, help="save the sweep's loss curves as a PNG")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the first model and the sweep")
    args = parser.parse_args()

    # ---------------------------------------------------------------- 0. a small trained model
    seq_len, batch = 64, 16
    ds = ft.load_dataset(args.data, tokenizer="char", seq_len=seq_len)
    cfg = ft.Config(vocab_size=ds.tokenizer.vocab_size, d_model=64, n_heads=4, n_layers=2, d_ff=256,
                    max_seq_len=seq_len, bias=False)
    steps = args.steps
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(optim.warmup_cosine(3e-3, steps // 10, steps, 3e-4), betas=(0.9, 0.99)))
    params = ft.init_params(cfg, seed=0)
    opt_state = opt.init(params)
    step = train.make_train_step(cfg, opt)
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, ft.data.sample_batch(ds.train, batch, seq_len, seed=0, step=i))
    print(f"0. trained a {ft.count_params(params):,}-parameter model for {steps} steps: "
          f"train loss {float(metrics['loss']):.3f} (ln(vocab) = {math.log(cfg.vocab_size):.3f})")

    # ---------------------------------------------------------------- 1. per-example gradients
    # ft.per_example.per_example_grads is vmap(grad(loss of one sequence)): every leaf of the result has a leading
    # batch axis. It runs attention on the einsum path, because vmap has no batching rule for the fused
    # SDPA kernels (it would fall back to looping over the batch for them).
    tokens, targets = ft.data.sample_batch(ds.val, 16, seq_len, seed=1, step=0)
    grads = ft.per_example.per_example_grads(params, tokens, targets, cfg)
    print()
    print(f"1. per-example gradients: w_qkv of block 0 is {tuple(params['blocks'][0]['attn']['w_qkv'].shape)}, "
          f"its per-example gradient {tuple(grads['blocks'][0]['attn']['w_qkv'].shape)}")
    # The same numbers as a Python loop, one torch.func.grad per sequence (and a lot slower: see
    # `ftransformer bench vmap`).
    loop = [torch.func.grad(lambda p, i=i: ft.loss_fn(p, tokens[i], targets[i], cfg))(params) for i in range(4)]
    diff = max(float((g[i] - want).abs().max())
               for i in range(4) for g, want in zip(ft.tree.leaves(grads), ft.tree.leaves(loop[i])))
    print(f"   max |vmap - loop| = {diff:.1e}")
    # A large gradient norm means the model would change a lot to fit that sequence better: text unlike
    # what it has learned (rare characters, unusual layout) pulls hardest.
    norms = optim.per_example_norms(grads)
    order = norms.argsort(descending=True).tolist()
    losses = [float(ft.loss_fn(params, tokens[i], targets[i], cfg)) for i in range(len(tokens))]
    print("   hardest and easiest held-out sequences (gradient norm, loss, text):")
    for i in order[:2] + order[-2:]:
        text = ds.tokenizer.decode(tokens[i].tolist())[:48].replace("\n", "\\n")
        print(f"   {float(norms[i]):7.3f}  {losses[i]:.3f}  {text!r}")

    # ---------------------------------------------------------------- 2. the gradient noise scale
    # With g_i the examples' gradients, tr(Sigma) (their variance) and |G|^2 (the squared true gradient)
    # both have unbiased estimates from one batch; averaged over a few batches, their ratio B_simple is
    # the batch size where the gradient's noise and its signal are about equal. Far below it, a bigger
    # batch is almost free speed; far above it, it wastes compute.
    est = per_example.noise_scale(params, [ft.data.sample_batch(ds.train, 16, seq_len, seed=2, step=i) for i in range(4)], cfg)
    print()
    print(f"2. gradient noise scale: tr(Sigma) = {float(est.trace_cov):.3f}, |G|^2 = {float(est.grad_sq_norm):.4f}, "
          f"B_simple = {float(est.b_simple):.0f} sequences (this run used batches of {batch})")

    # ---------------------------------------------------------------- 3. DP-SGD's clipping
    # dp_aggregate clips every example's gradient to norm C, sums, adds N(0, (sigma C)^2) noise from an
    # explicit key, and averages: no single sequence can move the model by more than C / batch.
    clip = float(norms.median())
    dp = optim.dp_aggregate(clip, 1.0, key=ft.random.key(0))
    noisy, _ = dp.update(grads, dp.init(params), params)
    exact, _ = optim.dp_aggregate(clip, 0.0, key=ft.random.key(0)).update(grads, dp.init(params), params)
    # The noise's norm is about sigma * C * sqrt(parameters) / batch: next to it the signal is tiny,
    # which is why DP-SGD trains with large batches (and why the privacy it buys needs an accountant,
    # e.g. Opacus's, to be stated as (epsilon, delta): not done here).
    print()
    print(f"3. DP-SGD with C = {clip:.3f} (the median norm): {int((norms > clip).sum())} of {len(norms)} examples "
          f"clipped; |mean clipped gradient| = {float(optim.global_norm(exact)):.3f} <= C; with noise sigma = 1: "
          f"{float(optim.global_norm(noisy)):.3f}")

    # ---------------------------------------------------------------- 4. a sweep in one vmapped loop
    # Four copies of the same initial model (seed 0), stacked on a leading axis, each with its own peak
    # learning rate. The optimizer is built per member inside the vmapped step from that member's lr
    # (a 0-d tensor there), so one call updates all four: ensemble.make_ensemble_step is vmap of the
    # very step make_train_step builds. ensemble.Members hands the stack to the same fit as one model
    # (resume, Ctrl-C, accumulation), with a checkpoint directory per member. The members share seed 0,
    # so they see the same batches: a fair sweep.
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    unit = optim.warmup_cosine(1.0, steps // 10, steps, 0.1)

    def make_opt(lr):
        return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lambda s: lr * unit(s), betas=(0.9, 0.99)))

    members = ensemble.Members(cfg, ds.train, ds.val, make_opt, [{"lr": lr, "seed": 0} for lr in lrs])
    out = Path(tempfile.mkdtemp(prefix="ft-example-10-"))
    settings = ft.loop.FitSettings(steps=steps, batch_size=batch, seq_len=seq_len, eval_every=max(steps // 6, 1),
                                   eval_batches=4, seed=3)
    result = ft.fit(members.init_params(), members.train_step(), members, settings, out_dir=out, progress=False,
                    log=None)
    print()
    print(f"4. learning-rate sweep, {len(lrs)} members trained together for {steps} steps (one vmapped step each):")
    print(ensemble.format_ranking(members.summary(result)).replace("\n", "\n   ").join(["   ", ""]))
    final = {r["member"]: r["val_loss"] for r in result.history if r["step"] == steps}
    best = min(final, key=final.get)
    print(f"   best final val loss: lr={lrs[best]:g} ({final[best]:.4f})   <- best")
    if args.plot:
        ensemble.plot_members(Path(args.plot), result.history, members.names)
        print(f"   every member's curves: {args.plot}")


if __name__ == "__main__":
    main()
