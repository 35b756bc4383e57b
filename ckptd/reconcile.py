"""One reconcile pass over one work_dir: observe → plan → act (slim first, delete last) → save.

Every step is idempotent, so a crash anywhere reduces to "reconcile again". Deletions happen
only when the pass is sure: no blocking problem, every best artifact durable, and each file
unchanged since it was planned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import artifacts
from ckptd.artifacts import ArtifactEntry, expand_artifact_dir
from ckptd.config import ProjectConfig
from ckptd.fsutil import FileStat, remove_stale_temp_files
from ckptd.layouts import LayoutError, choose_layout
from ckptd.layouts.base import Layout
from ckptd.model import Best, Checkpoint, Problem
from ckptd.observe import Observation, observe
from ckptd.policy import Decision, Plan, PolicyInput, plan
from ckptd.state import LockBusy, StateError, WorkDirLock, WorkDirState, load_state, save_state
from ckptd.units import format_size


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
    notes: list[str] = field(default_factory=list)
    skipped: str = ""  # why the work_dir was not acted on at all (busy, not a work_dir)
    dry_run: bool = False
    seconds: float = 0.0
    reclaimed_bytes: int = 0  # this pass
    reclaimed_total: int = 0  # since ckptd first managed the work_dir

    @property
    def failed(self) -> bool:
        return bool(self.errors)


SlimFn = Callable[..., object]


@dataclass(frozen=True, slots=True)
class PassOptions:
    settle: float = 2.0
    dry_run: bool = False
    now: Callable[[], float] = time.time
    # inotify's close-after-write: checkpoint name -> stat at close (daemon only)
    closed: Mapping[str, FileStat] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None


def _keep_keys(target: Target, layout: Layout) -> tuple[str, ...]:
    keys = target.project.artifact.keep_keys
    return layout.default_keep_keys if keys == "auto" else tuple(keys)


def _write_artifact(
    target: Target,
    layout: Layout,
    observation: Observation,
    state: WorkDirState,
    best: Best,
    checkpoint: Checkpoint,
    options: PassOptions,
) -> ArtifactEntry:
    from ckptd.slim import slim_checkpoint

    folder = target.artifact_dir
    name = layout.artifact_name(best.key, checkpoint)
    if target.project.artifact.hash_in_name:
        stem = name.removesuffix(".pth")

        def final_name(sha256: str) -> str:
            return f"{stem}-{sha256[:8]}.pth"

        name_for: str | Callable[[str], str] = final_name
    else:
        name_for = name
    result = slim_checkpoint(
        target.work_dir / checkpoint.name,
        folder,
        name_for,
        keep_keys=_keep_keys(target, layout),
        progress=options.progress,
    )
    meta = getattr(result, "meta", None) or {}
    epoch = meta.get("epoch", checkpoint.index if checkpoint.unit == "epoch" else None)
    step = meta.get("iter", checkpoint.index if checkpoint.unit != "epoch" else None)
    return ArtifactEntry(
        key=best.key,
        file=result.path.name,
        rule=best.rule,
        value=best.value,
        unit=checkpoint.unit,
        index=checkpoint.index,
        epoch=epoch,
        step=step,
        sha256=result.sha256,
        bytes=result.size,
        source_checkpoint=checkpoint.name,
        source_stat=tuple(result.source_stat.as_list()),  # type: ignore[arg-type]
        kept_keys=tuple(result.kept_keys),
        time=artifacts.now_iso(),
    )


def _ensure_artifacts(
    target: Target,
    layout: Layout,
    observation: Observation,
    state: WorkDirState,
    options: PassOptions,
    report: WorkDirReport,
) -> bool:
    """Slim every best that is not yet an artifact. False when one failed (then: no deletions)."""
    from ckptd.slim import SlimError

    folder = target.artifact_dir
    entries = dict(observation.manifest)
    ok = True
    for key, best in observation.bests.items():
        checkpoint = observation.scan.checkpoint_at(best.index)
        entry = entries.get(key)
        path = folder / layout_name_or_entry(layout, best, checkpoint, entry)
        if key in observation.ready:
            report.artifacts.append(ArtifactOutcome(key, best, path, "unchanged", entry=entry))
            continue
        if checkpoint is None:
            detail = (
                f"the best {best.key}={best.value:g} is at index {best.index}, whose checkpoint is "
                "no longer in the work_dir; the artifact stays at the previous best"
            )
            report.artifacts.append(ArtifactOutcome(key, best, path, "missing", detail, entry))
            continue
        if not checkpoint.complete:
            detail = f"{checkpoint.name} is {checkpoint.incomplete_reason}; will slim it then"
            report.artifacts.append(ArtifactOutcome(key, best, path, "deferred", detail, entry))
            continue
        if options.dry_run:
            report.artifacts.append(ArtifactOutcome(key, best, path, "would write", entry=entry))
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(folder)
            new = _write_artifact(target, layout, observation, state, best, checkpoint, options)
            entries[key] = new
            artifacts.write_manifest(
                folder, entries, target.work_dir, target.project.name, layout.name
            )
        except (SlimError, OSError) as exc:
            ok = False
            message = _artifact_error(exc, folder, checkpoint)
            report.errors.append(message)
            report.artifacts.append(ArtifactOutcome(key, best, path, "failed", message, entry))
            continue
        report.artifacts.append(ArtifactOutcome(key, best, folder / new.file, "written", entry=new))
    if not options.dry_run and folder.is_dir():
        _remove_replaced_artifacts(folder, entries, state)
    return ok


def layout_name_or_entry(
    layout: Layout, best: Best, checkpoint: Checkpoint | None, entry: ArtifactEntry | None
) -> str:
    if entry is not None and entry.index == best.index:
        return entry.file
    if checkpoint is not None:
        return layout.artifact_name(best.key, checkpoint)
    return entry.file if entry else "(none)"


def _artifact_error(exc: BaseException, folder: Path, checkpoint: Checkpoint) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return (
                f"{folder}: no space left while writing the artifact of {checkpoint.name} "
                f"({format_size(checkpoint.stat.size)} checkpoint); free space there; the "
                "previous best artifact is untouched and nothing was deleted"
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (
                f"{folder}: cannot write the artifact ({exc.strerror}); give ckptd's user write "
                "access to artifact.dir; nothing was deleted"
            )
        where = exc.filename or folder
        return f"{where}: {exc.strerror or exc}; nothing was deleted"
    return str(exc)


def _remove_replaced_artifacts(
    folder: Path, entries: Mapping[str, ArtifactEntry], state: WorkDirState
) -> None:
    """Remove artifacts ckptd made that the manifest no longer names.

    Runs only after the manifest names the new ones, so a complete best artifact exists at
    every instant. Files the manifest names are ckptd's own even if a crash kept them out of
    the saved state; anything else in the folder is never touched.
    """
    current = {e.file for e in entries.values() if _plain_name(e.file)}
    survivors = []
    for name in dict.fromkeys([*state.own_artifacts, *current]):
        if name in current:
            survivors.append(name)
        elif _plain_name(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    state.own_artifacts = survivors


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


def _delete(work_dir: Path, decision: Decision) -> DeleteOutcome:
    """Unlink one checkpoint through a handle on the work_dir, if it is still what was planned."""
    name = decision.checkpoint.name
    if "/" in name or name in ("", ".", ".."):
        return DeleteOutcome(decision, False, "not a plain file name in the work_dir; left alone")
    dir_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return DeleteOutcome(decision, True, "already gone")
        if FileStat.of(st) != decision.checkpoint.stat or not os.path.stat.S_ISREG(st.st_mode):
            return DeleteOutcome(decision, False, "changed since it was planned; left for later")
        os.unlink(name, dir_fd=dir_fd)
        return DeleteOutcome(decision, True)
    except OSError as exc:
        return DeleteOutcome(decision, False, f"cannot delete: {exc.strerror}")
    finally:
        os.close(dir_fd)


def _policy_input(observation: Observation, now: float) -> PolicyInput:
    return PolicyInput(
        checkpoints=observation.scan.checkpoints,
        evaluated=observation.evaluated,
        latest_evaluated=observation.latest_evaluated,
        best={k: b.index for k, b in observation.bests.items()},
        artifact_ready=frozenset(observation.ready),
        resume_target=observation.scan.resume_target,
        now=now,
    )


def _act(
    target: Target,
    layout: Layout,
    observation: Observation,
    state: WorkDirState,
    options: PassOptions,
    report: WorkDirReport,
) -> None:
    artifacts_ok = _ensure_artifacts(target, layout, observation, state, options, report)
    # Re-plan: a best whose artifact was just written no longer needs its full checkpoint.
    observation.ready |= {a.key for a in report.artifacts if a.status == "written"}
    report.plan = plan(_policy_input(observation, options.now()), target.project.retention)
    if observation.blocking or not artifacts_ok:
        if report.plan.deletions:
            report.notes.append(
                f"{len(report.plan.deletions)} deletion(s) held back until the errors above "
                "are fixed"
            )
        return
    if options.dry_run or target.project.dry_run:
        return
    for decision in report.plan.deletions:
        outcome = _delete(target.work_dir, decision)
        report.deletions.append(outcome)
        if outcome.done and outcome.detail != "already gone":
            size = decision.checkpoint.stat.size
            report.reclaimed_bytes += size
            state.reclaimed_bytes += size
            state.deleted.append(
                {
                    "name": decision.checkpoint.name,
                    "bytes": size,
                    "time": artifacts.now_iso(),
                    "reason": "; ".join(decision.reasons),
                }
            )
        elif not outcome.done:
            report.errors.append(f"{target.work_dir / decision.checkpoint.name}: {outcome.detail}")


def reconcile(
    target: Target, options: PassOptions, lock: WorkDirLock | None = None
) -> WorkDirReport:
    """One pass over one work_dir. Never raises for problems of this work_dir: they are reported."""
    started = time.monotonic()
    dry_run = options.dry_run or target.project.dry_run
    report = WorkDirReport(target=target, dry_run=dry_run)
    own_lock = lock is None
    lock = lock or WorkDirLock(target.work_dir)
    try:
        _reconcile_locked(target, options, lock, dry_run, report)
    except LockBusy as exc:
        report.skipped = str(exc)
    except (LayoutError, StateError) as exc:
        report.errors.append(str(exc))
    except OSError as exc:
        report.errors.append(f"{exc.filename or target.work_dir}: {exc.strerror or exc}")
    finally:
        if own_lock:
            lock.release()
        report.seconds = time.monotonic() - started
    return report


def _reconcile_locked(
    target: Target, options: PassOptions, lock: WorkDirLock, dry_run: bool, report: WorkDirReport
) -> None:
    layout = choose_layout(target.work_dir, target.project.layout)
    if layout is None:
        report.skipped = "does not look like a work_dir of a supported trainer (yet)"
        return
    report.layout = layout.name
    if target.artifact_dir.resolve() == target.work_dir.resolve():
        raise LayoutError(
            f"{target.work_dir}: artifact.dir resolves to the work_dir itself, where the trainer "
            "keeps its own best_*.pth; use a subfolder such as '{work_dir}/best'"
        )
    if not dry_run:
        lock.acquire()
    state, note = load_state(target.work_dir)
    if note:
        report.notes.append(note)
    now = options.now()
    observation = observe(
        target.work_dir,
        layout,
        target.project,
        state,
        target.artifact_dir,
        settle=options.settle,
        now=now,
        closed=options.closed,
    )
    report.observation = observation
    report.errors.extend(str(p) for p in observation.blocking)
    report.notes.extend(str(p) for p in observation.problems if not p.blocking)
    if observation.scan.resume_note:
        report.notes.append(observation.scan.resume_note)
    _act(target, layout, observation, state, options, report)
    if report.plan is not None:
        report.notes.extend(report.plan.notes)
    state.layout = layout.name
    state.sources = observation.sources
    state.verified = observation.verified
    report.reclaimed_total = state.reclaimed_bytes
    if not dry_run:
        state.last_pass = {
            "time": artifacts.now_iso(),
            "errors": len(report.errors),
            "reclaimed_bytes": report.reclaimed_bytes,
        }
        save_state(target.work_dir, state)


def problems_text(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]
