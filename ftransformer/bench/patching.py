"""``ftransformer bench patching``: one exact activation-patching sweep (layer x position) three ways.

Contenders, each computing the metric of every single patch of ``--site`` (one layer, one position,
clean values into the corrupted run), timed in the same run:

* ``loop of single patches``: one ``forward_with_activations`` per patch with ``interp.patch`` (what a
  hook loop does);
* ``vmap of full runs``: per layer, one ``torch.func.vmap`` over the patch masks of whole forward
  passes (under vmap the unpatched prefix of blocks already runs once, unbatched);
* ``patch_sweep, all positions``: ``interp.patch_sweep`` with one position bucket (runs from the patched
  layer over every query position: the sweep without the causal skip);
* ``patch_sweep``: ``interp.patch_sweep`` as it is (the queries from the patch's position bucket on,
  over the base run's keys/values of the positions before).

Before timing, every contender's values are checked equal to the loop's (to ``TOL``). Timings are
interleaved (each repetition runs every contender once; warm-up first), medians reported; the speed-up
column is each row's median over ``patch_sweep``'s.

The position buckets (``interp.patching.BUCKETS``) save FLOPs (about half of the patched runs' queries
at 8 buckets) at the price of 8 vmapped calls per layer instead of one: they win where the matmuls
dominate (the default sizes, or 4 layers x 128 wide x 32 tokens), and lose to per-call overhead on
very small models (e.g. ``--layers 3 --batch-size 4 --seq-len 24``: about even with the vmap of full
runs). Use ``--threads 1`` on a shared machine: contended cores make the medians noisy.
"""

import warnings

import torch

from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.bench.vmap import format_table
from ftransformer.config import PRESETS
from ftransformer.interp import patching
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.interventions import patch
from ftransformer.interp.patching import patch_sweep
from ftransformer.params import init_params

LOOP, VMAP, ALL_POSITIONS, SWEEP = "loop of single patches", "vmap of full runs", "patch_sweep, all positions", "patch_sweep"
TOL = 1e-4


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes (default: tiny)")
    parser.add_argument("--layers", type=int, default=2, help="n_layers (default: 2)")
    parser.add_argument("--d-model", type=int, default=64, help="d_model, with d_model // 32 heads (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences (default: 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--site", default="resid_pre", choices=patching.RESID_SITES + ("mlp.hidden",),
                        help="the patched site, swept by layer x position (default: resid_pre)")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved repetitions (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")


def setup(args):
    """The model, tokens and metric the benchmark patches, built from the parsed arguments."""
    heads = max(1, args.d_model // 32)
    cfg = PRESETS[args.preset].replace(
        n_layers=args.layers, d_model=args.d_model, n_heads=heads, n_kv_heads=heads, d_ff=4 * args.d_model,
        max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len), dropout=0.0,
    )
    params = init_params(cfg, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    clean = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    corrupt = clean.clone()
    corrupt[:, args.seq_len // 2] = (clean[:, args.seq_len // 2] + 1) % cfg.vocab_size
    return cfg, params, clean, corrupt


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """The metric: the last position's logit of token 0 minus token 1, averaged over the batch."""
    return (logits[..., -1, 0] - logits[..., -1, 1]).mean()


def _site(acts: dict, layer: int, site: str) -> torch.Tensor:
    return patching.site_value(acts, layer, site)


def _loop(params, clean, corrupt, cfg, site):
    _, source = forward_with_activations(params, clean, cfg)
    rows = []
    for i in range(cfg.n_layers):
        value = _site(source, i, site)
        rows.append(torch.stack([
            logit_diff(forward_with_activations(params, corrupt, cfg, interventions=patch(f"blocks.{i}.{site}", value, positions=p))[0])
            for p in range(clean.shape[-1])
        ]))
    return torch.stack(rows)


def _vmap_full(params, clean, corrupt, cfg, site):
    _, source = forward_with_activations(params, clean, cfg)
    masks = torch.eye(clean.shape[-1], dtype=torch.bool)[:, :, None]
    rows = []
    for i in range(cfg.n_layers):
        value = _site(source, i, site)

        def run(mask, i=i, value=value):
            fix = {f"blocks.{i}.{site}": lambda v: torch.where(mask, value, v)}
            return logit_diff(forward_with_activations(params, corrupt, cfg, interventions=fix)[0])

        rows.append(torch.func.vmap(run)(masks))
    return torch.stack(rows)


def _one_bucket(fn):
    def run():
        before, patching.BUCKETS = patching.BUCKETS, 1
        try:
            return fn()
        finally:
            patching.BUCKETS = before

    return run


def contenders(cfg, params, clean, corrupt, site) -> dict:
    def sweep():
        return patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site)

    return {
        LOOP: lambda: _loop(params, clean, corrupt, cfg, site),
        VMAP: lambda: _vmap_full(params, clean, corrupt, cfg, site),
        ALL_POSITIONS: _one_bucket(sweep),
        SWEEP: sweep,
    }


def check_equal(fns: dict) -> float:
    """Every contender's values against the loop's; returns the largest difference (raises over ``TOL``)."""
    reference = fns[LOOP]()
    worst = 0.0
    for name, fn in fns.items():
        diff = (fn() - reference).abs().max().item()
        if diff > TOL:
            raise AssertionError(f"{name} differs from the loop by {diff:.3g} (expected <= {TOL:g})")
        worst = max(worst, diff)
    return worst


def run(args) -> int:
    with warnings.catch_warnings(), num_threads(args.threads) as threads:
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        cfg, params, clean, corrupt = setup(args)
        fns = contenders(cfg, params, clean, corrupt, args.site)
        diff = check_equal(fns)
        times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=torch.device("cpu"), unit=1e3)
    print(f"{args.site} patching by layer x position: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"batch {args.batch_size} x {args.seq_len}, {threads} threads; {args.repeats} interleaved repetitions "
          f"after {args.warmup} warm-up, medians; position buckets {patching.BUCKETS}")
    print(f"every contender equals the loop to {diff:.2g}\n")
    print(format_table(f"{cfg.n_layers * args.seq_len} patches", times, SWEEP, {}, {}))
    print("\nspeed-up: this row's median time / patch_sweep's")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m ftransformer.bench.patching", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
