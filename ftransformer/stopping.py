"""When a generation ends and what it shows: one implementation for every decoding loop (the decode
loop of ``generate_stream``, the sliding stream, speculative decoding).

A loop produces a stream of steps, one new token per row each. ``until_stopped`` shows ``pad_id``
in a row after its first stop token and ends the stream as soon as every row has stopped, so the loop
is not run further; ``stack_steps`` turns what a stream yielded into the new columns of the output.
"""

from collections.abc import Iterable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ftransformer import validate


def check_max_new_tokens(max_new_tokens) -> None:
    """Raise ``ValueError`` unless ``max_new_tokens`` is an int >= 0."""
    validate.non_negative_int("max_new_tokens", max_new_tokens)


def until_stopped(steps: Iterator[Tensor], stop_tokens: Sequence[int], pad_id: int) -> Iterator[Tensor]:
    """``steps`` with ``pad_id`` shown in each row after its first stop token, ending once every row has stopped.

    A stopped row's loop still feeds its sampled (valid) token to the model; only what it shows is padding.
    Without stop tokens the steps pass through untouched: reading whether every row has stopped costs a
    host sync per step, which only generations with stop tokens pay.
    """
    if not len(stop_tokens):
        yield from steps
        return
    stop, done = None, None
    for token in steps:
        if stop is None:
            stop = torch.tensor(list(stop_tokens), dtype=token.dtype, device=token.device)
            done = torch.zeros(token.shape, dtype=torch.bool, device=token.device)
        shown, done = token.masked_fill(done, pad_id), done | torch.isin(token, stop)
        yield shown
        if bool(done.all()):  # the loop behind `steps` is not resumed: no step is computed for nothing
            return


def stack_steps(steps: Iterable[Tensor], prompt: Int[Tensor, "*batch seq"]) -> Int[Tensor, "*batch _"]:
    """The tokens ``steps`` yielded as columns after ``prompt``'s (none: zero columns), in its dtype."""
    new = list(steps)
    if not new:
        return prompt.new_empty((*prompt.shape[:-1], 0))
    return torch.stack(new, dim=-1).to(prompt.dtype)


__all__ = ["check_max_new_tokens", "stack_steps", "until_stopped"]
