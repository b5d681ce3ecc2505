"""Shared fixtures for the test suite."""

import sys
import types
from pathlib import Path

import pytest
import torch

# `tests` is this folder (a namespace package). Some wheels (kronfluence 1.0.1) install a top-level `tests`
# package of their own that would shadow it; name this folder explicitly before importing from it.
if getattr(sys.modules.get("tests"), "__path__", [None])[0] != str(Path(__file__).parent):
    sys.modules["tests"] = types.ModuleType("tests")
    sys.modules["tests"].__path__ = [str(Path(__file__).parent)]

import ftransformer as ft
from ftransformer.layers import attention_kernel
from tests.typecheck import unchecked


def pytest_configure(config):
    # Test tensors are tiny: one intra-op thread beats several, whose fork/join costs more than the
    # arithmetic and, on a busy machine, makes a 0.3 ms forward take tens of milliseconds.
    torch.set_num_threads(1)


@pytest.fixture
def no_typecheck():
    """Turn jaxtyping's runtime checks off for one test (a ``@jaxtyped`` function graph-breaks under
    ``torch.compile``), and put the previous setting back afterwards."""
    with unchecked():
        yield


@pytest.fixture
def tiny_cfg() -> ft.Config:
    """The "tiny" preset: vocab 37, d_model 24, 3 heads, 2 layers, d_ff 40, max_seq_len 16 -- every axis
    a different size, so a swapped axis fails loudly."""
    return ft.PRESETS["tiny"]


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator for test data, so no test touches torch's global random state."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=["sdpa", "einsum"])
def kernel(request) -> str:
    """The test runs once per attention kernel, inside ``layers.attention_kernel(kernel)``."""
    with attention_kernel(request.param):
        yield request.param
