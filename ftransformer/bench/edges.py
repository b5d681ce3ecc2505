"""Edge attribution against exact edge patching: the price of every edge's effect, exact and estimated.

Contenders, each giving a value for every edge writer -> reader of a random model (clean values into the
corrupted run), timed in the same run:

* ``loop of single-edge circuits``: one ``interp.edges.circuit_logits`` per edge (all edges kept but one,
  that one fed the clean run's write): what a loop of patched runs does;
* ``edge_patch_sweep``: the same values as one ``vmap`` over the edges of each reader layer, each run
  starting at that layer with the one reader's swapped projection computed once per writer;
* ``EAP``: ``edge_attribution``, the first-order estimate of all of them from one forward + backward;
* ``EAP-IG``: the same with ``--steps`` integration points (one ``vmap`` over alpha).

Before timing, the sweep is checked equal to the loop (to ``TOL``), and the estimates are put next to the
exact values (``attribution.atp_report``: correlation, sign agreement, the largest misses; its index ``n``
is the n-th edge of ``graph(cfg).edges.nonzero()``). Timings are
interleaved medians; the speed-up column is each row's median over EAP's (how many EAPs it costs).
"""

import argparse
import warnings

import torch

from ftransformer.bench import patching as patching_bench
from ftransformer.bench.patching import setup, logit_diff
from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.bench.vmap import format_table
from ftransformer.interp import edges
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.attribution import atp_report

LOOP, SWEEP, EAP, IG = "loop of single-edge circuits", "edge_patch_sweep", "EAP", "EAP-IG"
TOL = 1e-4


def add_arguments(parser) -> None:
    """``bench.patching``'s model, batch and timing options (its ``--site`` is not used here), with this
    benchmark's defaults (4 layers x 128 wide, 8 x 32 tokens), and EAP-IG's steps."""
    patching_bench.add_arguments(parser)
    parser.set_defaults(layers=4, d_model=128, seq_len=32, repeats=3)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG's integration points (default: 5)")
    parser.add_argument("--no-loop", action="store_true", help="leave out the loop (it is the slow one)")


def _loop(params, clean, corrupt, cfg) -> torch.Tensor:
    g = edges.graph(cfg)
    ablated = edges.writer_values(params, forward_with_activations(params, clean, cfg)[1], cfg)
    before = logit_diff(forward_with_activations(params, corrupt, cfg)[0])
    out = torch.zeros(g.edges.shape)
    for u, v in g.edges.nonzero().tolist():
        mask = torch.ones(g.edges.shape)
        mask[u, v] = 0.0
        out[u, v] = logit_diff(edges.circuit_logits(params, corrupt, cfg, mask, ablated)) - before
    return out


def contenders(cfg, params, clean, corrupt, steps: int, loop: bool) -> dict:
    fns = {LOOP: lambda: _loop(params, clean, corrupt, cfg)} if loop else {}
    fns[SWEEP] = lambda: edges.edge_patch_sweep(params, clean, corrupt, logit_diff, cfg)
    fns[EAP] = lambda: edges.edge_attribution(params, clean, corrupt, logit_diff, cfg).scores
    fns[IG] = lambda: edges.edge_attribution(params, clean, corrupt, logit_diff, cfg, method="eap-ig", steps=steps).scores
    return fns


def run(args) -> int:
    with warnings.catch_warnings(), num_threads(args.threads) as threads:
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        cfg, params, clean, corrupt = setup(args)
        fns = contenders(cfg, params, clean, corrupt, args.steps, not args.no_loop)
        on = edges.graph(cfg).edges
        exact = fns[SWEEP]()
        if LOOP in fns and (diff := (fns[LOOP]() - exact).abs().max().item()) > TOL:
            raise AssertionError(f"edge_patch_sweep differs from the loop by {diff:.3g} (expected <= {TOL:g})")
        reports = {name: atp_report(exact[on], fns[name]()[on], top=3) for name in (EAP, IG)}
        times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=torch.device("cpu"), unit=1e3)
    print(f"edges of {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads: {int(on.sum())} edges; batch "
          f"{args.batch_size} x {args.seq_len}, {threads} threads; {args.repeats} interleaved repetitions after "
          f"{args.warmup} warm-up, medians" + ("; the sweep equals the loop" if LOOP in fns else ""))
    for name, report in reports.items():
        print(f"\n{name} ({args.steps} steps) vs exact:" if name == IG else f"\n{name} vs exact:", report, sep="\n")
    table = format_table(f"{int(on.sum())} edges", times, EAP, {}, {})
    print(f"\n{table}\n\nspeed-up: this row's median time / EAP's")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftransformer.bench.edges", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
