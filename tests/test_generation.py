"""Generation: prefill/decode_step against forward, greedy generate against an argmax loop, sampling
(greedy, temperature, top-k, top-p, seeds), stop tokens, streaming, ragged prompts, compile, errors."""

import re

import pytest

import torch

import ftransformer as ft
from ftransformer.decode_steps import clear_compiled
from ftransformer.sampling import GREEDY
from ftransformer.speculative import Draft

CFG = ft.Config(vocab_size=37, d_model=24, n_heads=6, n_kv_heads=2, n_layers=2, d_ff=40, max_seq_len=20)


def tokens_for(cfg, shape, gen):
    return torch.randint(0, cfg.vocab_size, shape, generator=gen)


def argmax_loop(params, prompt, cfg, n):
    """Greedy decoding the slow way: the whole sequence through ``forward`` for every new token."""
    tokens = prompt
    for _ in range(n):
        tokens = torch.cat([tokens, ft.forward(params, tokens, cfg)[..., -1, :].argmax(-1, keepdim=True)], dim=-1)
    return tokens


# ---------------------------------------------------------------- prefill / decode_step


def test_prefill_and_decode_step_match_forward(gen):
    params = ft.init_params(CFG, seed=0)
    tokens = tokens_for(CFG, (3, 9), gen)
    expected = ft.forward(params, tokens, CFG)
    logits, cache = ft.prefill(params, tokens[:, :6], ft.init_cache(CFG, 3, max_len=9), CFG)
    torch.testing.assert_close(logits, expected[:, 5], atol=1e-5, rtol=0)
    for i in range(6, 9):
        logits, cache = ft.decode_step(params, tokens[:, i], cache, CFG)
        torch.testing.assert_close(logits, expected[:, i], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [9, 9, 9]


def test_prefill_of_ragged_prompts_returns_each_rows_last_real_logits(gen):
    params = ft.init_params(CFG, seed=1)
    prompts = tokens_for(CFG, (3, 5), gen)
    lengths = torch.tensor([5, 1, 3])
    logits, cache = ft.prefill(params, prompts, ft.init_cache(CFG, 3, max_len=6), CFG, seq_lengths=lengths)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[row], ft.forward(params, prompts[row, :n], CFG)[-1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [5, 1, 3]


# ---------------------------------------------------------------- greedy generation


@pytest.mark.parametrize(
    "cfg",
    [CFG, CFG.replace(positional="rope", norm_position="post"), CFG.replace(positional="sinusoidal")],
    ids=["learned", "rope-post", "sinusoidal"],
)
def test_greedy_generate_equals_an_argmax_loop_over_forward(cfg, gen, kernel):
    params = ft.init_params(cfg, seed=2)
    prompt = tokens_for(cfg, (2, 4), gen)
    out = ft.generate(params, prompt, cfg, max_new_tokens=9, sampling=GREEDY)
    assert out.shape == (2, 13) and out.dtype == prompt.dtype
    assert torch.equal(out, argmax_loop(params, prompt, cfg, 9))


def test_generate_one_unbatched_prompt(gen):
    params = ft.init_params(CFG, seed=3)
    prompt = tokens_for(CFG, (5,), gen)
    out = ft.generate(params, prompt, CFG, max_new_tokens=4, sampling=GREEDY)
    assert out.shape == (9,)
    assert torch.equal(out, argmax_loop(params, prompt, CFG, 4))


def test_generate_fills_the_context_exactly(gen):
    params = ft.init_params(CFG, seed=4)
    prompt = tokens_for(CFG, (1, 15), gen)
    out = ft.generate(params, prompt, CFG, max_new_tokens=5, sampling=GREEDY)
    assert out.shape == (1, CFG.max_seq_len)
    assert torch.equal(out, argmax_loop(params, prompt, CFG, 5))


def test_zero_new_tokens_returns_the_prompt(gen):
    params = ft.init_params(CFG, seed=5)
    prompt = tokens_for(CFG, (2, 3), gen)
    assert torch.equal(ft.generate(params, prompt, CFG, max_new_tokens=0), prompt)


def test_ragged_prompts_generate_what_each_row_generates_alone(gen):
    params = ft.init_params(CFG, seed=6)
    prompts = tokens_for(CFG, (3, 6), gen)
    lengths = torch.tensor([6, 2, 4])
    out = ft.generate(params, prompts, CFG, max_new_tokens=5, sampling=GREEDY, seq_lengths=lengths, pad_id=-1)
    assert out.shape == (3, 11)
    for row, n in enumerate(lengths.tolist()):
        alone = ft.generate(params, prompts[row, :n], CFG, max_new_tokens=5, sampling=GREEDY)
        assert torch.equal(out[row, : n + 5], alone)
        assert bool((out[row, n + 5 :] == -1).all())


def test_the_removed_keywords_are_type_errors(gen):
    # 0.3: sampling comes as one Sampling, the step as step=, the draft as one Draft, seq_lengths by that name.
    params = ft.init_params(CFG, seed=6)
    prompts = tokens_for(CFG, (3, 6), gen)
    lengths = torch.tensor([6, 2, 4])
    for removed in (dict(temperature=0.8), dict(top_k=3), dict(top_p=0.9), dict(compile=True),
                    dict(prompt_lengths=lengths), dict(draft_tokens=2)):
        with pytest.raises(TypeError, match=next(iter(removed))):
            ft.generate(params, prompts, CFG, max_new_tokens=3, **removed)
        with pytest.raises(TypeError, match=next(iter(removed))):
            ft.generate_stream(params, prompts, CFG, max_new_tokens=3, **removed)
    with pytest.raises(TypeError, match="prompt_lengths"):
        ft.prefill(params, prompts, ft.init_cache(CFG, 3, max_len=6), CFG, prompt_lengths=lengths)
    with pytest.raises(TypeError, match="sampling"):  # beartype (in tests) or the library's own check
        ft.generate(params, prompts, CFG, max_new_tokens=3, sampling={"temperature": 0.5})
    with pytest.raises(TypeError, match="seed"):
        ft.generate(params, prompts, CFG, max_new_tokens=3, seed=1.5)


# ---------------------------------------------------------------- sampling


def test_same_seed_same_text_other_seed_other_text(gen):
    params = ft.init_params(CFG, seed=7)
    prompt = tokens_for(CFG, (2, 3), gen)
    kwargs = dict(max_new_tokens=12, sampling=ft.Sampling(temperature=1.5, top_k=20, top_p=0.95))
    a = ft.generate(params, prompt, CFG, seed=11, **kwargs)
    b = ft.generate(params, prompt, CFG, seed=11, **kwargs)
    c = ft.generate(params, prompt, CFG, seed=12, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :3], prompt)


# ---------------------------------------------------------------- stop tokens and streaming


def test_stop_tokens_end_a_row_and_pad_it(gen):
    params = ft.init_params(CFG, seed=8)
    prompt = tokens_for(CFG, (3, 4), gen)
    free = ft.generate(params, prompt, CFG, max_new_tokens=10, sampling=GREEDY)
    stop = int(free[0, 6])  # the third new token of row 0
    out = ft.generate(params, prompt, CFG, max_new_tokens=10, sampling=GREEDY, stop_tokens=[stop], pad_id=-1)
    for row in range(3):
        new = free[row, 4:].tolist()
        n = new.index(stop) + 1 if stop in new else len(new)
        assert out[row, 4 : 4 + n].tolist() == new[:n]
        assert bool((out[row, 4 + n :] == -1).all())
    # The stream ends as soon as every row has stopped.
    single = ft.generate(params, prompt[:1], CFG, max_new_tokens=10, sampling=GREEDY, stop_tokens=[stop])
    assert single.shape == (1, 4 + free[0, 4:].tolist().index(stop) + 1)
    assert int(single[0, -1]) == stop


def test_the_stream_yields_the_tokens_generate_returns(gen):
    params = ft.init_params(CFG, seed=9)
    prompt = tokens_for(CFG, (2, 5), gen)
    kwargs = dict(max_new_tokens=7, sampling=ft.Sampling(temperature=0.8, top_k=10), seed=3)
    stream = ft.generate_stream(params, prompt, CFG, **kwargs)
    first = next(stream)  # produced before the rest is computed
    assert first.shape == (2,)
    streamed = torch.stack([first, *stream], dim=-1)
    assert torch.equal(torch.cat([prompt, streamed], dim=-1), ft.generate(params, prompt, CFG, **kwargs))


# ---------------------------------------------------------------- compile


def test_compiled_decode_step_does_not_recompile_per_step(gen, no_typecheck):
    cfg, warm = CFG.replace(n_layers=1), ft.Sampling(temperature=0.7)
    params = ft.init_params(cfg, seed=10)
    prompt = tokens_for(cfg, (2, 3), gen)
    torch._dynamo.reset()
    clear_compiled()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = ft.generate(params, prompt, cfg, max_new_tokens=8, sampling=GREEDY, step="compile")
        # A second generation of the same shapes reuses the graph too.
        again = ft.generate(params, prompt, cfg, max_new_tokens=8, sampling=warm, seed=1, step="compile")
    assert torch.equal(out, ft.generate(params, prompt, cfg, max_new_tokens=8, sampling=GREEDY))
    assert torch.equal(again, ft.generate(params, prompt, cfg, max_new_tokens=8, sampling=warm, seed=1))
    torch._dynamo.reset()
    clear_compiled()


def test_aot_decode_step_generates_what_the_eager_loop_generates(gen):
    # step="aot": the decode step exported and compiled by AOTInductor (ftransformer.aot), with the
    # written-out attention. Greedy and sampled tokens equal the eager loop's (the logits agree to float
    # rounding, far inside the margins of a random tiny model); a second generation of the same shapes,
    # also with other params, reuses the built step.
    from ftransformer import aot

    params = ft.init_params(CFG, seed=12)
    prompt = tokens_for(CFG, (2, 5), gen)
    lengths = torch.tensor([5, 3])
    before = aot.built_steps()
    greedy = ft.generate(params, prompt, CFG, max_new_tokens=9, sampling=GREEDY, step="aot")
    assert aot.built_steps() == before + 1
    assert torch.equal(greedy, ft.generate(params, prompt, CFG, max_new_tokens=9, sampling=GREEDY))
    kw = dict(max_new_tokens=9, sampling=ft.Sampling(temperature=0.8, top_k=7), seed=4, seq_lengths=lengths)
    other = ft.init_params(CFG, seed=13)
    sampled = ft.generate(other, prompt, CFG, step="aot", **kw)
    assert torch.equal(sampled, ft.generate(other, prompt, CFG, **kw))
    # cache lengths are bucketed (5 + 7 and 5 + 9 both round up to max_seq_len=20): one step serves both
    shorter = ft.generate(params, prompt, CFG, max_new_tokens=7, sampling=GREEDY, step="aot")
    assert torch.equal(shorter, greedy[:, :12])
    # a generation that needs no decode step (one new token) builds none, whatever its shape
    ft.generate(params, tokens_for(CFG, (3, 4), gen), CFG, max_new_tokens=1, step="aot")
    assert aot.built_steps() == before + 1


def test_aot_step_signature_tells_memory_layouts_apart():
    # A compiled library assumes the strides it was built for: params of the same shapes but another
    # layout (here every matrix transposed in memory) must not reuse it.
    from ftransformer import aot

    params = ft.init_params(CFG, seed=0)
    other = ft.tree.map(lambda x: x.t().contiguous().t() if x.ndim == 2 else x, params)
    cache = ft.init_cache(CFG, (1,), max_len=8)
    token = torch.zeros(1, dtype=torch.long)
    assert aot._signature(CFG, (params, token, cache)) == aot._signature(CFG, (ft.tree.map(torch.clone, params), token, cache))
    assert aot._signature(CFG, (params, token, cache)) != aot._signature(CFG, (other, token, cache))
    assert [aot.cache_length(n, CFG) for n in (1, 14, 20)] == [20, 20, 20]
    big = CFG.replace(max_seq_len=200)
    assert [aot.cache_length(n, big) for n in (1, 64, 65, 199)] == [64, 64, 128, 200]


def test_step_is_one_of_the_kinds():
    params = ft.init_params(CFG)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"step must be one of \('eager', 'compile', 'aot'\), got 'fast'"):
        ft.generate(params, prompt, CFG, max_new_tokens=2, step="fast")
    with pytest.raises(ValueError, match='step="aot" takes float params'):
        ft.generate_stream(ft.quantize(params, CFG, "int8"), prompt, CFG, max_new_tokens=2, step="aot")
    with pytest.raises(ValueError, match="takes neither seq_lengths nor a step other than 'eager'; got .* step='aot'"):
        ft.generate(params, prompt, CFG, max_new_tokens=2, step="aot", draft=Draft(params, CFG))
    with pytest.raises(ValueError, match="step must be one of"):
        ft.generate(params, prompt, CFG, max_new_tokens=2, step="AOT", draft=Draft(params, CFG))


