"""Sparse autoencoders: read a model's activations as sparse sums of learned directions.

An SAE is one more params pytree, splicing it into the model is one more intervention, and a sweep of
SAEs is one ``vmap``::

    state = sae.init_stack(keys, hp, cfg)                  # a stack: leaves [members, ...]
    state, metrics = sae.stack_step(state, hp, x, cfg)     # ONE vmapped step trains them all
    ft.forward_with_activations(params, tokens, model_cfg, interventions=sae.splice_sae(path, p, h, cfg))

1. Ground truth first: activations built from 48 known directions in 16 dimensions (more directions
   than dimensions: superposition). A stack of four TopK SAEs (k = 2 or 3, two learning rates) trains
   in one vmapped step; each decoder should find the directions (mean max cosine close to 1).
2. Then a tiny character model trained here for a few hundred steps: its activations are collected to a
   memory-mapped file, a stack of SAEs trains on them, and each is spliced back in to see what the
   model loses (CE recovered against zero- and mean-ablation). The features of a model this small are a
   demo of the machinery, not findings about language models.

Run:  python examples/11_sae.py [--data FILE] [--model-steps N] [--sae-steps N] [--out DIR]   (a minute or two on a CPU)
"""

import argparse
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer.tree import unstack as unstack_params
from ftransformer.interp import sae


def ground_truth(steps: int) -> None:
    print("1. superposition ground truth: 48 directions in 16 dims, each on with p = 0.04")
    dirs = sae.feature_directions(ft.random.key(0), 48, 16)
    cfg = sae.SAEConfig(d_in=16, d_sae=96, architecture="topk", k_max=3, dead_tokens=5000)
    hp = sae.make_hparams(4, k=[2, 2, 3, 3], lr=[3e-3, 1e-2, 3e-3, 1e-2])
    state = sae.init_stack(ft.random.split(ft.random.key(1), 4), hp, cfg)
    for step in range(steps):
        x = sae.superposition_batch(ft.random.fold_in(ft.random.key(2), step), dirs, 512, 0.04)
        state, _ = sae.stack_step(state, hp, x, cfg)
    for i, params in enumerate(unstack_params(state.params)):
        print(f"   member {i}: k={int(hp['k'][i])} lr={float(hp['lr'][i]):.0e}  "
              f"mean max cosine with the true directions = {sae.mean_max_cosine(dirs, params['w_dec']):.3f}")


def tiny_model(steps: int, out: Path, data: str | None) -> tuple:
    cfg = ft.Config(vocab_size=1, d_model=64, n_heads=4, n_layers=2, d_ff=256, max_seq_len=64)
    ds = ft.load_dataset(data, tokenizer="char", seq_len=cfg.max_seq_len)
    cfg = cfg.replace(vocab_size=ds.tokenizer.vocab_size)
    print(f"\n2. a {ft.count_params(ft.init_params(cfg)):,}-parameter character model, {steps} training steps")
    result = ft.fit(ft.init_params(cfg, seed=0), ft.make_train_step(cfg, ft.optim.adamw(3e-3)),
                    ft.loop.TokenData(cfg, ds.train, ds.val),
                    ft.loop.FitSettings(steps=steps, batch_size=16, eval_every=steps, eval_batches=4),
                    out_dir=out / "model", progress=False, log=None)
    print(f"   val loss {result.history[-1]['val_loss']:.3f}")
    return cfg, result.params, ds


def windows(ids, seq: int, count: int) -> torch.Tensor:
    return torch.as_tensor(ids[: count * seq].astype("int64")).reshape(count, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth-steps", type=int, default=250, help="SAE steps on the synthetic data")
    parser.add_argument("--model-steps", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--sae-steps", type=int, default=300, help="SAE steps on the model's activations")
    parser.add_argument("--data", default=None, help="a text file (default: the built-in corpus)")
    parser.add_argument("--out", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ft-example-11-"))
    ground_truth(args.truth_steps)

    cfg, params, ds = tiny_model(args.model_steps, out, args.data)
    site = "blocks.1.resid_mid"
    train = windows(ds.train, cfg.max_seq_len, len(ds.train) // cfg.max_seq_len)
    # Position 0 is dropped (outlier activations); the scale gives x a mean norm of sqrt(d_model).
    # 40,000 rows, or every row a small text has (each window gives seq - 1: position 0 is dropped).
    n_tokens = min(40_000, train.shape[0] * (cfg.max_seq_len - 1))
    acts = sae.collect_activations(params, train.split(32), cfg, site, out / "acts", n_tokens=n_tokens)
    print(f"   collected {acts.data.shape[0]:,} activations of {site} (memory-mapped), scale {acts.scale:.3f}")
    sae_cfg = sae.SAEConfig(d_in=cfg.d_model, d_sae=512, architecture="topk", k_max=32, dead_tokens=20_000)
    hp = sae.make_hparams(3, k=[8, 16, 32], lr=2e-3)
    state = sae.fit_stack(acts, sae_cfg, hp, out / "saes", steps=args.sae_steps, batch_size=512, progress=False)
    val = windows(ds.val, cfg.max_seq_len, 32)
    with torch.no_grad():
        m = sae.evaluate_stack(params, val, cfg, site, state.params, hp, sae_cfg, scale=acts.scale)
    print(f"   clean CE {float(m['ce_clean']):.3f}, zero-ablated {float(m['ce_zero']):.3f}, "
          f"mean-ablated {float(m['ce_mean']):.3f} nats")
    print("    k    L0   expl.var  CE rec (zero)  CE rec (mean)  delta CE    KL   dead")
    for i in range(3):
        print(f"   {int(hp['k'][i]):>2}  {float(m['l0'][i]):>4.1f}  {float(m['explained_variance'][i]):>8.3f}"
              f"  {float(m['ce_recovered_zero'][i]):>13.3f}  {float(m['ce_recovered_mean'][i]):>13.3f}"
              f"  {float(m['delta_ce'][i]):>8.3f}  {float(m['kl'][i]):>5.3f}  {int(m['dead'][i]):>4}")
    print(f"   files: {out}/acts (activations.f32 + .json), {out}/saes (latest/ checkpoint, metrics.jsonl)")


if __name__ == "__main__":
    main()
