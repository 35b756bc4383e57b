"""disk.min_free on a small filesystem made for the test (a tmpfs in a private mount
namespace, ``tests.faults.mountns``), with two simulated MMEngine runs on it: one ended (its
files hours old), one running. ckptd frees space by deleting the ended run's oldest
unprotected checkpoints first, never a protected one, and says so when only protected ones
remain; a trainer writing while ``ckptd run`` watches never hits ENOSPC while something
deletable remains."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_proc import actions
from tests.faults.figures import report
from tests.faults.mountns import MountNamespace, NamespacedDaemon
from tests.helpers import REPO, write_config

MiB = 2**20
PARAMS = "250000"  # ~2 MiB per checkpoint (weights + SGD momentum), ~1 MiB per artifact


def simulate(ns: MountNamespace, work_dir: Path, epochs: int, *extra: str):
    return ns.run(
        [
            sys.executable,
            "-m",
            "ckptd.demo.simulate",
            str(work_dir),
            "--epochs",
            str(epochs),
            "--param-count",
            PARAMS,
            *extra,
        ],
        check=False,
        cwd=REPO,
    )


def age(folder: Path, seconds: float) -> None:
    """Make a run look ended: every file's mtime ``seconds`` earlier, in the same order."""
    for path in [folder, *folder.rglob("*")]:
        then = path.lstat().st_mtime - seconds
        os.utime(path, (then, then), follow_symlinks=False)


def epochs_of(work_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in work_dir.glob("epoch_*.pth"))


