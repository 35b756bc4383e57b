"""``disk.min_free``: which extra checkpoints go when a filesystem runs short. Pure.

The watermark looks across every work_dir on one filesystem, because the space is shared: a
finished run's old checkpoints should go before a running one's. Its input is what each
work_dir's own plan kept without protecting (``Decision.protected`` is never overridden:
newest, resume target, pending evaluation, best until its artifact, being written, disputed
or trainer-held), plus the filesystem's free and total bytes. Its answer names checkpoints per
work_dir; the engine re-plans each of those work_dirs under its lock and deletes a named
checkpoint only if that fresh plan still keeps it unprotected, with the same stat
(``apply_evictions``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ckptd.core.model import FileStat
from ckptd.core.policy import Action, Decision, Plan, Reason, RuleId

# A run with too few checkpoints to measure its pace counts as running this long after its
# last write; also the least window for any run (an epoch of a few seconds says little).
RUNNING_FLOOR_SECONDS = 600.0


def is_running(checkpoint_mtimes: Sequence[float], log_mtime: float | None, now: float) -> bool:
    """A run is running while its newest checkpoint or metric log changed within twice the
    longest interval between its checkpoints (at least ``RUNNING_FLOOR_SECONDS``).

    Only the order of deletions depends on it (ended runs' checkpoints go first), never
    whether a checkpoint may be deleted, so a wrong guess costs a preference, not safety."""
    times = sorted(checkpoint_mtimes)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    window = max(RUNNING_FLOOR_SECONDS, 2 * max(gaps, default=0.0))
    last = max([*times, *([log_mtime] if log_mtime is not None else [])], default=None)
    return last is not None and now - last <= window


@dataclass(frozen=True, slots=True)
class Candidate:
    owner: str  # the work_dir
    decision: Decision  # kept by its work_dir's plan, not protected
    running: bool  # its run is still training (``is_running``)


@dataclass(frozen=True, slots=True)
class DiskSpace:
    free_bytes: int  # statvfs f_bavail * f_frsize: what an unprivileged trainer can still use
    total_bytes: int
    threshold_bytes: int  # disk.min_free applied to total_bytes
    min_free: str  # as configured, for the explanation

    @property
    def below(self) -> bool:
        return self.free_bytes < self.threshold_bytes


@dataclass(frozen=True, slots=True)
class WatermarkPlan:
    # work_dir -> checkpoint name -> (its stat when planned, why it goes)
    evict: Mapping[str, Mapping[str, tuple[FileStat, Reason]]] = field(default_factory=dict)
    freed_bytes: int = 0
    # Even with every unprotected checkpoint gone the filesystem stays under the watermark:
    # protected checkpoints (and whatever else is on it) hold the space.
    blocked: bool = False


def candidates(owner: str, plan: Plan, running: bool) -> list[Candidate]:
    """What a work_dir's plan offers the watermark: kept, unprotected checkpoints."""
    return [Candidate(owner, d, running) for d in plan.kept if not d.protected]


def plan_watermark(offered: Iterable[Candidate], disk: DiskSpace) -> WatermarkPlan:
    """Ended runs' checkpoints before running ones', each oldest first by its own mtime,
    until the free space would be back at the threshold."""
    if not disk.below:
        return WatermarkPlan()
    order = sorted(
        offered,
        key=lambda c: (
            c.running,
            c.decision.checkpoint.stat.mtime_ns,
            c.decision.checkpoint.index,  # equal mtimes (a copy, a restore): lower first
            c.owner,
        ),
    )
    detail = {
        "free_bytes": disk.free_bytes,
        "total_bytes": disk.total_bytes,
        "threshold_bytes": disk.threshold_bytes,
        "min_free": disk.min_free,
    }
    reason = Reason(RuleId.DISK_WATERMARK, detail)
    evict: dict[str, dict[str, tuple[FileStat, Reason]]] = {}
    free = disk.free_bytes
    for c in order:
        if free >= disk.threshold_bytes:
            break
        checkpoint = c.decision.checkpoint
        evict.setdefault(c.owner, {})[checkpoint.name] = (checkpoint.stat, reason)
        free += checkpoint.stat.size
    return WatermarkPlan(evict, free - disk.free_bytes, free < disk.threshold_bytes)


def apply_evictions(plan: Plan, evict: Mapping[str, tuple[FileStat, Reason]]) -> Plan:
    """A work_dir's fresh plan with the watermark's choices deleted: only checkpoints this
    plan still keeps without protection and whose stat is the one the watermark planned with."""
    if not evict:
        return plan
    decisions = []
    for d in plan.decisions:
        wanted = evict.get(d.checkpoint.name)
        if wanted is not None and d.keep and not d.protected and wanted[0] == d.checkpoint.stat:
            d = Decision(d.checkpoint, Action.DELETE, (wanted[1],))
        decisions.append(d)
    return replace(plan, decisions=tuple(decisions))
