"""Hugging Face tokenizers in: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``generation_config.json``).

``load_hf_tokenizer(directory)`` reads what ``transformers``' ``save_pretrained`` writes for a fast
tokenizer and gives the ids ``AutoTokenizer`` gives, on the ``tokenizers`` library alone:

- ``tokenizer.json`` is the whole pipeline (normalizer, pre-tokenizer, model, post-processor, decoder)
  and its added tokens; special tokens inside text (``"<|eot_id|>"``) encode to their one id.
- ``tokenizer_config.json`` names the special tokens (``bos_token``, ``eos_token``, ...; a name
  missing from the vocabulary is added, as transformers adds it) and may hold ``add_bos_token`` /
  ``add_eos_token``: when either is there, the post-processor is rebuilt as ``BOS $A EOS`` with the
  flags (missing flag = False), as transformers' Llama/Gemma tokenizers (and, since transformers 5,
  every fast tokenizer) do. Without them, ``tokenizer.json``'s post-processor stands.
- the chat template is ``chat_template.jinja`` (where recent transformers write it), named ones
  in ``additional_chat_templates/NAME.jinja``, or, in older directories, ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of ``{"name", "template"}``).
- ``generation_config.json``'s ``eos_token_id`` (one id or a list: chat models stop at the end of a
  turn as well as at the end of the text) joins the tokenizer's ``eos_token`` in ``eos_ids``.

``tokenizer.json`` is followed as written, as ``tokenizers`` and transformers 4 follow it. transformers 5
rebuilds the normalizer and pre-tokenizer of ``tokenizer_class: LlamaTokenizer(Fast)`` directories
(Llama 2, Mistral 7B v0.1) from the ``legacy`` flag instead, which changes the ids of text that starts
with a space or follows a special token. Here the file's pipeline stands.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ftransformer import validate
from ftransformer.data.tokenizers import ids_list, smallest_uint
from ftransformer.io import atomic_write
from ftransformer.interop.chat_template import render_chat

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers hands a chat template (``{{ bos_token }}``), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---------------------------------------------------------------- reading the files


def read_json_file(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_backend(directory: Path):
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = directory / TOKENIZER_JSON
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"no {TOKENIZER_JSON} in {directory}: expected a fast tokenizer as transformers' save_pretrained "
            f"writes it (only the tokenizers format is read, not tokenizer.model or vocab.json), found {found}"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises its own exception type for every malformed file
        raise ValueError(f"{path} is not a tokenizers file: {e}") from None


def token_content(value, field: str) -> str | None:
    """A special token's text from ``tokenizer_config.json``: a string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{TOKENIZER_CONFIG}: {field} must be a string or {{\"content\": string}}, got {value!r}")


def special_tokens(config: Mapping) -> dict[str, str]:
    """The named special tokens of a tokenizer config (``bos_token``, ``eos_token``, ...) that are set."""
    named = {name: token_content(config.get(name), name) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in named.items() if text is not None}


def extra_special_tokens(config: Mapping) -> list[str]:
    """``additional_special_tokens`` (transformers 4) or ``extra_special_tokens`` (5) of a tokenizer config."""
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):  # {attribute name: token}, as multimodal tokenizers store them
        extra = list(extra.values())
    if not isinstance(extra, list):
        raise ValueError(f"{TOKENIZER_CONFIG}: extra special tokens must be a list, got {extra!r}")
    return [token_content(t, "an extra special token") for t in extra]


def config_chat_templates(config: Mapping) -> dict[str, str]:
    """``chat_template`` of a tokenizer config by name: a string is ``"default"``, a list names its own."""
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        bad = [t["name"] for t in value if not t["name"] or set(t["name"]) & set("/\\") or t["name"].startswith(".")]
        if bad:  # the name becomes a file name when the tokenizer is saved
            raise ValueError(f"{TOKENIZER_CONFIG}: a chat template's name must be a plain file name, got {bad[0]!r}")
        return {t["name"]: t["template"] for t in value}
    raise ValueError(
        f"{TOKENIZER_CONFIG}: chat_template must be a string or a list of {{\"name\": str, \"template\": str}}, "
        f"got {json.dumps(value)[:80]}"
    )


