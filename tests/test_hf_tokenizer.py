"""Hugging Face tokenizers and chat templates: the same ids and text as transformers' AutoTokenizer.

Two tiny tokenizers are trained here (nothing downloaded) and saved the way transformers saves a fast
tokenizer: a byte-level BPE with a split regex like Llama 3's (BOS added by tokenizer.json's
post-processor, a Llama-3-style template) and a SentencePiece-style BPE with byte fallback like
Llama 2's (BOS from ``add_bos_token``, a ChatML-style template).
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ftransformer as ft
from ftransformer.data import Tokenizer
from ftransformer.interop.chat_template import chat_environment, plain_data, render_chat
from ftransformer.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from ftransformer.sampling import GREEDY

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (  # noqa: E402
    AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers,
)

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

CORPUS = (
    "The quick brown fox jumps over the lazy dog. 12345 and 67 apples, 2024-07-26!\n"
    "  Leading spaces   and multiple   spaces; tabs\there. café naïve résumé Zürich\n"
    "def f(x):\n    return x * 2  # it's a comment, isn't it?\n"
    "Chat: user asks, assistant answers. What is 2 + 2? It is 4.\n"
) * 40
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role in ['user', 'assistant']) %}
        {{- raise_exception('Conversation roles must be user or assistant after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Plain (undashed) tags on lines of their own: only trim_blocks + lstrip_blocks keep their newlines and
# indentation out of the text. Also namespace(), loop controls, {% generation %}, tojson and raise_exception.
CHATML_TEMPLATE = """{% set ns = namespace(has_system=false) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.has_system = true %}
        {% break %}
    {% endif %}
{% endfor %}
{% if not ns.has_system %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if tools %}
<|im_start|>tools
    {% for tool in tools %}
{{ tool | tojson }}
    {% endfor %}
<|im_end|>
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "  and 12345 * 67?\n\n"},
    ],
    [{"role": "user", "content": "café 東京 😀 <|eot_id|> <|im_end|> <s> tabs\tand   spaces"}],
    [{"role": "user", "content": "no tool calls", "tool_calls": None}, {"role": "assistant", "content": ""}],
]
TOOLS = [{"type": "function", "function": {"name": "größe", "description": "x < y & y > z", "parameters": {}}}]


def train_bpe(backend, vocab_size: int, specials: list[str], **trainer_kwargs):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **trainer_kwargs)
    backend.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return backend


def byte_level_backend():
    """Llama 3 / Qwen style: split regex then byte-level BPE; tokenizer.json adds BOS."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    train_bpe(tok, 420, LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def sentencepiece_backend():
    """Llama 2 style: '▁' for spaces and a leading '▁', BPE over the raw text, unknown characters as bytes <0xNN>.

    The byte tokens take ids 3..258 as in Llama 2; tokenizer.json adds BOS (and the config says add_bos_token).
    """
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    model = json.loads(train_bpe(trained, 320, ["<unk>", "<s>", "</s>"], limit_alphabet=40).to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


def save_hf(directory, backend, *, generation_eos=None, **kwargs):
    """Save ``backend`` as transformers saves a fast tokenizer, plus a generation_config.json."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(directory)
    if generation_eos is not None:
        eos_ids = [backend.token_to_id(t) for t in generation_eos]
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return directory


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return save_hf(
        tmp_path_factory.mktemp("llama3"), byte_level_backend(), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE, generation_eos=["<|end_of_text|>", "<|eot_id|>"],
    )


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return save_hf(
        tmp_path_factory.mktemp("spm"), sentencepiece_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False, chat_template=CHATML_TEMPLATE, generation_eos=["<|im_end|>", "</s>"],
    )


@pytest.fixture(scope="module", params=["llama3", "spm"])
def pair(request):
    """(ours, transformers') for each saved tokenizer."""
    directory = request.getfixturevalue(f"{request.param}_dir")
    return load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


