"""What the daemon tells systemd and ``/healthz``: ready once every work_dir had its first
pass, alive while the main loop turns, and a one-line status."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable

from ckptd.core.timings import Timings
from ckptd.core.units import format_size
from ckptd.service.schedule import WorkDirSlot
from ckptd.service.sdnotify import Notifier

log = logging.getLogger("ckptd.daemon")


def status_line(slots: Iterable[WorkDirSlot]) -> str:
    slots = list(slots)
    errors = sum(1 for s in slots if s.failures)
    reclaimed = sum(s.last_report.reclaimed_total for s in slots if s.last_report)
    return (
        f"watching {len(slots)} work_dir(s); {errors} with errors; "
        f"reclaimed {format_size(reclaimed)} in total"
    )


class Health:
    def __init__(self, notifier: Notifier, timings: Timings) -> None:
        self.notifier = notifier
        self.timings = timings
        self.last_tick = time.monotonic()
        self.first_pass_done = False
        self._waiting: collections.deque[WorkDirSlot] = collections.deque()
        self._seen = -1

    def first_pass(self, slots: list[WorkDirSlot]) -> None:
        """READY once every work_dir was visited: one that failed or is locked by another ckptd
        counts, since READY means "every work_dir had its first pass", not "all succeeded"."""
        if self.first_pass_done:
            return
        if len(slots) != self._seen:  # (re)built when rediscovery adds work_dirs
            self._waiting, self._seen = collections.deque(slots), len(slots)
        # Passes finish in about the order they were queued: dropping the finished ones from
        # the front keeps this O(1) per tick, where any() over 2,000 slots was not.
        while self._waiting and self._waiting[0].attempted:
            self._waiting.popleft()
        if any(not s.attempted for s in self._waiting):
            self.notifier.status("first reconcile in progress")
            return
        self.first_pass_done = True
        status = status_line(slots)
        self.notifier.ready(status)
        log.info("ready: first full reconcile done", extra={"fields": {"status": status}})

    def healthy(self, slots: list[WorkDirSlot]) -> tuple[bool, str]:
        """For /healthz: ready after the first full pass, alive while the main loop turns."""
        if not self.first_pass_done:
            return False, "starting: first reconcile in progress"
        stale = time.monotonic() - self.last_tick
        if stale > self.timings.loop_stale_after:
            return False, f"main loop has not run for {stale:.0f} s"
        return True, status_line(slots)
