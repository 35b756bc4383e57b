"""Disk full and I/O errors (invariant 7): no partial artifact, the old best stays, nothing is
deleted in that work_dir, the message says what to do, and ckptd recovers by itself.

Small filesystems are tmpfs mounts in a private mount namespace (``tests.faults.mountns``);
permission errors come from ``chattr +i`` (root ignores mode bits), a read-only bind mount and a
ckptd that runs as ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess
from tests.faults.figures import report
from tests.faults.invariants import artifact_problems, end_state, read_manifest, temp_files
from tests.faults.mountns import MountNamespace, NamespacedDaemon, require_root_tools
from tests.faults.trainer import CHECKPOINT, record, replay_now
from tests.helpers import REPO, write_config

ALL_FOUR = ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_4.pth"]


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name))


def training(root: Path, epochs: int) -> Path:
    """A work_dir with the recorded run's first ``epochs`` epochs (best so far: 2, then 4)."""
    work_dir = root / "work_dirs" / "run"
    work_dir.mkdir(parents=True, exist_ok=True)
    replay_now(record(), work_dir, upto_epoch=epochs)
    return work_dir


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    require_root_tools("chattr")
    try:
        for path in paths:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip(f"chattr +i is not supported on {path}'s filesystem")
        yield
    finally:
        for path in paths:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_artifact_dir_full_keeps_the_old_best_and_deletes_nothing_until_space_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MountNamespace() as ns:
        best = tmp_path / "artifacts"
        best.mkdir()
        ns.mount_tmpfs(best, "300k")  # one ~200 KB artifact fits, two do not
        config = write_config(tmp_path, artifact={"dir": str(best)})
        work_dir = training(tmp_path, 2)
        first = ns.ckptd("once", "-c", str(config))
        assert first.returncode == 0, first.stdout + first.stderr
        inside = ns.view(best)
        before = read_manifest(inside)
        assert before and before["artifacts"]["coco/bbox_mAP"]["index"] == 2

        training(tmp_path, 4)  # a new best at epoch 4 while the folder is nearly full
        full = ns.ckptd("once", "-c", str(config))
        out = full.stdout
        assert full.returncode == 1, out
        assert f"{best}: no space left while writing the artifact of epoch_4.pth" in out
        assert "free space there" in out and "nothing was deleted" in out
        assert "deletion(s) held back" in out
        assert checkpoints(work_dir) == ALL_FOUR  # epochs 1 and 2 would be deleted otherwise
        assert read_manifest(inside) == before  # the old best stays, complete and published
        assert not artifact_problems(inside)
        assert not temp_files(inside), "a partial artifact was left in the full folder"
        assert sorted(p.name for p in inside.iterdir()) == [
            "best_coco_bbox_mAP_epoch_2.pth",
            "manifest.json",
        ]

        ns.resize(best, "2m")  # space returns
        again = ns.ckptd("once", "-c", str(config))
        assert again.returncode == 0, again.stdout + again.stderr
        assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
        assert sorted(p.name for p in inside.iterdir()) == [
            "best_coco_bbox_mAP_epoch_4.pth",
            "manifest.json",
        ]
        assert not artifact_problems(inside)
    report(capsys, "artifact dir full (ENOSPC)", faults_injected=1, recovered="yes")


def test_daemon_retries_by_itself_when_space_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MountNamespace() as ns:
        best = tmp_path / "artifacts"
        best.mkdir()
        ns.mount_tmpfs(best, "100k")  # not even one artifact fits
        config = write_config(tmp_path, artifact={"dir": str(best)})
        work_dir = training(tmp_path, 4)
        with NamespacedDaemon(ns, config) as daemon:
            daemon.wait_for(lambda r: "no space left" in r.get("message", "").lower(), 30)
            assert checkpoints(work_dir) == ALL_FOUR
            ns.resize(best, "2m")
            started = time.monotonic()
            daemon.wait_for(lambda r: r.get("action") == "delete", 30)
            waited = time.monotonic() - started
        assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
        assert not artifact_problems(ns.view(best))
        errors = [r for r in daemon.records() if r.get("action") == "error"]
        assert errors and all(str(best) in r["message"] for r in errors)
    report(capsys, "ckptd run retries after ENOSPC", recovered_after_s=round(waited, 1))


@pytest.mark.parametrize("managed_before", [True, False], ids=["managed", "first pass"])
def test_work_dir_filesystem_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], managed_before: bool
) -> None:
    """The training disk is full (the emergency ckptd is for), the artifact disk is not.
    Managed before: ckptd still slims the best and frees the disk. Never seen before: it cannot
    even create its lock there; it says so and deletes nothing."""
    with MountNamespace() as ns:
        disk = tmp_path / "disk"
        disk.mkdir()
        ns.mount_tmpfs(disk, "4m")
        work_dir = ns.view(disk) / "work_dirs" / "run"
        work_dir.mkdir(parents=True)
        config = disk / "ckptd.yaml"  # beside work_dirs/, in the namespace's view
        shutil.copy(
            write_config(tmp_path, artifact={"dir": str(tmp_path / "best")}), ns.view(config)
        )
        replay_now(record(), work_dir, upto_epoch=2)
        if managed_before:
            assert ns.ckptd("once", "-c", str(config)).returncode == 0
        replay_now(record(), work_dir, upto_epoch=4)
        filler = ns.view(disk) / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # fill to the last block
                f.write(b"\0" * 4096)
        result = ns.ckptd("once", "-c", str(config))
        out = result.stdout + result.stderr
        assert not temp_files(work_dir)
        if not managed_before:
            assert result.returncode == 1
            # the file and the call (failing system calls: test_fault_syscalls.py)
            assert f"{disk}/work_dirs/run/.ckptd" in out and ": cannot " in out
            assert "No space left on device" in out
            assert checkpoints(work_dir) == ALL_FOUR
            return
        assert result.returncode == 0, out
        assert "cannot record the artifact best_coco_bbox_mAP_epoch_4.pth ahead" in out
        assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"], out
        assert not artifact_problems(tmp_path / "best"), out
        # once the pass freed space its state was saved: the next pass is quiet
        second = ns.ckptd("once", "-c", str(config))
        assert second.returncode == 0, second.stdout + second.stderr
        assert "slimming" not in second.stderr
    report(capsys, "work_dir filesystem full", faults_injected=1, freed="epochs 1-2")


def test_delete_permission_denied_is_reported_retried_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work_dir = training(tmp_path, 4)
    config = write_config(tmp_path)
    with immutable(work_dir / "epoch_1.pth"), DaemonProcess(config) as daemon:
        daemon.wait_for(lambda r: r.get("action") == "error", 30)
        error = next(r for r in daemon.records() if r.get("action") == "error")
        assert (
            f"{work_dir / 'epoch_1.pth'}: cannot delete: Operation not permitted"
            in (error["message"])
        )
        # the others were deleted; everything protected is there
        assert checkpoints(work_dir) == ["epoch_1.pth", "epoch_3.pth", "epoch_4.pth"]
        subprocess.run(["chattr", "-i", str(work_dir / "epoch_1.pth")], check=True)
        started = time.monotonic()
        daemon.wait_for(
            lambda r: r.get("action") == "delete" and r.get("checkpoint") == "epoch_1.pth", 30
        )
        waited = time.monotonic() - started
    assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
    assert not artifact_problems(work_dir / "best")
    report(capsys, "delete: permission denied", retried_after_s=round(waited, 1))


@pytest.mark.parametrize("how", ["chattr +i", "read-only mount"])
def test_artifact_dir_not_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    work_dir = training(tmp_path, 4)
    best = tmp_path / "artifacts"
    best.mkdir()
    config = write_config(tmp_path, artifact={"dir": str(best)})
    with contextlib.ExitStack() as stack:
        if how == "chattr +i":
            stack.enter_context(immutable(best))
            result = subprocess.run(
                [sys.executable, "-m", "ckptd", "once", "-c", str(config)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            expected = "Operation not permitted"
        else:
            ns = stack.enter_context(MountNamespace())
            ns.bind_read_only(best)
            result = ns.ckptd("once", "-c", str(config))
            expected = "Read-only file system"
        out = result.stdout
        assert result.returncode == 1, out
        assert f"{best}: cannot write the artifact ({expected})" in out
        assert "give ckptd's user write access to artifact.dir; nothing was deleted" in out
        assert checkpoints(work_dir) == ALL_FOUR
        assert list(best.iterdir()) == []
    again = subprocess.run(
        [sys.executable, "-m", "ckptd", "once", "-c", str(config)], capture_output=True, cwd=REPO
    )
    assert again.returncode == 0
    assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
    assert not artifact_problems(best)
    report(capsys, f"artifact dir not writable ({how})", faults_injected=1, recovered="yes")


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A temp folder other users can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ckptd-fault-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ckptd_running_as_another_user_without_write_access(
    world_readable_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's files belong to root; ckptd runs as nobody, allowed to write only its own
    folders: every delete fails with a message, nothing is lost, and a chmod fixes it."""
    require_root_tools("setpriv")
    tmp_path = world_readable_tmp
    work_dir = training(tmp_path, 4)
    for folder in (work_dir / ".ckptd", work_dir / "best"):
        folder.mkdir()
        os.chown(folder, 65534, 65534)
    config = write_config(tmp_path)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    argv += [sys.executable, "-m", "ckptd", "once", "-c", str(config)]
    before = end_state(work_dir, work_dir / "best")
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    for name in ("epoch_1.pth", "epoch_2.pth"):
        assert f"{work_dir / name}: cannot delete: Permission denied" in out
    assert checkpoints(work_dir) == before["kept"] == ALL_FOUR
    assert not artifact_problems(work_dir / "best")  # the artifact is ckptd's own: written
    os.chmod(work_dir, 0o777)
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
    report(capsys, "ckptd as another user (EACCES)", faults_injected=2, recovered="yes")
