import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftransformer import checkpoint
from ftransformer.cli import build_parser, main
from ftransformer.cli.train_cmd import parse_overrides
from ftransformer.recipes import QUICKSTART_PRESET, QUICKSTART_STEPS, RECIPES

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SMALL_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))
# the tiny preset's recipe, made smaller still: a few steps of a few short windows
FAST = ["--preset", "tiny", "--quiet", "--set", "eval_batches=2", "--batch-size", "4"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


def test_train_end_to_end_then_resume(tmp_path, small_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "4", "--eval-every", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert str(out / "latest") in printed and "metrics.jsonl" in printed and "loss.png" in printed
    assert [r["step"] for r in metrics(out)] == [0, 2, 4]
    assert (out / "loss.png").is_file() and list((out / "cache").glob("tokens-*.npy"))
    ck = checkpoint.load_checkpoint(out / "latest")
    assert ck.step == 4 and ck.config.vocab_size == len(set(SMALL_TEXT)) == ck.tokenizer.vocab_size
    assert ck.extra["train"]["preset"] == "tiny" and ck.extra["train"]["recipe"]["batch_size"] == 4

    # without --resume the run is not overwritten
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "4", "--out", str(out)])
    assert rc == 2 and "already holds a run (checkpoint at step 4); add --resume" in capsys.readouterr().err

    # --resume continues with the saved settings; --steps extends the run
    rc = main(["train", "--resume", "--quiet", "--out", str(out), "--steps", "6"])
    assert rc == 0
    assert [r["step"] for r in metrics(out)] == [0, 2, 4, 6]
    assert checkpoint.load_checkpoint(out / "latest").step == 6


def test_set_overrides_model_and_recipe(tmp_path, small_file):
    out = tmp_path / "run"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(out), "--tokenizer", "char",
               "--set", "d_model=30", "--set", "n_heads=5", "--set", "bias=false", "--set", "seq_len=12",
               "--set", "warmup_steps=1", "--accum", "2", "--lr", "0.01", "--seed", "3"])
    assert rc == 0
    ck = checkpoint.load_checkpoint(out / "latest")
    assert (ck.config.d_model, ck.config.n_heads, ck.config.bias) == (30, 5, False)
    recipe = ck.extra["train"]["recipe"]
    assert (recipe["seq_len"], recipe["warmup_steps"], recipe["accum_steps"], recipe["lr"]) == (12, 1, 2, 0.01)
    assert ck.extra["train"]["seed"] == 3


def test_eval_batches_all_flag_and_set(tmp_path, small_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(out), "--eval-batches", "all"])
    assert rc == 0 and checkpoint.load_checkpoint(out / "latest").extra["train"]["recipe"]["eval_batches"] == "all"
    assert parse_overrides(["eval_batches=all"])[1] == {"eval_batches": "all"}
    assert parse_overrides(["eval_batches=3"])[1] == {"eval_batches": 3}
    assert build_parser().parse_args(["train", "--eval-batches", "5"]).eval_batches == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--eval-batches", "0"])
    assert "expected an int >= 1 or 'all'" in capsys.readouterr().err


def test_parse_overrides():
    config, recipe = parse_overrides(["dropout=0.2", "n_kv_heads=none", "tie_embeddings=no", "steps=5", "tokenizer=bpe"])
    assert config == {"dropout": 0.2, "n_kv_heads": None, "tie_embeddings": False}
    assert recipe == {"steps": 5, "tokenizer": "bpe"}
    with pytest.raises(ValueError, match="--set colour: unknown field; model fields: vocab_size"):
        parse_overrides(["colour=red"])
    with pytest.raises(ValueError, match="--set d_model=wide: expected an int"):
        parse_overrides(["d_model=wide"])
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_overrides(["d_model"])


