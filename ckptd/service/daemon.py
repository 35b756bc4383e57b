"""``ckptd run``: the long-running service.

The main thread owns all scheduling: watch events and timers only mark work_dirs due, and a
small pool of workers reconciles them, never two passes on one work_dir at once. Everything is
level-triggered: a pass reads the disk, so a missed event costs latency, never correctness,
and the periodic resync bounds even that. Which work_dirs and folders: ``service/discovery``;
when a work_dir is due: ``service/schedule``; publishing: ``service/publishing``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ckptd.core.cancel import Cancelled, CancelToken
from ckptd.core.config import ConfigError, LoadedConfig, load_config
from ckptd.core.model import FileStat
from ckptd.core.timings import TIMINGS, Timings
from ckptd.engine.reconcile import PassOptions, WorkDirReport, reconcile
from ckptd.present.report import metrics_of
from ckptd.service.discovery import WorkDirSet
from ckptd.service.diskwatch import DiskWatch
from ckptd.service.health import Health, status_line
from ckptd.service.hooks import HookRunner
from ckptd.service.metrics import DaemonMetrics
from ckptd.service.publishing import PublishRelay
from ckptd.service.schedule import WorkDirSlot, next_due
from ckptd.service.sdnotify import Notifier, watchdog_interval
from ckptd.service.watch import Change, Watcher

log = logging.getLogger("ckptd.daemon")


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
        self.health = Health(self.notifier, timings)
        self.work_dirs = WorkDirSet(timings)
        self.slots = self.work_dirs.slots
        self.publishing = PublishRelay(metrics)
        self.hooks = HookRunner(metrics)
        self.disk = DiskWatch(metrics)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._reload = False
        self._rediscover_at = 0.0
        self._resync_at = 0.0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptd-worker")
        watch = loaded.config.watch
        self.watcher = Watcher(watch.mode, watch.poll_interval, self._on_change)
        self._cancel = CancelToken(
            lambda: self._stop_deadline is not None and time.monotonic() > self._stop_deadline,
            "ckptd is stopping; the artifact was not written and will be next start",
        )

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
        soon = time.monotonic() + self.timings.debounce
        with self._cond:
            slot = self.slots.get(change.root)
            if slot is None:  # a glob parent: maybe a new work_dir
                self._rediscover_at = min(self._rediscover_at, soon)
            else:
                if change.closed_after_write:
                    try:
                        name = change.path.relative_to(slot.target.work_dir).as_posix()
                        slot.closed[name] = FileStat.lstat(change.path)
                    except (ValueError, OSError):
                        pass  # outside the work_dir, or already gone
                self._mark_due(slot, soon)
            self._cond.notify_all()

    def _mark_due(self, slot: WorkDirSlot, when: float) -> None:
        if slot.running:
            slot.again = True
        slot.due = when if slot.due is None else min(slot.due, when)

    def _forget(self, work_dir: Path) -> None:
        self.publishing.forget(work_dir)
        if self.metrics:
            self.metrics.forget(str(work_dir))

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
                # a burst of finished passes is handled in one tick, not one tick each
                self._stop.wait(max(0.0, now + self.timings.loop_min_interval - time.monotonic()))
        finally:
            self._shutdown()
        return 0

    def _rediscover(self) -> None:
        cpu = time.thread_time()
        wanted = self.work_dirs.discover(self.loaded)
        now = time.monotonic()
        with self._cond:
            for slot in self.work_dirs.apply(wanted, now, self._forget):
                self._mark_due(slot, now)
        self.watcher.sync(self.work_dirs.watch_plan(self.loaded))
        if self.metrics:
            self.metrics.set_watched(len(self.slots))
        cost = time.thread_time() - cpu
        self._rediscover_at = time.monotonic() + self.timings.rediscover_interval(cost)

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
        cost = sum(slot.quiet_pass_cpu for slot in self.slots.values())
        self._resync_at = now + self.timings.resync_interval(
            self.loaded.config.watch.resync_interval, cost
        )

    def _dispatch(self, now: float) -> None:
        with self._cond:
            due = [s for s in self.slots.values() if s.due is not None and s.due <= now]
            for slot in sorted(due, key=lambda s: s.due or 0):
                if slot.running:
                    continue
                slot.running, slot.again, slot.due = True, False, None
                closed, slot.closed = slot.closed, {}
                evict, slot.evict = slot.evict, {}
                options = PassOptions(
                    settle=self.loaded.config.watch.settle,
                    closed=closed,
                    cancel=self._cancel,
                    evict=evict,
                )
                future = self._pool.submit(reconcile, slot.target, options, slot.lock)
                future.add_done_callback(lambda f, s=slot: self._finished(s, f))

    def _finished(self, slot: WorkDirSlot, future: Future[WorkDirReport]) -> None:
        now = time.monotonic()
        report = None
        if future.cancelled():
            # Queued when SIGTERM came: never started, nothing to report, the next start redoes it.
            with self._cond:
                slot.running = False
            return
        where = {"fields": {"work_dir": str(slot.target.work_dir)}}
        try:
            report = future.result()
        except Cancelled as exc:
            log.warning(str(exc), extra=where)
        except Exception:
            log.exception("unexpected error; will retry", extra=where)
        with self._cond:
            slot.running = False
            slot.attempted = True
            due = next_due(slot, report, now, self.timings)
            if due is not None:
                self._mark_due(slot, due)
            if slot.again:
                self._mark_due(slot, now + self.timings.debounce)
            self._cond.notify_all()
        if report is None:
            return
        if not report.acted:
            slot.quiet_pass_cpu = report.cpu_seconds
        if self.metrics:
            self.metrics.record_pass(**metrics_of(report))
        if self.on_report:
            self.on_report(report)
        if not self._stop.is_set():
            self.publishing.after_pass(report, slot.lock)
            self.hooks.after_pass(report)
            self._watermark(report)
        if self.loaded.config.disk is None:
            # Only the watermark reads a past pass's observation and plan (the logs compare
            # notes; the status line sums bytes): without it, keep the report without them.
            # They were most of the idle daemon's RSS: ~85 KiB per work_dir of 50 checkpoints.
            with self._cond:
                if slot.last_report is report:
                    slot.last_report = dataclasses.replace(report, observation=None, plan=None)

    def _watermark(self, report: WorkDirReport) -> None:
        """disk.min_free: re-plan the filesystem's work_dirs after each pass."""
        disk = self.loaded.config.disk
        if disk is None:
            return
        with self._cond:
            latest = [s.last_report for s in self.slots.values() if s.last_report is not None]
        evictions = self.disk.after_pass(report, latest, disk)
        now = time.monotonic()
        with self._cond:
            for work_dir, evict in evictions.items():
                slot = self.slots.get(work_dir)
                if slot is not None:
                    slot.evict.update(evict)
                    self._mark_due(slot, now)
            self._cond.notify_all()

    # --- health --------------------------------------------------------------------------

    def _check_first_pass(self) -> None:
        with self._cond:
            slots = list(self.slots.values())
        self.health.first_pass(slots)

    def healthy(self) -> tuple[bool, str]:
        return self.health.healthy(list(self.slots.values()))

    def status_line(self) -> str:
        return status_line(self.slots.values())

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
        self.publishing.stop(0)  # ask now; the passes in hand get the grace time first
        self._pool.shutdown(wait=True, cancel_futures=True)
        left = (self._stop_deadline or time.monotonic()) - time.monotonic()
        self.publishing.stop(max(1.0, left))
        self.hooks.stop(max(1.0, left))
        for slot in self.slots.values():
            slot.lock.release()
        self.notifier.close()
        log.info("stopped")
