"""When a work_dir is reconciled next: the per-work_dir slot and the timing rules the
daemon's scheduler applies (debounce, backoff, re-checks that time alone makes necessary)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.model import FileStat
from ckptd.engine.outcome import WorkDirReport
from ckptd.engine.state import WorkDirLock
from ckptd.engine.targets import Target

DEBOUNCE = 0.2  # coalesce the burst of events one checkpoint or log line causes
BACKOFF_START, BACKOFF_MAX = 5.0, 300.0
BUSY_RETRY = 30.0


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


def backoff(failures: int) -> float:
    """Seconds before retrying a work_dir after ``failures`` failed passes in a row."""
    return min(BACKOFF_MAX, BACKOFF_START * 2 ** (failures - 1))


def folder_stamps(folders: list[Path]) -> tuple[int, ...]:
    """mtime_ns of each folder (-1 if gone): a new entry in any of them changes this."""
    stamps = []
    for folder in folders:
        try:
            stamps.append(os.stat(folder).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def recheck_time(report: WorkDirReport, settle: float, now: float) -> float | None:
    """When a pass left something that time alone will change: settling files, grace ends."""
    observation = report.observation
    if observation is None:
        return None
    times = []
    if any(not c.complete for c in observation.scan.checkpoints) or any(
        a.status == "deferred" for a in report.artifacts
    ):
        times.append(now + max(settle, 0.5))
    grace = report.target.project.retention.pending_eval_grace
    wall = time.time()
    for c in observation.scan.checkpoints:
        # A checkpoint too young to trust is looked at again the moment it is `settle` old,
        # not `settle` after this pass (polling adds its own delay before the pass).
        young = c.stat.mtime_ns / 1e9 + settle - wall
        if not c.complete and young > 0:
            times.append(now + young + 0.05)
    for c in observation.scan.checkpoints:
        if c.index not in observation.evaluated:
            expires = c.stat.mtime_ns / 1e9 + grace - wall
            if expires > 0:
                times.append(now + expires + 1)
    return min(times) if times else None
