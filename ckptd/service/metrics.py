"""Prometheus metrics and the health endpoint of ``ckptd run --metrics-addr``.

Per-work_dir numbers live in one plain table guarded by a lock and are turned into metric
families at scrape time by a custom collector. That makes ``forget()`` exact (a work_dir that
is no longer watched loses every series at once, whatever labels it had) and lets the
"seconds since the last successful reconcile" gauge be computed when Prometheus asks.

Served by a threaded stdlib HTTP server in a daemon thread:

- ``/metrics``  the exposition (text format, or OpenMetrics when the scraper asks for it);
- ``/healthz``  200 with a short text when ``health()`` returns ``(True, text)``, else 503;
- anything else 404. Requests are never logged.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ckptd import __version__
from ckptd.engine.outcome import ErrorKind, PublishOutcome
from ckptd.engine.targets import Target
from ckptd.fs.space import FilesystemSpace, space_of
from ckptd.service.http import MetricsServer

__all__ = [
    "ERROR_KINDS",
    "RECONCILE_BUCKETS",
    "SLIM_BUCKETS",
    "DaemonMetrics",
]

# A slim of a small model takes ~0.05 s, of a 4 GB checkpoint on a slow disk up to minutes.
SLIM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# A pass with nothing to do is a directory scan (ms); one that slims takes as long as the slim.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Kinds pre-set to 0 for every work_dir, so that rate()/increase() see the first error.
ERROR_KINDS = tuple(str(kind) for kind in ErrorKind)


@dataclass(slots=True)
class _WorkDirStats:
    project: str
    first_seen: float
    last_ok: float | None = None
    checkpoints_kept: int = 0
    bytes_held: int = 0
    reclaimed_bytes: int = 0
    slims: int = 0
    deletions: int = 0
    deletions_held: int = 0  # by the last pass (errors hold every deletion back)
    over_budget: bool = False  # protected checkpoints alone over retention.max_total_size
    passes: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    best: dict[str, float] = field(default_factory=dict)
    artifact_bytes: dict[str, int] = field(default_factory=dict)
    artifact_failed: dict[str, bool] = field(default_factory=dict)  # metric -> its slim failed
    # artifact.publish; None until the work_dir's first publish, so others get no series
    publish_pending: bool | None = None
    uploads: int = 0
    uploaded_bytes: int = 0
    upload_failures: int = 0
    upload_timeouts: int = 0


class _WorkDirCollector(Collector):
    """Yields the per-work_dir families from the table at scrape time."""

    def __init__(self, owner: DaemonMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        rows = self._owner._snapshot()
        now = time.time()
        wdp = ["work_dir", "project"]

        def gauge(name: str, doc: str, labels: list[str] = wdp) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str] = wdp) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        kept = gauge("ckptd_checkpoints_kept", "Checkpoints the retention policy keeps.")
        held = gauge("ckptd_checkpoints_held_bytes", "Bytes of the checkpoints kept on disk.")
        reclaimed = counter("ckptd_reclaimed_bytes", "Bytes freed by deleting checkpoints.")
        slims = counter("ckptd_slims", "Slim best-model artifacts written.")
        deletions = counter("ckptd_deletions", "Checkpoints deleted.")
        held_back = gauge(
            "ckptd_deletions_held",
            "Deletions the last pass held back because it found errors (0: none held).",
        )
        over_budget = gauge(
            "ckptd_over_budget",
            "1 while protected checkpoints alone exceed retention.max_total_size.",
        )
        passes = counter("ckptd_reconcile_passes", "Reconcile passes by result.", [*wdp, "result"])
        errors = counter("ckptd_errors", "Errors by kind.", [*wdp, "kind"])
        best = gauge("ckptd_best_metric_value", "Best value of a metric.", [*wdp, "metric"])
        artifact = gauge(
            "ckptd_artifact_bytes", "Size of the newest slim artifact.", [*wdp, "metric"]
        )
        failed = gauge(
            "ckptd_best_artifact_failed",
            "1 while the last pass could not write the artifact of the metric's best.",
            [*wdp, "metric"],
        )
        last_ok = gauge(
            "ckptd_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last successful reconcile pass.",
        )
        age = gauge(
            "ckptd_last_successful_reconcile_age_seconds",
            "Seconds since the last successful reconcile pass (since ckptd first saw the "
            "work_dir, if none has succeeded yet); computed at scrape time.",
        )
        for path, s in rows:
            labels = [path, s.project]
            kept.add_metric(labels, s.checkpoints_kept)
            held.add_metric(labels, s.bytes_held)
            reclaimed.add_metric(labels, s.reclaimed_bytes)
            slims.add_metric(labels, s.slims)
            deletions.add_metric(labels, s.deletions)
            held_back.add_metric(labels, s.deletions_held)
            over_budget.add_metric(labels, int(s.over_budget))
            for result, n in sorted(s.passes.items()):
                passes.add_metric([*labels, result], n)
            for kind, n in sorted(s.errors.items()):
                errors.add_metric([*labels, kind], n)
            for key, value in sorted(s.best.items()):
                best.add_metric([*labels, key], value)
            for key, size in sorted(s.artifact_bytes.items()):
                artifact.add_metric([*labels, key], size)
            for key, bad in sorted(s.artifact_failed.items()):
                failed.add_metric([*labels, key], int(bad))
            if s.last_ok is not None:
                last_ok.add_metric(labels, s.last_ok)
            age.add_metric(labels, max(0.0, now - (s.last_ok or s.first_seen)))
        yield from (kept, held, reclaimed, slims, deletions, held_back, over_budget)
        yield from (passes, errors, best, artifact, failed, last_ok, age)
        yield from _publish_families(rows, wdp)
        yield from self._owner._filesystem_families()


def _publish_families(rows: list[tuple[str, _WorkDirStats]], wdp: list[str]) -> list[Metric]:
    uploads = CounterMetricFamily(
        "ckptd_publish_uploads", "Objects uploaded by artifact.publish.", labels=wdp
    )
    sent = CounterMetricFamily("ckptd_publish_uploaded_bytes", "Bytes uploaded.", labels=wdp)
    failures = CounterMetricFamily("ckptd_publish_failures", "Failed publishes.", labels=wdp)
    timeouts = CounterMetricFamily(
        "ckptd_publish_timeouts", "Publishes stopped at artifact.publish.timeout.", labels=wdp
    )
    pending = GaugeMetricFamily(
        "ckptd_publish_pending",
        "1 while the remote manifest is not yet the local one (new best, or failed uploads).",
        labels=wdp,
    )
    for path, s in rows:
        if s.publish_pending is None:
            continue
        labels = [path, s.project]
        uploads.add_metric(labels, s.uploads)
        sent.add_metric(labels, s.uploaded_bytes)
        failures.add_metric(labels, s.upload_failures)
        timeouts.add_metric(labels, s.upload_timeouts)
        pending.add_metric(labels, int(s.publish_pending))
    return [uploads, sent, failures, timeouts, pending]


class DaemonMetrics:
    """Everything ``ckptd run`` exposes. Thread-safe: passes are recorded from worker threads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        own = registry is None
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self._lock = threading.Lock()
        self._rows: dict[str, _WorkDirStats] = {}
        self._mountpoints: dict[tuple[str, int], str] = {}  # (work_dir, st_dev) -> mountpoint
        # work_dir -> (when, its filesystem), read after each pass (a stat and a statvfs)
        self._space: dict[str, tuple[float, FilesystemSpace]] = {}
        self._ready = Gauge(
            "ckptd_ready",
            "1 while /healthz answers 200: the first full pass is done and the loop runs.",
            registry=self.registry,
        )
        self._watched = Gauge(
            "ckptd_work_dirs_watched", "Work_dirs ckptd manages now.", registry=self.registry
        )
        self._slim_seconds = Histogram(
            "ckptd_slim_duration_seconds",
            "Time to write one slim best-model artifact.",
            buckets=SLIM_BUCKETS,
            registry=self.registry,
        )
        self._pass_seconds = Histogram(
            "ckptd_reconcile_duration_seconds",
            "Time of one reconcile pass of one work_dir.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        Info("ckptd_build", "ckptd version and Python.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.registry.register(_WorkDirCollector(self))
        # disk.min_free (service/diskwatch.py) and hooks (service/hooks.py)
        self._watermark_blocked = Gauge(
            "ckptd_disk_watermark_blocked",
            "1 while only protected checkpoints keep a filesystem under disk.min_free.",
            ["mountpoint"],
            registry=self.registry,
        )
        self._watermark_deletions = Counter(
            "ckptd_disk_watermark_deletions",
            "Checkpoints deleted because a filesystem was under disk.min_free.",
            ["mountpoint"],
            registry=self.registry,
        )
        self._hook_failures = Counter(
            "ckptd_hook_failures",
            "Hooks that failed, timed out or could not start.",
            ["work_dir", "project", "hook"],
            registry=self.registry,
        )
        self._hook_labels: set[tuple[str, str, str]] = set()  # so forget() can drop them
        if own:  # a shared registry (e.g. the global one) may already have these
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    # --- recording -----------------------------------------------------------------------

    def set_watched(self, work_dirs: int) -> None:
        self._watched.set(work_dirs)

    def record_pass(
        self,
        *,
        work_dir: str,
        project: str,
        seconds: float,
        ok: bool,
        checkpoints_kept: int,
        bytes_held: int,
        reclaimed_bytes: int,
        slims: list[tuple[str, float, int]],
        deletions: int,
        errors: list[str],
        best: dict[str, float],
        deletions_held: int = 0,
        over_budget: bool = False,
        artifact_failed: dict[str, bool] | None = None,
    ) -> None:
        """One finished pass. Gauges take the values given (the work_dir after the pass);
        counters add ``reclaimed_bytes``, ``deletions``, one per slim and one per error kind
        listed (a kind may repeat). ``best`` replaces the previous best values.
        ``deletions_held``: deletions the pass held back; ``over_budget``: its plan's;
        ``artifact_failed``: per metric, whether writing its best's artifact failed (replaces).
        Also reads the free space of the work_dir's filesystem (once per pass, from the
        worker thread that just scanned it: a hung mount never blocks a scrape)."""
        self._pass_seconds.observe(max(0.0, seconds))
        with self._lock:
            mountpoints = {k: v for k, v in self._mountpoints.items() if k[0] == work_dir}
        space = space_of(work_dir, mountpoints)
        for _key, slim_seconds, _size in slims:
            self._slim_seconds.observe(max(0.0, slim_seconds))
        now = time.time()
        with self._lock:
            row = self._rows.get(work_dir)
            if row is None or row.project != project:
                row = self._rows[work_dir] = _WorkDirStats(project=project, first_seen=now)
            row.passes["ok" if ok else "error"] += 1
            if ok:
                row.last_ok = now
            row.checkpoints_kept = checkpoints_kept
            row.bytes_held = bytes_held
            row.reclaimed_bytes += max(0, reclaimed_bytes)
            row.deletions += max(0, deletions)
            row.deletions_held = max(0, deletions_held)
            row.over_budget = bool(over_budget)
            row.slims += len(slims)
            for key, _slim_seconds, size in slims:
                row.artifact_bytes[key] = size
            for kind in errors:
                row.errors[kind] = row.errors.get(kind, 0) + 1
            row.best = {key: float(value) for key, value in best.items()}
            row.artifact_failed = dict(artifact_failed or {})
            self._mountpoints.update(mountpoints)
            if space is None:
                self._space.pop(work_dir, None)
            else:
                self._space[work_dir] = (now, space)

    def record_publish(
        self,
        *,
        work_dir: str,
        project: str,
        uploads: int,
        uploaded_bytes: int,
        failed: bool,
        pending: bool,
        timed_out: bool = False,
    ) -> None:
        """One publish attempt of ``artifact.publish``: counters add, ``pending`` replaces."""
        with self._lock:
            row = self._rows.get(work_dir)
            if row is None or row.project != project:
                row = self._rows[work_dir] = _WorkDirStats(project=project, first_seen=time.time())
            row.uploads += max(0, uploads)
            row.uploaded_bytes += max(0, uploaded_bytes)
            row.upload_failures += int(failed)
            row.upload_timeouts += int(timed_out)
            row.publish_pending = pending

    def record_publish_outcome(self, target: Target, outcome: PublishOutcome) -> None:
        """``record_publish`` of one publisher outcome (the daemon's and the tests' one way)."""
        self.record_publish(
            work_dir=str(target.work_dir),
            project=target.project.name,
            uploads=outcome.uploads,
            uploaded_bytes=outcome.uploaded_bytes,
            failed=outcome.failed,
            pending=outcome.pending,
            timed_out=outcome.timed_out,
        )

    def record_watermark(self, mountpoint: str, blocked: bool, deletions: int) -> None:
        self._watermark_blocked.labels(mountpoint).set(int(blocked))
        self._watermark_deletions.labels(mountpoint).inc(max(0, deletions))

    def record_hook_failure(self, work_dir: str, project: str, hook: str) -> None:
        with self._lock:
            self._hook_labels.add((work_dir, project, hook))
        self._hook_failures.labels(work_dir, project, hook).inc()

    def forget(self, work_dir: str) -> None:
        """The work_dir is no longer watched: every series labelled with it disappears."""
        with self._lock:
            self._rows.pop(work_dir, None)
            self._space.pop(work_dir, None)
            for key in [k for k in self._mountpoints if k[0] == work_dir]:
                del self._mountpoints[key]
            hooks = {labels for labels in self._hook_labels if labels[0] == work_dir}
            self._hook_labels -= hooks
        for labels in hooks:
            self._hook_failures.remove(*labels)

    def _filesystem_families(self) -> list[Metric]:
        """Free and total bytes of each filesystem holding a managed work_dir, one series per
        device (its newest reading), as the last pass of each work_dir found them."""
        free = GaugeMetricFamily(
            "ckptd_filesystem_free_bytes",
            "Bytes available to unprivileged writers on a filesystem holding managed work_dirs.",
            labels=["mountpoint"],
        )
        size = GaugeMetricFamily(
            "ckptd_filesystem_size_bytes",
            "Size of a filesystem holding managed work_dirs.",
            labels=["mountpoint"],
        )
        newest: dict[int, tuple[float, FilesystemSpace]] = {}
        with self._lock:
            for when, fs in self._space.values():
                if fs.device not in newest or when > newest[fs.device][0]:
                    newest[fs.device] = (when, fs)
        for _when, fs in sorted(newest.values(), key=lambda item: item[1].mountpoint):
            free.add_metric([fs.mountpoint], fs.free_bytes)
            size.add_metric([fs.mountpoint], fs.size_bytes)
        return [free, size]

    def _snapshot(self) -> list[tuple[str, _WorkDirStats]]:
        with self._lock:
            return [
                (
                    path,
                    _WorkDirStats(
                        project=s.project,
                        first_seen=s.first_seen,
                        last_ok=s.last_ok,
                        checkpoints_kept=s.checkpoints_kept,
                        bytes_held=s.bytes_held,
                        reclaimed_bytes=s.reclaimed_bytes,
                        slims=s.slims,
                        deletions=s.deletions,
                        deletions_held=s.deletions_held,
                        over_budget=s.over_budget,
                        passes=dict(s.passes),
                        errors=dict(s.errors),
                        best=dict(s.best),
                        artifact_bytes=dict(s.artifact_bytes),
                        artifact_failed=dict(s.artifact_failed),
                        publish_pending=s.publish_pending,
                        uploads=s.uploads,
                        uploaded_bytes=s.uploaded_bytes,
                        upload_failures=s.upload_failures,
                        upload_timeouts=s.upload_timeouts,
                    ),
                )
                for path, s in sorted(self._rows.items())
            ]

    # --- serving -------------------------------------------------------------------------

    def start_server(self, address: str, health: Callable[[], tuple[bool, str]]) -> MetricsServer:
        """Listen on ``address`` ("127.0.0.1:9464", "[::1]:9464", ":9464" = every interface,
        IPv4 and IPv6 where possible; port 0 = any free port) and serve in a daemon thread
        until ``stop()``. ValueError for a malformed address, OSError if it cannot be bound.
        ``health`` is called per /healthz request, from the server's threads, and per scrape
        for ``ckptd_ready``."""

        def ready() -> float:
            try:
                return float(bool(health()[0]))
            except Exception:
                return 0.0

        self._ready.set_function(ready)
        return MetricsServer(address, self.registry, health)
