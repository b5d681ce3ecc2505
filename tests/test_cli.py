"""The command line: ``ftransformer inspect`` and ``python -m ftransformer``."""

import re
import subprocess
import sys

import pytest

import ftransformer as ft
from ftransformer.cli import main


def test_inspect_seed_prints_the_config_and_the_breakdown(capsys):
    assert main(["inspect", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    cfg = ft.PRESETS["seed"]
    for field in cfg.to_dict():
        value = getattr(cfg, field)  # sub-configs print as themselves, not as their dicts
        assert re.search(rf"^\s*{field}\s+{re.escape(repr(value))}\s*$", out, flags=re.M), field
    assert re.search(r"head_dim\s+64", out)
    for label, number in [("token embeddings", "2,560,000"), ("attention", "1,048,576"),
                          ("feed-forward", "2,097,152"), ("estimate", "5,705,728")]:
        assert re.search(rf"{label}.*\s{number}$", out, flags=re.M), (label, number)
    total = ft.params.param_breakdown(cfg)["total"]
    assert re.search(rf"exact total\s+{total:,}$", out, flags=re.M)
    assert f"{total - 5_705_728:,}" in out  # the gap, next to what the estimate leaves out
    assert "leaves out" in out


def test_inspect_defaults_to_seed_and_knows_every_preset(capsys):
    assert main(["inspect"]) == 0
    assert "preset 'seed'" in capsys.readouterr().out
    assert main(["inspect", "--preset", "gpt2"]) == 0
    assert "124,439,808" in capsys.readouterr().out


def test_inspect_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--preset", "gpt5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "gpt5" in err and "seed" in err  # names the bad choice and lists the good ones


def test_python_dash_m_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "ftransformer", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: ftransformer" in result.stdout
    assert "inspect" in result.stdout


# What ``ftransformer --help`` must not load: compile machinery, plotting and the optional heavy libraries.
HEAVY = ("torch._dynamo", "torch._inductor", "transformers", "torchao", "matplotlib")
LOADED_AFTER = """
import sys
from ftransformer.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("LOADED", *[m for m in {heavy!r} if m in sys.modules])
print("COMMANDS", *sorted(m for m in sys.modules if m.startswith(("ftransformer.cli.", "ftransformer.bench."))))
"""


def _loaded_after(argv: list[str]) -> tuple[list[str], list[str]]:
    code = LOADED_AFTER.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in result.stdout.splitlines()
                 if line.startswith(("LOADED", "COMMANDS")))
    return lines["LOADED"].split(), lines["COMMANDS"].split()


def test_help_imports_no_compile_machinery_and_no_command():
    loaded, commands = _loaded_after(["--help"])
    assert loaded == []
    assert commands == []  # the commands' modules load when a command is parsed


def test_a_command_loads_its_own_module_only():
    _, commands = _loaded_after(["bench", "--help"])
    assert commands == ["ftransformer.cli.bench_cmd"]
    _, commands = _loaded_after(["bench", "train", "--help"])
    assert "ftransformer.bench.train" in commands and "ftransformer.bench.generate" not in commands
    assert "ftransformer.cli.train_cmd" not in commands