def test_bad_flags_are_one_line_errors(tmp_path, small_file, capsys):
    for argv, message in (
        (["--set", "n_layers=0"], "Config.n_layers must be positive, got 0"),
        (["--set", "seq_len=40"], "seq_len=40 but the model's max_seq_len=16; add --set max_seq_len=40"),
        (["--batch-size", "5", "--accum", "2"], "batch_size=5 must be divisible by accum_steps=2"),
        (["--resume"], "nothing to resume in"),
    ):
        rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "is empty"),
        ("latin1.txt", "caf\u00e9 ol\u00e9 ".encode("latin-1") * 100, "is not UTF-8 text (byte 0xe9 at offset 3"),
        ("short.txt", b"to be or not to be", "is too short: 18 tokens"),
    ],
)
def test_bad_data_file_one_line_error(tmp_path, capsys, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    rc = main(["train", *FAST, "--data", str(path), "--steps", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ftransformer train: error: data file {str(path)!r} {problem}")
    assert "Traceback" not in err


def test_bad_data_file_in_a_subprocess_has_no_traceback(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00garbage" * 50)
    proc = subprocess.run(
        [sys.executable, "-m", "ftransformer", "train", "--data", str(path), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"ftransformer train: error: data file {str(path)!r} is not UTF-8 text (byte 0xff at offset 0 cannot be decoded)"]
    assert not (tmp_path / "run" / "latest").exists()


def test_no_arguments_trains_the_quickstart_on_the_builtin_corpus(tmp_path, monkeypatch, capsys):
    # The real default command, only shortened with --steps (and quiet): built-in corpus, default preset and out dir.
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--steps", "2", "--quiet", "--set", "eval_batches=1"])
    printed = capsys.readouterr().out
    assert rc == 0
    out = Path("runs") / f"{QUICKSTART_PRESET}-stdlib"
    assert "built-in corpus" in printed and str(out / "latest") in printed
    ck = checkpoint.load_checkpoint(out / "latest")
    assert ck.step == 2 and ck.extra["train"]["data"] is None and ck.extra["train"]["preset"] == QUICKSTART_PRESET
    assert ck.extra["train"]["recipe"]["batch_size"] == RECIPES[QUICKSTART_PRESET].batch_size
    # a second default run goes next to the first instead of over it
    rc = main(["train", "--steps", "1", "--quiet", "--set", "eval_batches=1"])
    assert rc == 0 and checkpoint.load_checkpoint(Path("runs") / f"{QUICKSTART_PRESET}-stdlib-2" / "latest").step == 1


def test_quickstart_defaults_fit_the_recipe():
    args = build_parser().parse_args(["train"])
    assert args.preset is None and args.steps is None and args.data is None
    assert QUICKSTART_STEPS < RECIPES[QUICKSTART_PRESET].steps


def test_every_preset_has_a_recipe_and_the_shakespeare_recipe_is_nanogpts():
    from ftransformer.config import PRESETS

    assert set(RECIPES) == set(PRESETS)
    r = RECIPES["shakespeare-char-cpu"]
    assert (r.tokenizer, r.val_fraction, r.batch_size, r.seq_len, r.lr, r.warmup_steps) == ("char", 0.1, 12, 64, 1e-3, 100)
    assert (r.lr * r.min_lr_ratio, r.beta1, r.beta2, r.weight_decay, r.grad_clip, r.steps) == (1e-4, 0.9, 0.99, 0.1, 1.0, 2000)
    assert (r.eval_every, r.eval_batches) == (250, 20)
    assert PRESETS["shakespeare-char-cpu"].dropout == 0 and PRESETS["shakespeare-char-cpu"].bias is False


def test_help_documents_every_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for flag in ("--preset", "--data", "--tokenizer", "--set", "--steps", "--batch-size", "--accum", "--lr",
                 "--eval-every", "--out", "--resume", "--compile", "--device", "--seed"):
        assert flag in text
    for action in train._actions:
        assert action.help, action.option_strings
    assert "shakespeare-char-cpu" in text and "metrics.jsonl" in text


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared corpus {SHAKESPEARE} is absent")
def test_shakespeare_preset_tokenizes_the_shared_corpus(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "shakespeare-char-cpu", "--data", str(SHAKESPEARE), "--steps", "1", "--quiet",
               "--set", "eval_batches=1", "--out", str(out)])
    assert rc == 0
    ck = checkpoint.load_checkpoint(out / "latest")
    assert ck.config.vocab_size == 65 and ck.tokenizer.vocab_size == 65
    assert ck.extra["fit"]["train_tokens"] == 1_003_854 and ck.extra["fit"]["val_tokens"] == 111_540



# ---------------------------------------------------------------- resolve_run: the flags to a RunSpec, running nothing


def test_resolve_run_decides_everything_without_running(tmp_path, monkeypatch):
    from ftransformer.cli.train_cmd import RunSpec, resolve_run

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--preset", "tiny", "--steps", "7", "--set", "d_model=30",
                                      "--set", "warmup_steps=1", "--lr", "0.01", "--dp-clip", "2.0", "--seed", "4"])
    spec = resolve_run(args)
    assert isinstance(spec, RunSpec)
    assert (spec.preset, spec.recipe.steps, spec.recipe.warmup_steps, spec.recipe.lr) == ("tiny", 7, 1, 0.01)
    assert spec.config is None and spec.config_changes == {"d_model": 30}
    assert (spec.dp_clip, spec.dp_noise, spec.seed, spec.resume, spec.members) == (2.0, 1.0, 4, False, None)
    assert spec.out == Path("runs") / "tiny-stdlib" and spec.tokenizer == RECIPES["tiny"].tokenizer
    assert spec.settings()["recipe"]["steps"] == 7
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing trained
    # no --preset and no --steps: the quickstart, shortened
    assert resolve_run(build_parser().parse_args(["train"])).recipe.steps == QUICKSTART_STEPS
    sweep = resolve_run(build_parser().parse_args(["train", "--preset", "tiny", "--sweep", "lr=1e-3,1e-2",
                                                   "--ensemble", "2"]))
    assert sorted((m["seed"], m["lr"]) for m in sweep.members) == [(0, 1e-3), (0, 1e-2), (1, 1e-3), (1, 1e-2)]
    with pytest.raises(ValueError, match="nothing to resume in"):
        resolve_run(build_parser().parse_args(["train", "--resume", "--out", str(tmp_path / "none")]))
    with pytest.raises(ValueError, match="--seed must be >= 0, got -1"):
        resolve_run(build_parser().parse_args(["train", "--seed", "-1"]))


def test_resolve_run_on_resume_reads_the_saved_settings(tmp_path, small_file):
    from ftransformer.cli.train_cmd import resolve_run

    out = tmp_path / "run"
    assert main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(out), "--seed", "3",
                 "--dp-clip", "1.5"]) == 0
    spec = resolve_run(build_parser().parse_args(["train", "--resume", "--out", str(out), "--steps", "5"]))
    assert spec.resume and spec.seed == 3 and spec.recipe.steps == 5 and spec.recipe.batch_size == 4
    assert spec.dp_clip == 1.5 and spec.data == str(small_file.resolve()) and spec.tokenizer == out / "latest"
    assert spec.config.vocab_size == checkpoint.load_checkpoint(out / "latest").config.vocab_size
    with pytest.raises(ValueError, match="--preset gpt2 but the run"):
        resolve_run(build_parser().parse_args(["train", "--resume", "--out", str(out), "--preset", "gpt2"]))


