"""``ftransformer bench train | generate``: speed benchmarks against plain-PyTorch baselines.

Each benchmark lives in ``ftransformer.bench.<name>`` with ``add_arguments(parser)`` and ``run(args)``;
its module is imported when the parser is built (argparse needs its flags), not when this one is.
"""

import importlib

# benchmark name -> (module, one-line help)
BENCHES = {
    "train": ("ftransformer.bench.train", "time one training step: functional model vs a plain torch.nn GPT"),
    "generate": ("ftransformer.bench.generate", "time generation against baselines"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # A benchmark not written yet is left out of the menu; a missing dependency is a real error.
            if e.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args) -> int:
    return int(args._bench_run(args) or 0)
