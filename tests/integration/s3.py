"""What the publish tests share: moto's S3 server on loopback, and helpers to drive
``ckptd`` against it and read the bucket back. Fixtures are in ``conftest.py`` beside this."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.config import ConfigError, load_config
from ckptd.demo.simulate import SimConfig, SimulatedTrainer
from tests.helpers import cli, write_config

s3fs = pytest.importorskip("s3fs", reason="needs the publish extra: pip install -e '.[publish]'")
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
BUCKET = "models"
# rises at epochs 2, 4 and 6: three bests, each replacing the one before
RISING = [0.3, 0.5, 0.4, 0.6, 0.55, 0.7]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``moto_server`` on 127.0.0.1; its store lives in memory, so a restart empties it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        if not MOTO_SERVER.exists():
            pytest.skip("needs moto[server] (the test extra): pip install -e '.[test]'")
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert self.proc.poll() is None, "moto_server exited"
                time.sleep(0.05)
        else:
            raise AssertionError("moto_server did not answer within 30 s")
        self.fs().mkdir(BUCKET)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def fs(self) -> Any:
        """A client of our own, as a deployment reading the bucket would have."""
        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={"retries": {"max_attempts": 1}},
        )


def s3_config(root: Path, server: MotoServer, **publish: Any) -> Path:
    options = {
        "endpoint_url": server.endpoint,
        # fail fast when the server is down; ckptd retries on its own schedule
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10},
    }
    spec = {"url": f"s3://{BUCKET}/{{project}}/{{run}}/", "storage_options": options, **publish}
    return write_config(root, artifact={"publish": spec})


def once(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli("once", "-c", str(config), "--json", *extra)
    assert out, err
    return code, json.loads(out)["work_dirs"][0]


def status(config: Path) -> dict[str, Any]:
    _code, out, _err = cli("status", "-c", str(config), "--json")
    return json.loads(out)["work_dirs"][0]


def remote_root(project: str, run: Path) -> str:
    return f"{BUCKET}/{project}/{run.name}"


def local_manifest(run: Path) -> bytes:
    return (run / "best" / "manifest.json").read_bytes()


def assert_mirrors_local(fs: Any, root: str, run: Path) -> dict[str, Any]:
    """The remote manifest is byte-for-byte the local one and every file it names is there
    with the recorded sha256; nothing else is left under the prefix."""
    raw = fs.cat_file(f"{root}/manifest.json")
    assert raw == local_manifest(run)
    data = json.loads(raw)
    for entry in data["artifacts"].values():
        body = fs.cat_file(f"{root}/{entry['file']}")
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        assert body == (run / "best" / entry["file"]).read_bytes()
    return data


def names(fs: Any, root: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def trainer(root: Path, name: str, values: list[float] = RISING) -> SimulatedTrainer:
    run = root / "work_dirs" / name
    return SimulatedTrainer(run, SimConfig(epochs=len(values), metric_values=values))


def epochs(t: SimulatedTrainer, n: int) -> None:
    for _ in range(n):
        t.run_epoch()


def config_error(tmp_path: Path, publish: dict[str, Any]) -> str:
    path = write_config(tmp_path, artifact={"publish": publish})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


PUBLISH = "artifact.publish"
