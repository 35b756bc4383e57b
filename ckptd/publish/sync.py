"""Publishing best artifacts to object storage (``artifact.publish``): when, and what it did.

``publish`` makes the remote manifest equal the local one (level-triggered, like a reconcile
pass) and records the result in ``.ckptd/publish.json``; ``publishstore`` does the uploads in
the order that keeps remote readers safe, in a process of its own that is killed at
``artifact.publish.timeout`` (``publishproc``). ``ckptd once`` publishes after its passes
(``publish_reports``); ``ckptd run`` from a background queue (``publishqueue``), so uploads never
hold up retention. fsspec and its backends are imported only when something is published.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.core.reads import read_file
from ckptd.engine.artifacts import MANIFEST, ArtifactEntry, now_iso
from ckptd.engine.outcome import ErrorKind, PublishOutcome, PublishStatus
from ckptd.engine.state import (
    LockBusy,
    PublishState,
    WorkDirLock,
    load_publish_state,
    save_publish_state,
)
from ckptd.fs.names import plain_name
from ckptd.publish.process import AttemptProcess, PublishTimeout
from ckptd.publish.store import (
    LocalChanged,
    PublishCancelled,
    PublishError,
    sha256_of,
)

if TYPE_CHECKING:
    from ckptd.engine.outcome import WorkDirReport
    from ckptd.engine.targets import Target


def publish_url(target: Target) -> str:
    config = target.project.artifact.publish
    assert config is not None
    return config.url.format(project=target.project.name, run=target.work_dir.name)


def _read_local(folder: Path) -> tuple[bytes, dict[str, Any], dict[str, ArtifactEntry]] | None:
    try:
        raw = read_file(folder / MANIFEST)
    except FileNotFoundError:
        return None
    return (raw, *parse_local(folder, raw))


def parse_local(folder: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, ArtifactEntry]]:
    """The local manifest's data and entries; raises PublishError if it cannot be published."""
    try:
        data = json.loads(raw)
        entries = {k: ArtifactEntry.from_json(v) for k, v in data["artifacts"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PublishError(f"{folder / MANIFEST}: unreadable ({exc}); not published") from None
    for entry in entries.values():
        if not plain_name(entry.file) or entry.file == MANIFEST:
            raise PublishError(f"{folder / MANIFEST}: names {entry.file!r}; not published")
    return data, entries


def _from_state(url: str, status: PublishStatus, state: PublishState) -> PublishOutcome:
    outcome = PublishOutcome(url, status, failures=state.failures, timeouts=state.timeouts)
    if state.url == url:
        outcome.manifest_sha256, outcome.files = state.manifest_sha256, dict(state.files)
        outcome.time = state.time
    return outcome


def publish_status(target: Target) -> PublishOutcome:
    """What is published where and whether the local best is newer, from the record alone
    (``ckptd status``: no network)."""
    url = publish_url(target)
    state = load_publish_state(target.work_dir)
    try:
        local = _read_local(target.artifact_dir)
    except PublishError as exc:
        return PublishOutcome(url, PublishStatus.FAILED, error=str(exc))
    if local is None:
        return _from_state(url, PublishStatus.NOTHING, state)
    in_place = state.url == url and state.manifest_sha256 == sha256_of(local[0])
    outcome = _from_state(
        url, PublishStatus.IN_SYNC if in_place and not state.stale else PublishStatus.PENDING, state
    )
    if state.last_error and outcome.status == PublishStatus.PENDING:
        outcome.status = PublishStatus.FAILED
        outcome.detail = f"last attempt {state.last_attempt}: {state.last_error}"
    elif outcome.status == PublishStatus.PENDING:
        outcome.detail = "the local best is newer" if not in_place else "replaced objects remain"
    return outcome


def publish(
    target: Target,
    *,
    stop: Callable[[], bool] | None = None,
    confirmed: set[tuple[str, str]] | None = None,
    deadline: float | None = None,
) -> PublishOutcome:
    """Make the remote manifest equal the local one. Never raises for remote or local
    problems: they come back in ``error``, and the record says what is pending.

    ``confirmed`` holds the (url, manifest sha256) pairs this process has seen in place; a
    record that matches one of them is trusted without asking the store again. The attempt
    is stopped at ``deadline`` (``time.monotonic()``; default: ``artifact.publish.timeout``
    from now).
    """
    url = publish_url(target)
    state = load_publish_state(target.work_dir)
    if state.url != url:  # the config moved publishing elsewhere: the old place is left alone
        state = PublishState(url=url, uploads=state.uploads, uploaded_bytes=state.uploaded_bytes)
    outcome = PublishOutcome(url, PublishStatus.FAILED)
    try:
        local = _read_local(target.artifact_dir)
        if local is None:
            return _from_state(url, PublishStatus.NOTHING, state)
        sha = sha256_of(local[0])
        if state.manifest_sha256 == sha and not state.stale and (url, sha) in (confirmed or ()):
            return _from_state(url, PublishStatus.IN_SYNC, state)
        state.last_attempt = now_iso()
        if deadline is None:
            deadline = time.monotonic() + timeout_of(target)
        attempt = AttemptProcess(target, url, state, stop, deadline)
        try:
            attempt.run(*local)
        finally:
            outcome.uploads, outcome.uploaded_bytes = attempt.uploads, attempt.uploaded_bytes
            outcome.removed = attempt.removed
            if attempt.in_place:  # even if removing replaced objects failed afterwards
                outcome.status = (
                    PublishStatus.PUBLISHED if attempt.changed_remote else PublishStatus.IN_SYNC
                )
        if confirmed is not None:
            confirmed.add((url, sha))
    except PublishCancelled:
        outcome.status, outcome.detail = (
            PublishStatus.CANCELLED,
            "ckptd stopped; publishing resumes at start",
        )
    except LocalChanged as exc:  # not a failure: the newer best is published next
        outcome.status, outcome.detail, outcome.retry_soon = (
            PublishStatus.PENDING,
            exc.args[0],
            True,
        )
    except Exception as exc:
        if outcome.status not in (
            PublishStatus.PUBLISHED,
            PublishStatus.IN_SYNC,
        ):  # else: only the cleanup failed
            outcome.status = PublishStatus.FAILED
        outcome.error = exc.args[0] if isinstance(exc, PublishError) else _describe(url, exc)
        outcome.timed_out = isinstance(exc, PublishTimeout)
        state.failures += 1
        state.timeouts += outcome.timed_out
        state.last_error = outcome.error
    finally:
        state.uploads += outcome.uploads
        state.uploaded_bytes += outcome.uploaded_bytes
        if outcome.status not in (PublishStatus.NOTHING, PublishStatus.IN_SYNC):
            with contextlib.suppress(OSError):
                save_publish_state(target.work_dir, state)
    outcome.failures, outcome.timeouts = state.failures, state.timeouts
    outcome.manifest_sha256, outcome.files, outcome.time = (
        state.manifest_sha256,
        dict(state.files),
        state.time,
    )
    return outcome


def timeout_of(target: Target) -> float:
    config = target.project.artifact.publish
    assert config is not None
    return config.timeout


def _describe(url: str, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{url}: {text}; will retry"


def publish_reports(reports: Iterable[WorkDirReport]) -> None:
    """After the passes of ``ckptd once``: publish every work_dir that has ``artifact.publish``;
    in a dry run (``ckptd status``, ``--dry-run``) only show what is published."""
    for report in reports:
        target = report.target
        if target.project.artifact.publish is None or report.skipped:
            continue
        if report.dry_run:
            report.publish = publish_status(target)
            continue
        lock = WorkDirLock(target.work_dir)
        try:
            lock.acquire()
        except (LockBusy, OSError) as exc:
            report.publish = publish_status(target)
            report.publish.detail = f"not published by this run: {exc}"
            continue
        # One deadline for the work_dir, so that `ckptd once` never waits longer for it.
        deadline = time.monotonic() + timeout_of(target)
        try:
            for _ in range(3):  # a best replaced under the upload is published right away
                report.publish = publish(target, deadline=deadline)
                if not report.publish.retry_soon:
                    break
        finally:
            lock.release()
        if report.publish.failed:
            report.error(ErrorKind.PUBLISH, report.publish.error)
