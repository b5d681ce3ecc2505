"""``ftransformer inspect``: a preset's config and parameter breakdown, or a look inside a model.

* ``ftransformer inspect [--preset NAME]``: the config, field by field, and the parameter breakdown;
* ``ftransformer inspect --hf-dir DIR``: the same for a Hugging Face model directory of any supported
  family (read from its ``config.json``; no weights are loaded);
* ``ftransformer inspect --gguf FILE``: the same for a GGUF file (read from its header: metadata and
  tensor shapes; no tensor is read);
* ``ftransformer inspect attention --checkpoint DIR --text TEXT [--layer L] --out FILE.png``: every
  head's attention pattern of one layer on a text, one panel per head;
* ``ftransformer inspect heads --checkpoint DIR --out FILE.png``: induction, previous-token and entropy
  scores of every head on repeated random tokens, printed as three tables and drawn as three heatmaps
  side by side in one PNG;
* ``ftransformer inspect logit-lens --checkpoint DIR --text TEXT --out FILE.png``: the top next-token
  guess read off the residual stream after every layer, at every position;
* ``ftransformer inspect patching --checkpoint DIR --clean TEXT --corrupt TEXT --answer A --wrong B
  [--site SITE] [--by AXES] --out FILE.png``: exact activation patching of every layer / position / head
  of a site, printed (the largest effects) and drawn as a heatmap;
* ``ftransformer inspect attribution ... [--compare]``: the same, estimated by attribution patching
  (AtP / AtP*) from one forward + backward; ``--compare`` prints it next to exact patching;
* ``ftransformer inspect edges ... [--method eap|eap-ig|exact] [--compare] [--faithfulness]``: every edge
  writer -> reader scored by EAP / EAP-IG (or patched exactly), the top edges printed and drawn as a
  graph, and the faithfulness of the top-k circuits (``cli/inspect_circuits.py`` has these three views);
* ``ftransformer inspect curvature --checkpoint DIR [--text TEXT] --out FILE.png``: the loss Hessian's top
  eigenvalues and trace, whole model and per layer, and its spectral density (``cli/inspect_curvature.py``);
* ``ftransformer inspect influence --checkpoint DIR --query TEXT [--data FILE] [--top N] [--method
  projected|ekfac] [--out FILE.png]``: the training sequences that most lowered the query's loss, with their
  scores, and a bar plot of them (``cli/inspect_influence.py``).
* ``ftransformer inspect steer --checkpoint DIR --positive TEXT --negative TEXT --prompt TEXT [--layer L]
  [--scale S] [--sweep LAYERS:SCALES] --out FILE.png``: a steering vector, its layer x scale sweep drawn as a
  heatmap, and samples without and with it (``cli/inspect_steer.py``).

Each view takes ``--hf-dir DIR`` (a Hugging Face model directory of any family ``interop.registry.FAMILIES``
lists) or ``--gguf FILE`` instead of ``--checkpoint``; ``inspect VIEW --help`` prints that view's flags only.
"""

import argparse
import dataclasses
import re
import sys

from ftransformer.cli import inspect_circuits, inspect_curvature, inspect_influence, inspect_steer
from ftransformer.cli.generate_cmd import DEVICES, add_gguf_argument, hf_families
from ftransformer.config import PRESETS, get_preset
from ftransformer.params import format_breakdown

VIEWS = ("attention", "heads", "logit-lens", *inspect_circuits.VIEWS, *inspect_curvature.VIEWS,
         *inspect_influence.VIEWS, *inspect_steer.VIEWS)
NEEDS_TEXT = ("attention", "logit-lens")
CIRCUITS = inspect_circuits.VIEWS


