"""``bench finetune`` on a tiny random Llama: every row's losses agree with transformers / PEFT, the table prints."""

import types

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from ftransformer.bench import finetune  # noqa: E402
from tests.typecheck import unchecked  # noqa: E402

OPTS = dict(size="tiny", steps=2, batch=2, seq=8, threads=1, rank=4, lr=1e-3, rows=",".join(finetune.ROWS))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    finetune.write_checkpoint(str(directory), "tiny")
    return directory


def in_process(mode, directory, opts):
    with unchecked():  # a training loop, not the shapes, is under test
        return finetune.measure_one(mode, str(directory), opts)


def test_every_row_agrees_with_its_baseline_and_the_table_prints(checkpoint, capsys):
    args = types.SimpleNamespace(dir=str(checkpoint), **OPTS)
    assert finetune.run(args, child=in_process) == 0
    out = capsys.readouterr().out
    for label in ("full ours", "full transformers", "lora ours", "lora PEFT", "dora ours", "dora PEFT", "qlora ours",
                  "stack8 ours", "8 x lora, in turn"):
        assert label in out
    goals = [line for line in out.splitlines() if "(goal " in line]
    assert len(goals) == 8 and all(line.endswith(("PASS", "MISS")) for line in goals), out


def test_the_same_adapters_train_the_same_way(checkpoint):
    """Ours and PEFT's LoRA from the same ``a``: equal losses at step 0 (b = 0: the base) and after updates."""
    opts = dict(OPTS, steps=3)
    ours, theirs = in_process("ours:lora", checkpoint, opts), in_process("theirs:lora", checkpoint, opts)
    assert ours["trained"] == theirs["trained"]
    finetune.check_agree(ours, theirs, "lora")
    assert ours["losses"][2] < ours["losses"][0]  # it trains


def test_disagreeing_losses_and_unknown_rows_are_refused(checkpoint):
    with pytest.raises(ValueError, match="disagree at step 1"):
        finetune.check_agree({"losses": [2.0, 1.5]}, {"losses": [2.0, 1.6]}, "full")
    with pytest.raises(ValueError, match="--rows takes names from"):
        finetune.measure(types.SimpleNamespace(**dict(OPTS, rows="full,qlora2")), checkpoint, in_process)
