"""``ftransformer inspect curvature``: the loss Hessian's top eigenvalues and trace, whole model and per layer.

The loss is the mean next-token cross-entropy on ``--text`` (or, without it, on ``--batch`` random sequences
from ``--seed``). Printed: the ``--top-k`` largest eigenvalues (Lanczos, ``--iters`` steps) and the trace
(Hutchinson, ``--probes`` Rademacher probes, with its standard error) of the whole model's Hessian and of each
layer's block of it; written: the whole model's spectral density (stochastic Lanczos quadrature) as ``--out``.
"""

import torch

VIEWS = ("curvature",)


def add_arguments(group) -> None:
    group.add_argument("--top-k", type=int, metavar="K", default=3, help="curvature: eigenvalues to print (default: 3)")
    group.add_argument("--iters", type=int, metavar="N", default=16, help="curvature: Lanczos steps (default: 16)")
    group.add_argument("--probes", type=int, metavar="N", default=8,
                       help="curvature: Hutchinson probes, and a quarter as many spectral-density probes (default: 8)")


def check_args(args) -> None:
    """The curvature view's numbers, as one-line errors."""
    if args.view not in VIEWS:
        return
    if args.top_k < 1 or args.iters < args.top_k:
        raise ValueError(f"--iters must be >= --top-k >= 1, got --top-k {args.top_k} --iters {args.iters}")
    if args.probes < 2:
        raise ValueError(f"--probes must be >= 2, got {args.probes}")


def _tokens(args, cfg, tokenizer, device, encode):
    if args.text is not None:
        return torch.tensor(encode(args.text, tokenizer, cfg), dtype=torch.long, device=device)[None]
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len), generator=gen).to(device)


def run(args, cfg, params, tokenizer, source, device, encode) -> int:
    """Print the eigenvalues and traces, and write the spectral density plot."""
    import ftransformer as ft
    from ftransformer.attribution import curvature, plots

    tokens = _tokens(args, cfg, tokenizer, device, encode)
    if tokens.shape[-1] < 2:
        raise ValueError("inspect curvature needs at least 2 tokens (a next-token loss)")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    key = ft.random.key(args.seed)
    print(f"Hessian of the next-token loss of {source} on {tokens.shape[0]} x {inputs.shape[-1]} tokens")
    print(f"  {'part':<10} {'params':>9}  {'trace +- stderr':>23}  top eigenvalues")
    groups = {"model": None, **curvature.layer_paths(params)}
    for name, paths in groups.items():
        like = curvature.select(params, paths)
        matvec = lambda v, paths=paths: curvature.hvp(  # noqa: E731
            lambda p: ft.loss_fn(p, inputs, targets, cfg), params, v, paths=paths)
        n = sum(x.numel() for x in like.values())
        k = min(args.top_k, n)
        top = curvature.top_eigenvalues(matvec, like, k, key=key, iters=min(args.iters, n))
        trace = curvature.hutchinson_trace(matvec, like, key=key, samples=args.probes)
        shown = "  ".join(f"{float(v):.4g}" for v in top)
        print(f"  {name:<10} {n:>9}  {float(trace.estimate):>11.4g} +- {float(trace.stderr):<8.2g}  {shown}")
        if name == "model":
            density = curvature.spectral_density(matvec, like, key=key, probes=max(1, args.probes // 4), iters=args.iters)
    path = plots.plot_spectrum(density, args.out, title=f"{source}: Hessian spectral density")
    print(f"wrote {path}")
    return 0