def add_arguments(parser) -> None:
    parser.add_argument(
        "view", nargs="?", choices=VIEWS, default=None, metavar="VIEW",
        help="what to draw from a model: attention, heads, logit-lens, patching, attribution, edges, curvature, influence or steer; without one, describe --preset",
    )
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="preset to describe when no VIEW is given (default: seed)")
    model = parser.add_argument_group("a VIEW's model and input")
    model.add_argument("--checkpoint", metavar="DIR", default=None,
                       help="a checkpoint directory, or a run directory of `ftransformer train` (its best/, else latest/)")
    model.add_argument("--hf-dir", metavar="DIR", default=None,
                       help=f"a Hugging Face model directory of any supported family ({hf_families()}): config.json, "
                            "model.safetensors (or shards) and tokenizer.json (GPT-2: or vocab.json + merges.txt); "
                            "without a VIEW, describe its config (no weights are read); with one, the model to run")
    add_gguf_argument(model)
    model.add_argument("--text", metavar="TEXT", default=None,
                       help="attention, logit-lens, curvature: the text to run (cropped to its last max_seq_len tokens)")
    model.add_argument("--layer", type=int, metavar="L", default=None,
                       help="attention: the layer to draw, 0-based (default: the last); steer: the layer to steer (default: the middle)")
    model.add_argument("--half", type=int, metavar="N", default=None,
                       help="heads: length of the random sequence that is repeated (default: min(max_seq_len // 2, 50))")
    model.add_argument("--batch", type=int, metavar="B", default=8, help="heads, curvature: random sequences to average over (default: 8)")
    model.add_argument("--seed", type=int, metavar="S", default=0, help="heads, curvature: seed of the random tokens and probes (default: 0)")
    model.add_argument("--out", metavar="FILE.png", default=None, help="where to write the picture (PNG)")
    model.add_argument("--device", choices=DEVICES, default="cpu", help="where to run (default: cpu)")
    inspect_circuits.add_arguments(parser.add_argument_group("the patching, attribution and edges views"))
    inspect_curvature.add_arguments(parser.add_argument_group("the curvature view"))
    inspect_influence.add_arguments(parser.add_argument_group("the influence view"))
    inspect_steer.add_arguments(parser.add_argument_group("the steer view"))
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            action.__class__ = ViewHelp  # `inspect VIEW --help`: that view's flags only


# "patching, attribution: ..." or "edges --faithfulness: ...": a flag's help that names the views it goes with.
VIEW_PREFIX = re.compile(r"([a-z-]+(?:, [a-z-]+)*)(?: --[a-z-]+)?: ")


def for_view(action, title: str | None, view: str) -> bool:
    """Whether a flag goes with ``view``: its group's title (``the ... views``) and its help's prefix name it,
    or name no view at all."""
    if action.dest in ("view", "preset"):
        return False
    if title and title.startswith("the ") and re.search(r" views?$", title) and view not in re.findall(r"[a-z-]+", title):
        return False
    named = VIEW_PREFIX.match(action.help or "")
    views = [w for w in named.group(1).split(", ") if w in VIEWS] if named else []
    return not views or view in views


def view_help(parser, view: str) -> str:
    """The help of ``inspect VIEW``: the view's line of this module's notes and the flags that go with it."""
    lines = [line for line in (__doc__ or "").split("* ``")[1:] if line.startswith(f"ftransformer inspect {view} ")]
    summary = re.sub(r"\s+", " ", lines[0].split("``:", 1)[1]).strip() if lines else None
    one = argparse.ArgumentParser(prog=f"{parser.prog} {view}", description=summary, add_help=False)
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if for_view(a, group.title, view)]
        if actions:
            target = one.add_argument_group(group.title)
            for action in actions:
                target._add_action(action)
    return one.format_help()


class ViewHelp(argparse._HelpAction):
    """``-h`` after a VIEW prints that view's help alone; without one, the whole command's."""

    def __call__(self, parser, namespace, values, option_string=None):
        view = getattr(namespace, "view", None)
        if view is None:
            return super().__call__(parser, namespace, values, option_string)
        print(view_help(parser, view), end="")
        parser.exit()


def describe(cfg, title: str) -> int:
    """The config field by field, then its parameter breakdown."""
    print(title)
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    for f in dataclasses.fields(cfg):
        print(f"  {f.name:<{width}}  {getattr(cfg, f.name)!r}")
    print(f"  {'head_dim':<{width}}  {cfg.head_dim!r}  ({'given' if cfg.attention.head_dim else 'derived'})")
    print()
    print(format_breakdown(cfg))
    return 0


def describe_preset(name: str) -> int:
    return describe(get_preset(name), f"preset {name!r}")


def describe_hf_dir(directory: str) -> int:
    """A Hugging Face directory's config, read from its config.json alone (no weights are loaded)."""
    from ftransformer.interop.hf import config_from_hf_dir, read_hf_config

    cfg = config_from_hf_dir(directory)
    hf = read_hf_config(directory)
    return describe(cfg, f"Hugging Face model {directory} (model_type={hf.get('model_type')!r})")


def describe_gguf(path: str) -> int:
    """A GGUF file's config, read from its header alone (no tensor is read)."""
    from ftransformer.interop.gguf import config_from_gguf

    cfg, meta = config_from_gguf(path)
    arch, name = meta.get("general.architecture"), meta.get("general.name")
    return describe(cfg, f"GGUF model {path} (general.architecture={arch!r}" + (f", general.name={name!r})" if name else ")"))


def format_scores(name: str, scores) -> str:
    """A ``[layers, heads]`` tensor as a text table, one row per layer."""
    layers, heads = scores.shape
    lines = [name, "  layer  " + "  ".join(f"h{h:<4}" for h in range(heads))]
    for i in range(layers):
        lines.append(f"  {i:>5}  " + "  ".join(f"{float(v):5.2f}" for v in scores[i]))
    return "\n".join(lines)