PIECES = st.one_of(
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzTQ .,!?'"), max_size=12),
    st.text(st.sampled_from(" \t\n"), min_size=1, max_size=4),  # leading, multiple and trailing spaces
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=7),
    # outside both training alphabets (bytes of the byte-level BPE, byte fallback of the other)
    st.text(st.sampled_from("éüßø東京😀🙂\u0301\u200b"), min_size=1, max_size=4),
    st.sampled_from(LLAMA3_SPECIALS + CHATML_SPECIALS + ["<s>", "</s>", "<unk>", "<|im_start", "<s"]),
    st.text(max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(PIECES, max_size=6).map("".join))
@example(text="")
@example(text="   leading and  multiple   spaces  ")
@example(text="digits 1 12 123 1234 12345 3.14159")
@example(text="a<|eot_id|>b<s>c</s> <|im_start|>user\nHi<|im_end|>")
def test_encode_and_decode_equal_autotokenizers(pair, text):
    ours, theirs = pair
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == theirs.encode(text, add_special_tokens=add)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_special_ids_come_from_both_configs(llama3_dir, spm_dir):
    for directory, eos_tokens in ((llama3_dir, ["<|end_of_text|>", "<|eot_id|>"]), (spm_dir, ["<|im_end|>", "</s>"])):
        ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
        assert ours.bos_id == theirs.bos_token_id and ours.bos_id is not None
        # generation_config's ids first, then the tokenizer's eos_token if it is not one of them
        assert ours.eos_ids == ours.stop_tokens == tuple(theirs.convert_tokens_to_ids(eos_tokens))
        assert theirs.eos_token_id in ours.eos_ids
        assert ours.vocab_size == len(theirs)
        assert ours.pad_id is None


def test_bos_is_added_once_and_only_when_asked(llama3_dir, spm_dir):
    for directory in (llama3_dir, spm_dir):
        tok = load_hf_tokenizer(directory)
        assert tok.encode("hi")[0] == tok.bos_id and tok.encode("hi", add_special_tokens=False)[0] != tok.bos_id
        ids = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, date_string="26 Jul 2024")
        assert ids.count(tok.bos_id) == (1 if directory == llama3_dir else 0)  # the template writes it, encode does not


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_equals_apply_chat_template(pair, chat, add_generation_prompt):
    ours, theirs = pair
    messages, extra = CHATS[chat], {"date_string": "26 Jul 2024"}
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert text == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
    )
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert ids == theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **extra
    )
    assert ids == ours.encode(text, add_special_tokens=False)


