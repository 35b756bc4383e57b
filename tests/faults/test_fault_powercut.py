"""Power loss anywhere: the simulated MMEngine trainer and ``ckptd run`` work on a filesystem
that keeps only what was made durable (``tests.faults.powerfs``); the power is cut at chosen and
random moments, the machine "reboots" (a fresh mount of what survived), ckptd restarts, and the
trainer goes on with what it had left to do.

Cuts are aimed the way the kill test aims its SIGKILLs (``test_fault_crash.Killer``: the
inotify reader stops ckptd within microseconds of an event), at every window: during a slim,
between the artifact and the manifest, between the manifest and the deletions, during
deletions, during a state save, during a publish record update; a quarter land at random times.
While ckptd is stopped the filesystem is cut (the trainer may still be mid-write: that is a
power cut too), then ckptd is killed. Both models of what survives are run, ``strict`` (only
what was fsynced) and ``reorder`` (plus any in-order prefix of each folder's and file's pending
work). ``tests.faults.powercut.judge_cut`` checks each rebooted disk; through every life a
``StreamChecker`` seeded with the surviving state judges each deletion as it happens.

The trainer never fsyncs (MMEngine does not: ``torch.save`` into an open file, flushed, closed),
so its own recent checkpoints are lost at a cut; those are counted as the trainer's losses.

``CKPTD_POWERCUT_RUNS`` (default 6 runs of ``CKPTD_POWERCUT_CUTS`` = 3 cuts each),
``CKPTD_POWERCUT_LANES`` (runs in parallel, default 2) and ``CKPTD_POWERCUT_SEED`` scale and
replay it; ``CKPTD_POWERCUT_PROGRESS=file`` appends each run's result to ``file`` as it ends.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import time
from collections.abc import Iterator
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
    ARTIFACT_INDEX,
    MANIFEST,
    Stream,
    StreamChecker,
    artifact_problems,
)
from tests.faults.powercut import judge_cut, surviving_view
from tests.faults.powerfs import MODELS
from tests.faults.powerfs_fuse import PowerMount, unavailable
from tests.faults.test_fault_crash import Killer, _is_trigger, _wait_stopped
from tests.faults.trainer import Recording, Replayer, record
from tests.helpers import write_config

WATCH = {"mode": "inotify", "settle": "0.3s", "resync_interval": "5m"}
TRIGGERS = (
    "during slim",
    "between slim and manifest",
    "between slim and delete",
    "during deletes",
    "during state save",
    "during publish record update",
)
SCENARIOS: dict[str, dict[str, Any]] = {
    "keep_last 1, published": {"retention": {"keep_last": 1, "pending_eval_grace": "1h"}},
    "keep_last 2, hash_in_name": {
        "retention": {"keep_last": 2, "pending_eval_grace": "1h"},
        "artifact": {"hash_in_name": True},
    },
}


def _is_power_trigger(kind: str, checker: StreamChecker, event: inotify.Event) -> bool:
    if kind == "between slim and manifest":
        return (
            event.folder == checker.artifact_dir
            and event.is_(inotify.IN_MOVED_TO)
            and event.name != MANIFEST
            and not event.name.startswith(TEMP_PREFIX)  # hash_in_name: the staged file
        )
    if kind == "during publish record update":
        return (
            event.folder == checker.state_dir
            and event.is_(inotify.IN_CREATE)
            and event.name.startswith(TEMP_PREFIX)
            and event.name.endswith("publish.json")
        )
    if kind == "between slim and delete":
        return (
            event.folder == checker.artifact_dir
            and event.is_(inotify.IN_MOVED_TO)
            and event.name == MANIFEST
        )
    return _is_trigger(kind, checker, event)


def _window(checker: StreamChecker) -> str:
    if any(name.endswith("publish.json") for name in checker.temps):
        return "during publish record update"
    window = checker.window()
    manifest_pending = "manifest" in checker.temps.values()  # being written, not yet in place
    if window == "between slim and delete" and (
        manifest_pending or checker.pass_events[-1:] == ["publish artifact"]
    ):
        return "between slim and manifest"
    return window


@dataclass
class RunResult:
    scenario: str
    model: str
    seed: int
    windows: list[str] = field(default_factory=list)
    aimed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trainer_lost: int = 0
    deleted: int = 0
    fsyncs: dict[str, int] = field(default_factory=dict)  # by whom: trainer / all


def _seeded_checker(work_dir: Path, recording: Recording, ops: Any, marks: Path) -> StreamChecker:
    """A checker whose trainer view starts from what survived the last cut."""
    checker = StreamChecker(work_dir, ops, metric=recording.metric, marks=marks)
    checker.view = surviving_view(work_dir, recording).view
    # every artifact file that survived is ckptd's (nothing else writes there), named by the
    # manifest or not (an orphan of a cut, claimed in state.json): ckptd may remove it, but
    # only once another complete one is there (an orphan can be the only copy of the best)
    if checker.artifact_dir.is_dir():
        for path in checker.artifact_dir.iterdir():
            match = ARTIFACT_INDEX.search(path.name)
            if match and not path.name.startswith(TEMP_PREFIX):
                checker.published[path.name] = int(match.group(1))
    checker.ever_published = bool(checker.published)
    return checker


def _recreate_folders(work_dir: Path, ops: Any) -> None:
    """A trainer that starts again makes its folders again (a cut may have taken them)."""
    for op in ops:
        if "/" in op.path:
            (work_dir / op.path).parent.mkdir(parents=True, exist_ok=True)


def powercut_run(
    root: Path, recording: Recording, scenario: str, model: str, seed: int, cuts: int
) -> RunResult:
    rng = random.Random(seed)
    result = RunResult(scenario, model, seed)
    marks, remote = root / "marks", root / "remote"
    marks.mkdir(parents=True)
    mount = PowerMount(root / "mnt", root / "scratch").mount()
    work_dir = mount.mountpoint / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    extra = dict(SCENARIOS[scenario])
    if "published" in scenario:
        extra["artifact"] = {"publish": {"url": f"file://{remote}/{{run}}/", "timeout": "20s"}}
    config = write_config(
        root, watch=WATCH, work_dirs=[str(mount.mountpoint / "work_dirs" / "*")], **extra
    )
    logs = iter(root / f"ckptd-{i}.log" for i in range(1000))
    done, had_artifact = 0, False
    try:
        for life in range(cuts + 1):
            ops = recording.ops[done:]
            _recreate_folders(work_dir, ops)
            mount.sync()  # what the last life left is on disk now
            killer = Killer(_is_power_trigger)
            with Stream() as stream:
                checker = stream.add(_seeded_checker(work_dir, recording, ops, marks))
                stream.hooks.append(killer.hook)
                daemon = DaemonProcess(config, log=next(logs)).start()
                epoch_seconds = rng.uniform(0.15, 0.4)
                replayer = Replayer(
                    recording, work_dir, epoch_seconds=epoch_seconds, marks=marks, ops=ops
                )
                if life == cuts:  # the last life runs to the end of the training
                    daemon.wait_ready()
                    replayer.start()
                    replayer.join(60)
                    time.sleep(1.5)
                    stream.drain()
                    # a publish attempt in hand may run to its timeout (20 s) on a loaded box
                    daemon.stop(timeout=60)
                    result.problems += checker.violations
                    result.problems += artifact_problems(checker.artifact_dir)
                    result.deleted += len(checker.deleted)
                    break
                triggers = TRIGGERS if "published" in scenario else TRIGGERS[:-1]
                kind = _aim_and_stop(
                    rng, killer, daemon, replayer, triggers[(seed + life) % len(triggers)]
                )
                counts, durable_unlinks = mount.cut(model, rng.randrange(1 << 30))  # type: ignore[arg-type]
                stream.drain()
                with stream.lock:
                    result.windows.append(_window(checker))
                    present = dict(checker.view.present)
                    # only what was durable when ckptd deleted it: the rest the cut took anyway
                    prefix = "/" + work_dir.relative_to(mount.mountpoint).as_posix() + "/"
                    deleted = [n for n in checker.deleted if prefix + n in durable_unlinks]
                result.aimed.append(kind)
                replayer.stop()
                daemon.stop(signal.SIGKILL)
                if replayer.ident is not None:  # started (a cut may come before that)
                    replayer.join(10)
                result.problems += [f"life {life}: {v}" for v in checker.violations]
                result.deleted += len(checker.deleted)
            done += replayer.done_ops
            for key, value in counts.items():
                result.fsyncs[key] = result.fsyncs.get(key, 0) + value
            mount.reboot()
            verdict = judge_cut(
                work_dir, recording, recording.metric, deleted, present, had_artifact,
                remote / "run",
            )  # fmt: skip
            result.problems += [f"cut {life} ({result.windows[-1]}): {p}" for p in verdict.problems]
            result.trainer_lost += len(verdict.trainer_lost)
            had_artifact = had_artifact or verdict.has_artifact
    finally:
        mount.unmount()
    return result


def _aim_and_stop(
    rng: random.Random, killer: Killer, daemon: DaemonProcess, replayer: Replayer, kind: str
) -> str:
    """Start the trainer once ckptd is ready and stop ckptd at an aimed window (from its first
    instant: a restarted ckptd's catch-up pass is a window too) or at a random time; returns
    the kind of cut it was."""
    span = sum(1 for op in replayer.ops if op.kind == "round") * replayer.epoch_seconds
    if rng.random() < 0.25:
        daemon.wait_ready()
        replayer.start()
        time.sleep(rng.uniform(0, span))
        os.kill(daemon.pid, signal.SIGSTOP)
        _wait_stopped(daemon.pid)
        return "random"
    killer.arm(daemon.pid, kind, rng.randrange(2))
    budget = time.monotonic() + 30
    finished_at = None
    while not killer.fired.wait(0.02):
        if not replayer.is_alive() and not replayer.finished and _ready(daemon):
            replayer.start()
            budget = time.monotonic() + 2.0 + span
        if replayer.finished and finished_at is None:
            finished_at = time.monotonic()
        if time.monotonic() > budget or (finished_at and time.monotonic() > finished_at + 0.5):
            break
    killer.disarm()
    if not killer.fired.is_set():
        kind = "random (trigger not reached)"
        os.kill(daemon.pid, signal.SIGSTOP)
    _wait_stopped(daemon.pid)
    return kind


def _ready(daemon: DaemonProcess) -> bool:
    return any(r.get("message", "").startswith("ready") for r in daemon.records())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_power_cut_anywhere_loses_nothing_ckptd_protects(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    runs = int(env_number("CKPTD_POWERCUT_RUNS", 6))
    lanes = int(env_number("CKPTD_POWERCUT_LANES", 2))
    cuts = int(env_number("CKPTD_POWERCUT_CUTS", 3))
    base_seed = int(env_number("CKPTD_POWERCUT_SEED", 1))
    started = time.monotonic()
    recording = record(param_count=2_000)
    names = list(SCENARIOS)

    roots = [tmp_path_factory.mktemp(f"powercut{i}") for i in range(runs)]  # not thread-safe

    def one(i: int) -> RunResult:
        scenario, model = names[(i // len(MODELS)) % len(names)], MODELS[i % len(MODELS)]
        try:
            result = powercut_run(roots[i], recording, scenario, model, base_seed + i, cuts)
        except Exception as exc:  # one broken run must not hide the others' results
            result = RunResult(scenario, model, base_seed + i, problems=[f"harness: {exc!r}"])
        progress = os.environ.get("CKPTD_POWERCUT_PROGRESS")  # a long run's results so far
        if progress:
            with open(progress, "a") as f:
                f.write(json.dumps(dataclasses.asdict(result)) + "\n")
        return result

    with ThreadPoolExecutor(lanes) as pool:
        results = list(pool.map(one, range(runs)))
    windows = collections.Counter(w for r in results for w in r.windows)
    failed = [r for r in results if r.problems]
    report(
        capsys,
        "power cut anywhere (unsynced writes dropped + reboot)",
        runs=runs,
        power_cuts=sum(len(r.windows) for r in results),
        models={m: sum(len(r.windows) for r in results if r.model == m) for m in MODELS},
        landed=dict(windows),
        aimed=dict(collections.Counter(a for r in results for a in r.aimed)),
        ckptd_deletions_checked=sum(r.deleted for r in results),
        trainer_lost_unsynced_checkpoints=sum(r.trainer_lost for r in results),
        fsyncs=_sum_counts(r.fsyncs for r in results),
        failed_runs=len(failed),
        seconds=round(time.monotonic() - started, 1),
        lost="nothing" if not failed else "SEE FAILURES",
    )
    assert not failed, "\n".join(
        f"run seed={r.seed} ({r.scenario}, {r.model}), cuts in {r.windows}:\n  "
        + "\n  ".join(r.problems)
        for r in failed
    )
    # the cuts must really have landed in the windows they were aimed at
    landed = set(windows) - {"other (reading, planning, idle)"}
    assert len(landed) >= min(3, runs), dict(windows)


def _sum_counts(counts: Any) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for c in counts:
        total.update({k: v for k, v in c.items() if k in ("fsync", "fsyncdir", "write")})
    return dict(total)


# --- one deletion, every cut the reordering model allows, in-process ----------------------


CUTS_PER_DELETION = 12


@contextlib.contextmanager
def mounted_run(root: Path) -> Iterator[tuple[PowerMount, Path, Recording, list[int]]]:
    """A power-cut mount with an empty work_dir, the replayed trainer's recording and the index
    of each of its rounds; skips where there is no FUSE (for the in-process cut tests)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    recording = record(param_count=2_000)
    rounds = [i for i, op in enumerate(recording.ops) if op.kind == "round"]
    with PowerMount(root / "mnt", root / "scratch") as mount:
        work_dir = mount.mountpoint / "work_dirs" / "run"
        work_dir.mkdir(parents=True)
        yield mount, work_dir, recording, rounds


@pytest.mark.parametrize("keep_last", [1])
def test_a_deletion_never_outlives_what_justified_it(tmp_path: Path, keep_last: int) -> None:
    """Old checkpoints, long on disk, are deleted because newer ones arrived (which the trainer
    never fsynced): every cut that keeps the deletion must keep the newer ones as well, and
    the pointer and the records the decision was read from."""
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover

    root = tmp_path
    problems = []
    with mounted_run(root) as (mount, work_dir, recording, rounds):
        config = write_config(
            root,
            work_dirs=[str(mount.mountpoint / "work_dirs" / "*")],
            retention={"keep_last": keep_last},
        )
        (target,) = discover(load_config(config)).targets
        Replayer(recording, work_dir, epoch_seconds=0, ops=recording.ops[: rounds[3]]).run()
        reconcile(target, PassOptions(settle=0))
        mount.sync()  # all of it long on disk
        Replayer(recording, work_dir, epoch_seconds=0, ops=recording.ops[rounds[3] :]).run()
        report = reconcile(target, PassOptions(settle=0))
        present = {p.name: 0 for p in work_dir.glob("epoch_*.pth")}
        ckptd_deleted = {d.decision.checkpoint.name for d in report.deletions if d.done}
        assert ckptd_deleted, report
        images, unlinked = mount.what_if("reorder", list(range(CUTS_PER_DELETION)))
        deleted = [n for n in ckptd_deleted if f"/work_dirs/run/{n}" in unlinked]
        for seed, image in enumerate(images):
            mount.reboot(image)
            verdict = judge_cut(work_dir, recording, recording.metric, deleted, present, True)
            problems += [f"seed {seed}: {p}" for p in verdict.problems]
    assert not problems, "\n".join(problems)


def test_an_artifact_folder_outside_the_work_dir_survives_the_deletions_it_allows(
    tmp_path: Path,
) -> None:
    """``artifact.dir`` outside the work_dir, created by the pass that slims the first best and
    then deletes that best's checkpoint (long on disk): no cut may keep the deletion and lose
    the new folder with the artifact in it."""
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover

    problems = []
    with mounted_run(tmp_path) as (mount, work_dir, recording, rounds):
        artifact_dir = mount.mountpoint / "models" / "test" / "run"
        config = write_config(
            tmp_path,
            work_dirs=[str(mount.mountpoint / "work_dirs" / "*")],
            retention={"keep_last": 1},
            artifact={"dir": str(mount.mountpoint / "models" / "{project}" / "{run}")},
        )
        (target,) = discover(load_config(config)).targets
        # epochs 1-7, best 6, all long on disk; no artifact folder yet
        Replayer(recording, work_dir, epoch_seconds=0, ops=recording.ops[: rounds[6]]).run()
        mount.sync()
        report = reconcile(target, PassOptions(settle=0))
        assert "epoch_6.pth" in {d.decision.checkpoint.name for d in report.deletions if d.done}
        images, unlinked = mount.what_if("reorder", list(range(CUTS_PER_DELETION)))
        deleted = [n for n in ("epoch_6.pth",) if f"/work_dirs/run/{n}" in unlinked]
        present = {"epoch_7.pth": 7}
        for seed, image in enumerate(images):
            mount.reboot(image)
            verdict = judge_cut(
                work_dir, recording, recording.metric, deleted, present, False,
                artifact_dir=artifact_dir,
            )  # fmt: skip
            problems += [f"seed {seed}: {p}" for p in verdict.problems]
    assert not problems, "\n".join(problems)