def chat_templates(directory: Path, config: Mapping) -> dict[str, str]:
    """The directory's chat templates by name (``"default"`` for the main one).

    As in transformers, template files (``chat_template.jinja``, ``additional_chat_templates/*.jinja``)
    replace the config's ``chat_template`` when there are any.
    """
    in_config = config_chat_templates(config)
    files = {"default": directory / CHAT_TEMPLATE_FILE}
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        files.update({p.stem: p for p in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))})
    in_files = {name: p.read_text(encoding="utf-8") for name, p in files.items() if p.is_file()}
    return in_files or in_config


def generation_eos_ids(generation_config: Mapping | None) -> list[int]:
    """``eos_token_id`` of a ``generation_config.json``: one id, a list of ids, or none."""
    value = (generation_config or {}).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(validate.is_int(i) for i in ids):
        raise ValueError(f"{GENERATION_CONFIG}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids


# ---------------------------------------------------------------- fixing up the backend


def add_missing_special_tokens(backend, tokens) -> None:
    """Register each of ``tokens`` as a special added token unless it already is one (as transformers does)."""
    from tokenizers import AddedToken

    registered = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(tokens) if t not in registered]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def bos_eos_post_processor(backend, add_bos: bool, add_eos: bool, bos: str | None, eos: str | None):
    """The post-processor ``BOS $A EOS`` (either end by its flag) that Llama-style tokenizers rebuild."""
    from tokenizers import processors

    if add_bos and bos is None:
        raise ValueError(f"{TOKENIZER_CONFIG} sets add_bos_token=true but names no bos_token")
    if add_eos and eos is None:
        raise ValueError(f"{TOKENIZER_CONFIG} sets add_eos_token=true but names no eos_token")
    first = [f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
    second = [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos
    ends = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(
        single=" ".join(first), pair=" ".join(first + second),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(ends)],
    )


def config_flag(config: Mapping, flag: str) -> bool:
    """A true/false switch of a tokenizer config (False when absent)."""
    value = config.get(flag, False)
    validate.boolean(f"{TOKENIZER_CONFIG}: {flag}", value, expected="true or false")
    return value


def configure_backend(backend, config: Mapping, specials: dict[str, str]) -> None:
    """Make ``backend`` encode as transformers' fast tokenizer built from ``config`` does."""
    add_missing_special_tokens(backend, [*specials.values(), *extra_special_tokens(config)])
    add_bos, add_eos = config_flag(config, "add_bos_token"), config_flag(config, "add_eos_token")
    if "add_bos_token" in config or "add_eos_token" in config:
        bos, eos = specials.get("bos_token"), specials.get("eos_token")
        backend.post_processor = bos_eos_post_processor(backend, add_bos, add_eos, bos, eos)
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    backend.no_truncation()
    backend.no_padding()


# ---------------------------------------------------------------- the tokenizer


class HFTokenizer:
    """A Hugging Face fast tokenizer with its special tokens, stop tokens and chat templates.

    Follows ``ftransformer.data.Tokenizer`` (``encode``, ``decode``, ``vocab_size``, ``save``, ...),
    so it plugs into generation, the CLI and checkpoints. Build it with ``load_hf_tokenizer``.
    """

    kind = "hf"

    def __init__(self, backend, config: Mapping, *, templates: Mapping[str, str], eos_ids, source: str = "memory"):
        from tokenizers import Tokenizer

        if not isinstance(backend, Tokenizer):
            raise TypeError(f"HFTokenizer wraps a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.tokenizer = backend
        self.config = dict(config)
        self.special_tokens = special_tokens(config)
        self.chat_templates = dict(templates)
        self.source = source
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        eos = self.special_tokens.get("eos_token")
        ids = [*eos_ids, *([] if eos is None else [self.token_id(eos)])]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"{source}: eos id {i} is outside the vocabulary [0, vocab_size={self._vocab_size})")
        self.eos_ids = tuple(dict.fromkeys(ids))

    def token_id(self, token: str) -> int:
        """The id of one token of the vocabulary (special or not)."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary of {self.source}")
        return i

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included): every id lies in ``[0, vocab_size)``."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """The id of ``bos_token``, or None when the tokenizer names none."""
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.token_id(bos)

    @property
    def pad_id(self) -> int | None:
        """The id of ``pad_token``, or None when the tokenizer names none."""
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self.token_id(pad)

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """The ids that end a generation (``eos_ids``), ready for ``generate(..., stop_tokens=...)``."""
        return self.eos_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``; ``add_special_tokens`` adds what the post-processor adds (e.g. BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """``encode`` as a numpy array of the smallest unsigned dtype that holds the vocabulary."""
        return np.asarray(self.encode(text, add_special_tokens), dtype=smallest_uint(self.vocab_size))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of a sequence of ids (a list or a 1-d tensor/array)."""
        return self.tokenizer.decode(ids_list(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def chat_template_name(self, name: str | None = None, *, tools=None) -> str:
        """``name`` if given, else ``"tool_use"`` when there are tools and such a template, else ``"default"``."""
        if not self.chat_templates:
            raise ValueError(
                f"{self.source} has no chat template: expected {CHAT_TEMPLATE_FILE} or a chat_template "
                f"in {TOKENIZER_CONFIG}"
            )
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError(f"{self.source} has no chat template {name!r}; it has {sorted(self.chat_templates)}")
        return name

    def render_chat(
        self, messages, *, add_generation_prompt: bool = False, template: str | None = None, **template_vars
    ) -> str:
        """The chat template's text for ``messages`` (see ``apply_chat_template``)."""
        name = self.chat_template_name(template, tools=template_vars.get("tools"))
        variables = {**self.special_tokens, **template_vars}
        try:
            return render_chat(
                self.chat_templates[name], messages, add_generation_prompt=add_generation_prompt, variables=variables
            )
        except ValueError as e:
            raise ValueError(f"chat template {name!r} of {self.source}: {e}") from None

    def apply_chat_template(
        self, messages, *, add_generation_prompt: bool = False, template: str | None = None, **template_vars,
    ) -> list[int]:
        """The ids of ``messages`` in the model's chat format (``render_chat`` gives the text).

        ``add_generation_prompt`` ends with the header of an assistant turn, for the model to write it.
        ``template_vars`` reach the template (``tools``, ``documents``, ``enable_thinking``, ...) and
        override the special tokens it sees (``bos_token``, ...). The template writes its special tokens
        itself, so the text is encoded without adding any (no second BOS).
        """
        text = self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, template=template, **template_vars
        )
        return self.encode(text, add_special_tokens=False)

    def fingerprint(self) -> str:
        """A hash of the whole encoding pipeline: the same tokenizer gives the same fingerprint."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer's files as transformers does (``load_hf_tokenizer`` reads them back).

        Returns the path of ``tokenizer.json``.
        """
        directory = Path(directory)
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        atomic_write(directory / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False))
        atomic_write(directory / GENERATION_CONFIG, json.dumps({"eos_token_id": list(self.eos_ids)}, indent=2))
        for name, source in self.chat_templates.items():
            path = directory / (CHAT_TEMPLATE_FILE if name == "default" else f"{CHAT_TEMPLATE_DIR}/{name}.jinja")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, source)
        return atomic_write(directory / TOKENIZER_JSON, self.tokenizer.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def load_hf_tokenizer(directory: str | os.PathLike) -> HFTokenizer:
    """The fast tokenizer saved in a Hugging Face model directory (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(
            f"{directory} is not a directory: expected a Hugging Face model directory with {TOKENIZER_JSON}"
        )
    backend = read_backend(directory)
    config = read_json_file(directory / TOKENIZER_CONFIG) or {}
    configure_backend(backend, config, special_tokens(config))
    eos_ids = generation_eos_ids(read_json_file(directory / GENERATION_CONFIG))
    templates = chat_templates(directory, config)
    return HFTokenizer(backend, config, templates=templates, eos_ids=eos_ids, source=str(directory))
