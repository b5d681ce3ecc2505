"""Mixed precision as an explicit policy: fp32 master weights and optimizer state, low-precision compute.

A ``Precision`` says two dtypes: ``param`` (what the parameters and the optimizer state are stored and
updated in) and ``compute`` (what the forward and backward passes run in). The train step casts the
master weights to ``compute`` *inside* the differentiated function (``train.loss_and_grads``), so the
cast's backward brings the gradients back to ``param``: the optimizer sees fp32 gradients of fp32
weights, and nothing else changes. There is no ``torch.autocast`` and no global state: the policy is an
argument of whoever builds the step (``make_train_step(..., precision=...)``, ``--dtype``).

The loss stays fp32 where it matters: ``model.loss_fn`` lifts low-precision logits to fp32 for the
log-sum-exp. fp32 is the default on a CPU (bf16 there is slower without AVX512-BF16/AMX); on a CUDA
device that supports it, ``resolve("auto", device)`` picks bf16.

``allow_tf32(device)`` is the other CUDA switch: fp32 matrix products on tensor cores (TF32). It changes
torch's global flags, so it is a call the program makes where a CUDA run starts, never an import.
"""

from dataclasses import dataclass

import torch

from ftransformer import tree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", "fp32", "bf16")  # --dtype values; fp16 needs loss scaling, which this policy does not do


@dataclass(frozen=True)
class Precision:
    """Which dtype the weights are kept in (``param``) and which the step computes in (``compute``)."""

    compute: torch.dtype = torch.float32  # forward and backward
    param: torch.dtype = torch.float32  # master weights, gradients and optimizer state

    def __post_init__(self):
        for name in ("compute", "param"):
            value = getattr(self, name)
            if not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise ValueError(f"Precision.{name} must be a floating torch.dtype, got {value!r}")
        if self.param.itemsize < self.compute.itemsize:
            raise ValueError(
                f"Precision.param={self.param} is narrower than compute={self.compute}: master weights must be "
                "at least as precise as the compute"
            )

    @property
    def name(self) -> str:
        """``"fp32"``, ``"bf16"``, ...: the compute dtype's short name."""
        return next((k for k, v in DTYPES.items() if v == self.compute), str(self.compute))

    @property
    def casts(self) -> bool:
        """Whether the step casts at all (False: the fp32 step, untouched)."""
        return self.compute != self.param

    def cast(self, leaves: list) -> list:
        """``leaves`` with every floating tensor in ``compute`` (integer leaves, e.g. int8 weights, as they are)."""
        if not self.casts:
            return leaves
        return [x.to(self.compute) if x.is_floating_point() else x for x in leaves]

    def compute_params(self, params: dict) -> dict:
        """A copy of ``params`` in the compute dtype (for inference: generation, evaluation)."""
        return tree.to(params, dtype=self.compute) if self.casts else params


FP32 = Precision()
BF16 = Precision(compute=torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA: compute capability 8.0+, Ampere and later)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve(dtype: str | Precision | None, device: str | torch.device) -> Precision:
    """The policy for ``--dtype``: ``"fp32"``, ``"bf16"``, or ``"auto"``/None (bf16 on a CUDA device that
    supports it, fp32 elsewhere)."""
    if isinstance(dtype, Precision):
        return dtype
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        return BF16 if bf16_supported(device) else FP32
    if dtype not in CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, got {dtype!r}")
    return Precision(compute=DTYPES[dtype])


def allow_tf32(device: str | torch.device) -> bool:
    """On a CUDA device, let fp32 matrix products and convolutions use TF32 tensor cores; returns whether it did.

    These are torch's process-wide flags: call this where a CUDA run starts (the CLI does), not at import.
    On any other device it changes nothing.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


__all__ = ["BF16", "CHOICES", "DTYPES", "FP32", "Precision", "allow_tf32", "bf16_supported", "resolve"]
