"""Every timing of the service in one settings object, and the one backoff rule.

The watch settings users tune (``settle``, ``poll_interval``, ``resync_interval``) are in
``ckptd.yaml``; these are the internal ones, gathered here so that the whole clock of the
daemon can be read (and, in tests, shortened) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timings:
    # coalesce the burst of events one checkpoint or log line causes
    debounce: float = 0.2
    # a failed pass (or publish attempt) is retried after 5 s, 10 s, ... up to 5 min
    backoff_start: float = 5.0
    backoff_max: float = 300.0
    # another ckptd holds the work_dir's lock: look again this often (a takeover's bound)
    busy_retry: float = 30.0
    # new work_dirs under globs whose parents are not watched (events on the watched ones
    # rediscover at once) ...
    rediscover_every: float = 10.0
    # ... or less often, so that this periodic globbing costs at most this share of a core
    # (at 2,000 work_dirs one rediscovery is ~0.2 s of CPU: every ~80 s instead of 10 s)
    rediscover_cpu_share: float = 0.0025
    # the periodic full resync (watch.resync_interval) is spaced out to cost at most this share
    resync_cpu_share: float = 0.005
    # ... but never rarer than this: the CkptdWorkDirStale alert fires after 30 min without a
    # good pass of a work_dir, and a quiet one gets passes only from the resync
    resync_spaced_max: float = 1200.0
    # the loop wakes at least every second; this long without a tick means it is stuck
    loop_stale_after: float = 30.0
    # ... and at most every 10 ms: each tick scans every work_dir's schedule, and a start-up
    # pass over 2,000 work_dirs woke it once per finished pass (~0.75 s of the 7.6 s to ready)
    loop_min_interval: float = 0.01
    # SIGTERM: in-flight work gets this long (systemd's default stop timeout is 90 s)
    stop_grace: float = 8.0
    # a work_dir's auto-detected layout is reused this long (start-up detects each twice)
    layout_redetect_after: float = 30.0
    # a folder modified this recently may change again within its mtime's granularity
    settled_folder: float = 2.0
    # the local artifact changed under an upload: publish the new one this soon
    publish_changed_retry: float = 0.5
    # a checkpoint still incomplete after this long is not being written: it is broken
    # (writers touch mtime continuously, so even a slow NFS write never looks this stale)
    stale_incomplete_after: float = 300.0
    # added to a moment the plan says something changes, so the pass lands just after it
    recheck_slack: float = 0.05

    def rediscover_interval(self, cpu_seconds: float) -> float:
        """Seconds until the next periodic rediscovery, after one that took ``cpu_seconds``."""
        return max(self.rediscover_every, cpu_seconds / self.rediscover_cpu_share)

    def resync_interval(self, configured: float, cpu_seconds: float) -> float:
        """Seconds until the next full resync, which costs ``cpu_seconds`` (the sum of each
        work_dir's last quiet pass): ``watch.resync_interval``, or less often where that would
        cost more than ``resync_cpu_share`` of a core, up to ``resync_spaced_max`` (2,000
        work_dirs: ~8 s of CPU per resync, every 20 min instead of 5; the watcher's events
        still start passes at once)."""
        return max(configured, min(cpu_seconds / self.resync_cpu_share, self.resync_spaced_max))

    def backoff(self, failures: int) -> float:
        """Seconds before retrying after ``failures`` failures in a row."""
        return min(self.backoff_max, self.backoff_start * 2 ** max(failures - 1, 0))


TIMINGS = Timings()