# ---------------------------------------------------------------- errors


def test_prompt_longer_than_max_seq_len(gen):
    params = ft.init_params(CFG)
    with pytest.raises(ValueError, match="prompt has seq=21 but max_seq_len=20"):
        ft.generate(params, tokens_for(CFG, (1, 21), gen), CFG, max_new_tokens=1)


def test_prompt_plus_new_tokens_longer_than_max_seq_len(gen):
    params = ft.init_params(CFG)
    with pytest.raises(ValueError, match="seq=15 plus max_new_tokens=6 is 21 tokens but max_seq_len=20"):
        ft.generate(params, tokens_for(CFG, (1, 15), gen), CFG, max_new_tokens=6)


def test_bad_generation_arguments(gen):
    params = ft.init_params(CFG)
    prompt = tokens_for(CFG, (2, 3), gen)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ft.generate(params, prompt, CFG, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[1, seq=3\]"):
        ft.generate(params, prompt, CFG, max_new_tokens=2, seq_lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="prompt contains id 37"):
        ft.generate(params, torch.tensor([[1, 37]]), CFG, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        ft.generate(params, prompt, CFG, max_new_tokens=2, sampling=ft.Sampling(top_p=2.0))
    with pytest.raises(ValueError, match=r"length 7 .*max_len=6"):
        _, cache = ft.prefill(params, prompt, ft.init_cache(CFG, 2, max_len=6), CFG)
        ft.prefill(params, prompt.repeat(1, 2)[:, :4], cache, CFG)


# ---------------------------------------------------------------- the command line and the benchmark


@pytest.fixture
def char_checkpoint(tmp_path):
    """A run directory as `ftransformer train` leaves it: run/best/ with config, params and tokenizer."""
    tokenizer = ft.data.CharTokenizer.from_text("abcdefgh ijk\n")
    cfg = ft.Config(vocab_size=tokenizer.vocab_size, d_model=12, n_heads=3, n_layers=2, d_ff=20, max_seq_len=24)
    params = ft.init_params(cfg, seed=3)
    ft.save_checkpoint(tmp_path / "run" / "best", params=params, config=cfg, step=5, tokenizer=tokenizer)
    return tmp_path / "run", cfg, params, tokenizer


def test_cli_generate_prints_the_prompt_and_its_sampled_continuation(char_checkpoint, capsys):
    from ftransformer.cli import main

    run_dir, cfg, params, tokenizer = char_checkpoint
    argv = ["generate", "--prompt", "cab", "--max-new-tokens", "9", "--seed", "4", "--top-k", "5"]
    assert main([*argv, "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out
    prompt = torch.tensor(tokenizer.encode("cab"))
    expected = ft.generate(params, prompt, cfg, max_new_tokens=9, sampling=ft.Sampling(0.8, top_k=5), seed=4)
    assert out == tokenizer.decode(expected.tolist()) + "\n"
    # The checkpoint directory itself works too, and the same seed prints the same text.
    assert main([*argv, "--checkpoint", str(run_dir / "best")]) == 0
    assert capsys.readouterr().out == out


def test_cli_generate_slides_past_the_context(char_checkpoint, capsys):
    from ftransformer.cli import main

    run_dir, cfg, _, _ = char_checkpoint
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "50"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(out) == 3 + 50 + 1  # the prompt, every token asked for (past max_seq_len=24), a newline
    # a prompt as long as the context is cut to its last max_seq_len // 2 tokens, with a note
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "abc" * 8, "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "the model sees its last 12" in captured.err
    assert len(captured.out) == 24 + 5 + 1


def test_cli_generate_can_decode_with_the_compiled_step(char_checkpoint, capsys, no_typecheck):
    from ftransformer.cli import main

    run_dir = char_checkpoint[0]
    # 33 tokens after a 3-token prompt: two segments of the sliding stream, both with a 24-slot cache
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "33"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()
    clear_compiled()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert main([*argv, "--compile"]) == 0
    finally:
        torch._dynamo.reset()
        clear_compiled()
    assert capsys.readouterr().out == eager


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "{missing}", "--prompt", "ab"], "no checkpoint at"),
        (["--prompt", "ab"], "--checkpoint DIR"),
        (["--checkpoint", "{run}", "--prompt", "xyz"], "vocabulary"),  # characters the tokenizer does not know
        (["--checkpoint", "{run}", "--prompt", "ab", "--temperature", "-1"], "temperature"),
        (["--checkpoint", "{run}", "--prompt", "ab", "--quantize", "int8", "--compile", "aot"], "takes float params"),
    ],
)
def test_cli_generate_errors_are_one_line(char_checkpoint, tmp_path, capsys, extra, message):
    from ftransformer.cli import main

    run_dir = char_checkpoint[0]
    argv = [a.format(missing=tmp_path / "missing", run=run_dir) for a in extra]
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftransformer generate: error:") and message in err and err.count("\n") == 1


