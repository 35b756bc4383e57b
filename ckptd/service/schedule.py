"""When a work_dir is reconciled next: the per-work_dir slot, and the re-check that time alone
makes necessary (the moment comes from the plan; debounce and backoff are ``Timings``)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.model import FileStat
from ckptd.core.policy import Reason
from ckptd.core.timings import TIMINGS, Timings
from ckptd.engine.outcome import SkipReason, WorkDirReport
from ckptd.engine.state import WorkDirLock
from ckptd.engine.targets import Target
from ckptd.present.report import log_actions

log = logging.getLogger("ckptd.daemon")


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
    # disk.min_free: what the next pass should delete (service/diskwatch.py)
    evict: dict[str, tuple[FileStat, Reason]] = field(default_factory=dict)
    # CPU seconds of its last pass that wrote and deleted nothing: what a resync costs here
    quiet_pass_cpu: float = 0.0


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


def next_due(
    slot: WorkDirSlot, report: WorkDirReport | None, now: float, timings: Timings
) -> float | None:
    """After a pass (``report`` None: it raised or was cancelled): log what it did, update
    the slot, and say when the work_dir is due again by time alone (None: only on events)."""
    if report is None or report.failed:
        if report is not None:
            log_actions(report, log, slot.last_report)
            slot.last_report = report
        slot.failures += 1
        return now + timings.backoff(slot.failures)
    slot.failures = 0
    if report.skip is SkipReason.LOCKED:
        if report.skipped != slot.busy_holder:
            log.warning(report.skipped, extra=_f(slot.target.work_dir, action="skip"))
            slot.busy_holder = report.skipped
        return now + timings.busy_retry
    slot.busy_holder = ""
    log_actions(report, log, slot.last_report)
    slot.last_ok = time.time()
    slot.last_report = report
    return recheck_time(report, now, timings)


def _f(work_dir: Path, **fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"work_dir": str(work_dir), **fields}}