def test_chat_template_with_tools_equals_apply_chat_template(spm_dir):
    ours, theirs = load_hf_tokenizer(spm_dir), transformers.AutoTokenizer.from_pretrained(spm_dir)
    text = ours.render_chat(CHATS[1], tools=TOOLS, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(CHATS[1], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '"größe"' in text and '"x < y & y > z"' in text  # tojson keeps non-ASCII and does not HTML-escape


def test_chat_template_without_date_uses_today(llama3_dir):
    from datetime import datetime

    text = load_hf_tokenizer(llama3_dir).render_chat(CHATS[0])
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}" in text


def test_messages_are_not_modified_and_none_values_are_dropped(spm_dir):
    tok = load_hf_tokenizer(spm_dir)
    messages = [{"role": "user", "content": "Hi", "name": None}]
    before = json.dumps(messages)
    with_none = tok.render_chat(messages)
    assert json.dumps(messages) == before
    assert with_none == tok.render_chat([{"role": "user", "content": "Hi"}])


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4's generic fast tokenizer ignores add_bos/eos_token")
@pytest.mark.parametrize(
    "flags",
    [dict(add_bos_token=True, add_eos_token=True), dict(add_bos_token=False, add_eos_token=True),
     dict(add_bos_token=False)],
)
def test_add_bos_eos_flags_rebuild_the_post_processor(tmp_path, flags):
    backend = sentencepiece_backend()
    directory = save_hf(tmp_path, backend, bos_token="<s>", eos_token="</s>", **flags)
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for text in ("hello world", "", "  12345 東京"):
        assert ours.encode(text) == theirs.encode(text)
        ids = ours.encode(text)
        assert (ids[-1:] == [2]) == flags.get("add_eos_token", False)
        assert (ids[:1] == [1]) == flags.get("add_bos_token", False)


def test_special_token_missing_from_the_vocabulary_is_added_as_transformers_adds_it(tmp_path):
    directory = save_hf(tmp_path, byte_level_backend(), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|pad|>"}))
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.pad_id == theirs.pad_token_id == ours.vocab_size - 1
    assert ours.encode("a<|pad|>b") == theirs.encode("a<|pad|>b")


def test_hf_tokenizer_is_a_library_tokenizer_and_saves_round_trip(llama3_dir, tmp_path):
    tok = load_hf_tokenizer(llama3_dir)
    assert isinstance(tok, Tokenizer) and tok.kind == "hf"
    text = "Hello  wörld 12345<|eot_id|>"
    array = tok.encode_array(text)
    assert array.dtype == np.uint16 and array.tolist() == tok.encode(text)
    assert tok.decode(torch.tensor(tok.encode(text))) == tok.decode(tok.encode(text))
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    again = load_hf_tokenizer(tmp_path)
    assert again.fingerprint() == tok.fingerprint() and again.eos_ids == tok.eos_ids and again.bos_id == tok.bos_id
    assert again.encode(text) == tok.encode(text)
    assert again.apply_chat_template(CHATS[1], date_string="x") == tok.apply_chat_template(CHATS[1], date_string="x")
    # transformers reads what save wrote, too
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode(text) == tok.encode(text)


def test_generate_stops_at_the_tokenizers_stop_tokens(spm_dir):
    tok = load_hf_tokenizer(spm_dir)
    cfg = ft.PRESETS["tiny"].replace(vocab_size=tok.vocab_size, max_seq_len=64)
    params = ft.init_params(cfg, seed=0)
    prompt = torch.tensor([tok.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    out = ft.generate(params, prompt, cfg, max_new_tokens=8, sampling=GREEDY, stop_tokens=tok.stop_tokens, pad_id=0)
    new = out[0, prompt.shape[-1]:].tolist()
    assert len(new) == 8 and isinstance(tok.decode(new), str)
    stops = [i for i, t in enumerate(new) if t in tok.stop_tokens]
    assert not stops or all(t == 0 for t in new[stops[0] + 1:])


def test_legacy_templates_in_tokenizer_config(tmp_path):
    directory = save_hf(tmp_path, sentencepiece_backend(), bos_token="<s>", eos_token="</s>")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tok, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for kwargs in ({}, {"tools": TOOLS}, {"template": "tool_use", "tools": []}):
        text = tok.render_chat(CHATS[0], **kwargs)
        their_kwargs = {("chat_template" if k == "template" else k): v for k, v in kwargs.items()}
        assert text == theirs.apply_chat_template(CHATS[0], tokenize=False, **their_kwargs)
    with pytest.raises(ValueError, match=r"no chat template 'rag'; it has \['default', 'tool_use'\]"):
        tok.apply_chat_template(CHATS[0], template="rag")
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "S{{ bos_token }}"}))
    assert load_hf_tokenizer(directory).render_chat(CHATS[0]) == "S<s>"


# ---------------------------------------------------------------- bad input: one clear error each


def _write(directory, name, text):
    (directory / name).write_text(text)
    return directory


def test_directory_errors(tmp_path, spm_dir):
    with pytest.raises(ValueError, match="is not a directory: expected a Hugging Face model directory"):
        load_hf_tokenizer(tmp_path / "missing")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no tokenizer.json in .*found \['vocab.json'\]"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizers file"):
        load_hf_tokenizer(_write(tmp_path, "tokenizer.json", '{"model": {"type": "nonsense"}}'))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("tokenizer_config.json", '{"bos_token": "<s>",', r"tokenizer_config.json is not valid JSON: line 1 column 21"),
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config.json must hold a JSON object, got list"),
        ("tokenizer_config.json", '{"bos_token": 3}', r"bos_token must be a string or \{\"content\": string\}, got 3"),
        ("tokenizer_config.json", '{"add_bos_token": true}', r"sets add_bos_token=true but names no bos_token"),
        ("tokenizer_config.json", '{"add_eos_token": "yes"}', r"add_eos_token must be true or false, got 'yes'"),
        ("tokenizer_config.json", '{"chat_template": 7}', r"chat_template must be a string or a list .*got 7"),
        ("tokenizer_config.json", '{"chat_template": [{"name": "a"}]}', r"got \[\{\"name\": \"a\"\}\]"),
        ("tokenizer_config.json", '{"chat_template": [{"name": "../x", "template": ""}]}', r"plain file name, got"),
        ("generation_config.json", '{"eos_token_id": "</s>"}', r"must be an int or a list of ints, got '</s>'"),
        ("generation_config.json", '{"eos_token_id": [2, 100000]}', r"eos id 100000 is outside .*vocab_size="),
    ],
)
def test_config_errors(tmp_path, spm_dir, name, text, message):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_text((spm_dir / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=message):
        load_hf_tokenizer(_write(directory, name, text))


def test_chat_errors(spm_dir, tmp_path):
    tok = load_hf_tokenizer(spm_dir)
    with pytest.raises(ValueError, match=r"chat template 'default' of .*refused the messages: Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}])
    with pytest.raises(TypeError, match=r"messages must be a list of dicts .*got str"):
        tok.apply_chat_template("Hi")
    with pytest.raises(ValueError, match="messages is empty"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match=r"messages\[1\] must be a dict .*got tuple"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, ("user", "b")])
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] must hold only JSON values .*got object"):
        tok.apply_chat_template([{"role": "user", "content": object()}])
    no_template = load_hf_tokenizer(save_hf(tmp_path, sentencepiece_backend(), bos_token="<s>"))
    with pytest.raises(ValueError, match="has no chat template: expected chat_template.jinja or a chat_template"):
        no_template.apply_chat_template(CHATS[0])


