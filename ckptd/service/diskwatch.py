"""``disk.min_free`` inside ``ckptd run``: after each pass, the filesystem of its work_dir is
checked against the watermark with the latest report of every work_dir on it; the work_dirs
the watermark chooses are passed again with their evictions (``engine/watermark.py``).

A watched write lands → that work_dir's pass → this check, so space is reclaimed as the
trainer fills the disk. "Blocked" (only protected checkpoints left) is logged once per change
and exported as ``ckptd_disk_watermark_blocked{mountpoint}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ckptd.core.config import DiskConfig
from ckptd.core.model import FileStat
from ckptd.core.policy import Reason
from ckptd.engine.outcome import WorkDirReport
from ckptd.engine.watermark import (
    blocked_note,
    device_of,
    filesystems,
    plan_filesystem,
    watermark_deletions,
)
from ckptd.service.metrics import DaemonMetrics

log = logging.getLogger("ckptd.daemon")

Evictions = dict[Path, Mapping[str, tuple[FileStat, Reason]]]


class DiskWatch:
    def __init__(self, metrics: DaemonMetrics | None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._blocked: dict[Path, bool] = {}  # mountpoint -> blocked at the last check

    def after_pass(
        self, report: WorkDirReport, latest: Iterable[WorkDirReport], disk: DiskConfig
    ) -> Evictions:
        """Which work_dirs to pass again, and what each should delete, after ``report``'s
        pass; ``latest``: the last report of every managed work_dir (``report`` included)."""
        device = device_of(report.target.work_dir)
        if device is None:
            return {}
        same = [r for r in latest if device_of(r.target.work_dir) == device]
        found = [fs for fs in filesystems(same, disk) if fs.device == device]
        if not found:
            return {}
        fs = found[0]
        wplan = plan_filesystem(fs, time.time())
        with self._lock:
            was = self._blocked.get(fs.mountpoint, False)
            self._blocked[fs.mountpoint] = wplan.blocked
        where = {"fields": {"mountpoint": str(fs.mountpoint)}}
        if wplan.blocked and not was:
            log.warning(blocked_note(fs), extra=where)
        elif was and not wplan.blocked:
            log.info(f"disk watermark on {fs.mountpoint}: no longer blocked", extra=where)
        if self.metrics:
            self.metrics.record_watermark(
                str(fs.mountpoint), wplan.blocked, watermark_deletions(report)
            )
        return {Path(owner): evict for owner, evict in wplan.evict.items()}
