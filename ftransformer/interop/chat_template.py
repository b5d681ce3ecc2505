"""Chat templates: a checkpoint's Jinja template rendered the way transformers renders it.

A chat model's tokenizer carries a Jinja template that turns a list of messages
(``{"role": "user", "content": "..."}``) into the one string the model was trained on, with its
control tokens (``<|start_header_id|>``, ``<|im_start|>``, ...) written out as text. Templates come
from the Hub, so they are untrusted code: they run in Jinja's immutable sandbox, and everything they
see is first copied into plain JSON values (no object whose methods the sandbox does not know about).

The environment is transformers': ``trim_blocks`` and ``lstrip_blocks`` on, the ``loopcontrols``
extension (``{% break %}``), a ``tojson`` that does not HTML-escape and keeps non-ASCII characters,
``raise_exception(message)``, ``strftime_now(format)``, a ``namespace`` that refuses underscore
names, and ``{% generation %}`` blocks (which transformers uses for training masks) rendered as
their body.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(jinja2.TemplateError):
    """What a template's ``raise_exception(message)`` raises (the template refused its input)."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` renders as its body (only training masks care where it is)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()``, refusing attribute names that start with an underscore (CPython internals)."""

    def __init__(*args, **kwargs):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_attribute_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_attribute_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a chat template may not set an underscore attribute on a namespace, got {name!r}"
        )


def _raise_exception(message) -> None:
    raise TemplateRaised(str(message))


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON text itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _new_dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)


def chat_environment() -> ImmutableSandboxedEnvironment:
    """A fresh sandboxed Jinja environment set up as transformers sets up its chat-template environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_new_dict, namespace=_Namespace
    )
    return env


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (cached by its text); a syntax error raises ``ValueError`` with its line."""
    if not isinstance(source, str):
        raise TypeError(f"a chat template is Jinja source text (str), got {type(source).__name__}")
    try:
        return chat_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        line = source.splitlines()[e.lineno - 1].strip() if 0 < e.lineno <= len(source.splitlines()) else ""
        raise ValueError(f"the chat template is not valid Jinja: line {e.lineno}: {e.message} (in {line!r})") from None


def plain_data(value, where: str = "value"):
    """A copy of ``value`` made of JSON types only (dict, list, tuple, str, int, float, bool, None).

    What a sandboxed template may see: anything else raises ``TypeError`` naming where it sits.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return plain_data(value.item(), where)
    for base in (str, int, float):  # subclasses (enums, numpy floats) carry methods of their own
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {plain_data(k, f"a key of {where}"): plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where} must hold only JSON values (dict, list, str, int, float, bool, None), got {type(value).__name__}"
    )


def chat_messages(messages) -> list[dict]:
    """The messages as the template sees them: plain dicts, keys whose value is None dropped.

    (APIs such as OpenAI's return ``content=None`` or ``tool_calls=None``; templates handle a missing
    key but would print ``None``.)
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(
            "messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict like {{'role': 'user', 'content': 'Hi'}}, got {type(message).__name__}"
            )
        out.append(plain_data({k: v for k, v in message.items() if v is not None}, f"messages[{i}]"))
    return out


def render_chat(
    source: str, messages, *, add_generation_prompt: bool = False, variables: Mapping | None = None
) -> str:
    """The text ``source`` renders for ``messages``.

    The template sees ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None unless
    given) and ``variables`` (e.g. the special tokens ``bos_token``, ``eos_token``, or a template's own
    switches such as ``enable_thinking``). A template's ``raise_exception`` and any other rendering
    error raise ``ValueError``.
    """
    template = compile_chat_template(source)
    context = {"tools": None, "documents": None, **plain_data(dict(variables or {}), "template variables")}
    context.update(messages=chat_messages(messages), add_generation_prompt=bool(add_generation_prompt))
    try:
        return template.render(**context)
    except TemplateRaised as e:
        raise ValueError(f"the chat template refused the messages: {e.message}") from None
    except (jinja2.TemplateError, TypeError) as e:
        raise ValueError(f"rendering the chat template failed: {type(e).__name__}: {e}") from None