def test_ensemble_trains_with_accumulation_and_resumes_through_fit(tmp_path, small_file, capsys):
    out = tmp_path / "ens"
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--eval-every", "2", "--out", str(out),
               "--sweep", "lr=1e-3,1e-2", "--accum", "2"])
    assert rc == 0 and "in 2 micro-batches" in capsys.readouterr().out
    assert [(r["step"], r["member"]) for r in metrics(out)] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert checkpoint.load_checkpoint(out / "member-1" / "latest").step == 2
    # the run is refused as a fresh one, and resumes with its members and settings
    rc = main(["train", *FAST, "--data", str(small_file), "--steps", "2", "--out", str(out)])
    assert rc == 2 and "already holds a run (checkpoint at step 2)" in capsys.readouterr().err
    rc = main(["train", "--resume", "--quiet", "--out", str(out), "--steps", "4"])
    assert rc == 0 and "lr=0.01" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [0, 0, 2, 2, 4, 4]
    assert checkpoint.load_checkpoint(out / "member-0" / "latest").extra["member"]["lr"] == 1e-3
    rc = main(["train", "--resume", "--quiet", "--out", str(out), "--ensemble", "2"])
    assert rc == 2 and "--ensemble/--sweep cannot change when resuming" in capsys.readouterr().err


def test_init_from_hf_defaults_to_a_fine_tuning_recipe(tmp_path):
    """A pretrained model trains at lr 5e-5, warm-up over 10% of the steps, no weight decay; --lr and --set win."""
    from ftransformer.cli.train_cmd import FINETUNE_LR, resolve_run

    def recipe(*flags):
        args = build_parser().parse_args(["train", "--init-from-hf", str(tmp_path), "--preset", "tiny", "--steps", "50",
                                          "--out", str(tmp_path / "run"), *flags])
        return resolve_run(args).recipe

    tuned = recipe()
    assert (tuned.lr, tuned.warmup_steps, tuned.weight_decay) == (FINETUNE_LR, 5, 0.0) == (5e-5, 5, 0.0)
    assert tuned.batch_size == RECIPES["tiny"].batch_size  # the rest is the preset's
    given = recipe("--lr", "2e-4", "--set", "warmup_steps=3")
    assert (given.lr, given.warmup_steps, given.weight_decay) == (2e-4, 3, 0.0)
    scratch = build_parser().parse_args(["train", "--preset", "tiny", "--out", str(tmp_path / "other")])
    assert resolve_run(scratch).recipe.lr == RECIPES["tiny"].lr  # from scratch: the preset's own
