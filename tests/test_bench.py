import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ftransformer as ft
from ftransformer.bench import scaling, torchao_ref
from ftransformer.bench import train as bench_train
from ftransformer.cli import main
from ftransformer.layers import int8


def test_bench_train_runs_and_prints_the_table(capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "train", "--steps", "2", "--warmup", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    out = capsys.readouterr().out
    assert "preset shakespeare-char-cpu, batch 12 x 64 tokens, device cpu, 1 threads" in out
    header = next(line for line in out.splitlines() if line.startswith("step"))
    assert header.split() == ["step", "median", "ms", "min", "ms", "tokens/s", "vs", "torch.nn", "target"]
    names = ("torch.nn + AdamW", "functional (eager)")
    rows = {name: line for line in out.splitlines() for name in names if line.startswith(name)}
    assert rows.keys() == {"torch.nn + AdamW", "functional (eager)"}
    assert rows["torch.nn + AdamW"].rstrip().endswith("1.00x")
    assert re.search(r"\d+\.\d\dx <=1\.10x$", rows["functional (eager)"])
    assert "functional (compiled)" not in out  # only with --compile
    # Both models start from the same numbers.
    ours, theirs = re.search(r"initial loss: functional ([\d.]+), torch.nn ([\d.]+)", out).groups()
    assert ours == theirs


def test_bench_train_on_another_preset_with_biases(capsys):
    assert main(["bench", "train", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--batch-size", "3",
                 "--seq-len", "7", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "preset tiny, batch 3 x 7 tokens" in out and "cpu clock" in out


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seq-len", "65"], "--seq-len must be in [1, max_seq_len=64], got 65"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--nproc", "1"], "--nproc must be >= 2 (it compares N processes with one), got 1"),
    (["--nproc", "2", "--profile"], "--profile times one process; it does not combine with --nproc"),
])
def test_bench_train_rejects_bad_flags(capsys, flags, message):
    assert main(["bench", "train", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_help_lists_train(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_nn_baseline_is_the_same_model():
    cfg = ft.PRESETS["tiny"]  # biases on: every parameter is copied
    params = ft.init_params(cfg, seed=4)
    model = bench_train.nn_from_params(params, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, targets), ft.loss_fn(params, tokens, targets, cfg))
    assert sum(p.numel() for p in model.parameters()) == ft.count_params(params)


def test_baseline_refuses_architectures_it_does_not_build():
    with pytest.raises(ValueError, match="needs positional.kind='learned', got 'rope'"):
        bench_train.check_supported(ft.PRESETS["tiny"].replace(positional="rope"))
    with pytest.raises(ValueError, match="needs n_kv_heads == n_heads, got 1 != 3"):
        bench_train.check_supported(ft.PRESETS["tiny"].replace(n_kv_heads=1))


def test_format_table_reports_medians_and_ratios():
    times = {"torch.nn + AdamW": [10.0, 12.0, 11.0], "functional (eager)": [9.0, 13.2, 13.2]}
    table = bench_train.format_table(times, tokens_per_step=768, baseline="torch.nn + AdamW").splitlines()
    nn_row, fn_row = table[2].split(), table[3].split()
    assert nn_row[-4:] == ["11.00", "10.00", "69,818", "1.00x"]
    assert fn_row[-5:] == ["13.20", "9.00", "58,182", "1.20x", "<=1.10x"]


def test_bench_quality_trains_both_models_identically(tmp_path, monkeypatch, capsys):
    """A few steps of the quality benchmark: same batches, same init -> the two columns agree."""
    import random as pyrandom

    import ftransformer.bench.quality as quality

    monkeypatch.setattr(quality, "TOTAL", 3)
    rng = pyrandom.Random(0)
    text = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(20_000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    assert main(["bench", "quality", "--data", str(path), "--seeds", "0", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "val loss on the whole val split (1,999 targets in 32 windows of 64)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2
    for _, ours, t_ours, theirs, t_theirs, diff in rows:
        assert abs(float(ours) - float(theirs)) < 1e-3 and float(t_ours) > 0 and float(t_theirs) > 0
    assert re.search(r"functional: [\d.]+ \+- [\d.]+ over 2 seed\(s\); torch.nn: ", out)
    assert "nanoGPT, same recipe and protocol: 1.9003 +- 0.0075" in out
    assert "target: mean val loss <= 1.900" in out
    # without the reference, on fixed batches
    assert main(["bench", "quality", "--data", str(path), "--seeds", "2", "--eval-batches", "2",
                 "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "val loss on the 2 fixed val batches of 12 x 64" in out and "torch.nn" not in out.split("\n")[1]
    assert "not the whole-split protocol" in out
    assert main(["bench", "quality", "--data", str(path), "--eval-batches", "some"]) == 2
    assert "--eval-batches must be 'all' or an int >= 1, got 'some'" in capsys.readouterr().err


def test_bench_train_nproc_times_one_and_two_torchrun_processes(capsys):
    # Real torchrun jobs (gloo): a single process, then two that must end with identical parameters.
    assert main(["bench", "train", "--nproc", "2", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "2 x 8 tokens per process (weak scaling)" in out and "backend gloo, 1 thread(s) per process" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[12]  ", line)]
    assert [(r[0], " ".join(r[1:-5])) for r in rows] == [
        ("1", "torch.nn + AdamW"), ("1", "functional (eager)"), ("2", "DDP + AdamW"), ("2", "functional (eager)")]
    assert rows[0][-1] == rows[1][-1] == "100%"
    assert rows[3][-4] != "-" and float(rows[3][-4]) >= 0  # the functional step's all-reduce is timed
    assert "all 2 processes hold identical parameters (checked exactly)" in out


def test_a_stalled_scaling_job_is_stopped_with_its_workers(tmp_path):
    # torchrun starts its workers in sessions of their own: stopping the launcher must also reach them,
    # through the pid files the workers write beside the JSON -- and only them (a pid may be reused).
    out = tmp_path / "2.json"

    def sleeper(name, *extra, **kw):
        code = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)")
        return subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name), *extra], **kw)

    launcher = sleeper("launcher")  # ignores SIGTERM, so it must be killed after the grace period
    worker = sleeper("worker", scaling.WORKER_MODULE, "--json", str(out), start_new_session=True)
    bystander = sleeper("bystander", start_new_session=True)  # a pid file naming it must not kill it
    deadline = time.monotonic() + 60
    while not all((tmp_path / n).exists() for n in ("launcher", "worker", "bystander")):
        assert time.monotonic() < deadline, "the test processes did not start"
        time.sleep(0.05)
    (tmp_path / "2.json.pid.1").write_text(str(worker.pid))
    (tmp_path / "2.json.pid.2").write_text(str(bystander.pid))
    try:
        scaling._stop(launcher, out, grace_s=1.0)
        assert launcher.poll() == -signal.SIGKILL
        if pathlib.Path(f"/proc/{worker.pid}/cmdline").exists():  # Linux: workers are found through /proc
            assert worker.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for proc in (launcher, worker, bystander):
            proc.kill()
            proc.wait()


def test_format_scaling_table_computes_efficiency_per_contender():
    one = {"median_ms": {scaling.NN: 10.0, scaling.FUNCTIONAL: 8.0}, "all_reduce_ms": {}}
    two = {"median_ms": {scaling.DDP: 12.5, scaling.FUNCTIONAL: 10.0}, "all_reduce_ms": {scaling.FUNCTIONAL: 1.5}}
    rows = [r.split() for r in scaling.format_scaling_table({1: one, 2: two}, tokens_per_process=100).splitlines()[2:]]
    # tokens/s, per process, efficiency (DDP against torch.nn in one process, functional against itself)
    assert rows[0][-4:] == ["-", "10,000", "10,000", "100%"]
    assert rows[2][-4:] == ["-", "16,000", "8,000", "80%"]
    assert rows[3][-4:] == ["1.50", "20,000", "10,000", "80%"]


def _char_checkpoints(tmp_path, **sizes):
    """A small text file and one random-weight checkpoint per ``name=Config`` keyword, all sharing its char tokenizer."""
    text = "the quick brown fox jumps over the lazy dog. " * 60
    data = tmp_path / "text.txt"
    data.write_text(text)
    tok = ft.data.CharTokenizer.from_text(text)
    for i, (name, cfg) in enumerate(sizes.items()):
        cfg = cfg.replace(vocab_size=tok.vocab_size)
        ft.save_checkpoint(tmp_path / name, params=ft.init_params(cfg, seed=i), config=cfg, step=0, tokenizer=tok)
    return data


def test_bench_int8_reports_loss_change_and_agreement(tmp_path, capsys):
    cfg = ft.Config(vocab_size=2, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=32)
    data = _char_checkpoints(tmp_path, model=cfg)
    argv = ["bench", "int8", "--checkpoint", str(tmp_path / "model"), "--data", str(data), "--windows", "3",
            "--prompts", "2", "--new-tokens", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"whole split, weight-only \([\d,]+\)\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d+\.\d\d%", out)
    assert re.search(r"decode path \(3 windows x 32\)\s+\d\.\d{4}", out)
    assert re.search(r"target: int8 val loss within 1% of float32: (met|missed)", out)
    assert f"decode product: {int8.product()}" in out  # which int8 product ran: fbgemm (which range) or reference
    assert re.search(r"greedy agreement of int8 over 2 val prompts x 6 tokens: \d+\.\d% of positions equal", out)
    if torchao_ref.available():  # torchao's rounding as the reference scheme: a second pair of columns
        assert re.search(r"decode path \(3 windows x 32\)(\s+\d\.\d{4}){2}\s+[+-]\d+\.\d\d%\s+\d\.\d{4}", out)
        assert re.search(r"greedy agreement of torchao int8 over 2 val prompts", out)
    else:
        assert "torchao int8: skipped: torchao not installed" in out


def test_bench_speculative_matches_the_target_and_reports_acceptance(tmp_path, capsys):
    target = ft.Config(vocab_size=2, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=32)
    data = _char_checkpoints(tmp_path, target=target, draft=target.replace(n_layers=1, d_model=16, n_heads=2, d_ff=32))
    argv = ["bench", "speculative", "--checkpoint", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
            "--data", str(data), "--draft-tokens", "2", "3", "--repeats", "1", "--new-tokens", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "greedy speculative output equals the target's" in out
    for k in (2, 3):
        assert re.search(rf"speculative, K={k}\s+\d+\.\d\d\s+\d+\.\d\dx\s+\d+%\s+\d+\.\d\d", out)
    assert main([*argv[:-1], "40"]) == 2
    assert "--new-tokens must lie in [1, 21]" in capsys.readouterr().err


# ---------------------------------------------------------------- the timing harness


def test_interleaved_alternates_contenders_after_the_warm_up():
    from ftransformer.bench import timing

    calls, ticks = [], iter(range(100))

    def contender(name):
        def fn(batch):
            calls.append((name, batch))
            return f"{name}:{batch}"
        return fn

    times, outputs = timing.interleaved(
        {"a": contender("a"), "b": contender("b")}, repeats=3, warmup=1, device=torch.device("cpu"),
        inputs=["x", "y"], clock=lambda: float(next(ticks)), unit=1e3,
    )
    assert calls == [("a", "x"), ("b", "x"), ("a", "x"), ("b", "x"), ("a", "y"), ("b", "y"), ("a", "x"), ("b", "x")]
    assert times == {"a": [1e3] * 3, "b": [1e3] * 3}  # each call spans one clock tick, in ms
    assert outputs == {"a": "a:x", "b": "b:x"}
    assert timing.medians({"a": [3.0, 1.0, 2.0], "b": [4.0]}) == {"a": 2.0, "b": 4.0}


def test_interleaved_calls_without_inputs():
    from ftransformer.bench import timing

    counter = iter(range(100))
    times, outputs = timing.interleaved({"only": lambda: next(counter)}, repeats=2, warmup=0,
                                        device=torch.device("cpu"))
    assert len(times["only"]) == 2 and all(t >= 0 for t in times["only"]) and outputs == {"only": 1}


def test_num_threads_restores_the_count_even_on_error():
    from ftransformer.bench import timing

    before = torch.get_num_threads()
    other = 2 if before != 2 else 1
    with timing.num_threads(other) as n:
        assert n == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with timing.num_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with timing.num_threads(None) as n:
        assert n == before
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        with timing.num_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_a_failing_bench_restores_the_thread_count(capsys):
    before = torch.get_num_threads()
    other = 2 if before != 2 else 1
    # the prompt does not fit the preset: the error comes after --threads took effect
    assert main(["bench", "generate", "--preset", "tiny", "--threads", str(other), "--prompt-len", "1000"]) == 2
    assert "exceeds the preset's max_seq_len" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_bench_generate_builds_a_llama_baseline_and_names_the_int8_product(capsys):
    # A config GPT-2 cannot express gets its family's transformers model (SmolLM2's shape: LlamaForCausalLM)
    # holding the same weights; --no-recompute drops the cache-less loop, --int8 names the product that ran.
    from ftransformer.bench import generate as bench_generate
    from ftransformer.interop.families import config_from_hf

    cfg = config_from_hf(dict(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                              num_key_value_heads=2, intermediate_size=40, tie_word_embeddings=True,
                              max_position_embeddings=32), "llama")
    params = ft.init_params(cfg, seed=3)
    hf = bench_generate.hf_model(params, cfg)
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ft.forward(params, tokens, cfg), atol=1e-5, rtol=1e-5)
    fns = bench_generate.contenders(params, cfg, tokens, 3, compiled=True, whole_graph=True, recompute=False)
    assert list(fns) == [bench_generate.CACHE, bench_generate.COMPILED, bench_generate.WHOLE]
    assert bench_generate.SHAPES["smollm2-135m"].n_layers == 30
    argv = ["bench", "generate", "--preset", "tiny", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
            "--warmup", "0", "--int8", "--no-recompute", "--no-hf"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert bench_generate.NO_CACHE not in out and "int8 (eager) vs KV-cache (eager)" in out
    assert f"the decode product is {int8.product()}" in out
