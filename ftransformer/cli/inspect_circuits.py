"""``ftransformer inspect patching | attribution``: find what carries a behaviour, from two prompts.

Both views run a model on a *clean* prompt and a *corrupted* one of the same token length, score each run
with a metric of its logits, and ask which slices of one site -- every layer, position and/or head --
carry the difference:

* ``patching``: exact activation patching (``interp.patch_sweep``), one patched run per slice;
* ``attribution``: attribution patching (``interp.attribution_patch``, AtP; AtP* for ``attn.q`` /
  ``attn.k``), every slice estimated from one forward + backward; ``--compare`` runs the exact sweep
  too and prints ``interp.atp_report`` (correlation, the largest misses).

Each prints the clean and corrupted metrics and the slices with the largest effects, and draws the whole
sweep as a heatmap (``interp.plots.plot_patching``) of the *change* of the metric from the base run (the
corrupted run when denoising, the clean one when noising), red where a patch raises the metric.

Metrics, all at the last position unless said: ``logit-diff`` (the logit of ``--answer`` minus that of
``--wrong``), ``logprob`` (the log-probability of ``--answer``), ``loss`` (the mean next-token loss of
predicting the clean prompt's tokens, at every position).
"""

import argparse
import sys

import torch

from ftransformer import interp
from ftransformer.interp.patching import HEAD_SITES
from ftransformer.interp.plots import plot_patching

METRICS = ("logit-diff", "logprob", "loss")


def add_arguments(group) -> None:
    """The flags of the patching and attribution views."""
    group.add_argument("--clean", metavar="TEXT", default=None, help="patching, attribution: the clean prompt")
    group.add_argument("--corrupt", metavar="TEXT", default=None,
                       help="patching, attribution: the corrupted prompt (the same number of tokens as --clean)")
    group.add_argument("--metric", choices=METRICS, default="logit-diff",
                       help="patching, attribution: logit-diff (--answer minus --wrong at the last position), "
                            "logprob (of --answer at the last position) or loss (of the clean tokens) (default: logit-diff)")
    group.add_argument("--answer", metavar="TOKEN", default=None, help="logit-diff, logprob: the right next token (one token)")
    group.add_argument("--wrong", metavar="TOKEN", default=None, help="logit-diff: the wrong next token (one token)")
    group.add_argument("--site", choices=interp.patching.SITES, default="resid_pre",
                       help="patching, attribution: the activation to patch (default: resid_pre)")
    group.add_argument("--by", metavar="AXES", default=None,
                       help="patching, attribution: the sweep's axes, comma-separated: layer and any of position, head "
                            "(default: layer,head for attn.* sites, else layer,position)")
    group.add_argument("--direction", choices=interp.patching.DIRECTIONS, default="denoise",
                       help="denoise: clean values into the corrupted run; noise: corrupted into the clean (default: denoise)")
    group.add_argument("--top", type=int, metavar="N", default=10, help="patching, attribution: rows of the printed table (default: 10)")
    group.add_argument("--compare", action="store_true", help="attribution: run the exact sweep too and print AtP next to it")
    group.add_argument("--correction", action=argparse.BooleanOptionalAction, default=True,
                       help="attribution: AtP* for attn.q / attn.k (default: on)")


def check_args(args) -> None:
    """Flags that do not fit the view, and missing ones, as one-line errors."""
    circuit = args.view in ("patching", "attribution")
    given = [f for f in ("clean", "corrupt", "answer", "wrong", "by") if getattr(args, f) is not None]
    if not circuit:
        if given or args.compare:
            flags = ", ".join("--" + f for f in given + (["compare"] if args.compare else []))
            raise ValueError(f"{flags} go with the patching and attribution views, not {args.view!r}")
        return
    if args.text is not None:
        raise ValueError(f"inspect {args.view} runs on two prompts: give --clean TEXT and --corrupt TEXT, not --text")
    if args.clean is None or args.corrupt is None:
        raise ValueError(f"inspect {args.view} needs --clean TEXT and --corrupt TEXT")
    if args.compare and args.view != "attribution":
        raise ValueError("--compare goes with the attribution view (patching is the exact sweep itself)")
    need = {"logit-diff": ("answer", "wrong"), "logprob": ("answer",), "loss": ()}[args.metric]
    for flag in ("answer", "wrong"):
        if flag in need and getattr(args, flag) is None:
            raise ValueError(f"--metric {args.metric} needs --{flag} TOKEN")
        if flag not in need and getattr(args, flag) is not None:
            raise ValueError(f"--{flag} does not go with --metric {args.metric}")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")


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


def one_token(flag: str, text: str, tokenizer) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"--{flag} must be one token, got {text!r}, which encodes to {len(ids)} tokens {ids}")
    return ids[0]


def make_metric(args, tokenizer, clean: torch.Tensor):
    """``(metric, description)``: the scalar function of the logits the flags ask for."""
    if args.metric == "loss":
        targets = clean[1:]

        def loss(logits: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), targets.reshape(-1))

        return loss, "loss (mean next-token cross-entropy of the clean prompt)"
    answer = one_token("answer", args.answer, tokenizer)
    if args.metric == "logprob":
        def logprob(logits: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(logits[..., -1, :], dim=-1)[..., answer].mean()

        return logprob, f"log-probability of {args.answer!r} at the last position"
    wrong = one_token("wrong", args.wrong, tokenizer)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[..., -1, answer] - logits[..., -1, wrong]).mean()

    return logit_diff, f"logit difference {args.answer!r} - {args.wrong!r} at the last position"


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
    """The patching or attribution view on a loaded model."""
    clean_ids, corrupt_ids = encode_pair(args.clean, args.corrupt, tokenizer, cfg)
    clean = torch.tensor(clean_ids, dtype=torch.long, device=device)
    corrupt = torch.tensor(corrupt_ids, dtype=torch.long, device=device)
    metric, described = make_metric(args, tokenizer, clean)
    by = parse_by(args)
    with torch.no_grad():
        clean_metric = float(metric(interp.forward_with_activations(params, clean, cfg)[0]))
        corrupt_metric = float(metric(interp.forward_with_activations(params, corrupt, cfg)[0]))
    base = corrupt_metric if args.direction == "denoise" else clean_metric
    labels = [tokenizer.decode([i]) for i in clean_ids]
    what = "clean values into the corrupted run" if args.direction == "denoise" else "corrupted values into the clean run"
    print(f"{source}: {args.site} by {' x '.join(by)}, {args.direction} ({what}), {len(clean_ids)} tokens")
    print(f"metric: {described}")
    print(f"clean run {clean_metric:.4f}, corrupted run {corrupt_metric:.4f}; the tables give the change from {base:.4f}")
    sweep_args = dict(site=args.site, by=by, direction=args.direction)
    if args.view == "patching":
        with torch.no_grad():
            change = interp.patch_sweep(params, clean, corrupt, metric, cfg, **sweep_args) - base
        columns, name = {"change": change}, "exact patching"
    else:
        change = interp.attribution_patch(params, clean, corrupt, metric, cfg, correction=args.correction, **sweep_args).detach()
        star = args.correction and args.site in ("attn.q", "attn.k")
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
