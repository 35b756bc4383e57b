"""Long run: 10 simulated trainers write a checkpoint every few seconds while ``ckptd run`` is
restarted every minute (SIGTERM and SIGKILL in turn). Throughout: every deletion and every
artifact replacement is judged as it happens (``StreamChecker``), every artifact the manifests
name is loaded and hashed every few seconds, and the daemon's RSS and open file descriptors are
sampled every second. Each daemon lifetime must end with flat memory and as many descriptors
as it had once warmed up.

CI runs 3 minutes; ``CKPTD_SOAK_SECONDS=1800`` is the 30-minute version. Also:
``CKPTD_SOAK_RESTART_SECONDS`` (60; 0 = never restart, for one long memory profile) and
``CKPTD_SOAK_TRAINERS`` (10).
"""

from __future__ import annotations

import math
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess
from tests.faults.figures import env_number, report
from tests.faults.invariants import (
    MANIFEST,
    Stream,
    StreamChecker,
    artifact_problems,
    fd_count,
    protected,
    rss_bytes,
    temp_files,
)
from tests.faults.trainer import CHECKPOINT, Recording, Replayer, record
from tests.helpers import write_config

SECONDS = env_number("CKPTD_SOAK_SECONDS", 180)
RESTART = env_number("CKPTD_SOAK_RESTART_SECONDS", 60)
TRAINERS = int(env_number("CKPTD_SOAK_TRAINERS", 10))
EPOCH_SECONDS = (2.0, 3.5)  # each trainer's pace, drawn once
WARM_UP = 15.0  # seconds of a lifetime before memory and descriptors must be flat
MiB = 1 << 20
# ckptd keeps every evaluation record it has read (state, last report): ~2 KB each, measured.
# Memory may grow with that history, at most this much per record; anything beyond is a leak.
PER_EVAL = 4096


