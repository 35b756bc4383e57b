"""One inotify reader and one polling thread, however many folders; watches follow the set."""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, WatchDescriptor

from ckptd.service.watch import Change, Watcher


def folders(root: Path, n: int) -> dict[Path, Path]:
    """``n`` work_dirs, each with a metric folder: folder -> work_dir."""
    wanted = {}
    for i in range(n):
        work_dir = root / f"run-{i:03d}"
        (work_dir / "vis_data").mkdir(parents=True)
        wanted[work_dir] = work_dir
        wanted[work_dir / "vis_data"] = work_dir
    return wanted


def wait_for(seen: list[Change], want: Callable[[Change], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(want(c) for c in list(seen)):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_threads_do_not_grow_with_work_dirs(tmp_path: Path, mode: str) -> None:
    before = threading.active_count()
    seen: list[Change] = []
    watcher = Watcher(mode, 0.2, seen.append)
    watcher.start()
    try:
        watcher.sync(folders(tmp_path / "few", 2))
        with_few = threading.active_count()
        many = folders(tmp_path / "many", 150)
        watcher.sync(many)
        assert len(watcher.watched) == 300
        assert set(watcher.watched.values()) == {mode}
        assert threading.active_count() == with_few == before + 1
        # and every one of the 300 folders is really watched, by that one thread
        last = tmp_path / "many" / "run-149" / "vis_data" / "scalars.json"
        time.sleep(0.3)  # the polling snapshot is taken at sync: a later write must differ
        last.write_text("{}\n")
        assert wait_for(seen, lambda c: c.path == last and c.root == last.parent.parent)
    finally:
        watcher.stop()
    assert threading.active_count() == before


def test_watches_follow_work_dirs_appearing_and_disappearing(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("inotify", 0.2, seen.append)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    try:
        watcher.sync({a: a})
        b.mkdir()
        watcher.sync({a: a, b: b})  # b appeared
        (b / "epoch_1.pth").write_bytes(b"x")
        assert wait_for(seen, lambda c: c.root == b and c.closed_after_write)
        watcher.sync({b: b})  # a no longer matched: its events stop
        seen.clear()
        (a / "epoch_1.pth").write_bytes(b"x")
        (b / "epoch_2.pth").write_bytes(b"x")
        assert wait_for(seen, lambda c: c.path.name == "epoch_2.pth")
        assert not any(c.root == a for c in seen)
        assert set(watcher.watched) == {b}
    finally:
        watcher.stop()


def test_a_deleted_folder_is_watched_again_when_it_comes_back(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("inotify", 0.2, seen.append)
    work_dir = tmp_path / "run"
    metrics = work_dir / "vis_data"
    metrics.mkdir(parents=True)
    wanted = {work_dir: work_dir, metrics: work_dir}
    try:
        watcher.sync(wanted)
        metrics.rmdir()
        assert wait_for(seen, lambda c: c.path == metrics)
        deadline = time.monotonic() + 5
        while metrics in watcher.watched and time.monotonic() < deadline:
            time.sleep(0.02)
        assert set(watcher.watched) == {work_dir}  # the kernel dropped the watch (IN_IGNORED)
        metrics.mkdir()
        watcher.sync(wanted)
        assert set(watcher.watched) == {work_dir, metrics}
        seen.clear()
        (metrics / "scalars.json").write_text("{}\n")
        assert wait_for(seen, lambda c: c.path == metrics / "scalars.json")
    finally:
        watcher.stop()


def test_queue_overflow_makes_every_watched_root_due(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("inotify", 0.2, seen.append)
    wanted = folders(tmp_path, 5)
    discovery = tmp_path
    wanted[discovery] = discovery
    try:
        watcher.sync(wanted)
        reader = watcher._inotify._reader()
        # what InotifyFD's thread does with the kernel's IN_Q_OVERFLOW (wd -1): its own path
        reader.handle_event(
            InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
        )
        assert {c.root for c in seen} == set(wanted.values())
    finally:
        watcher.stop()


def test_polling_sees_a_folder_go_and_come_back(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("poll", 0.1, seen.append)
    folder = tmp_path / "run"
    folder.mkdir()
    try:
        watcher.sync({folder: folder})
        folder.rmdir()
        assert wait_for(seen, lambda c: c.path == folder)
        folder.mkdir()
        (folder / "epoch_3.pth").write_bytes(b"x")
        assert wait_for(seen, lambda c: c.path == folder / "epoch_3.pth")
    finally:
        watcher.stop()


def test_periodic_rediscovery_costs_at_most_its_share_of_a_core() -> None:
    from ckptd.core.timings import Timings

    timings = Timings(rediscover_every=10.0, rediscover_cpu_share=0.0025)
    assert timings.rediscover_interval(0.002) == 10.0  # a few work_dirs: every 10 s
    interval = timings.rediscover_interval(0.2)  # ~2,000 work_dirs
    assert interval == pytest.approx(80.0)
    assert 0.2 / interval <= 0.0025


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_failing_inotify_add_watch_falls_back_to_polling_that_folder(
    tmp_path: Path, code: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Any failure of inotify_add_watch but a vanished folder polls that folder and warns; an
    EIO once escaped the daemon's loop and stopped it."""
    from watchdog.observers import inotify_c

    broken = tmp_path / "run-broken"
    broken.mkdir()
    real = inotify_c.inotify_add_watch

    def add_watch(fd: int, path: bytes, mask: int) -> int:
        if path == bytes(broken):
            ctypes.set_errno(code)
            return -1
        return real(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", add_watch)
    seen: list[Change] = []
    watcher = Watcher("inotify", 0.2, seen.append)
    watcher.start()
    try:
        wanted = {**folders(tmp_path, 1), broken: broken}
        watcher.sync(wanted)
        assert watcher.watched[broken] == "poll"
        assert broken in watcher.fell_back
        assert {v for k, v in watcher.watched.items() if k != broken} == {"inotify"}
        assert any(
            "inotify_add_watch" in r.getMessage() or "watch" in r.getMessage()
            for r in caplog.records
        )
        time.sleep(0.3)
        (broken / "epoch_1.pth").write_bytes(b"x")
        assert wait_for(seen, lambda c: c.root == broken)
    finally:
        watcher.stop()


def test_the_periodic_resync_costs_at_most_its_share_of_a_core(tmp_path: Path) -> None:
    """The resync is spaced out by what its passes cost: each work_dir's last quiet pass (one
    that wrote and deleted nothing), measured in the thread that ran it."""
    import threading
    import time

    from ckptd.core.config import load_config
    from ckptd.core.timings import Timings
    from ckptd.service.daemon import Daemon
    from tests.helpers import simulate, write_config

    timings = Timings(resync_cpu_share=0.005)
    assert timings.resync_interval(300.0, 0.1) == 300.0  # a few work_dirs: as configured
    assert timings.resync_interval(300.0, 5.0) == pytest.approx(1000.0)  # ~1,200 work_dirs
    # never rarer than every 20 min: the stale-work_dir alert fires after 30 min without a pass
    assert timings.resync_interval(300.0, 8.0) == 1200.0

    for name in ("a", "b"):
        simulate(tmp_path / "work_dirs" / name, epochs=3)
    write_config(tmp_path, retention={"keep_last": 3})
    share = 1e-4  # so small that two quiet passes space the resync beyond the configured 300 s
    daemon = Daemon(load_config(tmp_path / "ckptd.yaml"), timings=Timings(resync_cpu_share=share))
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not daemon.health.first_pass_done:
            time.sleep(0.05)
        assert daemon.health.first_pass_done
        while time.monotonic() < deadline and not all(
            s.quiet_pass_cpu > 0 for s in daemon.slots.values()
        ):
            time.sleep(0.05)  # the first pass slims: the quiet pass is the one after it
            daemon._resync()
        costs = [s.quiet_pass_cpu for s in daemon.slots.values()]
        assert len(costs) == 2 and all(c > 0 for c in costs)
        before = time.monotonic()
        daemon._resync()
        spacing = daemon._resync_at - before
        expected = max(300.0, min(sum(costs) / share, 1200.0))
        assert spacing == pytest.approx(expected, rel=0.05)
        assert spacing > 300.0
    finally:
        daemon.request_stop()
        runner.join(30)
