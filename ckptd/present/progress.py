"""A progress bar for long copies on a terminal; silent when output is piped or small."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

# Smaller copies finish before a bar would tell anyone anything.
PROGRESS_MIN_BYTES = 1 << 30


@contextlib.contextmanager
def byte_progress(
    total: int, label: str, *, stream=None, force: bool = False
) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``progress(done, total)`` callback, or None when no bar should be shown.

    ``total`` decides whether to show a bar at all; the bar then counts against the ``total``
    the callback reports (a slim reports output bytes, fewer than the source's size).
    """
    stream = stream or sys.stderr
    if not force and (total < PROGRESS_MIN_BYTES or not stream.isatty()):
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=stream
    ) as bar:

        def update(done: int, counted_total: int) -> None:
            if counted_total != bar.total:
                bar.total = counted_total
            bar.update(done - bar.n)

        yield update
