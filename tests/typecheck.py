"""Turning the suite's runtime shape checks off for a stretch of code that is not under test."""

import contextlib

import jaxtyping


def _leave_undecorated(fn=None, *, typechecker=None):
    """Stands in for ``jaxtyping.jaxtyped`` while checking is off: hands the function back unchanged."""
    return (lambda f: f) if fn is None else fn


@contextlib.contextmanager
def unchecked():
    """jaxtyping's runtime checks off inside the block, the previous setting back after it.

    The import hook decorates a function defined inside another one each time the outer one runs, and
    decorating (inspect.signature) costs time and cannot be traced by torch.compile: with checks off, that
    is skipped too. (A module first imported inside the block would stay unchecked for the session:
    import early.)"""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    original = jaxtyping.jaxtyped
    jaxtyping.jaxtyped = _leave_undecorated
    try:
        yield
    finally:
        jaxtyping.jaxtyped = original
        jaxtyping.config.update("jaxtyping_disable", before)
