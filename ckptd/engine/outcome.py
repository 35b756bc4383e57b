"""What a reconcile pass produces, and its options: the report, with what was written, deleted
and (filled by ``ckptd once`` afterwards) published."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from ckptd.core.cancel import CancelToken
from ckptd.core.model import Best, FileStat
from ckptd.core.policy import Decision, Plan, Reason
from ckptd.engine.artifacts import ArtifactEntry
from ckptd.engine.observe import Observation
from ckptd.engine.targets import Target


class ArtifactStatus(StrEnum):
    UNCHANGED = "unchanged"  # the artifact already holds the best
    WRITTEN = "written"
    WOULD_WRITE = "would write"  # dry run
    DEFERRED = "deferred"  # the best's checkpoint is not complete yet
    FAILED = "failed"
    MISSING = "missing"  # the best's checkpoint is gone: nothing to slim


class ErrorKind(StrEnum):
    """What went wrong in a pass; the ``kind`` label of ckptd_errors_total."""

    CONFIG = "config"  # the project or layout cannot apply to this work_dir
    INPUT = "input"  # bad input found in the work_dir (logs, checkpoints, pointers)
    IO = "io"  # the work_dir or ckptd's state could not be read or written
    SLIM = "slim"  # a best artifact could not be written
    DELETE = "delete"  # a planned deletion failed
    PUBLISH = "publish"  # artifact.publish failed


class SkipReason(StrEnum):
    """Why a pass did not act on a work_dir at all."""

    LOCKED = "locked"  # another ckptd holds the work_dir's lock
    NO_LAYOUT = "no_layout"  # the folder matches no supported trainer's layout


@dataclass(slots=True)
class ArtifactOutcome:
    key: str
    best: Best
    path: Path
    status: ArtifactStatus
    detail: str = ""
    entry: ArtifactEntry | None = None
    seconds: float = 0.0  # time spent slimming, when written


@dataclass(slots=True)
class DeleteOutcome:
    decision: Decision
    done: bool
    detail: str = ""


class PublishStatus(StrEnum):
    PUBLISHED = "published"  # this attempt changed the remote side
    IN_SYNC = "in sync"
    NOTHING = "nothing to publish"  # no local manifest yet
    PENDING = "pending"  # to be published (or retried soon)
    FAILED = "failed"
    CANCELLED = "cancelled"  # ckptd stopped; resumes at start


@dataclass(slots=True)
class PublishOutcome:
    url: str
    status: PublishStatus
    manifest_sha256: str = ""  # of the manifest in place at url, as far as ckptd knows
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256 named by it
    time: str = ""  # when it was put in place
    uploads: int = 0  # objects uploaded by this attempt (artifact files and the manifest)
    uploaded_bytes: int = 0
    removed: list[str] = field(default_factory=list)  # replaced objects removed
    error: str = ""
    detail: str = ""
    failures: int = 0  # failed attempts since the last success
    timed_out: bool = False  # this attempt was stopped at artifact.publish.timeout
    timeouts: int = 0  # of the failures since the last success, those stopped so
    retry_soon: bool = False  # the local artifact changed under the upload

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def pending(self) -> bool:
        return self.status in (PublishStatus.PENDING, PublishStatus.FAILED, PublishStatus.CANCELLED)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error"] = self.error or None
        data["detail"] = self.detail or None
        return data


@dataclass(slots=True)
class WorkDirReport:
    target: Target
    layout: str | None = None
    observation: Observation | None = None
    plan: Plan | None = None
    artifacts: list[ArtifactOutcome] = field(default_factory=list)
    deletions: list[DeleteOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_kinds: list[ErrorKind] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip: SkipReason | None = None  # the work_dir was not acted on at all ...
    skipped: str = ""  # ... and what to tell the user about it
    dry_run: bool = False
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of the thread that ran the pass
    reclaimed_bytes: int = 0  # this pass
    reclaimed_total: int = 0  # since ckptd first managed the work_dir
    publish: PublishOutcome | None = None  # artifact.publish: filled after the pass (ckptd once)
    # The plan was made with no error holding deletions back (a later failure, such as no
    # space for the state file, does not change what may be deleted): disk.min_free may use it.
    deletions_clear: bool = False

    @property
    def acted(self) -> bool:
        """Did the pass write an artifact or delete a checkpoint?"""
        return bool(self.deletions) or any(
            a.status is ArtifactStatus.WRITTEN for a in self.artifacts
        )

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def changes_at(self) -> float | None:
        """The earliest wall-clock moment this pass's outcome changes by time alone: a file
        becomes old enough to trust, or a keep rule's answer runs out (pending_eval_grace)."""
        moments = [
            t
            for t in (
                self.observation.changes_at if self.observation else None,
                self.plan.changes_at if self.plan else None,
            )
            if t is not None
        ]
        return min(moments, default=None)

    def absorb(self, later: WorkDirReport) -> None:
        """Fold in a second pass over the same work_dir (disk.min_free's evictions), so one
        report says what both did; the plan and observation are the later pass's."""
        self.observation = later.observation or self.observation
        if self.plan is not None and later.plan is not None:
            # what the first pass deleted is no longer in the later plan: still list it
            names = {d.checkpoint.name for d in later.plan.decisions}
            gone = [d for d in self.plan.decisions if d.checkpoint.name not in names]
            merged = sorted(
                (*later.plan.decisions, *gone), key=lambda d: d.checkpoint.index, reverse=True
            )
            self.plan = replace(later.plan, decisions=tuple(merged))
        else:
            self.plan = later.plan or self.plan
        self.artifacts += [a for a in later.artifacts if a.status is ArtifactStatus.WRITTEN]
        self.deletions += later.deletions
        self.errors += later.errors
        self.error_kinds += later.error_kinds
        self.notes += [n for n in later.notes if n not in self.notes]
        self.skip, self.skipped = self.skip or later.skip, self.skipped or later.skipped
        self.seconds += later.seconds
        self.deletions_clear = later.deletions_clear
        self.reclaimed_bytes += later.reclaimed_bytes
        self.reclaimed_total = max(self.reclaimed_total, later.reclaimed_total)

    def error(self, kind: ErrorKind, message: str) -> None:
        self.errors.append(message)
        self.error_kinds.append(kind)

    def skipped_because(self, reason: SkipReason, text: str) -> None:
        self.skip, self.skipped = reason, text


@dataclass(frozen=True, slots=True)
class PassOptions:
    settle: float = 2.0
    dry_run: bool = False
    now: Callable[[], float] = time.time
    # inotify's close-after-write: checkpoint name -> stat at close (daemon only)
    closed: Mapping[str, FileStat] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None  # a progress bar, for people
    cancel: CancelToken | None = None  # the daemon's stop: long copies end cleanly
    # ckptd once / status: no later pass finishes what waits, unless the user runs one
    one_shot: bool = False
    # disk.min_free: checkpoint name -> (stat when planned, why) the watermark wants gone,
    # deleted only if this pass's own plan still keeps it unprotected (core/watermark.py)
    evict: Mapping[str, tuple[FileStat, Reason]] = field(default_factory=dict)
