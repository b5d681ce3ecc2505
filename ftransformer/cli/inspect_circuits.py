"""``ftransformer inspect patching | attribution | edges``: find what carries a behaviour, from two prompts.

The views run a model on a *clean* prompt and a *corrupted* one of the same token length, score each run
with a metric of its logits, and ask which slices of one site -- every layer, position and/or head --
carry the difference:

* ``patching``: exact activation patching (``interp.patch_sweep``), one patched run per slice;
* ``attribution``: attribution patching (``interp.attribution_patch``, AtP; AtP* for ``attn.q`` /
  ``attn.k``), every slice estimated from one forward + backward; ``--compare`` runs the exact sweep
  too and prints ``interp.atp_report`` (correlation, the largest misses);
* ``edges``: every edge writer -> reader of the model's graph (``interp.graph``: the embedding, heads and
  MLPs -> each head's q / k / v input, each MLP's input, the logits) scored by EAP or EAP-IG
  (``interp.edge_attribution``) or patched exactly one by one (``--method exact``,
  ``interp.edge_patch_sweep``); ``--compare`` prints the estimate next to the exact sweep,
  ``--faithfulness`` the metric kept by the circuits of the top-k edges (``interp.faithfulness``) with the
  rest ablated, as a table and a curve (``interp.plots.plot_faithfulness``).

The first two print the clean and corrupted metrics and the slices with the largest effects, and draws the whole
sweep as a heatmap (``interp.plots.plot_patching``) of the *change* of the metric from the base run (the
corrupted run when denoising, the clean one when noising), red where a patch raises the metric. ``edges`` prints the top edges by |score| and draws them as a graph
(``interp.plots.plot_edges``).

Metrics, all at the last position unless said: ``logit-diff`` (the logit of ``--answer`` minus that of
``--wrong``), ``logprob`` (the log-probability of ``--answer``), ``loss`` (the mean next-token loss of
predicting the clean prompt's tokens, at every position).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from ftransformer import interp
from ftransformer.cli import inspect_influence
from ftransformer.interp.patching import HEAD_SITES
from ftransformer.interp.edges import ABLATIONS, EdgeScores, sweep_cost, top_edges
from ftransformer.interp.plots import plot_edges, plot_faithfulness, plot_patching

METRICS = ("logit-diff", "logprob", "loss")
# --answer TEXT without a leading space: warn when " TEXT" is this many times likelier at the last position.
SPACE_RATIO = 10.0
VIEWS = ("patching", "attribution", "edges")
EDGE_METHODS = ("eap", "eap-ig", "exact")
# The flags of one view or two, default None so that a flag given to another view can be named.
ONLY = {"by": ("patching", "attribution"), "site": ("patching", "attribution"), "correction": ("attribution",),
        "compare": ("attribution", "edges"), "method": ("edges",), "steps": ("edges",), "ablation": ("edges",),
        "faithfulness": ("edges",), "curve_out": ("edges",), "compare_edges": ("edges",)}
# edges --compare over more edges than this: print the estimated time and the flag that bounds it first.
BIG_SWEEP = 2000
# The edges view's own flags (each default None: given or not).
EDGE_FLAGS = {
    "--method": dict(choices=(*EDGE_METHODS, *inspect_influence.METHODS),
                     help="edges: eap (one forward + backward), eap-ig (integrated gradients) or exact (every edge "
                          "patched alone) (default: eap-ig); influence: projected or ekfac (default: projected)"),
    "--steps": dict(type=int, metavar="M", help="edges: EAP-IG's integration steps (default: 5)"),
    "--faithfulness": dict(action="store_true", help="edges: the metric of the top-k circuits, every other edge ablated, "
                                                     "printed and plotted"),
    "--ablation": dict(metavar="KINDS", help="edges --faithfulness: how the edges outside a circuit are ablated, "
                                             "comma-separated, any of corrupt (the corrupted run's writes, as ACDC and "
                                             "EAP-IG measure faithfulness), mean (each writer's mean over both prompts "
                                             "at every position) or zero (default: corrupt)"),
    "--compare-edges": dict(type=int, metavar="N", help="edges --compare: patch exactly only the N edges the estimate "
                                                        "ranks highest (default: every edge, with a warning and an "
                                                        f"estimate above {BIG_SWEEP} edges)"),
    "--curve-out": dict(metavar="FILE.png", help="edges --faithfulness: where to draw the curve (default: --out's name "
                                                 "with -faithfulness)"),
}


def add_arguments(group) -> None:
    """The flags of the patching and attribution views."""
    group.add_argument("--clean", metavar="TEXT", default=None, help="patching, attribution, edges: the clean prompt")
    group.add_argument("--corrupt", metavar="TEXT", default=None,
                       help="patching, attribution, edges: the corrupted prompt (the same number of tokens as --clean)")
    group.add_argument("--metric", choices=METRICS, default="logit-diff",
                       help="patching, attribution, edges: logit-diff (--answer minus --wrong at the last position), "
                            "logprob (of --answer at the last position) or loss (of the clean tokens) (default: logit-diff)")
    group.add_argument("--answer", metavar="TOKEN", default=None, help="logit-diff, logprob: the right next token (one token)")
    group.add_argument("--wrong", metavar="TOKEN", default=None, help="logit-diff: the wrong next token (one token)")
    group.add_argument("--site", choices=interp.patching.SITES, default=None,
                       help="patching, attribution: the activation to patch (default: resid_pre)")
    group.add_argument("--by", metavar="AXES", default=None,
                       help="patching, attribution: the sweep's axes, comma-separated: layer and any of position, head "
                            "(default: layer,head for attn.* sites, else layer,position)")
    group.add_argument("--direction", choices=interp.patching.DIRECTIONS, default="denoise",
                       help="denoise: clean values into the corrupted run; noise: corrupted into the clean (default: denoise)")
    group.add_argument("--top", type=int, metavar="N", default=10,
                       help="patching, attribution, edges: rows of the printed table; edges: also the edges drawn (default: 10)")
    group.add_argument("--compare", action="store_true", default=None,
                       help="attribution, edges: run the exact sweep too and print the estimate next to it")
    group.add_argument("--correction", action=argparse.BooleanOptionalAction, default=None,
                       help="attribution: AtP* for attn.q / attn.k (default: on)")
    group.add_argument("--chunk", type=int, metavar="N", default=64,
                       help="patching, attribution, edges: patched runs (edges, circuits) computed at once; bounds the "
                            "memory (default: 64)")
    for flag, kwargs in EDGE_FLAGS.items():
        group.add_argument(flag, default=None, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Flags that do not fit the view, and missing ones, as one-line errors."""
    if args.view not in VIEWS:
        given = [f for f in ("clean", "corrupt", "answer", "wrong", *ONLY)
                 if getattr(args, f) is not None and not (f == "method" and args.view in inspect_influence.VIEWS)]
        if given:
            raise ValueError(f"{', '.join(map(_flag, given))} go with the {', '.join(VIEWS)} views, not {args.view!r}")
        return
    if args.text is not None:
        raise ValueError(f"inspect {args.view} runs on two prompts: give --clean TEXT and --corrupt TEXT, not --text")
    if args.clean is None or args.corrupt is None:
        raise ValueError(f"inspect {args.view} needs --clean TEXT and --corrupt TEXT")
    for name, views in ONLY.items():
        if getattr(args, name) is not None and args.view not in views:
            raise ValueError(f"{_flag(name)} goes with the {' and '.join(views)} view{'s' * (len(views) > 1)}, not {args.view!r}")
    need = {"logit-diff": ("answer", "wrong"), "logprob": ("answer",), "loss": ()}[args.metric]
    for flag in ("answer", "wrong"):
        if flag in need and getattr(args, flag) is None:
            raise ValueError(f"--metric {args.metric} needs --{flag} TOKEN")
        if flag not in need and getattr(args, flag) is not None:
            raise ValueError(f"--{flag} does not go with --metric {args.metric}")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.view == "edges":
        check_edge_args(args)


