"""``python -m ftransformer.bench.edges`` runs on a tiny model in seconds, checks the sweep against the loop
first, puts the estimates next to the exact values and prints one row per contender."""

from ftransformer.bench import edges as bench_edges

TINY = ["--layers", "2", "--d-model", "32", "--seq-len", "6", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
        "--steps", "2"]


def test_the_bench_runs_on_a_tiny_model_and_prints_every_contender(capsys):
    assert bench_edges.main(TINY) == 0
    out = capsys.readouterr().out
    assert "the sweep equals the loop" in out and "EAP vs exact:" in out and "EAP-IG (2 steps) vs exact:" in out
    for name in (bench_edges.LOOP, bench_edges.SWEEP, bench_edges.EAP, bench_edges.IG):
        assert f"\n{name} " in out
    # embed -> 9 readers, a0.h0 -> 6 (m0, layer 1's q/k/v/m1, logits), m0 -> 5, a1.h0 -> 2, m1 -> logits.
    assert "2 layers, d_model 32, 1 heads: 23 edges; batch 2 x 6" in out


def test_without_the_loop_it_times_three_contenders(capsys):
    assert bench_edges.main(TINY + ["--no-loop"]) == 0
    out = capsys.readouterr().out
    assert bench_edges.LOOP not in out and "the sweep equals the loop" not in out and f"\n{bench_edges.SWEEP} " in out
