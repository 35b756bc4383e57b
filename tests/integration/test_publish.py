"""``artifact.publish``: best artifacts uploaded over the wire to an S3-compatible server.

The server is moto's ``moto_server`` on a loopback port, started and stopped here, and ckptd
talks to it through s3fs exactly as it would to S3. The manifest-last ordering is checked by a
reader thread that polls the remote manifest while ckptd replaces the best.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.config import load_config
from ckptd.engine.state import WorkDirLock, load_publish_state
from ckptd.publish.store import TEMP_PREFIX
from tests.daemon_proc import DaemonProcess
from tests.faults import publishchild
from tests.helpers import checkpoints, cli, write_config
from tests.integration.s3 import (
    BUCKET,
    PUBLISH,
    MotoServer,
    assert_mirrors_local,
    config_error,
    epochs,
    free_port,
    local_manifest,
    names,
    once,
    remote_root,
    s3_config,
    status,
    trainer,
)

# fake credentials from the environment, no profile of this machine, fast ckptd retries
pytestmark = pytest.mark.usefixtures("aws_env")

SECRET = "looks like a credential, and ckptd does not read secrets from its config file"


@pytest.mark.parametrize(
    ("publish", "key", "expected"),
    [
        ({"url": "s3://m/{user}/"}, f"{PUBLISH}.url", "unknown placeholder {user}; allowed"),
        ({"url": "models/{run}"}, f"{PUBLISH}.url", "expected a URL with a scheme"),
        ({"url": "nosuch://m/{run}"}, f"{PUBLISH}.url", "unknown scheme 'nosuch'"),
        ({"storage_options": {}}, f"{PUBLISH}.url", "required key is missing"),
        ({"url": "s3://m/{run}", "keep": 1}, f"{PUBLISH}.keep", "unknown key; allowed here: url"),
        (
            {"url": "s3://m/{run}", "storage_options": {"secret": "abc"}},
            f"{PUBLISH}.storage_options",
            f"'secret' {SECRET}",
        ),
        (
            {"url": "s3://m/", "storage_options": {"client_kwargs": {"AWS_Secret_Access_Key": 1}}},
            f"{PUBLISH}.storage_options",
            f"'client_kwargs.AWS_Secret_Access_Key' {SECRET}",
        ),
        (
            {"url": "az://c/{run}", "storage_options": {"account_key": "x"}},
            f"{PUBLISH}.storage_options",
            "environment variables (e.g. AWS_ACCESS_KEY_ID",
        ),
        (
            {"url": "gs://b/{run}", "storage_options": {"token": "/etc/sa.json"}},
            f"{PUBLISH}.storage_options",
            "the provider's default chain (IAM role, workload or managed identity)",
        ),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, publish: dict[str, Any], key: str, expected: str
) -> None:
    message = config_error(tmp_path, publish)
    assert f"projects[0].{key}: " in message and expected in message, message
    assert "abc" not in message  # a rejected secret is not echoed


def test_config_accepts_profiles_endpoints_and_defaults(tmp_path: Path) -> None:
    options = {
        "profile": "deploy",
        "endpoint_url": "https://minio.internal:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/m"},
    }
    path = write_config(
        tmp_path,
        artifact={"publish": {"url": "s3://m/{project}/{run}/", "storage_options": options}},
    )
    publish = load_config(path).config.projects[0].artifact.publish
    assert publish is not None and publish.keep_history is False
    assert publish.storage_options == options
    assert load_config(write_config(tmp_path)).config.projects[0].artifact.publish is None


def test_once_without_publish_never_imports_fsspec(tmp_path: Path) -> None:
    epochs(trainer(tmp_path, "r"), 2)
    config = write_config(tmp_path)
    code = (
        "import sys; from ckptd.cli.commands import main; rc = main(['once', '-c', sys.argv[1]]); "
        "assert 'fsspec' not in sys.modules and 's3fs' not in sys.modules; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()


# --- S3 over the wire --------------------------------------------------------------------


def test_first_upload_then_replacement_removes_the_old_best(
    tmp_path: Path, server: MotoServer
) -> None:
    t = trainer(tmp_path, "first")
    config = s3_config(tmp_path, server)
    fs, root = server.fs(), remote_root("test", t.work_dir)
    epochs(t, 2)
    code, report = once(config)
    assert code == 0, report["errors"]
    assert report["publish"]["status"] == "published"
    assert report["publish"]["uploads"] == 2  # the artifact and the manifest
    data = assert_mirrors_local(fs, root, t.work_dir)
    first = data["artifacts"]["coco/bbox_mAP"]["file"]
    assert first == "best_coco_bbox_mAP_epoch_2.pth"
    assert names(fs, root) == [first, "manifest.json"]
    record = load_publish_state(t.work_dir)
    assert record.url == f"s3://{BUCKET}/test/first/" and not record.stale
    assert record.manifest_sha256 == hashlib.sha256(local_manifest(t.work_dir)).hexdigest()

    code, report = once(config)  # nothing new: compared with the store, nothing uploaded
    assert code == 0 and report["publish"]["status"] == "in sync"
    assert report["publish"]["uploads"] == 0

    epochs(t, 2)  # new best at epoch 4
    code, report = once(config)
    assert code == 0, report["errors"]
    assert report["publish"]["removed"] == [first]
    data = assert_mirrors_local(fs, root, t.work_dir)
    assert names(fs, root) == ["best_coco_bbox_mAP_epoch_4.pth", "manifest.json"]
    shown = status(config)["publish"]
    assert shown["status"] == "in sync" and list(shown["files"]) == [
        "best_coco_bbox_mAP_epoch_4.pth"
    ]
    code, out, _ = cli("status", "-c", str(config))
    assert f"publish       s3://{BUCKET}/test/first/  [in sync] manifest" in out


def test_keep_history_keeps_replaced_bests(tmp_path: Path, server: MotoServer) -> None:
    t = trainer(tmp_path, "history")
    config = s3_config(tmp_path, server, keep_history=True)
    fs, root = server.fs(), remote_root("test", t.work_dir)
    for _ in range(3):
        epochs(t, 2)
        assert once(config)[0] == 0
    assert_mirrors_local(fs, root, t.work_dir)
    assert names(fs, root) == [
        "best_coco_bbox_mAP_epoch_2.pth",
        "best_coco_bbox_mAP_epoch_4.pth",
        "best_coco_bbox_mAP_epoch_6.pth",
        "manifest.json",
    ]


def test_crash_before_the_manifest_resumes_and_cleans_up(
    tmp_path: Path, server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = trainer(tmp_path, "crash")
    config = s3_config(tmp_path, server)
    fs, root = server.fs(), remote_root("test", t.work_dir)
    epochs(t, 2)
    assert once(config)[0] == 0
    before = fs.cat_file(f"{root}/manifest.json")
    epochs(t, 2)

    with monkeypatch.context() as patched:  # it dies after the new file, before its manifest
        publishchild.inject(patched, "kill-before-manifest")
        code, report = once(config)
    assert code == 1
    assert "the publishing process was killed by signal 9" in report["publish"]["error"]
    # readers still see the old best, complete; the new file waits unnamed
    assert fs.cat_file(f"{root}/manifest.json") == before
    assert "best_coco_bbox_mAP_epoch_4.pth" in names(fs, root)
    fs.pipe_file(f"{root}/{TEMP_PREFIX}dead0000-best.pth", b"partial upload of a killed ckptd")
    assert status(config)["publish"]["status"] in ("pending", "failed")

    code, report = once(config)
    assert code == 0, report["errors"]
    assert report["publish"]["status"] == "published"
    assert_mirrors_local(fs, root, t.work_dir)
    assert names(fs, root) == ["best_coco_bbox_mAP_epoch_4.pth", "manifest.json"]


def test_server_stopped_mid_upload_then_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MotoServer(free_port()).start()
    try:
        t = trainer(tmp_path, "outage")
        config = s3_config(tmp_path, server)
        epochs(t, 3)
        started = time.monotonic()
        assert server.proc is not None
        with monkeypatch.context() as patched:  # the server dies at the first upload
            publishchild.inject(patched, "stop-server", str(server.proc.pid))
            code, report = once(config)
        server.stop()
        assert time.monotonic() - started < 30
        # the upload failed, and said so; local retention went ahead regardless
        assert code == 1
        assert report["publish"]["status"] == "failed"
        assert any(f"s3://{BUCKET}/test/outage/" in e for e in report["errors"])
        assert checkpoints(t.work_dir) == ["epoch_2.pth", "epoch_3.pth"]
        assert (t.work_dir / "best" / "best_coco_bbox_mAP_epoch_2.pth").exists()
        record = load_publish_state(t.work_dir)
        assert record.failures == 1 and record.last_error and not record.manifest_sha256
        shown = status(config)["publish"]
        assert shown["status"] == "failed" and "last attempt" in shown["detail"]

        code, report = once(config)  # still down: reported again, nothing lost
        assert code == 1 and load_publish_state(t.work_dir).failures == 2

        server.start()  # back, empty (moto keeps its store in memory): a fresh ckptd catches up
        epochs(t, 1)  # new best at epoch 4 meanwhile
        code, report = once(config)
        assert code == 0, report["errors"]
        assert report["publish"]["status"] == "published"
        fs, root = server.fs(), remote_root("test", t.work_dir)
        data = assert_mirrors_local(fs, root, t.work_dir)
        assert [e["epoch"] for e in data["artifacts"].values()] == [4]
        assert names(fs, root) == ["best_coco_bbox_mAP_epoch_4.pth", "manifest.json"]
        assert load_publish_state(t.work_dir).failures == 0
    finally:
        server.stop()


def test_reader_never_sees_a_manifest_before_its_files(tmp_path: Path, server: MotoServer) -> None:
    """A deployment polling the bucket while ckptd replaces the best five times: every manifest
    it reads names files that are there with the sha256 it states."""
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    t = trainer(tmp_path, "reader", values)
    config = s3_config(tmp_path, server)
    root = remote_root("test", t.work_dir)
    stop = threading.Event()
    seen: set[bytes] = set()
    violations: list[str] = []
    observations = [0]

    def reader() -> None:
        fs = server.fs()
        key = f"{root}/manifest.json"
        while not stop.is_set():
            try:
                raw = fs.cat_file(key)
            except FileNotFoundError:
                continue
            observations[0] += 1
            seen.add(raw)
            for entry in json.loads(raw)["artifacts"].values():
                try:
                    body = fs.cat_file(f"{root}/{entry['file']}")
                except FileNotFoundError:
                    body = None
                if body is None or hashlib.sha256(body).hexdigest() != entry["sha256"]:
                    # a newer manifest may have replaced this one meanwhile (the old best is
                    # then removed); with the same manifest still in place it is a violation
                    try:
                        again = fs.cat_file(key)
                    except FileNotFoundError:
                        again = None
                    if again == raw:
                        violations.append(
                            f"{entry['file']}: {'missing' if body is None else 'sha'}"
                        )

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for _ in values:
            epochs(t, 1)
            code, report = once(config)
            assert code == 0, report["errors"]
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert not violations
    assert len(seen) >= 4 and observations[0] > 20
    assert_mirrors_local(server.fs(), root, t.work_dir)


def folder_artifact(run: Path, name: str, files: dict[str, bytes]) -> None:
    """A best artifact that is a folder (Hugging Face layout): its files, a SHA256SUMS listing
    whose sha256 the manifest records, and the manifest naming only this folder."""
    from ckptd.engine.artifacts import ArtifactEntry, write_manifest

    folder = run / "best" / name
    folder.mkdir(parents=True)
    for file, body in files.items():
        (folder / file).write_bytes(body)
    listing = "".join(f"{hashlib.sha256(b).hexdigest()}  {f}\n" for f, b in sorted(files.items()))
    (folder / "SHA256SUMS").write_text(listing)
    entry = ArtifactEntry(
        key="eval_loss",
        file=name,
        rule="less",
        value=0.1,
        unit="step",
        index=int(name.rsplit("-", 1)[1]),
        epoch=None,
        step=int(name.rsplit("-", 1)[1]),
        sha256=hashlib.sha256(listing.encode()).hexdigest(),
        bytes=sum(map(len, files.values())) + len(listing),
        source_checkpoint=name,
        source_stat=(0, 0, 0),
        kept_keys=tuple(sorted(files)),
        time="2026-01-01T00:00:00+0000",
    )
    write_manifest(run / "best", {"eval_loss": entry}, run, "test", "hf")


def test_folder_artifacts_are_published_file_by_file(tmp_path: Path, server: MotoServer) -> None:
    from ckptd.engine.targets import Target
    from ckptd.publish.sync import publish

    run = tmp_path / "work_dirs" / "hf"
    config = load_config(s3_config(tmp_path, server))
    target = Target(run, config.config.projects[0], config.base_dir)
    fs, root = server.fs(), remote_root("test", run)
    fs.pipe_file(f"{root}/checkpoint-80/foreign", b"not ckptd's")  # shares a name prefix
    folder_artifact(run, "checkpoint-8", {"model.safetensors": b"w" * 5000, "config.json": b"{}"})
    outcome = publish(target)
    assert outcome.status == "published" and outcome.uploads == 4, outcome
    for name in ("model.safetensors", "config.json", "SHA256SUMS"):
        assert (
            fs.cat_file(f"{root}/checkpoint-8/{name}")
            == (run / "best/checkpoint-8" / name).read_bytes()
        )
    assert fs.cat_file(f"{root}/manifest.json") == local_manifest(run)

    shutil.rmtree(run / "best" / "checkpoint-8")
    folder_artifact(run, "checkpoint-16", {"model.safetensors": b"v" * 6000})
    outcome = publish(target)
    assert outcome.status == "published" and outcome.removed == ["checkpoint-8"], outcome
    assert names(fs, root) == ["checkpoint-16", "checkpoint-80", "manifest.json"]
    assert sorted(names(fs, f"{root}/checkpoint-16")) == ["SHA256SUMS", "model.safetensors"]
    assert fs.cat_file(f"{root}/checkpoint-80/foreign") == b"not ckptd's"


# --- file:// and the daemon ----------------------------------------------------------------


def test_file_target(tmp_path: Path) -> None:
    target = tmp_path / "published"
    t = trainer(tmp_path, "local")
    config = write_config(
        tmp_path, artifact={"publish": {"url": f"file://{target}/{{project}}/{{run}}"}}
    )
    prefix = target / "test" / "local"
    for n in (2, 2):
        epochs(t, n)
        code, report = once(config)
        assert code == 0, report["errors"]
        assert report["publish"]["status"] == "published"
        assert (prefix / "manifest.json").read_bytes() == local_manifest(t.work_dir)
        data = json.loads(local_manifest(t.work_dir))
        files = sorted(e["file"] for e in data["artifacts"].values())
        assert sorted(os.listdir(prefix)) == [*files, "manifest.json"]
        for name in files:
            body = (prefix / name).read_bytes()
            assert body == (t.work_dir / "best" / name).read_bytes()
    assert files == ["best_coco_bbox_mAP_epoch_4.pth"]


def test_publish_queue_retries_in_the_background(tmp_path: Path) -> None:
    from ckptd.core.timings import Timings
    from ckptd.engine.targets import Target
    from ckptd.publish import queue as publishqueue
    from ckptd.service.metrics import DaemonMetrics

    blocker = tmp_path / "published"
    blocker.write_text("a file where the folder should be")  # publishing fails until removed
    t = trainer(tmp_path, "queued")
    epochs(t, 2)
    config = write_config(tmp_path, artifact={"publish": {"url": f"file://{blocker}/{{run}}"}})
    assert cli("once", "-c", str(config))[0] == 1  # the local artifact, not the upload
    loaded = load_config(config)
    target = Target(t.work_dir, loaded.config.projects[0], loaded.base_dir)
    metrics = DaemonMetrics()
    outcomes: list[str] = []

    def record(target: Target, outcome: Any) -> None:
        outcomes.append(outcome.status)
        metrics.record_publish_outcome(target, outcome)

    lock = WorkDirLock(t.work_dir)
    lock.acquire()
    queue = publishqueue.PublishQueue(record, Timings(backoff_start=0.2))
    queue.start()
    try:
        queue.submit(target, lock)
        deadline = time.monotonic() + 10
        while "failed" not in outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        blocker.unlink()
        while "published" not in outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcomes[-1] == "published", outcomes
        queue.submit(target, lock)  # in sync now: the record alone says so
        while len(outcomes) < outcomes.index("published") + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcomes[-1] == "in sync"
    finally:
        queue.stop(5)
        lock.release()
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    labels = f'project="test",work_dir="{t.work_dir}"'
    assert f"ckptd_publish_uploads_total{{{labels}}} 2.0" in text
    assert f"ckptd_publish_pending{{{labels}}} 0.0" in text
    assert "ckptd_publish_failures_total{" in text and "ckptd_publish_uploaded_bytes_total{" in text
    assert (tmp_path / "published" / "queued" / "manifest.json").exists()


def test_daemon_publishes_beside_retention_and_after_a_restart(tmp_path: Path) -> None:
    server = MotoServer(free_port()).start()
    try:
        t = trainer(tmp_path, "live")
        config = s3_config(tmp_path, server)
        fs, root = server.fs(), remote_root("test", t.work_dir)
        epochs(t, 2)
        with DaemonProcess(config) as daemon:
            daemon.wait_ready()
            daemon.wait_for(lambda r: r.get("action") == "publish", 30)
            assert_mirrors_local(fs, root, t.work_dir)
            server.stop()
            epochs(t, 2)  # new best at 4 while the store is down
            daemon.wait_for(lambda r: "publish failed" in r.get("message", ""), 30)
            deadline = time.monotonic() + 20  # retention goes on without the store
            while checkpoints(t.work_dir) != ["epoch_3.pth", "epoch_4.pth"]:
                assert time.monotonic() < deadline, checkpoints(t.work_dir)
                time.sleep(0.05)
            assert daemon.stop() == 0
        assert load_publish_state(t.work_dir).failures >= 1
        server.start()  # back (and empty): the next ckptd publishes at its first pass
        with DaemonProcess(config) as daemon:
            daemon.wait_for(
                lambda r: r.get("action") == "publish" and "epoch_4" in r.get("message", ""), 30
            )
            assert daemon.stop() == 0
        assert_mirrors_local(server.fs(), root, t.work_dir)
        assert load_publish_state(t.work_dir).failures == 0
    finally:
        server.stop()
