"""Stopping long work from outside: a token the daemon sets and the copy loops check.

A slim of a large checkpoint can take minutes; at SIGTERM the daemon gives in-flight work a
grace period and then wants it to stop cleanly (no partial file stays, the next start redoes
it). The loops check the token at the points where they report progress, so progress
callbacks stay callbacks and never need to raise.
"""

from __future__ import annotations

from collections.abc import Callable


class Cancelled(Exception):
    """The work was stopped before it finished; nothing it would have written exists."""


class CancelToken:
    def __init__(self, stop_requested: Callable[[], bool], why: str) -> None:
        self._stop_requested = stop_requested
        self.why = why

    def check(self) -> None:
        if self._stop_requested():
            raise Cancelled(self.why)


def check(token: CancelToken | None) -> None:
    if token is not None:
        token.check()
