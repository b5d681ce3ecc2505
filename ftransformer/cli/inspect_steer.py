"""``ftransformer inspect steer``: build a steering vector from two texts, sweep layer x scale, sample with and without.

The vector is the difference of ``resid_post`` at the last token of ``--positive`` and of ``--negative``
(``interp.steering.steering_vector``), one per swept layer. The sweep (``interp.steering.steering_sweep``, one
vmap) scores each (layer, scale) by the mean next-token log-prob of the ``--positive`` text, teacher-forced, and is
drawn as a heatmap to ``--out``. Then ``--max-new-tokens`` tokens after ``--prompt`` are sampled (``--seed``) without
and with ``scale * vector`` added at ``--layer`` (every position), through the compiled decode step on request.
"""

import torch

VIEWS = ("steer",)


def add_arguments(group) -> None:
    group.add_argument("--positive", metavar="TEXT", default=None, help="steer: a text showing the behaviour")
    group.add_argument("--negative", metavar="TEXT", default=None, help="steer: a text without it")
    group.add_argument("--prompt", metavar="TEXT", default=None, help="steer: the text to continue with and without steering")
    group.add_argument("--scale", type=float, metavar="S", default=4.0, help="steer: the vector's scale (default: 4)")
    group.add_argument("--sweep", metavar="LAYERS:SCALES", default=None,
                       help="steer: the sweep's layers and scales, e.g. 0,1,2:-8,-4,0,4,8 (default: every layer : -S,0,S)")
    group.add_argument("--max-new-tokens", type=int, metavar="N", default=24, help="steer: tokens to sample (default: 24)")
    group.add_argument("--step", choices=("eager", "compile"), default="eager",
                       help="steer: the decode step of the samples (default: eager)")


def parse_sweep(text: str | None, n_layers: int, scale: float) -> tuple[list[int], list[float]]:
    """``"0,1:-4,0,4"`` -> ([0, 1], [-4.0, 0.0, 4.0]); None: every layer and (-scale, 0, scale)."""
    if text is None:
        return list(range(n_layers)), [-scale, 0.0, scale]
    try:
        layers, scales = text.split(":")
        layers, scales = [int(x) for x in layers.split(",")], [float(x) for x in scales.split(",")]
    except ValueError:
        raise ValueError(f"--sweep must be LAYERS:SCALES, comma-separated (e.g. 0,1:-4,0,4), got {text!r}") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"--sweep layers must lie in [0, n_layers={n_layers}), got {bad}")
    return layers, scales


def check_args(args) -> None:
    """The steer view's flags, as one-line errors (the others' flags refused with it)."""
    if args.view not in VIEWS:
        named = [f"--{f.replace('_', '-')}" for f in ("positive", "negative", "prompt", "sweep") if getattr(args, f)]
        if named:
            raise ValueError(f"{', '.join(named)} go with the steer view, not {args.view!r}")
        return
    missing = [f"--{f}" for f in ("positive", "negative", "prompt") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"inspect steer needs {' '.join(missing)}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def _ids(text: str, tokenizer, cfg, device, encode) -> torch.Tensor:
    return torch.tensor(encode(text, tokenizer, cfg), dtype=torch.long, device=device)[None]


def _sample(params, cfg, prompt, args, tokenizer, interventions=None) -> str:
    import ftransformer as ft

    n = min(args.max_new_tokens, cfg.max_seq_len - prompt.shape[-1])
    out = ft.generate(params, prompt, cfg, max_new_tokens=n, seed=args.seed, interventions=interventions,
                      step=args.step)
    return tokenizer.decode(out[0, prompt.shape[-1]:].tolist())


def run(args, cfg, params, tokenizer, source, device, encode) -> int:
    """Print the sweep and the two samples; write the sweep's heatmap."""
    from ftransformer.interp import steering
    from ftransformer.interp.plots import plot_steering_sweep

    if args.layer is not None and not 0 <= args.layer < cfg.n_layers:
        raise ValueError(f"--layer must lie in [0, n_layers={cfg.n_layers}), got {args.layer}")
    layers, scales = parse_sweep(args.sweep, cfg.n_layers, args.scale)
    layer = cfg.n_layers // 2 if args.layer is None else args.layer
    pos, neg = (_ids(t, tokenizer, cfg, device, encode) for t in (args.positive, args.negative))
    vectors = {i: steering.steering_vector(params, cfg, pos, neg, f"blocks.{i}.resid_post") for i in {*layers, layer}}

    def logprob(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., :-1, :].log_softmax(-1).gather(-1, pos[..., 1:, None]).mean()

    with torch.no_grad():
        values = steering.steering_sweep(params, cfg, pos, {i: vectors[i] for i in layers}, scales, logprob)
    print(f"steering sweep of {source}: mean next-token log-prob of --positive ({pos.shape[-1]} tokens)")
    print("  layer  " + "  ".join(f"{s:>8g}" for s in scales))
    for i, row in zip(sorted(layers), values):
        print(f"  {i:>5}  " + "  ".join(f"{float(v):8.3f}" for v in row))
    path = plot_steering_sweep(values, sorted(layers), scales, args.out, title=f"{source}: steering sweep",
                               label="mean log-prob of --positive")
    prompt = _ids(args.prompt, tokenizer, cfg, device, encode)
    steered = steering.steer(vectors[layer], f"blocks.{layer}.resid_post", args.scale)
    print(f"\nsamples after {args.prompt!r} (seed {args.seed}, step {args.step}):")
    print(f"  plain             : {_sample(params, cfg, prompt, args, tokenizer)!r}")
    print(f"  layer {layer:>2} x {args.scale:<5g}: {_sample(params, cfg, prompt, args, tokenizer, steered)!r}")
    print(f"wrote {path}")
    return 0
