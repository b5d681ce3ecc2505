"""Compiled decoding under steering: the intervention's tensors are arguments of the compiled blocks."""

import pytest
import torch

import ftransformer as ft
from ftransformer import decode_steps
from ftransformer.interp import steering
from ftransformer.layers.tap import Tap, WithTensors
from ftransformer.sampling import GREEDY

from tests.test_steering import CONFIGS, _uncached_greedy


@pytest.fixture
def fresh_compile():
    """Dynamo's caches and counters cleared before and after (so ``unique_graphs`` counts this test's graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    decode_steps.clear_compiled()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    decode_steps.clear_compiled()


def test_compiled_steered_decoding_equals_eager_and_uncached_without_recompiling(gen, no_typecheck, fresh_compile):
    # Two steering edits at once (a resid_mid and an embed one: a compiled block and the eager code around the
    # blocks); a new vector and a new scale run the graphs built for the first (2: the plain block, the steered one).
    cfg = CONFIGS["pre-ln-rope-gqa"]
    params = ft.init_params(cfg, seed=0, dtype=torch.float64)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    plain = ft.generate(params, prompt, cfg, max_new_tokens=7, sampling=GREEDY)
    for scale in (3.0, -2.5, 6.0):
        vector = torch.randn(cfg.d_model, generator=gen, dtype=torch.float64)
        interventions = {**steering.steer(vector, "blocks.1.resid_mid", scale),
                         **steering.steer(vector.flip(0), "embed", torch.tensor(0.5, dtype=torch.float64))}
        kw = dict(max_new_tokens=7, sampling=GREEDY, interventions=interventions)
        compiled = ft.generate(params, prompt, cfg, step="compile", **kw)
        eager = ft.generate(params, prompt, cfg, **kw)
        assert torch.equal(compiled, eager)
        assert torch.equal(eager, _uncached_greedy(params, prompt, cfg, interventions, "all", 7))
        assert not torch.equal(compiled, plain)
        assert fresh_compile["stats"]["unique_graphs"] == 2, scale


def test_the_compiled_tapped_step_gives_the_eager_logits(no_typecheck, fresh_compile):
    cfg = CONFIGS["parallel"]
    params = ft.init_params(cfg, seed=1, dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 9, 2, 7, 3, 3, 8]])
    interventions = steering.steer(torch.linspace(-2, 2, cfg.d_model, dtype=torch.float64), "blocks.2.resid_post", 1.5)
    expected, _ = ft.forward_with_activations(params, tokens, cfg, interventions=interventions)
    stepper = decode_steps.tapped_step(Tap(interventions, record=False), "compile")
    assert stepper.kind == "compile"
    cache = ft.init_cache(cfg, 1, max_len=stepper.cache_length(tokens.shape[-1], cfg), dtype=torch.float64)
    _, cache = ft.prefill(params, tokens[:, :4], cache, cfg, tap=Tap(interventions, record=False))
    for i in range(4, tokens.shape[-1]):
        logits, cache = stepper.step(params, tokens[:, i], cache, cfg)
        torch.testing.assert_close(logits, expected[:, i], atol=1e-10, rtol=0)


def test_steer_is_a_pure_function_of_its_tensors_and_compile_refuses_other_functions():
    vector = torch.arange(4.0, dtype=torch.float64)
    edit = steering.steer(vector, "embed", 2.0)["embed"]
    assert isinstance(edit, WithTensors) and edit.fn is steering.add_scaled
    torch.testing.assert_close(edit(torch.ones(2, 3, 4, dtype=torch.float64)), 1 + 2 * vector.expand(2, 3, 4))
    assert decode_steps.is_compilable({"embed": edit}) and not decode_steps.is_compilable({"embed": lambda v: v})
    with pytest.raises(ValueError, match="WithTensors interventions only; got 'compile' with \\['function'\\]"):
        decode_steps.tapped_step(Tap({"embed": lambda v: v}), "compile")
    with pytest.raises(ValueError, match="got 'aot'"):
        decode_steps.tapped_step(Tap({"embed": edit}), "aot")
