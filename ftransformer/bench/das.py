"""``ftransformer bench das``: a (layer x position) DAS sweep, ours as ONE stacked step vs pyvene one hypothesis at a time.

Both sides train on the same counterfactual pairs of the same model: ``interp.planted``'s echo model (the
variable "last token" in a planted 2-D subspace at the last position of every layer), which ``interop.save_hf``
writes as a ``transformers`` Llama for pyvene (its logits checked against ours first). Ours is
``interp.das_sweep`` over every (layer, position) at one ``k`` (each member run from its own layer, all in one
batched pass); pyvene's is what its tutorials do for each hypothesis: an ``IntervenableModel`` with a
``RotatedSpaceIntervention`` on that layer's ``block_output`` at that position, trained by ``torch.optim.Adam``
(same learning rate, steps and full batch), then IIA on the same held-out pairs. End-to-end time (model
conversion, training, evaluation) on the process's CPU clock, one thread.
pyvene is optional (the ``bench`` extra): without it the bench says so and times ours alone.
"""

import argparse
import tempfile
import time

import torch

from ftransformer.bench.timing import num_threads
from ftransformer.interp import planted
from ftransformer.interp.hypotheses import das_sweep
from ftransformer.model import forward


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="layers of the planted model (all swept)")
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4, help="sequence length (every position swept)")
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (full batch)")
    parser.add_argument("--test-pairs", type=int, default=256, help="held-out pairs for IIA")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=2, help="the swapped subspace size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pyvene", action="store_true", help="time ours alone")
    parser.set_defaults(_bench_run=run)


def setup(args) -> tuple:
    """The planted model, its config and the (train, test) pairs."""
    cfg = planted.planted_config(vocab=8, d_model=args.d_model, n_layers=args.layers, seq=args.seq, n_heads=2)
    params = planted.planted_model(cfg)
    return cfg, params, planted.pairs(args.pairs, cfg, seed=1), planted.pairs(args.test_pairs, cfg, seed=2)


def ours(args, cfg, params, train, test) -> torch.Tensor:
    """IIA ``[layers, positions]`` of the whole sweep, trained by one stacked step per iteration."""
    result = das_sweep(params, cfg, train, test, layers=range(cfg.n_layers), positions=range(cfg.max_seq_len),
                       ks=[args.k], steps=args.steps, lr=args.lr)
    return result.iia[..., 0]


def load_pyvene():
    """``(pyvene, transformers)``, or ``(None, why)`` when pyvene does not import."""
    try:
        import pyvene
        import transformers
    except Exception as error:  # an optional peer: any import failure means "not here"
        return None, f"{type(error).__name__}: {error}"
    return pyvene, transformers


def hf_model(transformers, cfg, params, directory: str):
    """Our params as a ``transformers`` Llama (``interop.save_hf``), eval mode, float32."""
    from ftransformer.interop.hf import save_hf

    save_hf(params, cfg, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def pyvene_one(pv, model, layer: int, position: int, args, train, test) -> float:
    """pyvene's DAS for one hypothesis, as its tutorials train it; returns held-out IIA."""
    config = pv.IntervenableConfig(representations=[pv.RepresentationConfig(layer, "block_output", "pos", 1)],
                                   intervention_types=pv.RotatedSpaceIntervention)
    intervenable = pv.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    for intervention in intervenable.interventions.values():
        (intervention[0] if isinstance(intervention, tuple) else intervention).set_interchange_dim(args.k)
    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=args.lr)

    def run(base, source):
        where = [[[position % base.shape[1]]] * base.shape[0]]
        _, out = intervenable({"input_ids": base}, [{"input_ids": source}], {"sources->base": (where, where)},
                              subspaces=[[list(range(args.k))] * base.shape[0]])
        return out.logits[:, -1]

    base, source, labels = train
    for _ in range(args.steps):
        loss = torch.nn.functional.cross_entropy(run(base, source), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return float((run(*test[:2]).argmax(-1) == test[2]).float().mean())


def pyvene_sweep(pv, transformers, args, cfg, params, train, test) -> torch.Tensor:
    """IIA ``[layers, positions]``: pyvene trained once per hypothesis, after converting our model."""
    with tempfile.TemporaryDirectory() as directory:
        model = hf_model(transformers, cfg, params, directory)
        with torch.no_grad():
            gap = (model(input_ids=test[0]).logits - forward(params, test[0], cfg)).abs().max()
        if gap > 1e-4:
            raise RuntimeError(f"the transformers model's logits differ from ours by {float(gap):.2e}")
        return torch.tensor([[pyvene_one(pv, model, layer, p, args, train, test) for p in range(cfg.max_seq_len)]
                             for layer in range(cfg.n_layers)])


def timed(fn) -> tuple[float, object]:
    """``(process CPU seconds, result)`` of one call."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def format_table(rows: list[tuple[str, float, torch.Tensor]], cfg, args) -> str:
    """The README table: time and IIA per hypothesis for each contender, then the ratio and the largest IIA gap."""
    lines = [f"DAS sweep: {cfg.n_layers} layers x {cfg.max_seq_len} positions, k={args.k}, d_model={cfg.d_model}, "
             f"{args.pairs} train / {args.test_pairs} test pairs, {args.steps} steps (CPU time, {args.threads} thread)",
             "| contender | time (s) | IIA per (layer, position) |", "|---|---|---|"]
    for name, seconds, iia in rows:
        lines.append(f"| {name} | {seconds:.2f} | {iia.tolist()} |")
    if len(rows) == 2:
        gap = float((rows[0][2] - rows[1][2]).abs().max())
        lines.append(f"speed-up (pyvene / ours): {rows[1][1] / rows[0][1]:.1f}x; largest IIA gap: {100 * gap:.1f} points")
    return "\n".join(lines)


def run(args) -> int:
    cfg, params, train, test = setup(args)
    pv, transformers = (None, "--no-pyvene") if args.no_pyvene else load_pyvene()
    with num_threads(args.threads):
        rows = [("ftransformer (one stacked step)", *timed(lambda: ours(args, cfg, params, train, test)))]
        if pv is None:
            print(f"pyvene skipped ({transformers}); install the bench extra to compare")
        else:
            rows.append(("pyvene (one at a time)", *timed(lambda: pyvene_sweep(pv, transformers, args, cfg, params, train, test))))
    print(format_table(rows, cfg, args))
    return 0
