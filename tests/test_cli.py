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
    for field, value in cfg.to_dict().items():
        assert re.search(rf"^\s*{field}\s+{re.escape(repr(value))}\s*$", out, flags=re.M), field
    assert re.search(r"head_dim\s+64", out)
    for label, number in [("token embeddings", "2,560,000"), ("attention", "1,048,576"),
                          ("feed-forward", "2,097,152"), ("estimate", "5,705,728")]:
        assert re.search(rf"{label}.*\s{number}$", out, flags=re.M), (label, number)
    total = ft.param_breakdown(cfg)["total"]
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