def test_malformed_template_names_the_line(tmp_path):
    broken = "ok\n{% for m in messages %}{{ m }"
    directory = save_hf(tmp_path, sentencepiece_backend(), bos_token="<s>", chat_template=broken)
    tok = load_hf_tokenizer(directory)  # loading does not need the template; using it does
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]
    with pytest.raises(ValueError, match=r"template 'default' of .*not valid Jinja: line 2: .*\{% for m in messages"):
        tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ messages.__class__.__name__ }}", r"SecurityError"),
        ("{{ messages[0].content.__class__.__mro__ }}", r"SecurityError"),
        ("{% set ns = namespace() %}{% set ns._secret = 1 %}", r"SecurityError: .*underscore attribute.*'_secret'"),
        ("{{ messages.append(1) }}", r"SecurityError"),
        ("{{ undefined_name.field }}", r"UndefinedError"),
    ],
)
def test_templates_run_in_a_sandbox(source, message):
    with pytest.raises(ValueError, match=rf"rendering the chat template failed: ({message})"):
        render_chat(source, CHATS[0])


def test_environment_helpers():
    env = chat_environment()
    assert env.trim_blocks and env.lstrip_blocks
    assert env.from_string("{{ x | tojson(indent=1) }}").render(x={"é": "<b>"}) == '{\n "\u00e9": "<b>"\n}'
    assert plain_data({"a": (1, np.float32(0.5), np.bool_(True))}) == {"a": (1, 0.5, True)}
    assert type(plain_data(np.int64(3))) is int
