"""Progress bars of the long interpretability sweeps: a tqdm bar on stderr with its estimate, or nothing."""

import contextlib
import sys
from collections.abc import Iterator


class _Silent:
    """A bar that counts nothing: what a sweep updates when no progress is asked for."""

    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Iterator:
    """A tqdm bar of ``total`` ``unit``s on stderr (its rate and time left are the estimate) when ``enabled``."""
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar
