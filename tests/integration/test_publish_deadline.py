"""``artifact.publish.timeout``: a store that hangs holds a publish attempt no longer than that.

The stores are real TCP servers on 127.0.0.1 (``tests.faults.stores``): one that accepts and
never answers, one that answers a byte at a time, and a proxy in front of moto that freezes
in the middle of an upload. ``storage_options`` ask for generous retries and read timeouts
(the backend would wait for hours); the deadline holds regardless, local retention is done
first, and the next attempt against a working store publishes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.engine.state import load_publish_state
from ckptd.publish.store import TEMP_PREFIX
from tests.daemon_proc import DaemonProcess
from tests.faults.stores import FreezingProxy, HangingServer
from tests.helpers import checkpoints, write_config
from tests.integration.s3 import (
    BUCKET,
    PUBLISH,
    MotoServer,
    assert_mirrors_local,
    config_error,
    epochs,
    free_port,
    names,
    once,
    remote_root,
    status,
    trainer,
)

pytestmark = pytest.mark.usefixtures("aws_env")

DEADLINE = 6.0  # against a store that hangs from the first request; the process starts in 1-3 s
# Enough for a whole publish to moto on a loaded 2-core CI box (about 5 s seen there): the
# publishing process alone takes 1-3 s to start.
WORKING = 60.0
# A once pass before the publish (slim, retention) plus killing the publisher: well under this.
SLACK = 4.0
FREEZE = 12.0  # time to get to the manifest's move before the deadline, on that box too
PATIENT = {  # what a user on a slow link might configure: hours of waiting per request
    "retries": {"max_attempts": 10},
    "connect_timeout": 60,
    "read_timeout": 600,
}


def deadline_config(root: Path, endpoint: str, timeout: float = DEADLINE) -> Path:
    spec = {
        "url": f"s3://{BUCKET}/{{project}}/{{run}}/",
        "storage_options": {"endpoint_url": endpoint, "config_kwargs": PATIENT},
        "timeout": f"{timeout:g}s",
    }
    return write_config(root, artifact={"publish": spec})


def timed_once(config: Path) -> tuple[float, int, dict[str, Any]]:
    started = time.monotonic()
    code, report = once(config)
    return time.monotonic() - started, code, report


def assert_timed_out(
    report: dict[str, Any], url: str, while_: str, deadline: float = DEADLINE
) -> None:
    publish = report["publish"]
    assert publish["status"] == "failed" and publish["timed_out"], publish
    error = publish["error"]
    assert error.startswith(f"{url}: publishing did not finish within artifact.publish.timeout")
    assert f"({deadline:g}s) and was stopped while {while_}" in error, error
    assert "raise artifact.publish.timeout" in error and error in report["errors"]


@pytest.mark.parametrize("mode", ["silent", "slow"])
def test_a_hanging_store_holds_once_only_until_the_deadline(tmp_path: Path, mode: str) -> None:
    port = free_port()
    t = trainer(tmp_path, f"hang-{mode}")
    epochs(t, 3)
    config = deadline_config(tmp_path, f"http://127.0.0.1:{port}")
    url = f"s3://{BUCKET}/test/{t.work_dir.name}/"
    with HangingServer(port, mode) as store:
        seconds, code, report = timed_once(config)
        assert store.connections >= 1  # it did reach the store, which never finished answering
    assert seconds < DEADLINE + SLACK, seconds
    assert code == 1
    assert_timed_out(report, url, "reading the manifest")
    # retention and the local best were done before publishing started
    assert checkpoints(t.work_dir) == ["epoch_2.pth", "epoch_3.pth"]
    assert (t.work_dir / "best" / "best_coco_bbox_mAP_epoch_2.pth").exists()
    record = load_publish_state(t.work_dir)
    assert (record.failures, record.timeouts) == (1, 1) and not record.manifest_sha256
    shown = status(config)["publish"]
    assert shown["status"] == "failed" and "artifact.publish.timeout (6s)" in shown["detail"]

    store = MotoServer(port).start()  # the store works again, on the same endpoint
    deadline_config(tmp_path, store.endpoint, WORKING)
    try:
        seconds, code, report = timed_once(config)
        assert code == 0, report["errors"]
        assert report["publish"]["status"] == "published" and not report["publish"]["timed_out"]
        fs, root = store.fs(), remote_root("test", t.work_dir)
        assert_mirrors_local(fs, root, t.work_dir)
        assert names(fs, root) == ["best_coco_bbox_mAP_epoch_2.pth", "manifest.json"]
        record = load_publish_state(t.work_dir)
        assert (record.failures, record.timeouts) == (0, 0)
    finally:
        store.stop()


def test_a_store_freezing_mid_upload_never_shows_a_partial_best(
    tmp_path: Path,
    shared_server: MotoServer,
) -> None:
    """Killed while the new manifest is moved in place: readers keep the previous best, whole;
    the next attempt removes the leftover upload and publishes."""
    server = shared_server
    port, upstream = free_port(), int(server.endpoint.rsplit(":", 1)[1])
    t = trainer(tmp_path, "freeze")
    config = deadline_config(tmp_path, f"http://127.0.0.1:{port}", WORKING)
    fs, root = server.fs(), remote_root("test", t.work_dir)
    with FreezingProxy(port, upstream, lambda chunk: False):
        epochs(t, 2)
        _seconds, code, report = timed_once(config)
        assert code == 0, report["errors"]
    before = fs.cat_file(f"{root}/manifest.json")

    def manifest_move(chunk: bytes) -> bool:  # the copy of its temporary key to manifest.json
        request = chunk.split(b"\r\n", 1)[0].split()
        return request[:1] == [b"PUT"] and request[1].endswith(b"/manifest.json")

    epochs(t, 2)  # new best at epoch 4
    deadline_config(tmp_path, f"http://127.0.0.1:{port}", FREEZE)
    with FreezingProxy(port, upstream, manifest_move) as proxy:
        seconds, code, report = timed_once(config)
        assert proxy.frozen.is_set()
    assert seconds < FREEZE + SLACK and code == 1, seconds
    url = f"s3://{BUCKET}/test/freeze/"
    assert_timed_out(report, url, "moving the manifest in place", FREEZE)
    assert fs.cat_file(f"{root}/manifest.json") == before  # the previous best, whole
    left = names(fs, root)
    assert "best_coco_bbox_mAP_epoch_2.pth" in left
    assert any(name.startswith(TEMP_PREFIX) for name in left), left  # the new manifest's
    assert checkpoints(t.work_dir) == ["epoch_3.pth", "epoch_4.pth"]

    deadline_config(tmp_path, f"http://127.0.0.1:{port}", WORKING)
    with FreezingProxy(port, upstream, lambda chunk: False):
        seconds, code, report = timed_once(config)
    assert code == 0, report["errors"]
    assert report["publish"]["removed"] == ["best_coco_bbox_mAP_epoch_2.pth"]
    assert_mirrors_local(fs, root, t.work_dir)
    assert names(fs, root) == ["best_coco_bbox_mAP_epoch_4.pth", "manifest.json"]


def test_a_deadline_after_the_manifest_leaves_only_the_clean_up(
    tmp_path: Path,
    shared_server: MotoServer,
) -> None:
    """Killed while removing the replaced best: the new manifest is in place and recorded as
    such, the old file is still to remove, and the next attempt removes it."""
    port, upstream = free_port(), int(shared_server.endpoint.rsplit(":", 1)[1])
    t = trainer(tmp_path, "cleanup")
    config = deadline_config(tmp_path, f"http://127.0.0.1:{port}", WORKING)
    fs, root = shared_server.fs(), remote_root("test", t.work_dir)
    old, new = "best_coco_bbox_mAP_epoch_2.pth", "best_coco_bbox_mAP_epoch_4.pth"
    with FreezingProxy(port, upstream, lambda chunk: False):
        epochs(t, 2)
        assert timed_once(config)[1] == 0
    epochs(t, 2)
    deadline_config(tmp_path, f"http://127.0.0.1:{port}", FREEZE)
    with FreezingProxy(port, upstream, lambda chunk: chunk.startswith(b"DELETE ")) as proxy:
        _seconds, code, report = timed_once(config)
        assert proxy.frozen.is_set()
    assert code == 1 and report["publish"]["status"] == "published", report["publish"]
    error = report["publish"]["error"]
    assert f"stopped while removing the replaced {old}; the new manifest is in place" in error
    assert_mirrors_local(fs, root, t.work_dir)  # readers already have the new best
    record = load_publish_state(t.work_dir)
    assert record.stale == [old] and new in record.files and record.timeouts == 1

    deadline_config(tmp_path, f"http://127.0.0.1:{port}", WORKING)
    with FreezingProxy(port, upstream, lambda chunk: False):
        _seconds, code, report = timed_once(config)
    assert code == 0 and report["publish"]["removed"] == [old], report
    assert names(fs, root) == [new, "manifest.json"]


def test_the_publisher_thread_of_ckptd_run_is_free_again_after_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import generate_latest

    from ckptd.core.config import load_config
    from ckptd.engine.outcome import PassOptions
    from ckptd.engine.reconcile import reconcile
    from ckptd.engine.state import WorkDirLock
    from ckptd.engine.targets import Target
    from ckptd.publish import queue as publishqueue
    from ckptd.service.metrics import DaemonMetrics

    port = free_port()
    t = trainer(tmp_path, "queued")
    epochs(t, 2)
    config = load_config(deadline_config(tmp_path, f"http://127.0.0.1:{port}"))
    target = Target(t.work_dir, config.config.projects[0], config.base_dir)
    reconcile(target, PassOptions(settle=0))  # the best artifact, as a pass of ckptd run makes
    metrics = DaemonMetrics()
    seen: list[tuple[float, Any]] = []

    def record(target: Target, outcome: Any) -> None:
        seen.append((time.monotonic(), outcome))
        metrics.record_publish_outcome(target, outcome)

    lock = WorkDirLock(t.work_dir)
    lock.acquire()
    queue = publishqueue.PublishQueue(record)
    queue.start()
    try:
        with HangingServer(port, "silent"):
            started = time.monotonic()
            queue.submit(target, lock)
            while not seen and time.monotonic() < started + DEADLINE + SLACK:
                time.sleep(0.05)
        assert seen, "the publisher was still stuck"
        finished, outcome = seen[0]
        assert finished - started < DEADLINE + SLACK and outcome.timed_out, outcome
    finally:
        queue.stop(5)
        lock.release()
    text = generate_latest(metrics.registry).decode()
    labels = f'project="test",work_dir="{t.work_dir}"'
    assert f"ckptd_publish_timeouts_total{{{labels}}} 1.0" in text
    assert f"ckptd_publish_failures_total{{{labels}}} 1.0" in text


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        ("1s", "1s is too short: each publish attempt starts its own process first"),
        ("soon", "cannot read 'soon' as a duration"),
        (-5, "a duration must be finite and >= 0"),
    ],
)
def test_config_timeout_errors_name_the_key(tmp_path: Path, timeout: Any, expected: str) -> None:
    message = config_error(tmp_path, {"url": "s3://m/{run}/", "timeout": timeout})
    assert f"projects[0].{PUBLISH}.timeout: " in message and expected in message, message


def test_config_timeout_default_and_units(tmp_path: Path) -> None:
    from ckptd.core.config import load_config

    def timeout_of(publish: dict[str, Any]) -> float:
        path = write_config(tmp_path, artifact={"publish": {"url": "s3://m/{run}/", **publish}})
        config = load_config(path).config.projects[0].artifact.publish
        assert config is not None
        return config.timeout

    assert timeout_of({}) == 600.0
    assert timeout_of({"timeout": "1h30m"}) == 5400.0
    assert timeout_of({"timeout": 45}) == 45.0


def publishing_processes() -> list[int]:
    """Publishing processes of this ckptd still alive (their command line names its folder)."""
    from ckptd.publish.process import ROOT

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"child_main" in b" ".join(argv) and ROOT.encode() in argv and state != "Z":
            found.append(int(proc.name))
    return found


def test_ckptd_run_logs_the_deadline_and_stops_with_no_publisher_left(tmp_path: Path) -> None:
    port = free_port()
    t = trainer(tmp_path, "daemon")
    epochs(t, 2)
    config = deadline_config(tmp_path, f"http://127.0.0.1:{port}")
    with HangingServer(port, "silent"), DaemonProcess(config) as daemon:
        daemon.wait_ready()
        record = daemon.wait_for(lambda r: "publish failed" in r.get("message", ""), 30)
        assert "artifact.publish.timeout (6s) and was stopped while" in record["message"]
        assert record["level"] == "warning" and record["url"].endswith("/test/daemon/")
        epochs(t, 1)  # retention goes on: the publisher never held a pass
        daemon.wait_for(lambda r: r.get("action") == "delete", 30)
        wait = time.monotonic() + 15  # until the retry after the backoff (5 s) hangs too
        while not publishing_processes() and time.monotonic() < wait:
            time.sleep(0.05)
        assert publishing_processes(), "no retry started"
        started = time.monotonic()  # stopping ckptd while its publishing process hangs
        assert daemon.stop() == 0
        assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10  # a hung child is killed 5 s after the stop at the latest
    while publishing_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not publishing_processes()


def test_leftover_multipart_uploads_of_temporary_keys_are_aborted(
    tmp_path: Path,
    shared_server: MotoServer,
) -> None:
    """What a kill in the middle of a large upload leaves on S3: the parts of an unfinished
    multipart upload to a temporary key. The next attempt aborts it, and only it."""
    t = trainer(tmp_path, "parts")
    epochs(t, 2)
    config = deadline_config(tmp_path, shared_server.endpoint, WORKING)
    fs, root = shared_server.fs(), remote_root("test", t.work_dir)
    prefix = root.split("/", 1)[1]
    for name in (f"{TEMP_PREFIX}dead0000-best.pth", "someone-elses-upload.bin"):
        fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=f"{prefix}/{name}")
    code, report = once(config)
    assert code == 0, report["errors"]
    listing = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=f"{prefix}/")
    assert [u["Key"] for u in listing.get("Uploads", [])] == [f"{prefix}/someone-elses-upload.bin"]
