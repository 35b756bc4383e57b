"""Crash anywhere: ``ckptd run`` is killed with SIGKILL at chosen and random moments while a
simulated MMEngine trainer writes epochs, then restarted (invariants 1, 3 and 5).

Kill times are biased into the windows that matter: the reader of one inotify queue sees ckptd
create its artifact temp file, publish the manifest, delete a checkpoint or create its state
temp file, and stops ckptd (SIGSTOP) within microseconds. While it is stopped the test records
which window it is really in (judged from everything ckptd did since its last state save) and
checks invariant 3 on disk, then kills it (SIGKILL) - so what a SIGKILL at that instant leaves
is exactly what is checked. A quarter of the kills land at uniformly random times instead.

Throughout, ``StreamChecker`` judges every deletion against the trainer's exact state
(invariant 1). Each run ends in the same state as an uninterrupted run: kept checkpoints,
artifact files and their sha256, manifest (invariant 5); and no temp file is left.

``CKPTD_CRASH_RUNS`` (default 50) and ``CKPTD_CRASH_LANES`` (runs in parallel, default 3) scale
it; ``CKPTD_CRASH_SEED`` replays a given seed.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckptd.fs.durable import TEMP_PREFIX
from tests.daemon_proc import DaemonProcess
from tests.faults import inotify
from tests.faults.figures import env_number, report
from tests.faults.invariants import (
    MANIFEST,
    WINDOWS,
    Stream,
    StreamChecker,
    artifact_problems,
    end_state,
    temp_files,
    thread_states,
)
from tests.faults.trainer import CHECKPOINT, Recording, Replayer, record
from tests.helpers import write_config

SCENARIOS: dict[str, dict[str, Any]] = {
    "keep_last 2": {"retention": {"keep_last": 2, "pending_eval_grace": "1h"}},
    "keep_last 1, hash_in_name": {
        "retention": {"keep_last": 1, "pending_eval_grace": "1h"},
        "artifact": {"hash_in_name": True},
    },
}
WATCH = {"mode": "inotify", "settle": "0.3s", "resync_interval": "5m"}
TRIGGERS = ("during slim", "between slim and delete", "during deletes", "during state save")


def _is_trigger(kind: str, checker: StreamChecker, event: inotify.Event) -> bool:
    name = event.name
    if kind == "during slim":
        return (
            event.folder == checker.artifact_dir
            and event.is_(inotify.IN_CREATE)
            and name.startswith(TEMP_PREFIX)
            and not name.endswith(MANIFEST)
        )
    if kind == "between slim and delete":
        return event.folder == checker.artifact_dir and event.is_(inotify.IN_MOVED_TO)
    if kind == "during deletes":
        return (
            event.folder == checker.work_dir
            and event.is_(inotify.IN_DELETE)
            and bool(CHECKPOINT.fullmatch(name))
        )
    return (
        event.folder == checker.state_dir
        and event.is_(inotify.IN_CREATE)
        and name.startswith(TEMP_PREFIX)
    )


class Killer:
    """Stops ckptd (SIGSTOP) from the inotify reader thread on the n-th matching event."""

    def __init__(
        self, is_trigger: Callable[[str, StreamChecker, inotify.Event], bool] = _is_trigger
    ) -> None:
        self.is_trigger = is_trigger
        self.pid = 0
        self.kind = ""
        self.skip = 0
        self.fired = threading.Event()

    def arm(self, pid: int, kind: str, skip: int) -> None:
        self.pid, self.kind, self.skip = pid, kind, skip
        self.fired.clear()

    def hook(self, checker: StreamChecker, event: inotify.Event) -> None:
        if not self.kind or not self.is_trigger(self.kind, checker, event):
            return
        if self.skip > 0:
            self.skip -= 1
            return
        self.kind = ""
        os.kill(self.pid, signal.SIGSTOP)
        self.fired.set()

    def disarm(self) -> None:
        self.kind = ""


@dataclass
class RunResult:
    scenario: str
    seed: int
    windows: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)
    deleted: int = 0
    ambiguous: int = 0
    seconds: float = 0.0


def _wait_stopped(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s in ("T", "t") for s in thread_states(pid)):
            return
        time.sleep(0.0005)
    raise AssertionError(f"ckptd (pid {pid}) did not stop: {thread_states(pid)}")


def _settle(check: Any, timeout: float, quiet: float = 1.0) -> Any:
    """Poll ``check()`` until its value stops changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = check(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = check()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def crash_run(
    root: Path,
    recording: Recording,
    scenario: str,
    seed: int,
    kills: int,
    expected: dict[str, Any] | None,
) -> RunResult:
    """One training with ``kills`` SIGKILLs of ckptd; its result (end state, windows, problems)."""
    started = time.monotonic()
    rng = random.Random(seed)
    result = RunResult(scenario, seed)
    work_dir = root / "work_dirs" / "run"
    marks = root / "marks"
    for folder in (work_dir, marks):
        folder.mkdir(parents=True)
    config = write_config(root, watch=WATCH, **SCENARIOS[scenario])
    logs = iter(root / f"ckptd-{i}.log" for i in range(1000))
    killer = Killer()
    with Stream() as stream:
        checker = stream.add(
            StreamChecker(work_dir, recording.ops, metric=recording.metric, marks=marks)
        )
        stream.hooks.append(killer.hook)
        daemon = DaemonProcess(config, log=next(logs)).start()
        daemon.wait_ready()
        epoch_seconds = rng.uniform(0.05, 0.2)
        replayer = Replayer(recording, work_dir, epoch_seconds=epoch_seconds, marks=marks)
        replayer.start()
        span = recording.epochs * epoch_seconds
        for k in range(kills):
            # a restarted ckptd catches up before it says "ready": aim from its first instant
            random_time = rng.random() < 0.25
            kind = "random" if random_time else TRIGGERS[(seed + k) % len(TRIGGERS)]
            if random_time:
                time.sleep(rng.uniform(0, span / kills))
                os.kill(daemon.pid, signal.SIGSTOP)
            else:
                killer.arm(daemon.pid, kind, rng.randrange(2) if k == 0 else 0)
                budget = time.monotonic() + 1.0 + span
                finished_at = None
                while not killer.fired.wait(0.02):
                    if replayer.finished and finished_at is None:
                        finished_at = time.monotonic()
                    if time.monotonic() > budget or (
                        finished_at and time.monotonic() > finished_at + 0.5
                    ):
                        break
                killer.disarm()
                if not killer.fired.is_set():
                    kind = "random (trigger not reached)"
                    os.kill(daemon.pid, signal.SIGSTOP)
            _wait_stopped(daemon.pid)
            stream.drain()
            with stream.lock:
                result.windows.append(checker.window())
            result.triggers.append(kind)
            result.problems += [f"at a kill: {p}" for p in artifact_problems(checker.artifact_dir)]
            daemon.stop(signal.SIGKILL)
            time.sleep(rng.uniform(0, 0.2))
            daemon = DaemonProcess(config, log=next(logs)).start()
        daemon.wait_ready()
        replayer.join(timeout=60)
        assert replayer.error is None and replayer.finished

        def state() -> dict[str, Any]:
            return end_state(work_dir, checker.artifact_dir)

        if expected is None:
            _settle(state, 30, quiet=1.5)
        else:
            deadline = time.monotonic() + 20
            while state() != expected and time.monotonic() < deadline:
                time.sleep(0.1)
        assert daemon.stop() == 0, daemon.text()
        stream.drain()
        result.end = state()
        result.problems += checker.violations
        result.deleted = len(checker.deleted)
        result.ambiguous = checker.ambiguous
    result.problems += [f"left behind: {p}" for p in temp_files(work_dir)]
    result.problems += artifact_problems(checker.artifact_dir)
    if expected is not None and result.end != expected:
        result.problems.append(f"end state {result.end} != uninterrupted {expected}")
    result.seconds = time.monotonic() - started
    return result


_references: dict[str, dict[str, Any]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, scenario: str) -> dict[str, Any]:
    """The end state of an uninterrupted run of the same recording (computed once)."""
    if scenario not in _references:
        root = tmp_path_factory.mktemp("uninterrupted")
        run = crash_run(root, record(), scenario, seed=0, kills=0, expected=None)
        assert not run.problems, run.problems
        end = run.end
        newest = ["epoch_7.pth", "epoch_8.pth"] if "2" in scenario else ["epoch_8.pth"]
        assert end["kept"] == newest, end
        pth = [n for n in end["artifacts"] if n.endswith(".pth")]
        assert len(pth) == 1 and pth[0].startswith("best_coco_bbox_mAP_epoch_6"), end
        assert end["manifest"]["coco/bbox_mAP"]["index"] == 6
        _references[scenario] = end
    return _references[scenario]


@pytest.mark.slow
def test_kill_9_anywhere_ends_like_an_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = int(env_number("CKPTD_CRASH_RUNS", 50))
    lanes = int(env_number("CKPTD_CRASH_LANES", 5))
    base_seed = int(env_number("CKPTD_CRASH_SEED", 1))
    started = time.monotonic()
    recording = record()
    expected = {s: reference(tmp_path_factory, s) for s in SCENARIOS}
    names = list(SCENARIOS)

    def one(i: int) -> RunResult:
        scenario = names[i % len(names)]
        root = tmp_path_factory.mktemp(f"crash{i}")
        return crash_run(root, recording, scenario, base_seed + i, 3, expected[scenario])

    with ThreadPoolExecutor(lanes) as pool:
        results = list(pool.map(one, range(runs)))
    windows = collections.Counter(w for r in results for w in r.windows)
    triggers = collections.Counter(t for r in results for t in r.triggers)
    failed = [r for r in results if r.problems]
    kills = sum(len(r.windows) for r in results)
    report(
        capsys,
        "crash anywhere (SIGKILL + restart)",
        runs=runs,
        kills=kills,
        landed=dict(windows),
        aimed=dict(triggers),
        ckptd_deletions_checked=sum(r.deleted for r in results),
        ambiguous=sum(r.ambiguous for r in results),
        failed_runs=len(failed),
        seconds=round(time.monotonic() - started, 1),
        lost="nothing" if not failed else "SEE FAILURES",
    )
    assert not failed, "\n".join(
        f"run seed={r.seed} ({r.scenario}), kills in {r.windows}:\n  " + "\n  ".join(r.problems)
        for r in failed
    )
    # the kills must really have exercised the windows they were aimed at
    for window in WINDOWS[:4]:
        assert windows[window] >= max(1, runs // 25), (window, dict(windows))


# --- the same windows, hit exactly, in-process ----------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: reconcile catches Exception subclasses, never this."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import ckptd.engine.artifacts
    import ckptd.engine.reconcile

    def die(*args: Any, **kwargs: Any) -> None:
        raise Killed(where)

    if where == "manifest":  # the artifact is renamed into place, the manifest not yet
        monkeypatch.setattr(ckptd.engine.artifacts, "write_manifest", die)
    else:  # the artifact and manifest are published, the pass's state is not saved
        monkeypatch.setattr(ckptd.engine.reconcile, "save_state", die)


@pytest.mark.parametrize("hash_in_name", [False, True], ids=["plain", "hash_in_name"])
@pytest.mark.parametrize("where", ["manifest", "state"])
def test_a_crash_after_publishing_leaves_no_orphan_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, hash_in_name: bool
) -> None:
    """Killed after a new best's artifact is in place, restarted only after a later best:
    the first artifact must still be removed, as an uninterrupted run removes it."""
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover
    from tests.faults.trainer import replay_now

    recording = record()
    ends = {}
    for name in ("uninterrupted", "crashed"):
        root = tmp_path / name
        work_dir = root / "work_dirs" / "run"
        work_dir.mkdir(parents=True)
        config = write_config(
            root, retention={"keep_last": 2}, artifact={"hash_in_name": hash_in_name}
        )

        def one_pass(config: Path = config) -> None:
            (target,) = discover(load_config(config)).targets
            reconcile(target, PassOptions(settle=0))

        replay_now(recording, work_dir, upto_epoch=4)  # best so far: epoch 4
        with monkeypatch.context() as patch:
            if name == "crashed":
                _crash_at(patch, where)
                with pytest.raises(Killed):
                    one_pass()
            else:
                one_pass()
        # the trainer goes on to a new best (epoch 6) before ckptd runs again
        replay_now(recording, work_dir)
        one_pass()
        ends[name] = end_state(work_dir, work_dir / "best")
        assert not temp_files(work_dir)
    assert ends["crashed"] == ends["uninterrupted"]


def test_an_orphan_artifact_stays_until_a_newer_best_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the artifact's rename and the manifest; restarted while the new best's
    checkpoint is still being written (deferred): the orphan is the only complete artifact
    there is, so it must stay until the new one is published (invariant 3)."""
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover
    from tests.faults.trainer import replay_now

    recording = record()
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    config = write_config(tmp_path, retention={"keep_last": 2}, watch={"settle": "1h"})
    (target,) = discover(load_config(config)).targets
    replay_now(recording, work_dir, upto_epoch=2)
    old = time.time() - 7200  # settled long ago
    for path in work_dir.glob("epoch_*.pth"):
        os.utime(path, (old, old))
    with monkeypatch.context() as patch:
        _crash_at(patch, "manifest")
        with pytest.raises(Killed):
            reconcile(target, PassOptions(settle=3600))
    orphan = work_dir / "best" / "best_coco_bbox_mAP_epoch_2.pth"
    assert orphan.exists()
    replay_now(recording, work_dir)  # epochs 3-8 land now: best epoch 6, not settled
    report = reconcile(target, PassOptions(settle=3600))
    assert [a.status for a in report.artifacts] == ["deferred"]
    assert orphan.exists(), "the only complete artifact was removed before its replacement"
    for path in work_dir.glob("epoch_*.pth"):
        os.utime(path, (old, old))
    report = reconcile(target, PassOptions(settle=3600))
    assert [a.status for a in report.artifacts] == ["written"]
    assert sorted(p.name for p in (work_dir / "best").iterdir()) == [
        "best_coco_bbox_mAP_epoch_6.pth",
        "manifest.json",
    ]


def test_sigterm_with_queued_passes_logs_no_error(tmp_path: Path) -> None:
    from tests.faults.trainer import replay_now

    for i in range(8):
        work_dir = tmp_path / "work_dirs" / f"run{i}"
        work_dir.mkdir(parents=True)
        replay_now(record(), work_dir, upto_epoch=4)  # each one has a slim to do
    daemon = DaemonProcess(write_config(tmp_path), "--workers", "1").start()
    daemon.wait_for(lambda r: r.get("action") == "slim-start", 60)  # 7 passes are queued
    assert daemon.stop(signal.SIGTERM) == 0
    errors = [r for r in daemon.records() if r.get("level") == "error"]
    assert not errors, errors[0]
