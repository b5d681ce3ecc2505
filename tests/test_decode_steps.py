"""The decode steps: the pure public one, the loop's in-place one (same logits, buffers written in place),
which step ``decode_step_for(kind)`` picks, and the untied unembedding (same logits)."""

from pathlib import Path

import re

import pytest
import torch

import ftransformer as ft
from ftransformer import decode_steps
from ftransformer.decode_steps import decode_step_for, untie_for_decoding
from ftransformer.sampling import GREEDY

CFG = ft.Config(vocab_size=29, d_model=20, n_heads=5, n_kv_heads=1, n_layers=2, d_ff=36, max_seq_len=100)


def test_in_place_step_equals_the_pure_step_and_writes_the_buffers_it_was_given(gen):
    params = ft.init_params(CFG, seed=1)
    prompt = torch.randint(0, CFG.vocab_size, (3, 4), generator=gen)
    token = torch.randint(0, CFG.vocab_size, (3,), generator=gen)
    _, cache = ft.prefill(params, prompt, ft.init_cache(CFG, 3, max_len=6), CFG)
    want, pure = ft.decode_step(params, token, cache, CFG)
    assert pure.k[0].data_ptr() != cache.k[0].data_ptr()  # the public step leaves its cache be
    got, owned = decode_step_for("eager", params).step(params, token, cache, CFG)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert owned.k[0].data_ptr() == cache.k[0].data_ptr() and owned.lengths.tolist() == [5, 5, 5]
    torch.testing.assert_close(owned.k[1], pure.k[1])


def test_the_kind_picks_one_step():
    params = ft.init_params(CFG)
    eager, compiled, ahead = (decode_step_for(kind, params) for kind in ("eager", "compile", "aot"))
    assert eager.step is decode_steps._in_place_step
    assert compiled.step is decode_step_for("compile", params).step  # built once, nothing compiled yet
    assert callable(ahead.step)  # the library is built on its first call
    assert [s.cache_length(70, CFG) for s in (eager, compiled, ahead)] == [70, 100, 100]  # compiled: bucketed
    for bad in ("fast", "AOT", ""):
        with pytest.raises(ValueError, match=rf"step must be one of \('eager', 'compile', 'aot'\), got {bad!r}"):
            decode_step_for(bad, params)
    for bad in (None, 1.0, True):  # beartype (in tests) names the argument, else the ValueError above
        with pytest.raises((TypeError, ValueError), match="kind|step must be one of"):
            decode_step_for(bad, params)
    with pytest.raises(ValueError, match='step="aot" takes float params'):
        decode_step_for("aot", ft.quantize(params, CFG, "int8"))


def test_untied_unembedding_gives_the_same_logits(gen):
    params = ft.init_params(CFG, seed=2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 7), generator=gen)
    untied, untied_cfg = untie_for_decoding(params, CFG)
    assert not untied_cfg.embeddings.tie and untied["unembed"]["w"].shape == (CFG.d_model, CFG.vocab_size)
    assert "unembed" not in params  # the caller's tree is untouched
    torch.testing.assert_close(ft.forward(untied, tokens, untied_cfg), ft.forward(params, tokens, CFG), atol=1e-5, rtol=0)
    own = CFG.replace(tie_embeddings=False)
    separate = ft.init_params(own)
    assert untie_for_decoding(separate, own) == (separate, own)


def test_only_the_decode_loops_call_the_in_place_forward():
    # Outside the model itself, only the decode steps (whose in-place step the eager, compiled and
    # ahead-of-time kinds all run) and speculative decoding call the one in-place forward.
    package = Path(decode_steps.__file__).parent
    model_side = {"model.py", "cache.py", "layers"}
    # (``make_train_step(donate=True)`` donates params and optimizer state to a training step: not the cache.)
    in_place = re.compile(r"\bforward_with_cache_in_place\b|\bwrite_kv_\b")  # not gguf's write_kv_data_to_file
    callers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py")
        if p.relative_to(package).parts[0] not in model_side and in_place.search(p.read_text())
    )
    assert callers == ["decode_steps.py", "speculative.py"]


def test_one_compiled_block_serves_every_layer_and_every_prompt_in_a_bucket(gen, no_typecheck):
    # step="compile" compiles the block once (params are arguments: both layers share the graph); the cache
    # length is bucketed (tiny: max_seq_len=16), so new prompt lengths and max_new_tokens reuse the graph, and
    # an ahead-of-time export in between leaves its guards (einops' backend cache) holding. Rotary, as Llama.
    from torch._dynamo.utils import counters

    cfg = ft.PRESETS["tiny"].replace(positional="rope")
    params = ft.init_params(cfg, seed=5)
    torch._dynamo.reset()
    decode_steps.clear_compiled()
    counters.clear()
    try:
        for prompt_len, new in ((3, 4), (5, 6), (2, 9), (4, 5)):
            if prompt_len == 4:  # the last one after an ahead-of-time build of the same block
                ft.generate(params, torch.randint(0, cfg.vocab_size, (1, 3), generator=gen), cfg,
                            max_new_tokens=3, sampling=GREEDY, step="aot")
            prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
            got = ft.generate(params, prompt, cfg, max_new_tokens=new, sampling=GREEDY, step="compile")
            assert torch.equal(got, ft.generate(params, prompt, cfg, max_new_tokens=new, sampling=GREEDY))
            assert counters["stats"]["unique_graphs"] == 1, (prompt_len, new)
    finally:
        torch._dynamo.reset()
        decode_steps.clear_compiled()
