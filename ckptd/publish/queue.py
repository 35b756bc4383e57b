"""``ckptd run``'s publisher: one background thread that uploads best artifacts.

Reconcile passes only ask for a publish (``submit``); the upload happens here, so a slow or
failing store never holds up retention, nor the passes of other work_dirs. A work_dir is
published at most once at a time, failures back off exponentially, and a publish that finds
the record, the local manifest and what this process last saw in agreement costs no request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.timings import TIMINGS, Timings
from ckptd.engine.outcome import PublishOutcome, PublishStatus
from ckptd.engine.state import WorkDirLock
from ckptd.engine.targets import Target
from ckptd.publish.sync import publish

log = logging.getLogger("ckptd.publish")


@dataclass(slots=True)
class _Job:
    target: Target
    lock: WorkDirLock
    due: float
    failures: int = 0
    backoff_until: float = 0.0


class PublishQueue:
    def __init__(
        self,
        on_outcome: Callable[[Target, PublishOutcome], None] | None = None,
        timings: Timings = TIMINGS,
    ) -> None:
        self.on_outcome = on_outcome
        self.timings = timings
        self._cond = threading.Condition()
        self._jobs: dict[Path, _Job] = {}
        self._stop = threading.Event()
        self._confirmed: set[tuple[str, str]] = set()
        self._thread = threading.Thread(target=self._run, name="ckptd-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, target: Target, lock: WorkDirLock) -> None:
        """Publish ``target`` soon; after a failure, not before its backoff has passed."""
        now = time.monotonic()
        with self._cond:
            job = self._jobs.get(target.work_dir)
            if job is None:
                self._jobs[target.work_dir] = _Job(target, lock, now)
            else:
                job.target, job.lock = target, lock
                job.due = min(job.due, max(now, job.backoff_until))
            self._cond.notify_all()

    def forget(self, work_dir: Path) -> None:
        with self._cond:
            self._jobs.pop(work_dir, None)

    def stop(self, timeout: float) -> None:
        """Stop between two chunks of an upload, waiting up to ``timeout`` (0: only ask); an
        unfinished upload resumes at the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if timeout > 0 and self._thread.is_alive():
            self._thread.join(timeout)

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                due = [j for j in self._jobs.values() if j.due <= now]
                if due:
                    job = min(due, key=lambda j: j.due)
                    job.due = float("inf")  # until submitted again or retried
                    return job
                upcoming = min((j.due for j in self._jobs.values()), default=float("inf"))
                self._cond.wait(timeout=min(1.0, max(0.0, upcoming - now)))
        return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            outcome = self._publish(job)
            if outcome is not None and self.on_outcome is not None:
                try:
                    self.on_outcome(job.target, outcome)
                except Exception:
                    log.exception("reporting a publish failed")

    def _publish(self, job: _Job) -> PublishOutcome | None:
        if not job.lock.held:  # another ckptd acts on this work_dir, or it is gone
            return None
        try:
            outcome = publish(job.target, stop=self._stop.is_set, confirmed=self._confirmed)
        except Exception as exc:  # a bug, not the store: keep the thread alive, retry later
            where = {"fields": {"work_dir": str(job.target.work_dir)}}
            log.exception("publish crashed; will retry", extra=where)
            outcome = PublishOutcome(
                str(job.target.work_dir), PublishStatus.FAILED, error=repr(exc)
            )
        now = time.monotonic()
        with self._cond:
            if outcome.retry_soon:
                job.due = min(job.due, now + self.timings.publish_changed_retry)
            elif outcome.failed:
                job.failures += 1
                job.backoff_until = now + self.timings.backoff(job.failures)
                job.due = min(job.due, job.backoff_until)
            elif outcome.status is not PublishStatus.CANCELLED:
                job.failures, job.backoff_until = 0, 0.0
        return outcome
