"""When a work_dir is reconciled next: the per-work_dir slot, and the re-check that time alone
makes necessary (the moment comes from the plan; debounce and backoff are ``Timings``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.fsutil import FileStat
from ckptd.outcome import Target, WorkDirReport
from ckptd.state import WorkDirLock
from ckptd.timings import TIMINGS, Timings


@dataclass(slots=True)
class WorkDirSlot:
    target: Target
    lock: WorkDirLock
    due: float | None = None
    running: bool = False
    again: bool = False  # changed while a pass was running
    failures: int = 0
    busy_holder: str = ""
    last_ok: float | None = None
    last_report: WorkDirReport | None = None
    attempted: bool = False  # a pass finished (ok, failed, or skipped as locked)
    closed: dict[str, FileStat] = field(default_factory=dict)


def folder_stamps(folders: list[Path]) -> tuple[int, ...]:
    """mtime_ns of each folder (-1 if gone): a new entry in any of them changes this."""
    stamps = []
    for folder in folders:
        try:
            stamps.append(os.stat(folder).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def recheck_time(report: WorkDirReport, now: float, timings: Timings = TIMINGS) -> float | None:
    """When to pass again because time alone changes the outcome (monotonic ``now``).

    The moment is the plan's and the observation's own (``WorkDirReport.changes_at``): the
    scheduler does not re-derive any rule.
    """
    changes_at = report.changes_at
    if changes_at is None:
        return None
    return now + max(changes_at - time.time(), 0.0) + timings.recheck_slack
