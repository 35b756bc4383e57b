"""``ckptd run``: the long-running service.

The main thread owns all scheduling: watch events and timers only mark work_dirs due, and a
small pool of workers reconciles them, never two passes on one work_dir at once. Everything is
level-triggered: a pass reads the disk, so a missed event costs latency, never correctness,
and the periodic resync bounds even that.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.config import ConfigError, LoadedConfig, load_config
from ckptd.fsutil import FileStat
from ckptd.layouts import LayoutError, choose_layout
from ckptd.metrics import DaemonMetrics
from ckptd.outcome import SkipReason
from ckptd.reconcile import PassOptions, Target, WorkDirReport, reconcile
from ckptd.report import log_actions, metrics_of
from ckptd.schedule import WorkDirSlot, folder_stamps, recheck_time
from ckptd.sdnotify import Notifier, watchdog_interval
from ckptd.state import WorkDirLock
from ckptd.targets import discover, discovery_folders
from ckptd.timings import TIMINGS, Timings
from ckptd.units import format_size
from ckptd.watch import Change, Watcher, watch_plan

if TYPE_CHECKING:
    from ckptd.publish import PublishOutcome
    from ckptd.publishqueue import PublishQueue

log = logging.getLogger("ckptd.daemon")


class Cancelled(Exception):
    """Raised inside a slim when the daemon must stop before it would finish."""


@dataclass(slots=True)
class Health:
    started: float = field(default_factory=time.time)
    last_tick: float = field(default_factory=time.monotonic)
    first_pass_done: bool = False
    last_success: float | None = None


class Daemon:
    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        workers: int = 2,
        notifier: Notifier | None = None,
        on_report: Callable[[WorkDirReport], None] | None = None,
        metrics: DaemonMetrics | None = None,
        timings: Timings = TIMINGS,
    ) -> None:
        self.loaded = loaded
        self.timings = timings
        self.notifier = notifier or Notifier()
        self.on_report = on_report
        self.metrics = metrics
        self.health = Health()
        self.slots: dict[Path, WorkDirSlot] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._reload = False
        self._rediscover_at = 0.0
        self._resync_at = 0.0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptd-worker")
        self._futures: dict[Path, Future[WorkDirReport]] = {}
        # work_dir -> (mtimes of its watched folders, those folders): layout detection and
        # listing run again only when one of the folders changed (idle cost at 200 work_dirs).
        self._watch_folders: dict[Path, tuple[tuple[int, ...], list[Path]]] = {}
        self._discovery_notes: set[str] = set()
        self._publisher: PublishQueue | None = None  # started with the first artifact.publish
        watch = loaded.config.watch
        self.watcher = Watcher(watch.mode, watch.poll_interval, self._on_change)

    # --- signals and events (any thread) -------------------------------------------------

    def request_stop(self) -> None:
        with self._cond:
            if not self._stop.is_set():
                self._stop_deadline = time.monotonic() + self.timings.stop_grace
                self._stop.set()
            self._cond.notify_all()

    def request_reload(self) -> None:
        with self._cond:
            self._reload = True
            self._cond.notify_all()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _on_change(self, change: Change) -> None:
        with self._cond:
            slot = self.slots.get(change.root)
            if slot is None:
                self._rediscover_at = min(
                    self._rediscover_at, time.monotonic() + self.timings.debounce
                )
            else:
                if change.closed_after_write:
                    self._remember_close(slot, change.path)
                self._mark_due(slot, time.monotonic() + self.timings.debounce)
            self._cond.notify_all()

    @staticmethod
    def _remember_close(slot: WorkDirSlot, path: Path) -> None:
        try:
            name = path.relative_to(slot.target.work_dir).as_posix()
            slot.closed[name] = FileStat.lstat(path)
        except (ValueError, OSError):
            pass  # outside the work_dir, or already gone

    def _mark_due(self, slot: WorkDirSlot, when: float) -> None:
        if slot.running:
            slot.again = True
        slot.due = when if slot.due is None else min(slot.due, when)

    # --- discovery -----------------------------------------------------------------------

    def _rediscover(self) -> None:
        found = discover(self.loaded)
        for note in found.notes:
            if note not in self._discovery_notes:  # said once, not every rediscovery
                log.warning(note, extra={"fields": {"action": "skip"}})
        self._discovery_notes = set(found.notes)
        wanted = {t.work_dir: t for t in found.targets}
        now = time.monotonic()
        with self._cond:
            for path in list(self.slots):
                slot = self.slots[path]
                if path not in wanted and not slot.running:
                    slot.lock.release()
                    del self.slots[path]
                    if self._publisher is not None:
                        self._publisher.forget(path)
                    if self.metrics:
                        self.metrics.forget(str(path))
                    log.info("work_dir gone or no longer matched", extra=_f(path))
            for path, target in wanted.items():
                slot = self.slots.get(path)
                if slot is None:
                    self.slots[path] = WorkDirSlot(target, WorkDirLock(path), due=now)
                    log.info("watching new work_dir", extra=_f(path, project=target.project.name))
                elif slot.target != target:
                    slot.target = target
                    self._mark_due(slot, now)
        self._sync_watches()
        if self.metrics:
            self.metrics.set_watched(len(self.slots))
        self._rediscover_at = time.monotonic() + self.timings.rediscover_every

    def _sync_watches(self) -> None:
        per_dir = []
        cache: dict[Path, tuple[tuple[int, ...], list[Path]]] = {}
        for path, slot in list(self.slots.items()):
            cached = self._watch_folders.get(path)
            if cached is not None and folder_stamps(cached[1]) == cached[0]:
                cache[path] = cached  # none of its folders changed: same layout, same folders
                per_dir.append((path, cached[1]))
                continue
            try:
                layout = choose_layout(path, slot.target.project.layout, slot.target.project)
            except (LayoutError, OSError):
                layout = None
            folders = layout.watch_folders(path) if layout else [path]
            stamps = folder_stamps(folders)
            recent = time.time() - self.timings.settled_folder  # may still change: not cached
            if layout is not None and stamps and max(stamps) < recent * 1e9:
                cache[path] = (stamps, folders)
            per_dir.append((path, folders))
        self._watch_folders = cache
        self.watcher.sync(watch_plan(per_dir, discovery_folders(self.loaded)))

    # --- the main loop -------------------------------------------------------------------

    def run(self) -> int:
        self.watcher.start()
        try:
            self._rediscover()
            self._resync_at = time.monotonic() + self.loaded.config.watch.resync_interval
            ping_every = watchdog_interval()
            next_ping = time.monotonic()
            while not self._stop.is_set():
                self.health.last_tick = time.monotonic()
                if self._reload:
                    self._do_reload()
                now = time.monotonic()
                if now >= self._rediscover_at:
                    self._rediscover()
                if now >= self._resync_at:
                    self._resync()
                self._dispatch(now)
                self._check_first_pass()
                if ping_every and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + ping_every
                self._wait(next_ping if ping_every else None)
        finally:
            self._shutdown()
        return 0

    def _wait(self, next_ping: float | None) -> None:
        with self._cond:
            deadlines = [self._rediscover_at, self._resync_at]
            deadlines += [s.due for s in self.slots.values() if s.due is not None and not s.running]
            if next_ping is not None:
                deadlines.append(next_ping)
            timeout = max(0.0, min(deadlines) - time.monotonic())
            if not self._stop.is_set() and not self._reload:
                self._cond.wait(timeout=min(timeout, 1.0))

    def _resync(self) -> None:
        now = time.monotonic()
        with self._cond:
            for slot in self.slots.values():
                self._mark_due(slot, now)
        self._resync_at = now + self.loaded.config.watch.resync_interval

    def _dispatch(self, now: float) -> None:
        with self._cond:
            due = [s for s in self.slots.values() if s.due is not None and s.due <= now]
            for slot in sorted(due, key=lambda s: s.due or 0):
                if slot.running:
                    continue
                slot.running, slot.again, slot.due = True, False, None
                closed, slot.closed = slot.closed, {}
                options = PassOptions(
                    settle=self.loaded.config.watch.settle,
                    closed=closed,
                    progress=self._cancel_check,
                )
                future = self._pool.submit(self._pass, slot, options)
                self._futures[slot.target.work_dir] = future
                future.add_done_callback(lambda f, s=slot: self._finished(s, f))

    def _cancel_check(self, done: int, total: int) -> None:
        deadline = self._stop_deadline
        if deadline is not None and time.monotonic() > deadline:
            raise Cancelled(
                "ckptd is stopping; the artifact was not written and will be next start"
            )

    def _pass(self, slot: WorkDirSlot, options: PassOptions) -> WorkDirReport:
        return reconcile(slot.target, options, lock=slot.lock)

    def _finished(self, slot: WorkDirSlot, future: Future[WorkDirReport]) -> None:
        now = time.monotonic()
        if future.cancelled():
            # Queued when SIGTERM came: never started, nothing to report, the next start redoes it.
            with self._cond:
                slot.running = False
                self._futures.pop(slot.target.work_dir, None)
            return
        try:
            report = future.result()
        except Cancelled as exc:
            log.warning(str(exc), extra=_f(slot.target.work_dir))
            report = None
        except Exception:
            log.exception("unexpected error; will retry", extra=_f(slot.target.work_dir))
            report = None
        with self._cond:
            slot.running = False
            slot.attempted = True
            self._futures.pop(slot.target.work_dir, None)
            next_due = self._next_due(slot, report, now)
            if next_due is not None:
                self._mark_due(slot, next_due)
            if slot.again:
                self._mark_due(slot, now + self.timings.debounce)
            self._cond.notify_all()
        if report is not None and self.metrics:
            self.metrics.record_pass(**metrics_of(report))
        if report is not None and self.on_report:
            self.on_report(report)
        if report is not None:
            self._request_publish(slot, report)

    def _request_publish(self, slot: WorkDirSlot, report: WorkDirReport) -> None:
        """Uploads run on the publisher's thread: a slow store never holds up a pass."""
        if report.target.project.artifact.publish is None or report.dry_run:
            return
        if not slot.lock.held or self._stop.is_set():
            return
        with self._cond:
            publisher = self._publisher
            if publisher is None:
                from ckptd.publishqueue import PublishQueue

                publisher = self._publisher = PublishQueue(self._published)
                publisher.start()
        publisher.submit(slot.target, slot.lock)

    def _published(self, target: Target, outcome: PublishOutcome) -> None:
        where = _f(target.work_dir, url=outcome.url, action="publish")
        if outcome.status == "published":
            files = ", ".join(sorted(outcome.files)) or "no files"
            log.info(f"publish: {outcome.url} now names {files}", extra=where)
        elif outcome.failed:
            log.warning(f"publish failed: {outcome.error}", extra=where)
        if self.metrics:
            self.metrics.record_publish(
                work_dir=str(target.work_dir),
                project=target.project.name,
                uploads=outcome.uploads,
                uploaded_bytes=outcome.uploaded_bytes,
                failed=outcome.failed,
                pending=outcome.pending,
            )

    def _next_due(
        self, slot: WorkDirSlot, report: WorkDirReport | None, now: float
    ) -> float | None:
        if report is None or report.failed:
            if report is not None:
                log_actions(report, log, slot.last_report)
                slot.last_report = report
            slot.failures += 1
            return now + self.timings.backoff(slot.failures)
        slot.failures = 0
        if report.skip is SkipReason.LOCKED:
            if report.skipped != slot.busy_holder:
                log.warning(report.skipped, extra=_f(slot.target.work_dir, action="skip"))
                slot.busy_holder = report.skipped
            return now + self.timings.busy_retry
        slot.busy_holder = ""
        log_actions(report, log, slot.last_report)
        slot.last_ok = time.time()
        self.health.last_success = slot.last_ok
        slot.last_report = report
        return recheck_time(report, now, self.timings)

    def _check_first_pass(self) -> None:
        if self.health.first_pass_done:
            return
        with self._cond:
            # A work_dir that failed or is locked by another ckptd counts as visited: READY
            # means "every work_dir had its first pass", not "every pass succeeded".
            pending = any(not s.attempted for s in self.slots.values())
        if not pending:
            self.health.first_pass_done = True
            self.notifier.ready(self.status_line())
            log.info(
                "ready: first full reconcile done", extra={"fields": {"status": self.status_line()}}
            )
        else:
            self.notifier.status("first reconcile in progress")

    def healthy(self) -> tuple[bool, str]:
        """For /healthz: ready after the first full pass, alive while the main loop turns."""
        if not self.health.first_pass_done:
            return False, "starting: first reconcile in progress"
        stale = time.monotonic() - self.health.last_tick
        if stale > self.timings.loop_stale_after:
            return False, f"main loop has not run for {stale:.0f} s"
        return True, self.status_line()

    def status_line(self) -> str:
        slots = list(self.slots.values())
        errors = sum(1 for s in slots if s.failures)
        reclaimed = sum(s.last_report.reclaimed_total for s in slots if s.last_report)
        return (
            f"watching {len(slots)} work_dir(s); {errors} with errors; "
            f"reclaimed {format_size(reclaimed)} in total"
        )

    # --- reload and shutdown -------------------------------------------------------------

    def _do_reload(self) -> None:
        self._reload = False
        self.notifier.reloading()
        try:
            loaded = load_config(self.loaded.path)
        except ConfigError as exc:
            log.error(f"config reload failed; keeping the running config: {exc}")
            self.notifier.ready("reload failed: keeping the running config")
            return
        self.loaded = loaded
        log.info("config reloaded", extra={"fields": {"config": str(loaded.path)}})
        self._rediscover()
        self._resync()
        self.notifier.ready(self.status_line())

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: finishing the work in hand")
        self.watcher.stop()
        if self._publisher is not None:
            self._publisher.stop(0)  # ask now; the passes in hand get the grace time first
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._publisher is not None:
            left = (self._stop_deadline or time.monotonic()) - time.monotonic()
            self._publisher.stop(max(1.0, left))
        for slot in self.slots.values():
            slot.lock.release()
        self.notifier.close()
        log.info("stopped")


def _f(work_dir: Path, **fields: object) -> dict[str, dict[str, object]]:
    """``extra=`` for a log call about one work_dir."""
    return {"fields": {"work_dir": str(work_dir), **fields}}