def test_text_stream_holds_back_half_a_character():
    from ftransformer.cli.generate_cmd import TextStream

    class Bytes:  # a byte-level tokenizer: one id per UTF-8 byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    pieces = [stream.push(b) for b in "aé€b".encode()]
    assert pieces == ["a", "", "é", "", "", "€", "b"]
    assert stream.finish() == ""


def test_bench_generate_runs_on_tiny_sizes(capsys):
    from ftransformer.cli import main

    argv = ["bench", "generate", "--preset", "tiny", "--prompt-len", "3", "--new-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("KV-cache (eager)", "no cache (forward)", "transformers", "ops/token", "floor"):
        assert name in out
    assert "all contenders produced the same tokens" in out
    assert main([*argv, "--prompt-len", "14"]) == 2  # 14 + 4 > max_seq_len=16
    assert "max_seq_len=16" in capsys.readouterr().err


def test_bench_generate_int8_contenders(capsys):
    from ftransformer.bench import torchao_ref
    from ftransformer.cli import main

    argv = ["bench", "generate", "--preset", "tiny", "--prompt-len", "3", "--new-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--int8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"int8 \(eager\)\s+\d+\.\d\d", out)
    assert re.search(r"int8 \(eager\) vs KV-cache \(eager\): \d+\.\d\dx tokens/s \((meets|misses)", out)
    assert re.search(r"int8 \(eager\): \d+% of its greedy tokens equal the fp32 model's", out)
    if torchao_ref.available():
        assert re.search(r"transformers \+ torchao int8\s+\d+\.\d\d", out)
        assert re.search(r"int8 \(eager\) vs transformers \+ torchao int8: \d+\.\d\dx tokens/s", out)
        assert re.search(r"transformers \+ torchao int8: \d+% of its greedy tokens equal", out)
    else:
        assert "transformers + torchao int8: skipped: torchao not installed" in out


def test_bench_generate_aot_contender(capsys):
    from ftransformer.cli import main

    argv = ["bench", "generate", "--preset", "tiny", "--prompt-len", "3", "--new-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--aot", "--no-hf"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"compiled the decode step of KV-cache \(AOTInductor\) in \d+\.\d s", out)
    assert re.search(r"KV-cache \(AOTInductor\)\s+\d+\.\d\d", out)
    assert "all contenders produced the same tokens" in out


# ---------------------------------------------------------------- past max_seq_len


def test_sliding_stream_equals_plain_generation_while_it_fits(gen):
    prompt = tokens_for(CFG, (2, 5), gen)
    params = ft.init_params(CFG, seed=3)
    kw = dict(max_new_tokens=CFG.max_seq_len - 5, sampling=ft.Sampling(temperature=0.9, top_k=7), seed=11)
    sliding = torch.stack(list(ft.generation.generate_stream_sliding(params, prompt, CFG, **kw)), dim=-1)
    torch.testing.assert_close(torch.cat([prompt, sliding], -1), ft.generate(params, prompt, CFG, **kw))


def test_sliding_stream_restarts_from_the_last_keep_tokens(gen):
    """Past the context, greedy sliding == generate on the last `keep` tokens, segment by segment."""
    prompt = tokens_for(CFG, (1, 4), gen)
    params = ft.init_params(CFG, seed=5)
    keep, total = 8, 3 * CFG.max_seq_len
    out = torch.stack(list(ft.generation.generate_stream_sliding(
        params, prompt, CFG, max_new_tokens=total, sampling=GREEDY, keep=keep)), dim=-1)
    assert out.shape == (1, total)
    first = CFG.max_seq_len - 4
    expected = ft.generate(params, prompt, CFG, max_new_tokens=first, sampling=GREEDY)[:, 4:]
    torch.testing.assert_close(out[:, :first], expected)
    context = torch.cat([prompt, out[:, :first]], -1)[:, -keep:]
    second = ft.generate(params, context, CFG, max_new_tokens=CFG.max_seq_len - keep, sampling=GREEDY)[:, keep:]
    torch.testing.assert_close(out[:, first:first + second.shape[1]], second)


def test_sliding_stream_rejects_a_bad_keep(gen):
    with pytest.raises(ValueError, match=r"keep must be an int in \[1, max_seq_len=20\)"):
        ft.generation.generate_stream_sliding(ft.init_params(CFG), tokens_for(CFG, (3,), gen), CFG, max_new_tokens=3, keep=20)


def test_sliding_stream_crops_a_prompt_longer_than_the_context(gen):
    params = ft.init_params(CFG, seed=2)
    long_prompt = tokens_for(CFG, (1, 3 * CFG.max_seq_len), gen)
    out = list(ft.generation.generate_stream_sliding(params, long_prompt, CFG, max_new_tokens=5, sampling=GREEDY,
                                                     keep=6))
    expected = ft.generate(params, long_prompt[:, -6:], CFG, max_new_tokens=5, sampling=GREEDY)[:, 6:]
    torch.testing.assert_close(torch.stack(out, -1), expected)


def test_sliding_stream_keeps_stopped_rows_stopped_across_segments(gen):
    params = ft.init_params(CFG, seed=4)
    prompt = tokens_for(CFG, (4, 3), gen)
    kw = dict(max_new_tokens=60, sampling=ft.Sampling(temperature=1.0), seed=3, keep=4)
    free = torch.stack(list(ft.generation.generate_stream_sliding(params, prompt, CFG, **kw)), -1)
    stop = int(free[0, 2])  # row 0 certainly stops at step 2, in the first segment
    out = torch.stack(list(ft.generation.generate_stream_sliding(params, prompt, CFG, **kw, stop_tokens=[stop],
                                                                 pad_id=-1)), -1)
    for row in range(4):
        hits = (free[row] == stop).nonzero()
        if len(hits) and int(hits[0]) < out.shape[-1]:
            first = int(hits[0])
            torch.testing.assert_close(out[row, : first + 1], free[row, : first + 1])
            assert bool((out[row, first + 1:] == -1).all()), f"row {row} came back to life after its stop token"


def test_ragged_prompt_shorter_than_its_padding_gets_a_big_enough_cache(gen):
    params = ft.init_params(CFG, seed=1)
    prompt = tokens_for(CFG, (2, 10), gen)
    lengths = torch.tensor([3, 5])
    out = ft.generate(params, prompt, CFG, max_new_tokens=2, sampling=GREEDY, seq_lengths=lengths)
    for row in range(2):
        alone = ft.generate(params, prompt[row, : lengths[row]], CFG, max_new_tokens=2, sampling=GREEDY)
        torch.testing.assert_close(out[row, : lengths[row] + 2], alone)


def test_sampling_options_have_one_home():
    cfg = ft.PRESETS["tiny"]
    params = ft.init_params(cfg, seed=0)
    prompt = torch.tensor([[1, 2, 3]])
    s = ft.Sampling(temperature=0.8, top_k=5)
    by_object = ft.generate(params, prompt, cfg, max_new_tokens=6, sampling=s, seed=3)
    streamed = torch.stack(list(ft.generate_stream(params, prompt, cfg, max_new_tokens=6, sampling=s, seed=3)), -1)
    assert torch.equal(streamed, by_object[:, 3:])
    slid = torch.stack(list(ft.generation.generate_stream_sliding(params, prompt, cfg, max_new_tokens=6, sampling=s,
                                                                  seed=3)), -1)
    assert torch.equal(slid, by_object[:, 3:])
    assert ft.Sampling().temperature == 1.0 and ft.Sampling(temperature=0).greedy and ft.Sampling(top_k=1).greedy
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        ft.Sampling(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        ft.Sampling(top_p=1.5)
    with pytest.raises(TypeError, match="temperature"):  # one way: the loose keywords are gone
        ft.generate(params, prompt, cfg, max_new_tokens=2, sampling=s, temperature=0.5)
