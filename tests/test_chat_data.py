"""Chat SFT data: the assistant-only mask (equal to transformers' where the template marks generation blocks),
bad rows named or skipped, and packing with a document mask equal to the unpacked per-document forward and loss."""

import dataclasses
import json

import pytest
import torch

import ftransformer as ft
from ftransformer.config import Attention, Positional
from ftransformer.data.chat import (
    IGNORE_INDEX, Example, pack, read_chat_jsonl, render_with_mask, shifted_targets,
)
from ftransformer.layers.masks import document_positions, self_mask
from ftransformer.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_hf_tokenizer import LLAMA3_TEMPLATE, byte_level_backend, save_hf, sentencepiece_backend  # noqa: E402

CHATML_GENERATION = """{% for message in messages %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}<|im_end|>
{% endgeneration %}
{% else %}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
CHATML_PLAIN = CHATML_GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}\n", "")

CHATS = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, how are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "and 12345 * 67?"},
        {"role": "assistant", "content": "The quick brown fox: 827115."},
    ],
    [
        {"role": "user", "content": "café?"},
        {"role": "assistant", "content": "Oui, café!"},
        {"role": "user", "content": "ok"},
    ],
]


def test_an_opening_assistant_turn_trains_its_header(ours):
    """No template renders an empty conversation, so the header before an opening assistant turn is trained."""
    messages = [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}]
    ids, mask = render_with_mask(ours, messages)
    first = ours.apply_chat_template(messages[:1])
    assert mask == [True] * len(first) + [False] * (len(ids) - len(first))


@pytest.fixture(scope="module", params=["spm", "byte_level"])
def tokenizer_dir(request, tmp_path_factory):
    """A tiny tokenizer with the generation-block ChatML template (the plain one is a named second template)."""
    backend = sentencepiece_backend() if request.param == "spm" else byte_level_backend()
    if request.param == "byte_level":
        backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    directory = save_hf(tmp_path_factory.mktemp(request.param), backend, eos_token="<|im_end|>",
                        chat_template=CHATML_GENERATION)
    return directory


def with_template(tokenizer, template):
    """The same tokenizer with another default chat template."""
    return HFTokenizer(
        tokenizer.tokenizer, tokenizer.config, templates={"default": template}, eos_ids=tokenizer.eos_ids
    )


# A 'tool' message renders nothing: the ChatML loop over the other messages only.
TOOLS_SKIPPED = "{% for message in messages if message['role'] != 'tool' %}"


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return load_hf_tokenizer(tokenizer_dir)


def theirs_mask(tokenizer_dir, messages):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("messages", CHATS)
def test_mask_equals_transformers_generation_blocks(tokenizer_dir, ours, messages):
    ids, mask = render_with_mask(ours, messages)
    their_ids, their_mask = theirs_mask(tokenizer_dir, messages)
    assert ids == their_ids
    assert mask == their_mask
    assert any(mask) and not all(mask)


@pytest.mark.parametrize("messages", CHATS)
def test_mask_without_generation_blocks_is_the_same(ours, messages):
    """Rendering prefixes needs no generation blocks: the plain template gives the same ids and mask."""
    ours_plain = with_template(ours, CHATML_PLAIN)
    assert render_with_mask(ours_plain, messages) == render_with_mask(ours, messages)


def trained_text(tokenizer, messages):
    ids, mask = render_with_mask(tokenizer, messages)
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_mask_covers_each_assistant_turn_and_its_end_token(ours):
    """The trained tokens decode to the assistant turns' text and end-of-turn tokens, nothing else."""
    if ours.tokenizer.decoder.__class__.__name__ != "ByteLevel":
        pytest.skip("the SentencePiece-style decoder strips a leading space from what it decodes")
    assert trained_text(ours, CHATS[1]) == "It is 4.<|im_end|>\nThe quick brown fox: 827115.<|im_end|>\n"


def test_mask_with_a_llama3_template(tmp_path):
    """A template with no generation blocks, a BOS and a date header: the turns' trimmed text and <|eot_id|>."""
    directory = save_hf(tmp_path, byte_level_backend(), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                        chat_template=LLAMA3_TEMPLATE)
    tok = load_hf_tokenizer(directory)
    assert trained_text(tok, CHATS[1]) == "It is 4.<|eot_id|>The quick brown fox: 827115.<|eot_id|>"
    ids, mask = render_with_mask(tok, CHATS[1])
    assert ids == tok.apply_chat_template(CHATS[1]) and not mask[0]


def test_prefix_inconsistent_template_is_refused(ours):
    reversed_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    tok = with_template(ours, reversed_template)
    with pytest.raises(ValueError, match="prefix-consistent"):
        render_with_mask(tok, CHATS[1])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_jsonl_chat_and_text(tmp_path, ours):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}, {"text": "The quick brown fox."}])
    data = read_chat_jsonl(path, ours, max_len=512)
    assert data.skipped == 0 and len(data.examples) == 2
    assert data.examples[0] == render_with_mask(ours, CHATS[0])
    assert data.examples[1] == Example(ours.encode("The quick brown fox."), [True] * len(data.examples[1].ids))