@dataclass
class Lifetime:
    pid: int
    ended_by: str = ""
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, rss, fds, evals

    def steady(self) -> list[tuple[float, int, int, int]]:
        start = self.samples[0][0] if self.samples else 0
        return [s for s in self.samples if s[0] - start >= WARM_UP]

    def verdict(self) -> tuple[str, list[str]]:
        steady = self.steady()
        if len(steady) < 10:
            return f"pid {self.pid}: too short to judge", []
        third = max(1, len(steady) // 3)
        head, tail = steady[:third], steady[-third:]
        evals = tail[-1][3] - head[0][3]
        excess = max(s[1] for s in tail) - max(s[1] for s in head) - PER_EVAL * evals
        fd_growth = min(s[2] for s in tail) - min(s[2] for s in head)
        # the growth that the evaluation history does not explain, per minute
        slope = _slope([(t, (r - PER_EVAL * e) / MiB) for t, r, _, e in steady]) * 60
        text = (
            f"pid {self.pid} ({self.ended_by}): RSS {head[0][1] / MiB:.1f} -> "
            f"{tail[-1][1] / MiB:.1f} MiB with {evals} more evaluations held "
            f"(unexplained {slope:+.2f} MiB/min), fds {min(s[2] for s in head)}"
            f" -> {min(s[2] for s in tail)}"
        )
        problems = []
        # a slope over less than 5 minutes is noise (allocator warm-up); judge it on long runs
        long_run = steady[-1][0] - steady[0][0] >= 300
        if excess > 8 * MiB or (long_run and slope > 0.5):
            problems.append(f"memory grows: {text}")
        if fd_growth > 2:
            problems.append(f"file descriptors leak: {text}")
        return text, problems


def _slope(points: list[tuple[float, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def _artifact_problems_settled(folder: Path) -> list[str]:
    """Artifact problems that hold while the manifest stays the same (ckptd may be replacing
    the artifact right now: the manifest changes first, the old file goes after)."""
    for _ in range(5):
        manifest = folder / MANIFEST
        before = manifest.read_bytes() if manifest.exists() else b""
        problems = artifact_problems(folder)
        after = manifest.read_bytes() if manifest.exists() else b""
        if before == after:
            return problems
        time.sleep(0.05)
    return []


def _soak_recording(seconds: float) -> Recording:
    epochs = math.ceil(seconds / EPOCH_SECONDS[0]) + 2
    rng = random.Random(0)  # a rising, noisy metric: a new best every few epochs
    values = tuple(
        round(0.1 + 0.8 * i / epochs + rng.uniform(-0.06, 0.06), 4) for i in range(epochs)
    )
    return record(epochs, values, param_count=10_000)


@pytest.mark.slow
def test_soak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = _soak_recording(SECONDS)
    rng = random.Random(1)
    config = write_config(
        tmp_path,
        retention={"keep_last": 2, "pending_eval_grace": "1h"},
        watch={"mode": "inotify", "settle": "0.5s", "resync_interval": "30s"},
    )
    work_dirs = [tmp_path / "work_dirs" / f"run{i:02d}" for i in range(TRAINERS)]
    lifetimes: list[Lifetime] = []
    problems: list[str] = []
    checks = 0
    with Stream() as stream:
        checkers, trainers = [], []
        for work_dir in work_dirs:
            marks = tmp_path / "marks" / work_dir.name
            work_dir.mkdir(parents=True)
            marks.mkdir(parents=True)
            checkers.append(
                stream.add(
                    StreamChecker(work_dir, recording.ops, metric=recording.metric, marks=marks)
                )
            )
            pace = rng.uniform(*EPOCH_SECONDS)
            trainers.append(Replayer(recording, work_dir, epoch_seconds=pace, marks=marks))
        logs = iter(tmp_path / f"ckptd-{i}.log" for i in range(10_000))
        daemon = DaemonProcess(config, log=next(logs)).start()
        daemon.wait_ready()
        lifetime = Lifetime(daemon.pid)
        for trainer in trainers:
            trainer.start()
        started = time.monotonic()
        born = started
        next_check = started
        signals = [signal.SIGTERM, signal.SIGKILL]
        while time.monotonic() - started < SECONDS:
            now = time.monotonic()
            with stream.lock:
                evals = sum(len(c.view.evals) for c in checkers)
            lifetime.samples.append((now, rss_bytes(daemon.pid), fd_count(daemon.pid), evals))
            if now >= next_check:  # invariant 3, on disk, for every work_dir
                for work_dir in work_dirs:
                    problems += _artifact_problems_settled(work_dir / "best")
                checks += 1
                next_check = now + 3
            if RESTART and now - born >= RESTART:
                sig = signals[len(lifetimes) % 2]
                lifetime.ended_by = signal.Signals(sig).name
                lifetimes.append(lifetime)
                daemon.stop(sig)
                daemon = DaemonProcess(config, log=next(logs)).start()
                daemon.wait_ready(60)
                lifetime, born = Lifetime(daemon.pid), time.monotonic()
            assert all(t.error is None for t in trainers)
            time.sleep(1)
        for trainer in trainers:
            trainer.stop()
        for trainer in trainers:
            trainer.join(10)
        time.sleep(3)  # one more pass over the last epochs
        lifetime.ended_by = "SIGTERM (end)"
        lifetimes.append(lifetime)
        assert daemon.stop() == 0, daemon.text()
        stream.drain()
        epochs = sum(max(c.view.present.values(), default=0) for c in checkers)
        for checker in checkers:
            problems += checker.violations
            # at rest: what the protection model requires is there
            present = {p.name for p in checker.work_dir.iterdir() if CHECKPOINT.fullmatch(p.name)}
            guarded = protected(
                checker.view, checker.metric, checker.rule, checker.published.values()
            )
            problems += [
                f"{checker.work_dir.name}: {n} missing" for n in guarded if n not in present
            ]
        deleted = sum(len(c.deleted) for c in checkers)
        events = sum(c.events for c in checkers)
    for work_dir in work_dirs:
        problems += [f"left behind: {p}" for p in temp_files(work_dir)]
        problems += artifact_problems(work_dir / "best")
    verdicts = [lt.verdict() for lt in lifetimes]
    for _text, found in verdicts:
        problems += found
    report(
        capsys,
        "soak",
        seconds=round(time.monotonic() - started),
        trainers=TRAINERS,
        epochs_written=epochs,
        deletions_checked=deleted,
        events_judged=events,
        artifact_checks=checks * TRAINERS,
        daemon_restarts=len(lifetimes) - 1,
        lifetimes="; ".join(text for text, _ in verdicts),
        lost="nothing" if not problems else "SEE FAILURES",
    )
    assert not problems, "\n".join(problems)
