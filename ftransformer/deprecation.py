"""Names that moved: one forwarder that resolves an old name to its new home with a ``DeprecationWarning``.

Used as a module's ``__getattr__`` (PEP 562), so the old name costs nothing until someone reads it.
"""

import importlib
import warnings
from collections.abc import Callable


def forwarder(
    owner: str, moved: dict[str, tuple[str, str]], *, removal: str, shown_as: str | None = None
) -> Callable[[str], object]:
    """A ``__getattr__`` for module ``owner``: ``moved`` maps an old name to ``(module, name)`` under
    ``ftransformer``; reading one warns "``shown_as.old`` moved to ``ftransformer.module.name``; ``removal``"
    (``shown_as``: how users write the owner, default its name)."""
    shown_as = shown_as or owner

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}")
        module, new = moved[name]
        warnings.warn(f"{shown_as}.{name} moved to ftransformer.{module}.{new}; {removal}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(f"ftransformer.{module}"), new)

    return __getattr__
