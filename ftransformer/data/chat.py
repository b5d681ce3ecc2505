"""Chat fine-tuning data: conversations rendered with the chat template, the loss on assistant tokens only,
packed several to a row with a document mask.

* ``render_with_mask``: the ids of a conversation and which of them are trained (the assistant turns), found
  by rendering prefixes: the ids of ``messages[:i]`` plus the assistant-turn header, and of ``messages[:i + 1]``;
  the tokens between the two are the turn's (its text and end-of-turn tokens). Every prefix must be a token
  prefix of the whole rendering, else the template (or tokenizer) is refused with the turn named.
* ``read_chat_jsonl``: a JSONL of ``{"messages": [{"role", "content"}, ...]}`` or ``{"text": ...}`` rows
  (plain text: every token trained), one clear error naming the bad row, or ``skip_bad=True`` and a count.
* ``pack``: examples into ``[rows, seq_len]`` tokens, targets (-100 off the mask and at each document's last
  token), positions restarting at each document and document ids, for ``model.forward(..., documents=)``.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ftransformer.layers.masks import document_positions
from ftransformer.shapes import Int, Tensor

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One document: its token ids and, per id, whether the loss is taken on predicting it."""

    ids: list[int]
    loss_mask: list[bool]


class ChatData(NamedTuple):
    """The examples of a file and how many bad rows were skipped (``skip_bad=True``)."""

    examples: list[Example]
    skipped: int


class Packed(NamedTuple):
    """Packed rows: ``forward(params, tokens, cfg, documents=documents)`` and ``cross_entropy`` against ``targets``."""

    tokens: Int[Tensor, "rows seq"]
    targets: Int[Tensor, "rows seq"]
    positions: Int[Tensor, "rows seq"]
    documents: Int[Tensor, "rows seq"]


def check_messages(messages: object) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str}`` dicts, or ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {type(messages).__name__} {messages!r:.60}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise ValueError(f"message {i} needs a string {field!r}, got {message.get(field)!r:.60}")
    return messages


def _token_prefix(prefix: list[int], ids: list[int], what: str) -> int:
    """``len(prefix)``, after checking that ``prefix`` starts ``ids`` (else the rendering is not prefix-consistent)."""
    if ids[: len(prefix)] != prefix:
        raise ValueError(
            f"the chat template is not prefix-consistent: the ids of {what} are not a prefix of the whole "
            f"conversation's ids, so the assistant mask cannot be found by rendering prefixes"
        )
    return len(prefix)


def render_with_mask(tokenizer, messages: object) -> Example:
    """The ids of ``messages`` (``tokenizer.apply_chat_template``) with the loss on assistant turns only."""
    messages = check_messages(messages)
    ids = list(tokenizer.apply_chat_template(messages))
    if not ids:
        raise ValueError("the chat template renders nothing for this conversation")
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A chat template renders no empty conversation: an opening assistant turn trains its header too.
        header = list(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else []
        start = _token_prefix(header, ids, f"messages[:{i}] with the assistant header")
        end = _token_prefix(list(tokenizer.apply_chat_template(messages[: i + 1])), ids, f"messages[:{i + 1}]")
        if end < start:
            raise ValueError(f"assistant message {i} renders shorter than its header ({end} < {start} tokens)")
        mask[start:end] = [True] * (end - start)
    return Example(ids, mask)


def render_text(tokenizer, text: object) -> Example:
    """A plain-text document (``tokenizer.encode``), every token trained."""
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("the text encodes to no tokens")
    return Example(ids, [True] * len(ids))


def render_row(tokenizer, row: object, max_len: int) -> Example:
    """One JSONL row (``{"messages": [...]}`` or ``{"text": ...}``) as an ``Example`` of at most ``max_len`` ids."""
    if not isinstance(row, dict) or ("messages" in row) == ("text" in row):
        raise ValueError(f"expected an object with 'messages' or 'text', got {row!r:.80}")
    example = render_with_mask(tokenizer, row["messages"]) if "messages" in row else render_text(tokenizer, row["text"])
    if len(example.ids) > max_len:
        raise ValueError(f"it is {len(example.ids)} tokens, longer than the context of {max_len}")
    if not any(example.loss_mask[1:]):
        raise ValueError("no token is trained (no assistant turn after the first token)")
    return example


def read_chat_jsonl(path: str | os.PathLike, tokenizer, *, max_len: int, skip_bad: bool = False) -> ChatData:
    """The examples of a chat JSONL file; a bad row raises ValueError naming it, or is counted (``skip_bad``)."""
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    examples, skipped = [], 0
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg})") from None
                examples.append(render_row(tokenizer, row, max_len))
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path}: row {line_no}: {e}") from None
                skipped += 1
    return ChatData(examples, skipped)


def shifted_targets(example: Example) -> list[int]:
    """Per position, the next id where it is trained, else ``IGNORE_INDEX`` (always at the document's end)."""
    ids, mask = example.ids, example.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row, in order, a new row started when the next example does not fit."""
    rows, used = [], seq_len
    for i, n in enumerate(lengths):
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; expected 1 to seq_len={seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack(examples: Sequence[Example], seq_len: int, *, pad_id: int = 0) -> Packed:
    """Examples packed in order into rows of ``seq_len`` tokens; padding is one more document, never trained."""
    rows = pack_rows([len(e.ids) for e in examples], seq_len)
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    documents = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            n = len(examples[i].ids)
            tokens[r, at : at + n] = torch.tensor(examples[i].ids)
            targets[r, at : at + n] = torch.tensor(shifted_targets(examples[i]))
            documents[r, at : at + n] = d
            at += n
        documents[r, at:] = len(row)
    return Packed(tokens, targets, document_positions(documents), documents)
