"""Two ``ckptd run`` on one work_dir (e.g. two hosts on shared storage): exactly one acts.

Proof, while a simulated trainer writes: the flock on ``.ckptd/lock`` belongs to the first
daemon (``/proc/locks``) and its holder file names it; the second logs that the work_dir is
locked by that pid and performs no slim and no delete while the first runs; every deletion the
kernel saw was logged by exactly one daemon, never both. Stopping the first lets the second take
over: at the trainer's next write, or (with nothing written) within its retry interval.
The second daemon may see the work_dir under another path (a bind mount in a private mount
namespace, as a second host sees an NFS export): flock arbitrates on the file itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.timings import TIMINGS
from tests.daemon_proc import DaemonProcess, actions
from tests.faults.figures import report
from tests.faults.invariants import Stream, StreamChecker, artifact_problems, temp_files
from tests.faults.mountns import MountNamespace, NamespacedDaemon
from tests.faults.trainer import Replayer, record, replay_now
from tests.helpers import write_config

WATCH = {"mode": "inotify", "settle": "0.3s", "resync_interval": "5m"}


def flock_holder(path: Path) -> int | None:
    """The pid holding a flock on ``path``, from /proc/locks."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
                return int(fields[4])
    return None


def _acted(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return actions(daemon.records(), "slim") + actions(daemon.records(), "delete")


@contextlib.contextmanager
def _second(how: str, root: Path, config: Path) -> Any:
    """The second daemon: same path, or the work_dirs bind-mounted at another path."""
    if how == "same path":
        with DaemonProcess(config, log=root / "b.log") as daemon:
            yield daemon, root / "work_dirs"
        return
    mount = root / "elsewhere"
    mount.mkdir()
    with MountNamespace() as ns:
        ns.run(["mount", "--bind", str(root / "work_dirs"), str(mount)])
        other = root / "b.yaml"
        other.write_text(config.read_text().replace("./work_dirs/*", f"{mount}/*"))
        with NamespacedDaemon(ns, other, log=root / "b.log") as daemon:
            yield daemon, mount


@pytest.mark.parametrize("how", ["same path", "bind mount elsewhere"])
def test_one_daemon_acts_and_the_other_takes_over(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = record()
    work_dir = tmp_path / "work_dirs" / "run"
    marks = tmp_path / "marks"
    work_dir.mkdir(parents=True)
    marks.mkdir()
    config = write_config(tmp_path, watch=WATCH)
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(Stream())
        checker = stream.add(
            StreamChecker(work_dir, recording.ops, metric=recording.metric, marks=marks)
        )
        a = stack.enter_context(DaemonProcess(config, log=tmp_path / "a.log"))
        a.wait_ready()
        replayer = Replayer(recording, work_dir, epoch_seconds=1.0, marks=marks)
        replayer.start()
        a.wait_for(lambda r: r.get("action") == "slim", 60)  # A holds the lock: it acts
        with _second(how, tmp_path, config) as (b, seen_as):
            b.wait_for(lambda r: f"locked by another ckptd (pid {a.pid} on" in r.get("message", ""))
            skip = next(r for r in b.records() if "locked by another" in r.get("message", ""))
            assert str(seen_as) in skip["work_dir"]
            a.wait_for(lambda r: r.get("action") == "delete", 60)  # A goes on acting
            assert flock_holder(work_dir / ".ckptd" / "lock") == a.pid
            assert f'"pid": {a.pid}' in (work_dir / ".ckptd" / "lock").read_text()
            assert not _acted(b), "the second daemon acted while the first held the lock"
            before_stop = {d["checkpoint"] for d in actions(a.records(), "delete")}
            assert not replayer.finished, "the machine is too slow for this test's pace"
            assert a.stop() == 0
            stopped = time.monotonic()
            b.wait_for(lambda r: r.get("action") in ("slim", "delete"), TIMINGS.busy_retry + 10)
            takeover = time.monotonic() - stopped
            assert flock_holder(work_dir / ".ckptd" / "lock") == b.pid
            replayer.join(60)
            deadline = time.monotonic() + 20
            while sorted(p.name for p in work_dir.glob("epoch_*.pth")) != [
                "epoch_7.pth",
                "epoch_8.pth",
            ]:
                assert time.monotonic() < deadline, "the second daemon did not finish the job"
                time.sleep(0.1)
            stream.drain()
        by_a = {d["checkpoint"] for d in actions(a.records(), "delete")}
        by_b = {d["checkpoint"] for d in actions(b.records(), "delete")}
        assert by_a == before_stop, "the first daemon acted after it was stopped"
        assert not by_a & by_b, f"both deleted {by_a & by_b}"
        assert sorted(by_a | by_b) == sorted(checker.deleted), (by_a, by_b, checker.deleted)
        assert not checker.violations, checker.violations
    assert not temp_files(work_dir)
    assert not artifact_problems(work_dir / "best")
    report(
        capsys,
        f"two daemons, one work_dir ({how})",
        deletions_by_first=len(by_a),
        deletions_by_second=len(by_b),
        by_both=0,
        takeover_s=round(takeover, 1),
    )


@pytest.mark.slow
def test_takeover_without_any_event_within_the_retry_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing changes in the work_dir after the first daemon stops: the second retries on
    its own, within Timings.busy_retry."""
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    replay_now(record(), work_dir, upto_epoch=2)
    config = write_config(tmp_path, watch=WATCH)
    with DaemonProcess(config, log=tmp_path / "a.log") as a:
        a.wait_ready()  # A holds the lock before B starts, so B is the one that waits
        with DaemonProcess(config, log=tmp_path / "b.log") as b:
            b.wait_for(lambda r: f"locked by another ckptd (pid {a.pid} on" in r.get("message", ""))
            a.send(signal.SIGSTOP)  # A holds the lock, and stays out of the way...
            replay_now(record(), work_dir, upto_epoch=4)  # ...while there is work to do
            time.sleep(1)  # B sees the events, finds the lock taken, waits busy_retry
            assert not _acted(b)
            a.stop(signal.SIGKILL)  # a crash: the kernel drops the flock; no event in work_dir
            stopped = time.monotonic()
            b.wait_for(lambda r: r.get("action") == "delete", TIMINGS.busy_retry + 10)
            takeover = time.monotonic() - stopped
    assert takeover <= TIMINGS.busy_retry + 2
    assert sorted(p.name for p in work_dir.glob("epoch_*.pth")) == ["epoch_3.pth", "epoch_4.pth"]
    report(capsys, "quiet takeover after kill -9", takeover_s=round(takeover, 1))


def test_second_daemon_becomes_ready_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    replay_now(record(), work_dir, upto_epoch=2)
    config = write_config(tmp_path, watch=WATCH)
    with DaemonProcess(config, log=tmp_path / "a.log") as a:
        a.wait_ready()  # A holds the lock before B starts, so B is the one that waits
        with DaemonProcess(config, log=tmp_path / "b.log") as b:
            b.wait_for(lambda r: "locked by another ckptd" in r.get("message", ""))
            b.wait_ready(timeout=10)
