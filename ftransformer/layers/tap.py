"""Where a forward pass shows its intermediate values: a ``Tap`` records them and applies interventions.

Layers take a ``tap`` and pass every value worth looking at through it: ``x = tap("resid_mid", x)``.
The default, ``NO_TAP``, hands each value straight back, so ``forward`` computes exactly what it
always did. ``forward_with_activations`` passes a fresh ``Tap`` (one per call, never shared), which
applies the caller's interventions (``path -> function(value) -> value``) and records what flows on.
Nothing global is touched, so a tapped forward still runs under ``grad``, ``vmap`` and ``compile``.
"""

from collections.abc import Callable
from typing import NamedTuple, no_type_check

from ftransformer.shapes import Tensor

Intervention = Callable[[Tensor], Tensor]


@no_type_check  # not wrapped by the jaxtyping hook: a wrapped method stops torch.compile (decode_steps)
class Tap:
    """Records values by dotted path (``"blocks.1.attn.pattern"``) and applies interventions to them."""

    active = True

    def __init__(self, interventions: dict[str, Intervention] | None = None, *, record: bool = True):
        self.acts: dict[str, Tensor] = {}
        self.interventions = dict(interventions or {})
        self.prefix = ""
        self.record = record  # False: only intervene (generation keeps no activations alive)

    def scope(self, name: str) -> "Tap":
        """The same recorder, with ``name.`` in front of every path given to it."""
        child = object.__new__(type(self))
        child.acts, child.interventions, child.prefix = self.acts, self.interventions, f"{self.prefix}{name}."
        child.record = self.record
        return child

    def intervenes(self, name: str) -> bool:
        """Whether an intervention replaces the value at ``name`` (layers then route it into the output)."""
        return self.prefix + name in self.interventions

    def __call__(self, name: str, value: Tensor) -> Tensor:
        path = self.prefix + name
        fn = self.interventions.get(path)
        if fn is not None:
            new = fn(value)
            if not isinstance(new, Tensor) or new.shape != value.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(f"the intervention at {path!r} must return a tensor of shape {tuple(value.shape)}, got {got}")
            value = new
        if self.record:
            self.acts[path] = value
        return value


@no_type_check
class _NoTap(Tap):
    """The tap of a plain forward pass: records nothing, changes nothing."""

    active = False

    def __init__(self):
        super().__init__()

    def scope(self, name: str) -> "Tap":
        return self

    def intervenes(self, name: str) -> bool:
        return False

    def __call__(self, name: str, value: Tensor) -> Tensor:
        return value


NO_TAP: Tap = _NoTap()


@no_type_check
class WithTensors(NamedTuple):
    """An intervention as a pure function of the value and its tensors, ``fn(value, *tensors)``: a compiled decode
    step takes the tensors as arguments (a new vector or scale reuses the compiled step; ``decode_steps``)."""

    fn: Callable[..., Tensor]  # a function defined once (e.g. at module level), so compiled code can key on it
    tensors: tuple[Tensor, ...]

    def __call__(self, value: Tensor) -> Tensor:
        return self.fn(value, *self.tensors)
