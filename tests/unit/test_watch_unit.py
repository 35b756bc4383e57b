"""Choosing inotify or polling per folder from /proc/mounts, and the watch-limit fallback."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from ckptd.service.watch import Change, Watcher, fstype_of, needs_polling, read_mounts

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
server:/export /mnt/nfs nfs4 rw,vers=4.2 0 0
//nas/share /mnt/smb cifs rw 0 0
s3fs /mnt/bucket fuse.s3fs rw 0 0
lustre@tcp:/fs /lustre lustre rw 0 0
/dev/gpfs0 /gpfs gpfs rw 0 0
tmpfs /mnt/with\\040space tmpfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "fstype", "poll"),
    [
        ("/data/work_dirs", "ext4", False),
        ("/mnt/nfs/runs/a", "nfs4", True),
        ("/mnt/nfsish", "ext4", False),
        ("/mnt/smb/x", "cifs", True),
        ("/mnt/bucket/y", "fuse.s3fs", True),
        ("/lustre/proj", "lustre", True),
        ("/gpfs/z", "gpfs", True),
        ("/mnt/with space/run", "tmpfs", False),
    ],
)
def test_fstype_and_polling_choice(path: str, fstype: str, poll: bool) -> None:
    mounts = read_mounts(MOUNTS)
    assert fstype_of(Path(path), mounts) == fstype
    assert needs_polling(fstype) is poll


def test_real_proc_mounts_is_readable() -> None:
    mounts = read_mounts()
    assert any(point == "/" for point, _ in mounts)


def test_inotify_sees_a_new_file_and_close_after_write(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("inotify", 0.5, seen.append)
    watcher.start()
    try:
        watcher.sync({tmp_path: tmp_path})
        assert watcher.watched == {tmp_path: "inotify"}
        (tmp_path / "epoch_1.pth").write_bytes(b"x" * 10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(c.closed_after_write for c in seen):
            time.sleep(0.05)
        assert any(c.closed_after_write and c.path.name == "epoch_1.pth" for c in seen)
        assert all(c.root == tmp_path for c in seen)
    finally:
        watcher.stop()


def test_polling_observer_sees_changes(tmp_path: Path) -> None:
    seen: list[Change] = []
    watcher = Watcher("poll", 0.2, seen.append)
    watcher.start()
    try:
        watcher.sync({tmp_path: tmp_path})
        assert watcher.watched == {tmp_path: "poll"}
        time.sleep(0.5)
        (tmp_path / "epoch_1.pth").write_bytes(b"x")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            time.sleep(0.05)
        assert any(c.path.name == "epoch_1.pth" for c in seen)
    finally:
        watcher.stop()


def test_watch_limit_falls_back_to_polling_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = Watcher("inotify", 0.5, lambda change: None)
    watcher.start()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher._inotify, "add", full)
    try:
        with caplog.at_level("WARNING", logger="ckptd.watch"):
            watcher.sync({tmp_path: tmp_path})
        assert watcher.watched == {tmp_path: "poll"}
        assert "fs.inotify.max_user_watches" in caplog.text
    finally:
        watcher.stop()


def test_sync_removes_watches_no_longer_wanted(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    watcher = Watcher("inotify", 0.5, lambda change: None)
    watcher.start()
    try:
        watcher.sync({a: a, b: b})
        assert set(watcher.watched) == {a, b}
        watcher.sync({b: b})
        assert set(watcher.watched) == {b}
        watcher.sync({b: b, tmp_path / "missing": tmp_path})
        assert set(watcher.watched) == {b}
    finally:
        watcher.stop()
