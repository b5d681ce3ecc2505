"""A weight leaf that shows ``linear`` reading it: ``Probe`` records the layer's input and perturbs its output.

Influence functions (``ftransformer.attribution.ekfac``) need, for each projection, its input activations and
the loss gradient at its output. Putting ``Probe(w, delta, record)`` in the parameter tree in place of ``w``
makes ``linear`` hand its input ``x`` to ``record`` and return ``x @ w + b + delta``; ``delta`` is a zero
tensor shaped like the output, so the forward pass is unchanged and the gradient with respect to ``delta`` is
the output gradient, token by token. No hook is registered: the probe is an argument, like an intervention.
"""

from collections.abc import Callable
from typing import NamedTuple

from ftransformer.shapes import Tensor


class Probe(NamedTuple):
    """``weight`` (any weight ``linear`` takes), its input shown to ``record``, ``delta`` added to its output."""

    weight: object
    delta: Tensor
    record: Callable[[Tensor], None]
