"""Stopping: a row shows ``pad_id`` after its first stop token; a stream ends once every row has stopped,
without running its loop further; the new tokens stack after the prompt."""

import pytest
import torch

from ftransformer.stopping import check_max_new_tokens, stack_steps, until_stopped


def counted(rows_by_step, pulled):
    for step in rows_by_step:
        pulled.append(step)
        yield torch.tensor(step)


def test_a_stopped_row_shows_padding_and_the_stream_ends_when_every_row_has_stopped():
    pulled = []
    steps = [[1, 2], [5, 3], [4, 5], [5, 6], [7, 7]]
    shown = [s.tolist() for s in until_stopped(counted(steps, pulled), [5, 9], pad_id=-1)]
    assert shown == [[1, 2], [5, 3], [-1, 5]]
    assert pulled == steps[:3]  # the step after the last stop is never computed
    # no stop tokens: the steps pass through as they are
    assert [s.tolist() for s in until_stopped(counted(steps, []), [], pad_id=-1)] == steps


def test_stack_steps_puts_the_new_tokens_after_the_prompt_in_its_dtype():
    prompt = torch.zeros(2, 3, dtype=torch.int32)
    new = stack_steps(iter([torch.tensor([1, 2]), torch.tensor([3, 4])]), prompt)
    assert new.dtype == torch.int32 and new.tolist() == [[1, 3], [2, 4]]
    assert stack_steps(iter([]), prompt).shape == (2, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_max_new_tokens_is_an_int_at_least_zero(bad):
    with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 0, got {bad!r}"):
        check_max_new_tokens(bad)
    check_max_new_tokens(0)
