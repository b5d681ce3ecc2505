"""Argument checks shared by every module: each raises naming the argument, what it must be and what it got.

``True`` and ``False`` are ints to Python; none of these counts them as one (a flag passed where a count was
meant is a bug, not a 1).
"""

from collections.abc import Sequence


def is_int(value) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, expected: str, value, allow_none: bool, error: type[Exception]):
    none = " or None" if allow_none else ""
    raise error(f"{name} must be {expected}{none}, got {value!r}")


def integer(name: str, value, *, allow_none: bool = False, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is an int (or None where allowed); the message names its type."""
    if not (is_int(value) or (allow_none and value is None)):
        none = " or None" if allow_none else ""
        raise error(f"{name} must be an int{none}, got {value!r} ({type(value).__name__})")


def int_at_least(name: str, value, low: int, *, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int ``>= low`` (or None where allowed)."""
    if allow_none and value is None:
        return
    if not is_int(value) or value < low:
        _fail(name, f"an int >= {low}", value, allow_none, ValueError)


def non_negative_int(name: str, value, *, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int ``>= 0`` (or None where allowed)."""
    int_at_least(name, value, 0, allow_none=allow_none)


def positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int ``> 0`` (or None where allowed)."""
    if allow_none and value is None:
        return
    if not is_int(value) or value <= 0:
        _fail(name, "a positive int", value, allow_none, ValueError)


def int_in(name: str, value, low: int, high: int, *, closed: bool = False, high_name: str | None = None) -> None:
    """Raise ValueError unless ``value`` is an int in ``[low, high)`` (``[low, high]`` when ``closed``)."""
    if not is_int(value) or not (low <= value <= high if closed else low <= value < high):
        top = f"{high_name}={high}" if high_name else f"{high}"
        _fail(name, f"an int in [{low}, {top}{']' if closed else ')'}", value, False, ValueError)


def boolean(name: str, value, *, expected: str = "a bool", error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is a real bool (a string like ``"false"`` is truthy, so it is refused);
    ``expected`` words it for the reader (``"true or false"`` in a JSON file)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def positive_number(name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int or float ``> 0``."""
    if not is_number(value) or not value > 0:
        _fail(name, "a number > 0", value, False, ValueError)


def one_of(name: str, value, choices: Sequence) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
