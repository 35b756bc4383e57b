"""``artifact.publish`` inside ``ckptd run``: passes hand their work_dir to the background
publisher, and its outcomes become log lines and metrics. A slow store never holds a pass."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.engine.outcome import PublishOutcome, PublishStatus, WorkDirReport
from ckptd.engine.state import WorkDirLock
from ckptd.engine.targets import Target
from ckptd.service.metrics import DaemonMetrics

if TYPE_CHECKING:
    from ckptd.publish.queue import PublishQueue

log = logging.getLogger("ckptd.daemon")


class PublishRelay:
    def __init__(self, metrics: DaemonMetrics | None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._queue: PublishQueue | None = None  # started with the first artifact.publish

    def after_pass(self, report: WorkDirReport, lock: WorkDirLock) -> None:
        """Queue the work_dir's artifact folder for publishing, when the pass calls for it."""
        if report.target.project.artifact.publish is None or report.dry_run or not lock.held:
            return
        with self._lock:
            if self._queue is None:
                from ckptd.publish.queue import PublishQueue  # only where publishing is used

                self._queue = PublishQueue(self._published)
                self._queue.start()
            queue = self._queue
        queue.submit(report.target, lock)

    def forget(self, work_dir: Path) -> None:
        if self._queue is not None:
            self._queue.forget(work_dir)

    def stop(self, grace: float) -> None:
        if self._queue is not None:
            self._queue.stop(grace)

    def _published(self, target: Target, outcome: PublishOutcome) -> None:
        where = {"fields": {"work_dir": str(target.work_dir), "url": outcome.url}}
        where["fields"]["action"] = "publish"
        if outcome.status is PublishStatus.PUBLISHED:
            files = ", ".join(sorted(outcome.files)) or "no files"
            log.info(f"publish: {outcome.url} now names {files}", extra=where)
        elif outcome.failed:
            log.warning(f"publish failed: {outcome.error}", extra=where)
        if self.metrics:
            self.metrics.record_publish_outcome(target, outcome)
