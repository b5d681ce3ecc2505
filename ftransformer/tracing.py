"""Whether code runs under a tracer (``torch.compile``, ``torch.func``), where tensor values cannot be read."""

import sys

import torch
from torch import Tensor


def compiling() -> bool:
    """True while ``torch.compile`` traces (without importing ``torch._dynamo`` when nothing loaded it yet)."""
    # Nothing can be compiling before torch._dynamo is imported; asking would import it (seconds).
    return "torch._dynamo" in sys.modules and torch.compiler.is_compiling()


def functorch_wrapped(x: Tensor) -> bool:
    """True when ``x`` is wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ...)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def is_tracing(x: Tensor) -> bool:
    """True under ``torch.compile`` or a ``torch.func`` transform, where reading tensor values is not allowed."""
    return compiling() or functorch_wrapped(x)


def transforms() -> tuple[str, ...]:
    """The ``torch.func`` transforms the current call runs under, outermost first (``"vmap"``, ``"grad"``,
    ``"jvp"``, ``"functionalize"``); empty outside them and while ``torch.compile`` traces (which hides them)."""
    if compiling():
        return ()
    stack = torch._C._functorch.get_interpreter_stack()
    return tuple(interpreter.key().name.lower() for interpreter in stack or ())