def check_edge_args(args) -> None:
    """The edges view's own flags: --steps with eap-ig, --compare with an estimate, the curve's flags with --faithfulness."""
    method = args.method or "eap-ig"
    if method not in EDGE_METHODS:
        raise ValueError(f"inspect edges --method must be one of {', '.join(EDGE_METHODS)}, got {method!r}")
    if args.steps is not None and method != "eap-ig":
        raise ValueError(f"--steps goes with --method eap-ig, not {method}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.compare and method == "exact":
        raise ValueError("--compare puts an estimate next to exact edge patching; --method exact is the exact sweep itself")
    for name in ("ablation", "curve_out"):
        if getattr(args, name) is not None and not args.faithfulness:
            raise ValueError(f"{_flag(name)} goes with --faithfulness")
    if args.compare_edges is not None and (not args.compare or args.compare_edges < 1):
        raise ValueError(f"--compare-edges N goes with --compare and N >= 1, got {args.compare_edges}"
                         + ("" if args.compare else " without --compare"))
    for kind in ablations(args):
        if kind not in ABLATIONS:
            raise ValueError(f"--ablation must be one or more of {', '.join(ABLATIONS)} (comma-separated), got {kind!r}")


def ablations(args) -> list[str]:
    """The kinds of ablation ``--ablation`` names, in its order (default: corrupt)."""
    if args.ablation is None:
        return ["corrupt"]
    kinds = [a.strip() for a in args.ablation.split(",") if a.strip()]
    return kinds or [""]


def encode_pair(clean: str, corrupt: str, tokenizer, cfg) -> tuple[list[int], list[int]]:
    """Both prompts' token ids, checked to be the same length (cropped alike to the last ``max_seq_len``)."""
    ids = {}
    for name, text in (("clean", clean), ("corrupt", corrupt)):
        ids[name] = tokenizer.encode(text)
        if not ids[name]:
            raise ValueError(f"--{name} encodes to no tokens; give at least one character")
    if len(ids["clean"]) != len(ids["corrupt"]):
        raise ValueError(f"--clean and --corrupt must be the same number of tokens, got {len(ids['clean'])} "
                         f"and {len(ids['corrupt'])} tokens")
    if len(ids["clean"]) > cfg.max_seq_len:
        print(f"note: the prompts are {len(ids['clean'])} tokens and max_seq_len={cfg.max_seq_len}: using their "
              f"last {cfg.max_seq_len}", file=sys.stderr)
    return ids["clean"][-cfg.max_seq_len:], ids["corrupt"][-cfg.max_seq_len:]


def one_token(flag: str, text: str, tokenizer, last_logits: torch.Tensor | None = None) -> int:
    """``--answer`` / ``--wrong`` as its one token id, said on stdout (which token the text became); with the
    clean run's last logits, a warning on stderr when the leading-space variant is far likelier."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"--{flag} must be one token, got {text!r}, which encodes to {len(ids)} tokens {ids}")
    print(f"--{flag} {text!r} is token {ids[0]} {tokenizer.decode(ids)!r}")
    spaced = tokenizer.encode(" " + text) if not text.startswith(" ") else []
    if last_logits is not None and len(spaced) == 1 and spaced[0] != ids[0]:
        logp = torch.log_softmax(last_logits.detach().float().reshape(-1, last_logits.shape[-1]), dim=-1).mean(0)
        ratio = float((logp[spaced[0]] - logp[ids[0]]).exp())
        if ratio >= SPACE_RATIO:
            print(f"warning: --{flag} {text!r} (token {ids[0]}) is {ratio:.3g}x less likely at the last position than "
                  f"{' ' + text!r} (token {spaced[0]}), its leading-space variant; did you mean --{flag} {' ' + text!r}?",
                  file=sys.stderr)
    return ids[0]


def make_metric(args, tokenizer, clean: torch.Tensor, last_logits: torch.Tensor | None = None):
    """``(metric, description, positions)``: the scalar function of the logits the flags ask for, and the
    positions it reads (None: all; the patched runs unembed only those)."""
    if args.metric == "loss":
        targets = clean[1:]

        def loss(logits: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), targets.reshape(-1))

        return loss, "loss (mean next-token cross-entropy of the clean prompt)", None
    answer = one_token("answer", args.answer, tokenizer, last_logits)
    if args.metric == "logprob":
        def logprob(logits: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(logits[..., -1, :], dim=-1)[..., answer].mean()

        return logprob, f"log-probability of {args.answer!r} at the last position", [-1]
    wrong = one_token("wrong", args.wrong, tokenizer, last_logits)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[..., -1, answer] - logits[..., -1, wrong]).mean()

    return logit_diff, f"logit difference {args.answer!r} - {args.wrong!r} at the last position", [-1]


def parse_by(args) -> tuple[str, ...]:
    if args.by is None:
        return ("layer", "head") if args.site in HEAD_SITES else ("layer", "position")
    return tuple(a.strip() for a in args.by.split(",") if a.strip())


def format_top(columns: dict[str, torch.Tensor], by: tuple, labels: list[str], top: int) -> str:
    """The ``top`` entries with the largest |first column|, one row each: their index along ``by`` (a
    position with its token), then every column's value there."""
    first = next(iter(columns.values()))
    order = first.flatten().abs().argsort(descending=True)[:top].tolist()
    head = "".join(f"{a:>9}" for a in by) + "  token   " * ("position" in by) + "".join(f"{n:>12}" for n in columns)
    lines = [head]
    for j in order:
        index = dict(zip(by, (int(i) for i in torch.unravel_index(torch.tensor(j), first.shape))))
        row = "".join(f"{index[a]:>9}" for a in by)
        if "position" in by:
            row += f"  {labels[index['position']]!r:<8}"
        lines.append(row + "".join(f"{float(c.flatten()[j]):>12.4g}" for c in columns.values()))
    return "\n".join(lines)


def run(args, cfg, params, tokenizer, source: str, device: torch.device) -> int:
    """The patching, attribution or edges view on a loaded model."""
    clean_ids, corrupt_ids = encode_pair(args.clean, args.corrupt, tokenizer, cfg)
    clean = torch.tensor(clean_ids, dtype=torch.long, device=device)
    corrupt = torch.tensor(corrupt_ids, dtype=torch.long, device=device)
    with torch.no_grad():
        clean_logits = interp.forward_with_activations(params, clean, cfg)[0]
        metric, described, at = make_metric(args, tokenizer, clean, clean_logits[..., -1, :])
        clean_metric = float(metric(clean_logits))
        corrupt_metric = float(metric(interp.forward_with_activations(params, corrupt, cfg)[0]))
    base = corrupt_metric if args.direction == "denoise" else clean_metric
    what = "clean values into the corrupted run" if args.direction == "denoise" else "corrupted values into the clean run"
    if args.view == "edges":
        print(f"{source}: edges writer -> reader, {args.direction} ({what}), {len(clean_ids)} tokens")
    else:
        args.site = args.site or "resid_pre"
        print(f"{source}: {args.site} by {' x '.join(parse_by(args))}, {args.direction} ({what}), {len(clean_ids)} tokens")
    print(f"metric: {described}")
    print(f"clean run {clean_metric:.4f}, corrupted run {corrupt_metric:.4f}; the tables give the change from {base:.4f}")
    labels = [tokenizer.decode([i]) for i in clean_ids]
    if args.view == "edges":
        return run_edges(args, cfg, params, (clean, corrupt, metric, at), source)
    return run_sweep(args, cfg, params, (clean, corrupt, metric, at), base, labels, source)


def run_sweep(args, cfg, params, prompts: tuple, base: float, labels: list[str], source: str) -> int:
    """The patching or attribution view: the sweep (or its estimate) of one site, its largest effects and heatmap."""
    clean, corrupt, metric, at = prompts
    by = parse_by(args)
    correction = args.correction is not False
    sweep_args = dict(site=args.site, by=by, direction=args.direction, chunk=args.chunk, logits_at=at, progress=True)
    if args.view == "patching":
        with torch.no_grad():
            change = interp.patch_sweep(params, clean, corrupt, metric, cfg, **sweep_args) - base
        columns, name = {"change": change}, "exact patching"
    else:
        change = interp.attribution_patch(params, clean, corrupt, metric, cfg, correction=correction, **sweep_args).detach()
        star = correction and args.site in ("attn.q", "attn.k")
        columns, name = {"estimate": change}, "AtP*" if star else "AtP"
        if args.compare:
            with torch.no_grad():
                exact = interp.patch_sweep(params, clean, corrupt, metric, cfg, **sweep_args) - base
            columns["exact"] = exact
    print()
    print(f"{name}: the {min(args.top, change.numel())} largest of {change.numel()} effects")
    print(format_top(columns, by, labels, args.top))
    if "exact" in columns:
        print()
        print(f"{name} next to exact patching:")
        print(interp.atp_report(columns["exact"], change, top=min(args.top, change.numel())))
    path = plot_patching(change, args.out, by=by, labels=labels if "position" in by else None,
                         title=f"{source}: {name} of {args.site}, {args.direction}", label=f"change of {args.metric}")
    print(f"wrote {path}")
    return 0


def edge_names(g) -> list[str]:
    """``"writer -> reader"`` for every existing edge of graph ``g``, in the order of ``g.edges.nonzero()``."""
    return [f"{g.writers[u]} -> {g.readers[v]}" for u, v in g.edges.nonzero().tolist()]


def format_edges(columns: dict[str, torch.Tensor], g, top: int) -> str:
    """The ``top`` edges with the largest |first column| (each column ``[writers, readers]``), one row each."""
    names = edge_names(g)
    values = {n: c.detach()[g.edges.to(c.device)].cpu() for n, c in columns.items()}
    first = next(iter(values.values()))
    width = max(len(n) for n in names)
    lines = [f"  {'rank':>4}  {'edge':<{width}}" + "".join(f"{n:>12}" for n in values)]
    for rank, j in enumerate(first.abs().argsort(descending=True)[:top].tolist(), 1):
        lines.append(f"  {rank:>4}  {names[j]:<{width}}" + "".join(f"{float(c[j]):>12.4g}" for c in values.values()))
    return "\n".join(lines)


def edge_report(exact: torch.Tensor, estimate: torch.Tensor, g, top: int) -> str:
    """``interp.atp_report`` of the estimate against the exact sweep over the graph's edges, each index named."""
    on = g.edges.to(exact.device)
    first, header, *rows = interp.atp_report(exact[on], estimate.detach()[on], top=top).splitlines()
    names = edge_names(g)
    width = max(len(n) for n in names)
    lines = [re.sub(r"^(\d+) patches,", r"\1 edges,", first), f"  {'edge':<{width}}" + header.split("index", 1)[1]]
    for row in rows:
        j, rest = re.fullmatch(r"\s*\((\d+),\)(.*)", row).groups()
        lines.append(f"  {names[int(j)]:<{width}}" + rest)
    return "\n".join(lines)


def edge_scores(args, cfg, params, prompts: tuple) -> tuple[str, EdgeScores]:
    """``(the method's name, its scores)``: EAP, EAP-IG or exact edge patching, as the flags ask."""
    clean, corrupt, metric, at = prompts
    method = args.method or "eap-ig"
    if method not in EDGE_METHODS:
        raise ValueError(f"inspect edges --method must be one of {', '.join(EDGE_METHODS)}, got {method!r}")
    if method == "exact":
        warn_big_sweep(params, clean, cfg, None, "--method exact", "--method eap-ig (an estimate of every edge)")
        with torch.no_grad():
            sweep = interp.edge_patch_sweep(params, clean, corrupt, metric, cfg, direction=args.direction, chunk=args.chunk,
                                            logits_at=at, progress=True)
        return "exact edge patching", EdgeScores(sweep, interp.graph(cfg))
    steps = 5 if args.steps is None else args.steps
    scores = interp.edge_attribution(params, clean, corrupt, metric, cfg, method=method, steps=steps, direction=args.direction,
                                     chunk=args.chunk, progress=True)
    name = f"EAP-IG ({steps} steps)" if method == "eap-ig" else "EAP"
    return name, EdgeScores(scores.scores.detach(), scores.graph)


def block_seconds(params, tokens: torch.Tensor, cfg, runs: int = 16) -> float:
    """Seconds one block takes on one run of ``tokens``, timed on a batch of ``runs`` copies (the sweeps' batches)."""
    import time

    batch = tokens.expand(runs, *tokens.shape)
    with torch.no_grad():
        start = time.perf_counter()
        interp.forward_with_activations(params, batch, cfg)
    return (time.perf_counter() - start) / (runs * cfg.n_layers)


def warn_big_sweep(params, tokens: torch.Tensor, cfg, only, what: str, bound: str) -> None:
    """Before an exact edge sweep: its edge count and estimated time; above ``BIG_SWEEP`` edges, a warning with
    the flag that bounds it (on stderr)."""
    g = interp.graph(cfg)
    n = int((g.edges if only is None else g.edges & only.cpu()).sum())
    seconds = sweep_cost(cfg, only) * block_seconds(params, tokens, cfg)
    print(f"{what}: exact patching of {n} edges, about {seconds:.0f} s ({seconds / 60:.1f} min) on this machine", file=sys.stderr)
    if n > BIG_SWEEP:
        print(f"warning: {n} edges is a long sweep; {bound} bounds it", file=sys.stderr)


def run_edges(args, cfg, params, prompts: tuple, source: str) -> int:
    """The edges view: the top edges by |score| (and the exact sweep's value), the graph image, and with
    --faithfulness the metric the top-k circuits keep."""
    clean, corrupt, metric, at = prompts
    name, scores = edge_scores(args, cfg, params, prompts)
    g = scores.graph
    n = int(g.edges.sum())
    columns = {"score" if args.method != "exact" else "change": scores.scores}
    if args.compare:
        only = None if args.compare_edges is None else top_edges(scores, min(args.compare_edges, n))
        warn_big_sweep(params, clean, cfg, only, "--compare", "--compare-edges N (the top N edges by the estimate)")
        with torch.no_grad():
            columns["exact"] = interp.edge_patch_sweep(params, clean, corrupt, metric, cfg, direction=args.direction,
                                                       chunk=args.chunk, only=only, logits_at=at, progress=True)
        if only is not None:
            g = g._replace(edges=g.edges & only.cpu())
            n = int(g.edges.sum())
    print()
    among = " compared (--compare-edges: the estimate's top)" if args.compare_edges is not None else ""
    print(f"{name}: the {min(args.top, n)} largest of {n} edges{among} ({len(g.writers)} writers, {len(g.readers)} readers)")
    print(format_edges(columns, g, args.top))
    if args.compare:
        print()
        print(f"{name} next to exact edge patching:")
        print(edge_report(columns["exact"], scores.scores, g, min(args.top, n)))
    path = plot_edges(scores, args.out, k=args.top, title=f"{source}: top {min(args.top, n)} edges by {name}, {args.direction}")
    print(f"wrote {path}")
    if args.faithfulness:
        curves = []
        with torch.no_grad():
            for kind in ablations(args):
                curves.append(interp.faithfulness(params, clean, corrupt, metric, cfg, scores, ablation=kind, chunk=args.chunk,
                                                  progress=True))
        print()
        print(format_faithfulness(curves, name))
        out = Path(args.out)
        curve_out = args.curve_out or out.with_name(f"{out.stem}-faithfulness{out.suffix or '.png'}")
        path = plot_faithfulness(curves, curve_out, title=f"faithfulness of the top-k circuits by {name}")
        print(f"wrote {path}")
    return 0


def format_faithfulness(curves: list, name: str) -> str:
    """The metric and the normalized metric of each top-k circuit, one row per k, a pair of columns per ablation."""
    lines = [f"faithfulness of the circuits of the top k edges by {name}, on the clean prompt (the rest ablated; "
             "normalized: (M - M(empty)) / (M(full) - M(empty)))"]
    lines.append("  " + " " * 6 + "".join(f"{c.ablation + ' ablation':>24}" for c in curves))
    lines.append(f"  {'k':>6}" + "".join(f"{'metric':>12}{'normalized':>12}" for _ in curves))
    for j, k in enumerate(curves[0].ks):
        lines.append(f"  {k:>6}" + "".join(f"{float(c.metric[j]):>12.4f}{float(c.normalized[j]):>12.3f}" for c in curves))
    lines.append("  " + "; ".join(f"{c.ablation}: full {c.full:.4f}, empty {c.empty:.4f}" for c in curves))
    return "\n".join(lines)
