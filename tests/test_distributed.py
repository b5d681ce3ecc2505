"""Data parallelism: two CPU processes (gloo) train exactly what one process trains.

Each multi-process test launches real processes through torchrun's module (``python -m
torch.distributed.run``), as a user would. Tolerances: two processes sum the per-row losses and gradients
in a different order than one process does (each rank sums its half, then the halves are added), so
results agree to float32 rounding, ~1e-7 relative per step; after a few AdamW steps the parameters stay
within 1e-5. The model has ``bias=false``: the gradient of a *key* bias is exactly zero in exact
arithmetic (softmax ignores a constant added to every score), so in floating point it is pure rounding
noise, which Adam divides by its own square root and turns into +-lr steps whose sign depends on the
summation order -- a comparison of those leaves would measure noise, not the implementation.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer import distributed

RUN = ["--preset", "tiny", "--quiet", "--tokenizer", "char", "--set", "bias=false", "--set", "eval_batches=2",
       "--batch-size", "8", "--eval-every", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FT_DIST_TIMEOUT": "30"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "small.txt"
    rng = np.random.default_rng(0)
    path.write_text("".join(rng.choice(list("abcdefgh \n"), 30_000)))
    return path


def train(corpus, out, *extra, nproc=1, timeout=300):
    cmd = [sys.executable, "-m", "ftransformer", "train", *RUN, "--data", str(corpus), "--out", str(out), *extra]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "ftransformer"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, *, atol):
    pa = ft.tree.flatten_with_paths(ft.load_checkpoint(a / "latest").params)
    pb = ft.tree.flatten_with_paths(ft.load_checkpoint(b / "latest").params)
    assert pa.keys() == pb.keys()
    for path, x in pa.items():
        y = pb[path]
        assert torch.allclose(x, y, rtol=0, atol=atol), f"{path}: max diff {float((x - y).abs().max()):.3g}"
    ha, hb = history(a), history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb):
        for k in ("train_loss", "val_loss", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (ra["step"], k)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_what_one_process_trains(corpus, tmp_path, accum):
    train(corpus, tmp_path / "one", "--steps", "6", "--accum", str(accum))
    two = train(corpus, tmp_path / "two", "--steps", "6", "--accum", str(accum), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert "2 processes (gloo), 4 sequences each" in two.stdout
    assert two.stdout.count("checkpoints:") == 1  # rank 0 alone reports (and writes)


def test_resumed_two_process_run_equals_an_uninterrupted_one(corpus, tmp_path):
    # A constant learning rate, so that a run told to stop at step 3 has the schedule of one told 6.
    flat = ["--set", "warmup_steps=0", "--set", "min_lr_ratio=1"]
    train(corpus, tmp_path / "whole", "--steps", "6", *flat, nproc=2)
    train(corpus, tmp_path / "parts", "--steps", "3", *flat, nproc=2)
    train(corpus, tmp_path / "parts", "--steps", "6", "--resume", nproc=2)
    # the same processes in the same order: the same sums, so nothing may differ at all
    assert_same_run(tmp_path / "whole", tmp_path / "parts", atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_ends_the_job_with_a_clear_error(corpus, tmp_path):
    # Two ranks started by hand with torchrun's environment, so the test can kill one of them itself.
    port, out = free_port(), tmp_path / "run"
    cmd = [sys.executable, "-m", "ftransformer", "train", *RUN, "--data", str(corpus), "--out", str(out),
           "--steps", "100000", "--eval-every", "100000"]
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # step 0 is on record: both ranks are training
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)  # bounded: gloo sees the closed socket, else the 30 s timeout
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()  # reap it and close its pipes
    assert procs[0].returncode == 3, err[-3000:]
    assert "rank 0: the gradient all-reduce across processes failed" in err and "another process has died" in err
    assert "Traceback" not in err
    assert waited < 60
    assert ft.load_checkpoint(out / "latest").step == 0  # the last good checkpoint is intact


def test_buckets_group_by_dtype_and_size_in_order():
    f = [torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(3, dtype=torch.long), torch.zeros(1)]
    assert distributed._buckets(f, bucket_bytes=100) == [[0, 1], [2], [3], [4]]
    assert distributed._buckets(f, bucket_bytes=10_000) == [[0, 1, 2], [3], [4]]


def test_shard_takes_this_ranks_rows_and_refuses_uneven_batches():
    ctx = distributed.DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
    assert ctx.shard(torch.arange(8)).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="7 rows does not split evenly over 2 processes"):
        ctx.shard(torch.arange(7))


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(distributed.DistributedError, match="launch with torchrun"):
        distributed.init_from_env()


def test_fit_refuses_a_batch_that_does_not_split_over_the_processes(tmp_path):
    cfg = ft.Config(vocab_size=11, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_seq_len=8)
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ids = np.arange(500) % 11
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by accum_steps=2 x 2 processes = 4"):
        ft.fit(ft.init_params(cfg), ft.make_train_step(cfg, ft.optim.sgd(0.1), accum_steps=2),
               ft.loop.TokenData(cfg, ids, ids), ft.loop.FitSettings(steps=1, batch_size=6, accum_steps=2),
               out_dir=tmp_path, dist=ctx, progress=False, log=None)