BAD_ROWS = [
    ({"messages": [{"content": "no role"}]}, "needs a string 'role'"),
    ({"messages": [{"role": "user"}]}, "needs a string 'content'"),
    ({"messages": "not a list"}, "must be a non-empty list"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "renders nothing"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no token is trained"),
    ({"messages": CHATS[1] * 20}, "longer than the context of 512"),
    ("{not json", "not valid JSON"),
    ({"neither": 1}, "expected an object with 'messages' or 'text'"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_row_is_named_or_skipped(tmp_path, ours, row, message):
    tok = with_template(ours, CHATML_PLAIN.replace("{% for message in messages %}", TOOLS_SKIPPED))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}, row, {"text": "ok then"}])
    with pytest.raises(ValueError, match=rf"chat.jsonl: row 2: .*{message}"):
        read_chat_jsonl(path, tok, max_len=512)
    data = read_chat_jsonl(path, tok, max_len=512, skip_bad=True)
    assert data.skipped == 1 and len(data.examples) == 2


def test_document_positions_and_mask():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    allowed = self_mask(document_positions(documents), None, documents).allowed[0]
    expected = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool).tril() for n in (3, 2, 3)))
    assert torch.equal(allowed, expected)
    windowed = self_mask(document_positions(documents), 2, documents).allowed[0]
    assert torch.equal(windowed, expected & ~torch.ones(8, 8, dtype=torch.bool).tril(-2))


def random_examples(gen, vocab, lengths):
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        mask = (torch.rand(n, generator=gen) < 0.6).tolist()
        out.append(Example(ids, mask))
    return out


def test_pack_layout(gen):
    examples = random_examples(gen, 30, [5, 4, 6, 7, 3])
    packed = pack(examples, 10, pad_id=1)
    assert packed.tokens.shape == (3, 10)  # [5, 4], [6], [7, 3]
    assert packed.documents[0].tolist() == [0] * 5 + [1] * 4 + [2]
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert packed.tokens[1, :6].tolist() == examples[2].ids and packed.tokens[1, 6:].tolist() == [1] * 4
    assert packed.targets[1, :6].tolist() == shifted_targets(examples[2])
    assert (packed.targets[1, 5:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="example 0 has 11 tokens; expected 1 to seq_len=10"):
        pack(random_examples(gen, 30, [11]), 10)


CONFIGS = {
    "learned": ft.PRESETS["tiny"],
    "rope": dataclasses.replace(ft.PRESETS["tiny"], positional=Positional("rope")),
    "rope_window": dataclasses.replace(
        ft.PRESETS["tiny"], positional=Positional("rope"), attention=Attention(window=3)
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_equals_unpacked(gen, name, kernel):
    cfg = CONFIGS[name]
    params = ft.init_params(cfg, seed=0, dtype=torch.float64)
    examples = random_examples(gen, cfg.vocab_size, [5, 4, 6, 7, 3, 16, 2])
    packed = pack(examples, cfg.max_seq_len)
    logits = ft.forward(params, packed.tokens, cfg, documents=packed.documents)
    total, count = 0.0, 0
    for e_index, example in enumerate(examples):
        row, start = locate(packed, examples, e_index)
        n = len(example.ids)
        alone = ft.forward(params, torch.tensor([example.ids]), cfg)
        torch.testing.assert_close(logits[row, start : start + n], alone[0], rtol=0, atol=1e-10)
        targets = torch.tensor([shifted_targets(example)])
        total = total + ft.loss_fn(params, torch.tensor([example.ids]), targets, cfg, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    packed_sum = ft.loss_fn(params, packed.tokens, packed.targets, cfg, documents=packed.documents, reduction="sum")
    packed_mean = ft.loss_fn(params, packed.tokens, packed.targets, cfg, documents=packed.documents)
    torch.testing.assert_close(packed_sum, total, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed_mean, total / count, rtol=0, atol=1e-10)


def locate(packed, examples, index):
    """The (row, start) where example ``index`` sits, recomputed from the packing rule."""
    from ftransformer.data.chat import pack_rows

    rows = pack_rows([len(e.ids) for e in examples], packed.tokens.shape[1])
    for r, row in enumerate(rows):
        if index in row:
            return r, sum(len(examples[i].ids) for i in row[: row.index(index)])
    raise AssertionError(index)


def test_forward_rejects_bad_documents(tiny_cfg, no_typecheck):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"documents has shape \(1, 3\) but tokens has shape \(1, 4\)"):
        ft.forward(params, tokens, tiny_cfg, documents=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="documents must be an integer tensor"):
        ft.forward(params, tokens, tiny_cfg, documents=torch.zeros(1, 4))
