"""Shared fixtures for the test suite."""

import jaxtyping
import pytest
import torch

import ftransformer as ft


def pytest_configure(config):
    # Test tensors are tiny: one intra-op thread beats several, whose fork/join costs more than the
    # arithmetic and, on a busy machine, makes a 0.3 ms forward take tens of milliseconds.
    torch.set_num_threads(1)


def _leave_undecorated(fn=None, *, typechecker=None):
    """Stands in for ``jaxtyping.jaxtyped`` while checking is off: hands the function back unchanged."""
    return (lambda f: f) if fn is None else fn


@pytest.fixture
def no_typecheck(monkeypatch):
    """Turn jaxtyping's runtime checks off for one test (a ``@jaxtyped`` function graph-breaks under
    ``torch.compile``), and put the previous setting back afterwards."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    # The import hook decorates a function defined inside another one each time the outer one runs,
    # and decorating (inspect.signature) cannot be traced by torch.compile: with checks off, skip it.
    # (A module first imported during such a test would stay unchecked for the session; import early.)
    monkeypatch.setattr(jaxtyping, "jaxtyped", _leave_undecorated)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture
def tiny_cfg() -> ft.Config:
    """The "tiny" preset: vocab 37, d_model 24, 3 heads, 2 layers, d_ff 40, max_seq_len 16 -- every axis
    a different size, so a swapped axis fails loudly."""
    return ft.PRESETS["tiny"]


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator for test data, so no test touches torch's global random state."""
    return torch.Generator().manual_seed(1234)
