"""What a reconcile pass produces, and its options: the report, with what was written, deleted
and (filled by ``ckptd once`` afterwards) published."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptd.core.model import Best, FileStat
from ckptd.core.policy import Decision, Plan
from ckptd.engine.artifacts import ArtifactEntry
from ckptd.engine.observe import Observation
from ckptd.engine.targets import Target


@dataclass(slots=True)
class ArtifactOutcome:
    key: str
    best: Best
    path: Path
    status: str  # "unchanged" | "written" | "would write" | "deferred" | "failed" | "missing"
    detail: str = ""
    entry: ArtifactEntry | None = None
    seconds: float = 0.0  # time spent slimming, when written


@dataclass(slots=True)
class DeleteOutcome:
    decision: Decision
    done: bool
    detail: str = ""


@dataclass(slots=True)
class PublishOutcome:
    url: str
    # published | in sync | nothing to publish | pending | failed | cancelled | skipped
    status: str
    manifest_sha256: str = ""  # of the manifest in place at url, as far as ckptd knows
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256 named by it
    time: str = ""  # when it was put in place
    uploads: int = 0  # objects uploaded by this attempt (artifact files and the manifest)
    uploaded_bytes: int = 0
    removed: list[str] = field(default_factory=list)  # replaced objects removed
    error: str = ""
    detail: str = ""
    failures: int = 0  # failed attempts since the last success
    retry_soon: bool = False  # the local artifact changed under the upload

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def pending(self) -> bool:
        return self.status in ("pending", "failed", "cancelled")

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
    error_kinds: list[str] = field(default_factory=list)  # metrics.ERROR_KINDS
    notes: list[str] = field(default_factory=list)
    skipped: str = ""  # why the work_dir was not acted on at all (busy, not a work_dir)
    dry_run: bool = False
    seconds: float = 0.0
    reclaimed_bytes: int = 0  # this pass
    reclaimed_total: int = 0  # since ckptd first managed the work_dir
    publish: PublishOutcome | None = None  # artifact.publish: filled after the pass (ckptd once)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def error(self, kind: str, message: str) -> None:
        self.errors.append(message)
        self.error_kinds.append(kind)


@dataclass(frozen=True, slots=True)
class PassOptions:
    settle: float = 2.0
    dry_run: bool = False
    now: Callable[[], float] = time.time
    # inotify's close-after-write: checkpoint name -> stat at close (daemon only)
    closed: Mapping[str, FileStat] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None
