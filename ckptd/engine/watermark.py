"""``disk.min_free`` in the engine: the passes' reports grouped by filesystem (``st_dev``), the
free space read with ``statvfs``, ``core/watermark`` asked which extra checkpoints go, and the
chosen work_dirs passed again with those evictions (``PassOptions.evict``).

The extra pass re-plans under the work_dir's lock, so a deletion still needs the fresh plan
to keep the checkpoint unprotected and its stat to be the planned one; a work_dir whose pass
holds deletions back (errors) or was skipped contributes nothing (``offered``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.core.config import DiskConfig
from ckptd.core.policy import RuleId
from ckptd.core.units import format_size
from ckptd.core.watermark import (
    Candidate,
    DiskSpace,
    WatermarkPlan,
    candidates,
    is_running,
    plan_watermark,
)
from ckptd.engine.outcome import ErrorKind, PassOptions, WorkDirReport
from ckptd.fs.space import mountpoint_of

# ckptd once: rounds of evictions at most (a round re-reads free space; one is the rule).
MAX_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class Filesystem:
    device: int
    mountpoint: Path
    space: DiskSpace
    reports: tuple[WorkDirReport, ...]


def device_of(work_dir: Path) -> int | None:
    try:
        return os.stat(work_dir).st_dev
    except OSError:
        return None


def disk_space(path: Path, disk: DiskConfig) -> DiskSpace:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return DiskSpace(st.f_bavail * st.f_frsize, total, disk.threshold(total), disk.min_free)


def _running(report: WorkDirReport, now: float) -> bool:
    observation = report.observation
    if observation is None:
        return True  # unknown: treated as running, so its checkpoints go last
    mtimes = [c.stat.mtime_ns / 1e9 for c in observation.scan.checkpoints]
    logs = []
    for source in observation.sources:
        with contextlib.suppress(OSError, ValueError):  # gone, or not a path
            logs.append((report.target.work_dir / source).stat().st_mtime)
    return is_running(mtimes, max(logs, default=None), now)


def offered(report: WorkDirReport, now: float) -> list[Candidate]:
    """What this work_dir's last pass lets the watermark delete."""
    plan = report.plan
    # Not from a pass whose errors hold deletions back, nor one whose deletions failed (asking
    # again would fail again); a dry run's pass would not delete: offering it would only hide
    # other candidates. A pass that failed only afterwards (ENOSPC writing its state on a full
    # disk) still offers: its eviction pass frees the space first.
    if (
        not report.deletions_clear
        or ErrorKind.DELETE in report.error_kinds
        or report.skip is not None
        or report.dry_run
        or plan is None
        or plan.held
    ):
        return []
    return candidates(str(report.target.work_dir), plan, _running(report, now))


def filesystems(reports: Iterable[WorkDirReport], disk: DiskConfig) -> list[Filesystem]:
    by_device: dict[int, list[WorkDirReport]] = {}
    for report in reports:
        device = device_of(report.target.work_dir)
        if device is not None:
            by_device.setdefault(device, []).append(report)
    found = []
    for device, group in by_device.items():
        work_dir = group[0].target.work_dir
        try:
            space = disk_space(work_dir, disk)
        except OSError:
            continue  # gone meanwhile: the next pass reports it
        found.append(Filesystem(device, mountpoint_of(work_dir), space, tuple(group)))
    return found


def plan_filesystem(fs: Filesystem, now: float) -> WatermarkPlan:
    offers = [c for r in fs.reports for c in offered(r, now)]
    return plan_watermark(offers, fs.space)


def blocked_note(fs: Filesystem) -> str:
    space = fs.space
    if space.min_free.endswith("%"):
        free = f"{100 * space.free_bytes / max(1, space.total_bytes):.1f}%"
    else:
        free = format_size(space.free_bytes)
    return (
        f"disk watermark on {fs.mountpoint}: {free} free < {space.min_free} "
        f"({format_size(space.free_bytes)} of {format_size(space.total_bytes)}), and only "
        "protected checkpoints (or other files) hold the rest: nothing more can be deleted "
        "safely; free space elsewhere or lower disk.min_free"
    )


def watermark_deletions(report: WorkDirReport) -> int:
    return sum(1 for d in report.deletions if d.done and RuleId.DISK_WATERMARK in d.decision.rules)


def enforce(
    reports: list[WorkDirReport],
    disk: DiskConfig,
    options: PassOptions,
    reconcile: Callable[..., WorkDirReport],
) -> list[str]:
    """``ckptd once``: after every work_dir's own pass, evict per filesystem until each is
    back above the watermark or only protected checkpoints remain; the notes to show."""
    by_dir = {r.target.work_dir: r for r in reports}
    notes: list[str] = []
    for _round in range(1 if options.dry_run else MAX_ROUNDS):
        progress = False
        notes = []
        for fs in filesystems(by_dir.values(), disk):
            wplan = plan_filesystem(fs, options.now())
            if wplan.blocked:
                notes.append(blocked_note(fs))
            for owner, evict in wplan.evict.items():
                first = by_dir[Path(owner)]
                again = reconcile(first.target, replace(options, evict=evict))
                first.absorb(again)
                progress |= watermark_deletions(again) > 0
        if not progress:
            break
    return notes
