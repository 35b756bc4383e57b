"""One reconcile pass over one work_dir: observe → plan → act (slim first, delete last) → save.

Every step is idempotent, so a crash anywhere reduces to "reconcile again". Deletions happen
only when the pass is sure: no blocking problem, every best artifact durable, and each file
unchanged since it was planned.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from ckptd.core.explain import describe_all, plan_notes
from ckptd.core.policy import Decision, PolicyInput, plan
from ckptd.core.watermark import apply_evictions
from ckptd.engine import artifacts
from ckptd.engine.bestartifact import ensure_artifacts
from ckptd.engine.observe import Observation, observe
from ckptd.engine.outcome import (
    ArtifactOutcome,
    ArtifactStatus,
    DeleteOutcome,
    ErrorKind,
    PassOptions,
    SkipReason,
    WorkDirReport,
)
from ckptd.engine.state import (
    LockBusy,
    StateError,
    WorkDirLock,
    WorkDirState,
    load_state,
    save_state,
)
from ckptd.engine.targets import Target
from ckptd.fs.delete import delete_checkpoint, remove_stale_temp_dirs
from ckptd.fs.flush import make_durable
from ckptd.layouts import LayoutError, choose_layout, no_layout_reason
from ckptd.layouts.base import Layout
from ckptd.layouts.memo import PeekMemo, remembering

__all__ = ["ArtifactOutcome", "PassOptions", "Target", "WorkDirReport", "reconcile"]


def _delete(work_dir: Path, decision: Decision) -> DeleteOutcome:
    """Remove one checkpoint (file or folder, possibly nested) if it is still what was planned."""
    try:
        done, detail = delete_checkpoint(
            work_dir, decision.checkpoint.name, decision.checkpoint.stat
        )
    except OSError as exc:
        return DeleteOutcome(decision, False, f"cannot delete: {exc.strerror}")
    return DeleteOutcome(decision, done, detail)


_PER_FILE = (os.strerror(errno.EPERM), os.strerror(errno.EACCES))


def _filesystem_failed(detail: str) -> bool:
    """Did the filesystem fail a deletion (EIO, ENOSPC, ...), rather than refuse this one file
    (immutable, no permission: the others still go, or one such file would stop all cleanup)
    or find it changed since it was planned?"""
    return detail.startswith("cannot ") and not detail.endswith(_PER_FILE)


def _policy_input(observation: Observation, now: float) -> PolicyInput:
    return PolicyInput(
        checkpoints=observation.scan.checkpoints,
        evaluated=observation.evaluated,
        latest_evaluated=observation.latest_evaluated,
        best={k: b.index for k, b in observation.bests.items()},
        artifact_ready=frozenset(observation.ready),
        resume_target=observation.scan.resume_target,
        older_pointers=observation.scan.older_pointers,
        now=now,
        disputes=tuple(observation.disputes),
        trainer_holds=tuple(observation.trainer_holds.items()),
        ranked={key: tuple(ranking) for key, ranking in observation.ranked.items()},
    )


def _identity(work_dir: Path) -> tuple[int, int]:
    """(device, inode) of the folder the work_dir's path leads to, never through a symlink."""
    st = os.lstat(work_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(
            errno.ENOTDIR, "is not a folder (a symlink or a file); ckptd stays out", work_dir
        )
    return st.st_dev, st.st_ino


def _still_there(work_dir: Path, identity: tuple[int, int]) -> None:
    """Stop the pass when the work_dir (or a folder above it) was moved or swapped meanwhile:
    paths would now lead into another folder, which ckptd must neither write nor clean up."""
    if _identity(work_dir) != identity:
        raise OSError(
            errno.ESTALE,
            "was moved or replaced during the pass (the path leads to another folder now); "
            "nothing more was done there, the next pass looks again",
            work_dir,
        )


def _act(
    target: Target,
    layout: Layout,
    observation: Observation,
    state: WorkDirState,
    options: PassOptions,
    report: WorkDirReport,
    identity: tuple[int, int],
) -> None:
    _still_there(target.work_dir, identity)
    artifacts_ok = ensure_artifacts(target, layout, observation, state, options, report)
    # Re-plan: a best whose artifact was just written no longer needs its full checkpoint.
    observation.ready |= {a.key for a in report.artifacts if a.status is ArtifactStatus.WRITTEN}
    held_by = sorted(set(report.error_kinds)) if observation.blocking or not artifacts_ok else []
    report.plan = plan(_policy_input(observation, options.now()), target.project.retention, held_by)
    if held_by:
        if report.plan.held:
            report.notes.append(
                f"{len(report.plan.held)} deletion(s) held back until the errors above are fixed"
            )
        return
    report.deletions_clear = True
    report.plan = apply_evictions(report.plan, options.evict)
    if options.dry_run or target.project.dry_run:
        return
    _still_there(target.work_dir, identity)
    remove_stale_temp_dirs(target.work_dir)  # trash of a deletion a crash interrupted
    deletions = report.plan.deletions
    if deletions and not _made_durable(target, layout, observation, report):
        return
    for done_so_far, decision in enumerate(deletions):
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
                    "reason": describe_all(decision.reasons),
                    "rules": [str(r) for r in decision.rules],
                }
            )
        elif not outcome.done:
            report.error(
                ErrorKind.DELETE, f"{target.work_dir / decision.checkpoint.name}: {outcome.detail}"
            )
            if _filesystem_failed(outcome.detail):
                # Unsure of the filesystem now: delete nothing more in this pass (found by
                # injecting unlinkat EIO: the next deletions went on). The next pass retries.
                left = len(deletions) - done_so_far - 1
                if left:
                    report.notes.append(
                        f"{left} more deletion(s) left for the next pass after this failure"
                    )
                break


