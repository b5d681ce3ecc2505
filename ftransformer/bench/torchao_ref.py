"""torchao's int8 weight-only quantization: the baseline of ``bench int8`` and ``bench generate --int8``.

torchao (``pip install torchao``; optional, as in the ``bench`` extra) is PyTorch's own quantization
library, and its ``Int8WeightOnlyConfig`` (formerly ``int8_weight_only``) is what gpt-fast-style decoding
uses. Two ways to put it beside ``ftransformer.quantization``:

* ``scheme_params`` -- our params with every matrix that ``quantize`` turns into an ``Int8Weight``
  quantized by torchao instead (its rounding: ``scale = max|column| / 127.5``, values in [-128, 127];
  ours: ``max|column| / 127`` in [-127, 127]). The same products then run, so a loss difference is the
  rounding scheme's alone.
* ``hf_int8`` -- transformers' GPT-2 holding our weights, its ``Conv1D`` projections turned into the
  ``nn.Linear`` modules that torchao quantizes, then ``quantize_``-d: the path a transformers user takes.
"""

import importlib.util
import warnings

import torch

from ftransformer.config import Config
from ftransformer.layers.int8 import Int8Weight
from ftransformer.quantization import quantize

SKIPPED = "skipped: torchao not installed or too old (pip install 'torchao>=0.18')"


def available() -> bool:
    """Whether a torchao with ``Int8WeightOnlyConfig`` and ``quantize_`` imports here."""
    if importlib.util.find_spec("torchao") is None:
        return False
    try:
        tq = _torchao()
    except Exception:  # a broken install is reported as absent: the baseline is skipped, not the bench
        return False
    return hasattr(tq, "Int8WeightOnlyConfig") and hasattr(tq, "quantize_")


def _torchao():
    with warnings.catch_warnings():  # its import warns about CUDA kernels a CPU build cannot load
        warnings.simplefilter("ignore")
        import torchao.quantization as tq
    return tq


def torchao_matrix(w: torch.Tensor) -> Int8Weight:
    """``w`` ``[d_in, d_out]`` quantized by torchao's int8 weight-only config, as our leaf type."""
    tq = _torchao()
    linear = torch.nn.Linear(w.shape[0], w.shape[1], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
    tq.quantize_(linear, tq.Int8WeightOnlyConfig())
    qw = linear.weight  # torchao's Int8Tensor: qdata [d_out, d_in], scale [d_out, 1]
    return Int8Weight(q=qw.qdata.t().contiguous(), scale=qw.scale.reshape(-1).to(w.dtype).contiguous())


def _pair_map(quantized, floats, fn):
    """``quantized`` with every ``Int8Weight`` replaced by ``fn`` of the float leaf at the same place in ``floats``."""
    if isinstance(quantized, Int8Weight):
        return fn(floats)
    if isinstance(quantized, dict):
        return {k: _pair_map(v, floats[k], fn) for k, v in quantized.items()}
    if isinstance(quantized, (list, tuple)):
        return type(quantized)(_pair_map(q, f, fn) for q, f in zip(quantized, floats))
    return quantized


def scheme_params(params: dict, cfg: Config) -> dict:
    """``quantize(params, cfg, "int8")`` with torchao's rounding of each matrix in place of ours."""
    return _pair_map(quantize(params, cfg, "int8"), params, torchao_matrix)


def hf_int8(hf_model):
    """``hf_model`` (a ``GPT2LMHeadModel``) with its projections as ``nn.Linear``, quantized by torchao in place."""
    from transformers.pytorch_utils import Conv1D

    tq = _torchao()
    for module in list(hf_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):  # y = x @ W + b with W [d_in, d_out]: a Linear holding W.T
                d_in, d_out = child.weight.shape
                linear = torch.nn.Linear(d_in, d_out, dtype=child.weight.dtype, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    tied = hf_model.config.tie_word_embeddings  # a tied unembedding is the token table: float, as in ours

    def projection(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not (tied and fqn == "lm_head")

    tq.quantize_(hf_model, tq.Int8WeightOnlyConfig(), filter_fn=projection)
    return hf_model


__all__ = ["SKIPPED", "available", "hf_int8", "scheme_params", "torchao_matrix"]
