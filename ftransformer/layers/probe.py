"""A weight leaf that shows ``linear`` reading it: ``Probe`` sees the layer's input and passes its output through ``tap``.

Influence functions (``ftransformer.attribution.ekfac``) need, for each projection, its input activations and
the loss gradient at its output. Putting ``Probe(w, tap)`` in the parameter tree in place of ``w`` makes ``linear``
return ``tap(x, x @ w + b)``: ``tap`` sees the input ``x`` and returns the output, typically through an identity
whose backward folds the output gradient into running statistics as the backward pass reaches the layer (so no
layer's gradient outlives its own step). No hook is registered: the probe is an argument, like an intervention.
"""

from collections.abc import Callable
from typing import NamedTuple

from ftransformer.shapes import Tensor


class Probe(NamedTuple):
    """``weight`` (any weight ``linear`` takes); ``tap(input, output)`` returns the output ``linear`` gives back."""

    weight: object
    tap: Callable[[Tensor, Tensor], Tensor]
