import json

import pytest

import ftransformer as ft
from ftransformer.bench import gpu
from ftransformer.cli import build_parser, main


def test_flops_per_token_matches_a_hand_count():
    cfg = ft.Config(vocab_size=11, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_seq_len=4)
    # per block: ln1 8+8, qkv 8*24+24, out 8*8+8, ln2 8+8, mlp in 8*16+16, mlp out 16*8+8
    block = 16 + (192 + 24) + (64 + 8) + 16 + (128 + 16) + (128 + 8)
    n = 11 * 8 + block + 16  # tied token table (it is the unembedding's product) + ln_f; positions are a lookup
    assert gpu.matmul_params(cfg) == n == 704
    # 6N, plus per layer 2 products (scores, values) x 2 FLOPs x heads*head_dim x T, x3 for the backward
    assert gpu.flops_per_token(cfg, 4) == 6 * 704 + 3 * 2 * 2 * 2 * 4 * 4 == 4608
    # an untied input table is a lookup too; its separate unembedding takes part in the product
    untied = cfg.replace(tie_embeddings=False)
    assert gpu.matmul_params(untied) == n  # tokens table left out, unembed [8, 11] counted instead
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        gpu.flops_per_token(cfg, 0)


def test_gpt2_flops_per_token_is_nanogpts():
    # nanoGPT's estimate_mfu for GPT-2 124M at T=1024: N = GPT-2's 124,439,808 parameters less the
    # position table (get_num_params(non_embedding=True)), then 6N + 12 L H Q T
    n = 124_439_808 - 1024 * 768
    assert gpu.flops_per_token(ft.PRESETS["gpt2"], 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_peak_table_knows_the_cards_and_not_others():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA GeForce RTX 3090") is None


def test_argument_parsing_and_device_defaults():
    args = build_parser().parse_args(["bench", "gpu", "--device", "cpu"])
    s = gpu._settings(args)
    assert (s["preset"], s["batch_size"], s["seq_len"], s["compile"]) == ("tiny", 2, 16, False)
    assert s["precision"].name == "fp32" and s["decode_batches"] == [1, 16]
    args = build_parser().parse_args(["bench", "gpu", "--device", "cpu", "--preset", "seed", "--seq-len", "32",
                                      "--dtype", "bf16", "--compile", "yes", "--decode-batches", "2,3"])
    s = gpu._settings(args)
    assert (s["preset"], s["seq_len"], s["compile"], s["precision"].name, s["decode_batches"]) == (
        "seed", 32, True, "bf16", [2, 3])
    for flags, message in ((["--seq-len", "17"], "must be <= max_seq_len=16, got 17"),
                           (["--steps", "0"], "--steps must be >= 1, got 0"),
                           (["--decode-batches", "1,x"], "--decode-batches must be comma-separated ints")):
        with pytest.raises(ValueError, match=message):
            gpu._settings(build_parser().parse_args(["bench", "gpu", "--device", "cpu", *flags]))


def test_cpu_run_prints_json(capsys):
    assert main(["bench", "gpu", "--device", "cpu", "--json", "--steps", "2", "--new-tokens", "3",
                 "--decode-batches", "1,2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["preset"] == "tiny" and report["dtype"] == "fp32"
    assert report["flops_per_token"] == gpu.flops_per_token(ft.PRESETS["tiny"], 16)
    assert report["peak_tflops"] is None and "MFU omitted" in report["note"]
    assert set(report["train"]) == {gpu.OURS, gpu.NANOGPT}
    for t in report["train"].values():
        assert t["tokens_per_s"] > 0 and t["mfu"] is None and t["peak_memory_mib"] > 0
    # the two contenders start from the same weights and see the same batches
    assert report["train"][gpu.OURS]["loss"] == pytest.approx(report["train"][gpu.NANOGPT]["loss"], rel=1e-3)
    assert set(report["decode"]) == {f"{name}, batch {b}" for name in (gpu.OURS, gpu.NANOGPT) for b in (1, 2)}
    assert all(d["tokens_per_s"] > 0 for d in report["decode"].values())


def test_cpu_run_prints_tables(capsys):
    assert main(["bench", "gpu", "--device", "cpu", "--steps", "1", "--warmup", "0", "--new-tokens", "2",
                 "--decode-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench gpu: cpu, torch ") and "MFU omitted" in out
    assert any(line.startswith(gpu.NANOGPT) for line in out.splitlines())
    assert any(line.startswith(f"{gpu.OURS}, batch 1") for line in out.splitlines())


def test_a_failing_decoder_is_reported_and_the_others_still_run(monkeypatch, capsys):
    def broken(prompt):
        raise RuntimeError("no graph today")

    real = gpu._decoders
    monkeypatch.setattr(gpu, "_decoders", lambda s, params: {**real(s, params), "broken": broken})
    assert main(["bench", "gpu", "--device", "cpu", "--steps", "1", "--new-tokens", "2", "--decode-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "broken, batch 1                  failed: RuntimeError: no graph today" in out
    assert any(line.startswith(f"{gpu.OURS}, batch 1") and "failed" not in line for line in out.splitlines())
