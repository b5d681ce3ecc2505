"""``ftransformer train | generate | inspect | bench``: one module per command, each with
``add_arguments(parser)`` and ``run(args) -> int``.

Errors a user can fix (bad flags, unreadable data, a checkpoint that does not fit) come out as one line
on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import importlib
import sys

# command name -> (module, one-line help). Each module is imported when the parser is built (argparse
# needs its flags), so command modules keep heavy imports inside their run().
COMMANDS = {
    "train": ("ftransformer.cli.train_cmd", "train a model (default: built-in corpus, CPU-sized preset)"),
    "generate": ("ftransformer.cli.generate_cmd", "generate text from a checkpoint or a Hugging Face GPT-2 directory"),
    "inspect": ("ftransformer.cli.inspect_cmd",
                "a preset's config and parameter breakdown; a model's attention, head scores, logit lens"),
    "bench": ("ftransformer.cli.bench_cmd", "benchmarks: train step and generation against baselines"),
}


def add_commands(sub, commands: dict, run_attr: str) -> None:
    """One sub-parser per ``name -> (module, help)``; the module supplies ``add_arguments`` and ``run``.

    A command whose module does not exist (yet) is left out of the menu; a missing dependency inside
    an existing module is a real error and propagates.
    """
    for name, (module_name, help_text) in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(**{run_attr: module.run})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftransformer", description="Build, train, run and inspect GPT-style transformers written as pure functions."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(sub, COMMANDS, "_run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("ftransformer: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, UnicodeDecodeError) as e:
        print(f"ftransformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from ftransformer.distributed import DistributedError  # torch is loaded by now

        if not isinstance(e, DistributedError):
            raise
        print(f"ftransformer {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
