"""What flows through a reconcile pass: the target, its options, and the report it produces."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.core.config import ProjectConfig
from ckptd.core.model import Best, FileStat
from ckptd.core.policy import Decision, Plan
from ckptd.engine.artifacts import ArtifactEntry, expand_artifact_dir
from ckptd.engine.observe import Observation

if TYPE_CHECKING:
    from ckptd.publish.sync import PublishOutcome


@dataclass(frozen=True, slots=True)
class Target:
    """A work_dir and the project that manages it."""

    work_dir: Path
    project: ProjectConfig
    base_dir: Path  # the config file's folder: relative paths resolve against it

    @property
    def artifact_dir(self) -> Path:
        return expand_artifact_dir(
            self.project.artifact.dir, self.work_dir, self.project.name, self.base_dir
        )


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
