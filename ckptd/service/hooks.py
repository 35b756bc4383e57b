"""``hooks.on_new_best`` inside ``ckptd run``: a small background thread runs each hook, so a
slow or failing hook never holds a pass; results become log lines and
``ckptd_hook_failures_total``. ``artifact.publish`` runs on its own thread meanwhile, so
``CKPTD_PUBLISHED_URL`` is not set here (docs/hooks.md)."""

from __future__ import annotations

import logging
import queue
import threading

from ckptd.engine.hooks import HookRun, log_result, new_best_hooks, run_hook
from ckptd.engine.outcome import WorkDirReport
from ckptd.service.metrics import DaemonMetrics

log = logging.getLogger("ckptd.hooks")
MAX_QUEUED = 64  # hooks waiting; beyond it new ones are dropped with a warning


class HookRunner:
    def __init__(self, metrics: DaemonMetrics | None) -> None:
        self.metrics = metrics
        self._queue: queue.Queue[HookRun | None] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def after_pass(self, report: WorkDirReport) -> None:
        for run in new_best_hooks(report):
            self._start()
            try:
                self._queue.put_nowait(run)
            except queue.Full:
                log.warning(
                    f"hook {run.hook} not run: {MAX_QUEUED} hooks are already waiting",
                    extra={"fields": {"work_dir": str(run.work_dir)}},
                )
                self._failed(run)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptd-hooks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while (run := self._queue.get()) is not None:
            try:
                result = run_hook(run)
            except Exception:  # a bug here must not end the thread, nor the daemon
                log.exception(f"hook {run.hook}: unexpected error")
                self._failed(run)
                continue
            log_result(result, log)
            if not result.ok:
                self._failed(run)

    def _failed(self, run: HookRun) -> None:
        if self.metrics:
            self.metrics.record_hook_failure(str(run.work_dir), run.project, run.hook)

    def stop(self, grace: float) -> None:
        """Let the running hook finish within ``grace`` (it is killed at its own timeout);
        waiting ones are dropped, like passes queued at shutdown."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        thread.join(grace)
