"""``ftransformer train | generate | inspect | bench``: one module per command, each with
``add_arguments(parser)`` and ``run(args) -> int``.

Errors a user can fix (bad flags, unreadable data, a checkpoint that does not fit) come out as one line
on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import importlib
import importlib.util
import sys

# command name -> (module, one-line help). A command's module is imported only when that command is
# parsed, so ``ftransformer --help`` loads none of them (nor torch.compile, matplotlib or transformers).
COMMANDS = {
    "train": ("ftransformer.cli.train_cmd", "train a model (default: built-in corpus, CPU-sized preset)"),
    "generate": ("ftransformer.cli.generate_cmd", "generate text from a checkpoint, a Hugging Face model directory or a GGUF file"),
    "inspect": ("ftransformer.cli.inspect_cmd",
                "a preset's config and parameter breakdown; a model's attention, head scores, logit lens, activation patching, attribution, edges"),
    "finetune": ("ftransformer.cli.finetune_cmd",
                 "LoRA / DoRA chat fine-tuning of a Hugging Face model (adapter checkpoints, PEFT format out)"),
    "bench": ("ftransformer.cli.bench_cmd", "benchmarks: train step and generation against baselines"),
    "sae": ("ftransformer.cli.sae_cmd", "sparse autoencoders: collect activations, train a stack, evaluate, show features"),
}


class LazyCommandParser(argparse.ArgumentParser):
    """A command's parser whose flags come from its module, imported the first time the command is parsed."""

    def __init__(self, *args, module_name: str, run_attr: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.module_name, self.run_attr, self.loaded = module_name, run_attr, False

    def load(self) -> None:
        """Import the command's module once: its ``add_arguments`` adds the flags, its ``run`` runs the command."""
        if not self.loaded:
            self.loaded = True
            module = importlib.import_module(self.module_name)
            module.add_arguments(self)
            self.set_defaults(**{self.run_attr: module.run})

    def parse_known_args(self, args=None, namespace=None):
        self.load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.load()
        return super().format_usage()

    def format_help(self) -> str:
        self.load()
        return super().format_help()


def add_commands(parser: argparse.ArgumentParser, commands: dict, *, dest: str, metavar: str, run_attr: str) -> None:
    """One sub-command per ``name -> (module, help)``; the module supplies ``add_arguments`` and ``run``.

    A command whose module does not exist (yet) is left out of the menu; a missing dependency inside
    an existing module is a real error and propagates when the command is parsed.
    """
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=True, parser_class=LazyCommandParser)
    for name, (module_name, help_text) in commands.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        sub.add_parser(name, help=help_text, description=help_text, module_name=module_name, run_attr=run_attr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftransformer", description="Build, train, run and inspect GPT-style transformers written as pure functions."
    )
    add_commands(parser, COMMANDS, dest="command", metavar="COMMAND", run_attr="_run")
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
