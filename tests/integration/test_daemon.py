"""``ckptd run`` as a real process next to real and simulated trainers."""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ckptd.fs.durable import TEMP_PREFIX
from tests.daemon_proc import DaemonProcess, actions
from tests.helpers import (
    REPO,
    assert_same_state_dict,
    checkpoints,
    load_full,
    load_weights_only,
    manifest,
    write_config,
)

HARNESS = REPO / "tests" / "trainers" / "mmengine_real.py"
SIMULATE = [sys.executable, "-m", "ckptd.demo.simulate"]


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(daemon: DaemonProcess, quiet: float = 1.5) -> None:
    """Wait until the daemon's log has been quiet for ``quiet`` seconds."""
    last = -1
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet:
        size = daemon.log_path.stat().st_size
        if size != last:
            last, stable_since = size, time.monotonic()
        time.sleep(0.1)


@pytest.mark.trainer
def test_live_real_mmengine_training(tmp_path: Path) -> None:
    """MMEngine trains in one process (with its own save_best writing best files and rewriting
    epoch_N.pth in place) while ckptd run manages the work_dir from another."""
    run = tmp_path / "work_dirs" / "live"
    run.mkdir(parents=True)
    write_config(tmp_path, watch={"settle": "1s"})
    with DaemonProcess(tmp_path / "ckptd.yaml") as daemon:
        daemon.wait_ready()
        trainer = subprocess.run(
            [
                sys.executable,
                str(HARNESS),
                str(run),
                "--epochs",
                "8",
                "--epoch-seconds",
                "0.6",
                "--save-best",
                "auto",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        wait_until(lambda: checkpoints(run) == ["epoch_7.pth", "epoch_8.pth"], 60, "final set")
        settled(daemon)
        records = daemon.records()
        assert daemon.stop() == 0
    (their_best,) = run.glob("best_*.pth")  # MMEngine's own, never touched by ckptd
    artifacts = sorted((run / "best").glob("*.pth"))
    assert [a.name for a in artifacts] == [their_best.name]
    assert_same_state_dict(
        load_weights_only(artifacts[0])["state_dict"], load_full(their_best)["state_dict"]
    )
    assert (run / Path((run / "last_checkpoint").read_text()).name).exists()
    deletes = actions(records, "delete")
    assert {d["checkpoint"] for d in deletes} == {f"epoch_{i}.pth" for i in range(1, 7)}
    # nothing was deleted before its evaluation was read
    assert all(d["reason"].endswith("; evaluated") for d in deletes), deletes
    assert not actions(records, "error")


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_slow_writer_is_never_read_or_deleted_before_complete(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "work_dirs" / "slow"
    write_config(
        tmp_path,
        retention={"keep_last": 1},
        watch={"mode": mode, "settle": "1s", "poll_interval": "0.3s"},
    )
    values = "0.1,0.2,0.3,0.4"  # every epoch is a new best: each one gets slimmed
    with DaemonProcess(tmp_path / "ckptd.yaml") as daemon:
        daemon.wait_ready()
        trainer = subprocess.Popen(
            [
                *SIMULATE,
                str(run),
                "--epochs",
                "4",
                "--slow-write-seconds",
                "2.5",
                "--param-count",
                "400000",
                "--metric-values",
                values,
            ]
        )
        finals: dict[str, tuple[int, int]] = {}

        def watch_sizes() -> None:  # the stat each checkpoint has once its writer is done
            while trainer.poll() is None:
                for path in run.glob("epoch_*.pth"):
                    st = path.stat()
                    finals[path.name] = (st.st_size, st.st_mtime_ns)
                time.sleep(0.02)

        sampler = threading.Thread(target=watch_sizes)
        sampler.start()
        assert trainer.wait(timeout=120) == 0
        sampler.join()
        wait_until(lambda: checkpoints(run) == ["epoch_4.pth"], 60, "final set")
        settled(daemon)
        records = daemon.records()
        assert daemon.stop() == 0
    slims = actions(records, "slim")
    assert [s["checkpoint"] for s in slims][-1] == "epoch_4.pth"
    entry = manifest(run / "best")["artifacts"]["coco/bbox_mAP"]
    st = (run / "epoch_4.pth").stat()
    assert entry["source_stat"][1:] == [st.st_size, st.st_mtime_ns]
    for slim in slims:  # every slim read a checkpoint in its final, complete state
        assert slim["checkpoint"] in finals
    assert not actions(records, "error")
    deleted = {d["checkpoint"] for d in actions(records, "delete")}
    assert deleted == {"epoch_1.pth", "epoch_2.pth", "epoch_3.pth"}


def test_restart_catches_up_to_the_same_end_state(tmp_path: Path) -> None:
    values = "0.2,0.5,0.3,0.6,0.4,0.45,0.55,0.3"
    args = ["--epochs", "8", "--delay", "0.4", "--metric-values", values]
    ends = {}
    for name in ("straight", "restarted"):
        root = tmp_path / name
        run = root / "work_dirs" / "r"
        write_config(root, watch={"settle": "0.5s"})
        daemon = DaemonProcess(root / "ckptd.yaml").start()
        daemon.wait_ready()
        trainer = subprocess.Popen([*SIMULATE, str(run), *args])
        if name == "restarted":
            wait_until(lambda run=run: (run / "epoch_3.pth").exists(), 30, "epoch 3")
            assert daemon.stop() == 0
            wait_until(lambda run=run: (run / "epoch_6.pth").exists(), 30, "epoch 6")
            daemon = DaemonProcess(root / "ckptd.yaml").start()
        assert trainer.wait(timeout=120) == 0
        wait_until(lambda run=run: len(checkpoints(run)) == 2, 60, "two checkpoints")
        settled(daemon)
        assert daemon.stop() == 0
        best = sorted((run / "best").glob("*.pth"))
        ends[name] = (checkpoints(run), [b.name for b in best], load_weights_only(best[0]))
    assert ends["straight"][0] == ends["restarted"][0] == ["epoch_7.pth", "epoch_8.pth"]
    assert ends["straight"][1] == ends["restarted"][1] == ["best_coco_bbox_mAP_epoch_4.pth"]
    assert_same_state_dict(ends["straight"][2]["state_dict"], ends["restarted"][2]["state_dict"])


def test_sigterm_during_a_large_slim_leaves_old_or_new_artifact(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "big"
    subprocess.run(
        [
            *SIMULATE,
            str(run),
            "--epochs",
            "2",
            "--param-count",
            "60000000",
            "--metric-values",
            "0.1,0.2",
            "--optimizer",
            "adamw",
        ],
        check=True,
        timeout=300,
    )
    write_config(tmp_path)
    with DaemonProcess(tmp_path / "ckptd.yaml") as daemon:
        daemon.wait_for(lambda r: r.get("action") == "slim-start", 60)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
    folder = run / "best"
    assert not list(folder.glob(f"{TEMP_PREFIX}*"))
    present = sorted(folder.glob("*.pth"))
    if present:  # the slim finished before the signal: it must be complete and published
        entry = manifest(folder)["artifacts"]["coco/bbox_mAP"]
        assert [p.name for p in present] == [entry["file"]]
        assert load_weights_only(present[0])["meta"]["epoch"] == entry["epoch"]
    assert checkpoints(run) == ["epoch_1.pth", "epoch_2.pth"] or present


def test_sighup_reload_keeps_serving_through_a_broken_config(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    subprocess.run([*SIMULATE, str(run), "--epochs", "5"], check=True, timeout=120)
    config = write_config(tmp_path, retention={"keep_last": 4})
    with DaemonProcess(config) as daemon:
        daemon.wait_ready()
        wait_until(lambda: len(checkpoints(run)) == 4, 60, "keep_last 4")
        good = config.read_text()
        config.write_text("projects: [{name: x, work_dirs: [y], retention: {keep_last: 0}}]")
        daemon.send(signal.SIGHUP)
        failed = daemon.wait_for(lambda r: "reload failed" in r.get("message", ""))
        assert "keep_last" in failed["message"]
        subprocess.run([*SIMULATE, str(run), "--epochs", "6", "--resume"], check=True, timeout=120)
        wait_until(lambda: checkpoints(run)[-1] == "epoch_6.pth" and len(checkpoints(run)) == 4)
        config.write_text(good.replace("keep_last: 4", "keep_last: 1"))
        daemon.send(signal.SIGHUP)
        daemon.wait_for(lambda r: r.get("message") == "config reloaded")
        wait_until(lambda: checkpoints(run) == ["epoch_6.pth"], 60, "keep_last 1 applied")
        assert daemon.stop() == 0


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    subprocess.run([*SIMULATE, str(run), "--epochs", "3"], check=True, timeout=120)
    write_config(tmp_path)
    address = str(tmp_path / "notify.sock")
    messages: list[tuple[float, str]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(0.2)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        daemon = DaemonProcess(tmp_path / "ckptd.yaml", env=env).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for _, m in messages) < 4:
            with contextlib.suppress(TimeoutError):
                messages.append((time.monotonic(), server.recv(4096).decode()))
        assert daemon.stop() == 0
        while True:
            try:
                messages.append((time.monotonic(), server.recv(4096).decode()))
            except TimeoutError:
                break
    texts = [m for _, m in messages]
    ready = next(i for i, m in enumerate(texts) if m.startswith("READY=1"))
    assert "STATUS=watching 1 work_dir(s)" in texts[ready]
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    assert len(pings) >= 4
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.2 < g < 1.0 for g in gaps), gaps  # half of WATCHDOG_USEC, never over it
    assert texts[-1] == "STOPPING=1" or "STOPPING=1" in texts


def test_metrics_and_healthz_of_a_running_daemon(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    run = tmp_path / "work_dirs" / "r"
    subprocess.run([*SIMULATE, str(run), "--epochs", "5"], check=True, timeout=120)
    write_config(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with DaemonProcess(tmp_path / "ckptd.yaml", "--metrics-addr", f"127.0.0.1:{port}") as daemon:
        daemon.wait_ready()
        wait_until(lambda: len(checkpoints(run)) == 2, 60, "retention")
        settled(daemon, 0.5)
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200 and b"watching 1 work_dir" in health.read()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        samples = {
            (s.name, s.labels.get("metric", "")): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert daemon.stop() == 0
    assert samples[("ckptd_work_dirs_watched", "")] == 1
    assert samples[("ckptd_deletions_total", "")] == 3
    assert samples[("ckptd_slims_total", "")] >= 1
    assert samples[("ckptd_checkpoints_kept", "")] == 2
    assert samples[("ckptd_best_metric_value", "coco/bbox_mAP")] == 0.5
    assert samples[("ckptd_reclaimed_bytes_total", "")] > 0


def test_new_work_dir_is_picked_up_without_restart(tmp_path: Path) -> None:
    (tmp_path / "work_dirs").mkdir()
    write_config(tmp_path)
    with DaemonProcess(tmp_path / "ckptd.yaml") as daemon:
        daemon.wait_ready()
        run = tmp_path / "work_dirs" / "late"
        subprocess.run([*SIMULATE, str(run), "--epochs", "4"], check=True, timeout=120)
        wait_until(lambda: checkpoints(run) == ["epoch_3.pth", "epoch_4.pth"], 30, "retention")
        daemon.wait_for(lambda r: r.get("message") == "watching new work_dir")
        assert daemon.stop() == 0