def free(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def small_disk(ns: MountNamespace, tmp_path: Path, size: str, min_free: str) -> tuple[Path, Path]:
    """A ``size`` tmpfs at ``tmp_path/disk`` holding the work_dirs, and a config for them where
    only the watermark (``disk.min_free``) deletes (keep_last 100)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    ns.mount_tmpfs(disk, size)
    config = write_config(tmp_path, work_dirs=[f"{disk}/work_dirs/*"], retention={"keep_last": 100})
    config.write_text(config.read_text() + f"disk:\n  min_free: {min_free}\n")
    return disk, config


def deletions(out: str) -> dict[str, list[tuple[str, list[str]]]]:
    data = json.loads(out)
    return {
        Path(w["work_dir"]).name: [
            (c["name"], c["rules"]) for c in w["checkpoints"] if c["action"] == "deleted"
        ]
        for w in data["work_dirs"]
    }


def test_once_frees_the_ended_runs_oldest_first_and_reports_blocked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MountNamespace() as ns:
        disk, config = small_disk(ns, tmp_path, "40m", "45%")
        ended, running = disk / "work_dirs" / "ended", disk / "work_dirs" / "running"
        assert simulate(ns, ended, 8).returncode == 0
        age(ns.view(ended), 10 * 3600)
        assert simulate(ns, running, 5).returncode == 0
        view = ns.view(disk)
        before, total = free(view)
        threshold = int(total * 0.45)
        assert before < threshold  # the two artifacts still to come make it worse

        started = time.monotonic()
        result = ns.ckptd("once", "--json", "-c", str(config))
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        gone = deletions(result.stdout)
        after, _ = free(view)
        assert after >= threshold
        # the ended run's oldest, in order, each for disk_watermark; the running run untouched
        names = sorted((n for n, _ in gone["ended"]), key=lambda n: int(n[6:-4]))
        assert names and names == [f"epoch_{i}.pth" for i in range(1, len(names) + 1)]
        assert all(rules == ["disk_watermark"] for _, rules in gone["ended"])
        assert gone["running"] == [] and epochs_of(ns.view(running)) == [1, 2, 3, 4, 5]
        assert 8 in epochs_of(ns.view(ended))  # newest and resume target
        assert len(names) < 7  # stopped once back above: not everything deletable went
        report(
            capsys,
            "watermark once",
            free_before=f"{before / MiB:.1f} MiB < {threshold / MiB:.1f} MiB",
            deleted=f"{len(names)} checkpoints of the ended run",
            seconds=f"{seconds:.2f} s (ckptd once)",
            free_after=f"{after / MiB:.1f} MiB",
        )

        # Fill the disk so that even every unprotected checkpoint would not be enough.
        unprotected = sum(
            p.stat().st_size
            for w in (ns.view(ended), ns.view(running))
            for p in w.glob("epoch_*.pth")
            if int(p.stem.split("_")[1]) != max(epochs_of(w))
        )
        room = after - MiB // 2
        assert MiB // 2 + unprotected < threshold, "sizes no longer make the test decidable"
        (view / "filler").write_bytes(b"\0" * room)
        blocked = ns.ckptd("once", "-c", str(config))
        assert blocked.returncode == 0, blocked.stdout + blocked.stderr
        assert f"disk watermark on {disk}:" in blocked.stdout
        assert "only protected checkpoints" in blocked.stdout
        assert "disk watermark: " in blocked.stdout  # each deletion's reason in the listing
        assert epochs_of(ns.view(ended)) == [8] and epochs_of(ns.view(running)) == [5]
        status = ns.ckptd("status", "-c", str(config))
        assert status.returncode == 0 and "only protected checkpoints" in status.stdout
        assert (ns.view(running) / "best").is_dir()


def test_a_trainer_writing_under_ckptd_run_never_runs_out_of_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MountNamespace() as ns:
        # 16 MiB kept free: 8 checkpoints' writes of headroom for ckptd's reaction
        disk, config = small_disk(ns, tmp_path, "40m", "40%")
        ended, running = disk / "work_dirs" / "ended", disk / "work_dirs" / "running"
        assert simulate(ns, ended, 6).returncode == 0
        age(ns.view(ended), 10 * 3600)
        with NamespacedDaemon(ns, config) as daemon:
            daemon.wait_ready(60)
            samples: list[tuple[float, int]] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    samples.append((time.monotonic(), free(ns.view(disk))[0]))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            # 24 epochs of ~2 MiB: 48 MiB written to a 40 MiB disk already 1/3 full
            trainer = simulate(ns, running, 24, "--delay", "0.2")
            seconds = time.monotonic() - started
            done.set()
            sampler.join()
            min_free_seen = min(f for _, f in samples)
            threshold = int(free(ns.view(disk))[1] * 0.40)
            longest, since = 0.0, None
            for t, f in samples:  # the longest stretch under the watermark
                if f < threshold:
                    since = t if since is None else since
                    longest = max(longest, t - since)
                else:
                    since = None
            assert trainer.returncode == 0, trainer.stdout[-2000:] + trainer.stderr[-2000:]
            time.sleep(3)
            records = daemon.records()
        deleted = [
            (Path(r["work_dir"]).name, r["checkpoint"])
            for r in actions(records, "delete")
            if "disk watermark" in r.get("reason", "")
        ]
        owners = [owner for owner, _ in deleted]
        # every deletable checkpoint of the ended run went before any of the running run's
        assert owners[: owners.count("ended")] == ["ended"] * 5
        assert "running" in owners
        assert epochs_of(ns.view(ended)) == [6]
        assert 24 in epochs_of(ns.view(running))
        low, total = free(ns.view(disk))
        assert low >= int(total * 0.40) - 3 * MiB
        report(
            capsys,
            "watermark run",
            written="24 x 2 MiB to a 40 MiB tmpfs, disk.min_free 40%",
            trainer_seconds=f"{seconds:.1f}",
            enospc="none",
            deleted=f"{len(deleted)} by the watermark, the ended run's first",
            least_free=f"{min_free_seen / MiB:.1f} MiB",
            longest_under_watermark=f"{longest:.2f} s",
            free_at_end=f"{low / MiB:.1f} MiB",
        )


def test_a_full_disk_is_freed_although_the_state_file_cannot_be_written(tmp_path: Path) -> None:
    """At 0 bytes free a pass cannot save its state (ENOSPC); its plan was still sound, so the
    watermark's eviction pass deletes first and then saves."""
    with MountNamespace() as ns:
        disk, config = small_disk(ns, tmp_path, "24m", "20%")
        run = disk / "work_dirs" / "run"
        assert simulate(ns, run, 6).returncode == 0
        assert ns.ckptd("once", "-c", str(config)).returncode == 0  # artifact, state: above
        view = ns.view(disk)
        (ns.view(run) / ".ckptd" / "state.json").unlink()  # the pass must write it again
        # the trainer's last write filled the disk
        with (view / "filler").open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        assert free(view)[0] < 4096
        result = ns.ckptd("once", "--json", "-c", str(config))
        assert "No space left on device" in result.stdout  # the first pass's state write
        gone = deletions(result.stdout)["run"]
        assert gone and all(rules == ["disk_watermark"] for _, rules in gone)
        assert free(view)[0] > 0 and 6 in epochs_of(ns.view(run))
        assert (ns.view(run) / ".ckptd" / "state.json").exists()  # the eviction pass saved it