def _made_durable(
    target: Target, layout: Layout, observation: Observation, report: WorkDirReport
) -> bool:
    """fsync what the deletions are decided on (the checkpoints kept, the resume pointer, the
    metric logs, their folders): a power cut must not keep a deletion and lose its reason."""
    assert report.plan is not None
    kept = [d.checkpoint.name for d in report.plan.decisions if d.keep and d.checkpoint.complete]
    try:
        make_durable(target.work_dir, [*kept, *layout.pointer_files, *observation.sources])
    except OSError as exc:
        report.error(
            ErrorKind.DELETE,
            f"{exc.filename or target.work_dir}: {exc.strerror} (making the kept checkpoints "
            "and logs durable before deleting); nothing was deleted, the next pass tries again",
        )
        return False
    return True


def reconcile(
    target: Target, options: PassOptions, lock: WorkDirLock | None = None
) -> WorkDirReport:
    """One pass over one work_dir. Never raises for problems of this work_dir: they are reported."""
    started, cpu = time.monotonic(), time.thread_time()
    dry_run = options.dry_run or target.project.dry_run
    report = WorkDirReport(target=target, dry_run=dry_run)
    own_lock = lock is None
    lock = lock or WorkDirLock(target.work_dir)
    try:
        _reconcile_locked(target, options, lock, dry_run, report)
    except LockBusy as exc:
        report.skipped_because(SkipReason.LOCKED, str(exc))
    except (LayoutError, StateError) as exc:
        report.error(ErrorKind.CONFIG, str(exc))
    except OSError as exc:
        message = f"{exc.filename or target.work_dir}: {exc.strerror or exc}"
        if exc.errno == errno.ENOSPC:
            message += (
                "; ckptd needs a few KB in the work_dir for its state (.ckptd/) before it can "
                "delete anything there: free a little space and it will catch up"
            )
        report.error(ErrorKind.IO, message)
    finally:
        if own_lock:
            lock.release()
        report.seconds = time.monotonic() - started
        report.cpu_seconds = time.thread_time() - cpu
    return report


def _reconcile_locked(
    target: Target, options: PassOptions, lock: WorkDirLock, dry_run: bool, report: WorkDirReport
) -> None:
    layout = choose_layout(target.work_dir, target.project.layout, target.project)
    if layout is None:
        report.skipped_because(SkipReason.NO_LAYOUT, no_layout_reason())
        return
    report.layout = layout.name
    if target.artifact_dir.resolve() == target.work_dir.resolve():
        raise LayoutError(
            f"{target.work_dir}: artifact.dir resolves to the work_dir itself, where the trainer "
            "keeps its own best_*.pth; use a subfolder such as '{work_dir}/best'"
        )
    if not dry_run:
        lock.acquire()
    identity = _identity(target.work_dir)
    state, note = load_state(target.work_dir)
    if note:
        report.notes.append(note)
    now = options.now()
    with remembering(PeekMemo(target.work_dir, state.peeked)) as memo:
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
    state.peeked = memo.to_json()
    report.observation = observation
    for problem in observation.blocking:
        report.error(ErrorKind.INPUT, str(problem))
    report.notes.extend(str(p) for p in observation.problems if not p.blocking)
    if observation.scan.resume_note:
        report.notes.append(observation.scan.resume_note)
    report.notes.extend(observation.notes)
    _act(target, layout, observation, state, options, report, identity)
    if report.plan is not None:
        report.notes.extend(plan_notes(report.plan))
    state.layout = layout.name
    state.sources = observation.sources
    state.verified = observation.verified
    state.checkpointed |= {c.index for c in observation.scan.checkpoints if c.complete}
    report.reclaimed_total = state.reclaimed_bytes
    if not dry_run:
        state.last_pass = {
            "time": artifacts.now_iso(),
            "errors": len(report.errors),
            "reclaimed_bytes": report.reclaimed_bytes,
        }
        _still_there(target.work_dir, identity)
        save_state(target.work_dir, state)
