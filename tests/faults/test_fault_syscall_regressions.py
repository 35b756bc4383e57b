"""The findings of the failing-system-call tests (``test_fault_syscalls.py``), each pinned at the
exact call, in-process and without libfiu."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tests.faults.invariants import read_manifest
from tests.faults.trainer import record, replay_now
from tests.helpers import write_config


def _fail(code: int) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def test_a_failed_lock_owner_write_lets_go_of_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.engine.state import WorkDirLock

    lock = WorkDirLock(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", _fail(errno.EIO))
        with pytest.raises(OSError) as raised:
            lock.acquire()
    assert raised.value.filename == str(lock.path)
    assert "cannot pwrite" in str(raised.value)
    again = WorkDirLock(tmp_path)  # same process: it must not find its own lock busy
    again.acquire()
    again.release()


def test_pread_full_reads_on_after_a_short_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.core.reads import pread_full

    path = tmp_path / "f"
    path.write_bytes(bytes(range(200)))
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real(fd, min(n, 7), off))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_full(fd, 150, 10) == bytes(range(10, 160))
        assert pread_full(fd, 100, 150) == bytes(range(150, 200))  # the end of the file
    finally:
        os.close(fd)


def test_a_failed_manifest_write_keeps_the_artifact_the_manifest_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptd.engine.artifacts
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover

    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    config = write_config(tmp_path, retention={"keep_last": 2})
    (target,) = discover(load_config(config)).targets
    recording = record()
    replay_now(recording, work_dir, upto_epoch=4)
    reconcile(target, PassOptions(settle=0))
    before = read_manifest(work_dir / "best")
    assert before is not None
    (old,) = [e["file"] for e in before["artifacts"].values()]
    replay_now(recording, work_dir)  # a new best: epoch 6
    with monkeypatch.context() as patch:
        patch.setattr(ckptd.engine.artifacts, "atomic_write_bytes", _fail(errno.EIO))
        report = reconcile(target, PassOptions(settle=0))
    assert report.errors and not [d for d in report.deletions if d.done]
    assert read_manifest(work_dir / "best") == before
    assert (work_dir / "best" / old).exists(), "the artifact the manifest names was removed"
    reconcile(target, PassOptions(settle=0))  # the retry
    after = read_manifest(work_dir / "best")
    assert after is not None
    assert [e["index"] for e in after["artifacts"].values()] == [6]
    assert not (work_dir / "best" / old).exists()
