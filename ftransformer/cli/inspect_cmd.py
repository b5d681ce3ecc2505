"""``ftransformer inspect``: a preset's config, field by field, and its parameter breakdown."""

import dataclasses

from ftransformer.config import PRESETS, get_preset
from ftransformer.params import format_breakdown


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="preset to describe (default: seed)")


def run(args) -> int:
    cfg = get_preset(args.preset)
    print(f"preset {args.preset!r}")
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    for f in dataclasses.fields(cfg):
        print(f"  {f.name:<{width}}  {getattr(cfg, f.name)!r}")
    print(f"  {'head_dim':<{width}}  {cfg.head_dim!r}  (derived)")
    print()
    print(format_breakdown(cfg))
    return 0