def _encode(text: str, tokenizer, cfg) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("--text encodes to no tokens; give at least one character")
    if len(ids) > cfg.max_seq_len:
        print(f"note: --text is {len(ids)} tokens and max_seq_len={cfg.max_seq_len}: using its last "
              f"{cfg.max_seq_len}", file=sys.stderr)
        ids = ids[-cfg.max_seq_len:]
    return ids


def _check_view_args(args) -> None:
    if args.preset is not None:
        raise ValueError(f"--preset describes a preset; it does not go with the {args.view!r} view")
    if args.out is None and args.view not in inspect_influence.VIEWS:
        raise ValueError(f"inspect {args.view} needs --out FILE.png")
    if args.view in NEEDS_TEXT and args.text is None:
        raise ValueError(f"inspect {args.view} needs --text TEXT")
    inspect_circuits.check_args(args)
    inspect_curvature.check_args(args)
    inspect_influence.check_args(args)
    inspect_steer.check_args(args)
    if args.view == "heads" and args.text is not None:
        raise ValueError(f"inspect {args.view} runs on random repeated tokens; it takes no --text")
    if args.view not in ("attention", "steer") and args.layer is not None:
        raise ValueError(f"--layer goes with the attention view, not {args.view!r}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")


def run(args) -> int:
    if args.view is None:
        given = [f for f in ("checkpoint", "text", "layer", "half", "out", "clean", "corrupt") if getattr(args, f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags} need a VIEW: inspect {{{','.join(VIEWS)}}} ...")
        named = [flag for flag, value in (("--preset", args.preset), ("--hf-dir", args.hf_dir), ("--gguf", args.gguf))
                 if value is not None]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} each name a model to describe; give one")
        if args.hf_dir is not None:
            return describe_hf_dir(args.hf_dir)
        if args.gguf is not None:
            return describe_gguf(args.gguf)
        return describe_preset(args.preset or "seed")
    _check_view_args(args)

    import torch

    from ftransformer import interp
    from ftransformer.cli.generate_cmd import SOURCES, select_device, load_model

    device = select_device(args.device)
    cfg, params, tokenizer = load_model(args, device)
    source = next(getattr(args, name) for name in SOURCES if getattr(args, name, None) is not None)

    if args.view in CIRCUITS:
        return inspect_circuits.run(args, cfg, params, tokenizer, source, device)
    if args.view in inspect_curvature.VIEWS:
        return inspect_curvature.run(args, cfg, params, tokenizer, source, device, _encode)
    if args.view in inspect_influence.VIEWS:
        return inspect_influence.run(args, cfg, params, tokenizer, source, device)
    if args.view in inspect_steer.VIEWS:
        return inspect_steer.run(args, cfg, params, tokenizer, source, device, _encode)

    def decode(i: int) -> str:
        return tokenizer.decode([int(i)])

    with torch.no_grad():
        if args.view == "heads":
            half = min(cfg.max_seq_len // 2, 50) if args.half is None else args.half
            scores = interp.head_scores(params, cfg, half=half, batch=args.batch, seed=args.seed)
            print(f"head scores of {source} on {args.batch} random sequences of {half} tokens, each repeated once")
            for name, s in scores.items():
                print()
                print(format_scores(name.replace("_", "-") + (" (nats)" if name == "entropy" else ""), s))
            path = interp.plot_head_scores(scores, args.out, title=f"{source}: head scores")
        else:
            ids = _encode(args.text, tokenizer, cfg)
            tokens = torch.tensor(ids, dtype=torch.long, device=device)
            _, acts = interp.forward_with_activations(params, tokens, cfg)
            labels = [decode(i) for i in ids]
            if args.view == "attention":
                layer = cfg.n_layers - 1 if args.layer is None else args.layer
                if not 0 <= layer < cfg.n_layers:
                    raise ValueError(f"--layer must lie in [0, n_layers={cfg.n_layers}), got {layer}")
                pattern = acts["blocks"][layer]["attn"]["pattern"]
                path = interp.plot_attention(pattern, labels, args.out, title=f"{source}: layer {layer} attention")
                print(f"layer {layer}: {cfg.n_heads} heads over {len(ids)} tokens")
            else:
                lens = interp.logit_lens(params, acts, cfg)
                path = interp.plot_logit_lens(lens, labels, decode, args.out, title=f"{source}: logit lens")
                top = lens[:, -1].argmax(-1).tolist()
                rows = ["embed"] + [f"block {i}" for i in range(cfg.n_layers)]
                print(f"top guess after the last token {labels[-1]!r}, layer by layer:")
                for row, t in zip(rows, top):
                    print(f"  {row:>9}  {decode(t)!r}")
    print(f"wrote {path}")
    return 0
