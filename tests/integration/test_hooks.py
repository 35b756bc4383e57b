"""hooks.on_new_best with real commands: a Python script that records its environment, curl
posting to an HTTP receiver on 127.0.0.1, and hooks that fail, hang or do not exist."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ckptd.core.config import load_config
from ckptd.engine.reconcile import PassOptions, reconcile
from ckptd.engine.targets import discover
from ckptd.service.hooks import HookRunner
from ckptd.service.metrics import DaemonMetrics
from tests.helpers import REPO, checkpoints, cli, simulate, write_config

VALUES = [0.1, 0.2, 0.3, 0.4, 0.5]
RECORD_ENV = """\
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: v for k, v in os.environ.items() if k.startswith("CKPTD_")}) + "\\n")
print("hook says hi"); print("to stderr", file=sys.stderr)
"""


def runs_of(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(work_dir: Path, epochs: int, resume: bool = False) -> None:
    simulate(work_dir, epochs=epochs, metric_values=VALUES, resume=resume)


def test_a_new_best_runs_the_hook_once_with_its_values(tmp_path: Path) -> None:
    script = tmp_path / "record_env.py"
    script.write_text(RECORD_ENV)
    out = tmp_path / "hook-runs.jsonl"
    hooks = {"on_new_best": [sys.executable, str(script), str(out)], "timeout": "20s"}
    config = write_config(tmp_path, hooks=hooks)
    work_dir = tmp_path / "work_dirs" / "run"
    train(work_dir, 3)

    code, stdout, logged = cli("once", "-c", str(config))  # the log goes to stderr
    assert code == 0, stdout
    (run,) = runs_of(out)
    artifact = Path(run["CKPTD_ARTIFACT"])
    assert run == {
        "CKPTD_PROJECT": "test",
        "CKPTD_WORK_DIR": str(work_dir),
        "CKPTD_METRIC": "coco/bbox_mAP",
        "CKPTD_VALUE": "0.3",
        "CKPTD_RULE": "greater",
        "CKPTD_INDEX": "3",
        "CKPTD_ARTIFACT": str(artifact),
        "CKPTD_SHA256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
    }  # no CKPTD_PUBLISHED_URL: artifact.publish is not configured
    assert artifact.parent == work_dir / "best"
    assert "exited with 0" in logged and "hook says hi" in logged and "to stderr" in logged

    assert cli("once", "-c", str(config))[0] == 0
    assert len(runs_of(out)) == 1  # the best did not change: no hook
    train(work_dir, 5, resume=True)
    assert cli("once", "-c", str(config))[0] == 0
    assert [r["CKPTD_INDEX"] for r in runs_of(out)] == ["3", "5"]
    assert cli("once", "--dry-run", "-c", str(config))[0] == 0
    assert len(runs_of(out)) == 2


class _Receiver(BaseHTTPRequestHandler):
    posts: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append({"path": self.path, "body": json.loads(body)})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, object]]]]:
    _Receiver.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.posts
    server.shutdown()
    server.server_close()


def docs_webhook() -> list[str]:
    """The webhook example of docs/hooks.md, as a user would paste it."""
    text = (REPO / "docs" / "hooks.md").read_text()
    block = text.split("## Example: a Slack")[1].split("```yaml")[1].split("```")[0]
    return yaml.safe_load(block)["hooks"]["on_new_best"]


def test_webhook_with_curl_to_a_local_receiver(
    tmp_path: Path, receiver: tuple[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url, posts = receiver
    monkeypatch.setenv("SLACK_WEBHOOK_URL", url)
    config = write_config(tmp_path, hooks={"on_new_best": docs_webhook()})
    train(tmp_path / "work_dirs" / "run", 3)
    code, stdout, _ = cli("once", "-c", str(config))
    assert code == 0 and "hook failed" not in stdout, stdout
    assert posts == [
        {"path": "/hook", "body": {"text": "test: new best coco/bbox_mAP=0.3 (epoch 3)"}}
    ]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["no-such-notify-ckptd"],
            "hooks.on_new_best[0]: 'no-such-notify-ckptd' is not found on PATH",
        ),
        (["/nonexistent/notify"], "'/nonexistent/notify' is not an executable file"),
        ([sys.executable, "-c", "import sys; sys.exit(3)"], "exited with 3"),
        ([sys.executable, "-c", "import time; time.sleep(60)"], "killed after hooks.timeout 1s"),
    ],
)
def test_a_failing_hook_is_reported_and_never_blocks_retention(
    tmp_path: Path, command: list[str], expected: str
) -> None:
    config = write_config(tmp_path, hooks={"on_new_best": command, "timeout": "1s"})
    work_dir = tmp_path / "work_dirs" / "run"
    train(work_dir, 5)
    started = time.monotonic()
    code, stdout, _ = cli("once", "-c", str(config))
    assert time.monotonic() - started < 20
    assert code == 0, stdout  # a hook is not the pass: retention and the artifact happened
    assert f"hook failed: project 'test': {expected}" in stdout or expected in stdout, stdout
    assert "hook failed" in stdout
    assert checkpoints(work_dir) == ["epoch_4.pth", "epoch_5.pth"]


def test_ckptd_run_runs_hooks_in_the_background_and_counts_failures(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        hooks={
            "on_new_best": [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(1)"]
        },
    )
    train(tmp_path / "work_dirs" / "run", 3)
    (target,) = discover(load_config(config)).targets
    report = reconcile(target, PassOptions(settle=0))
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    runner = HookRunner(metrics)
    started = time.monotonic()
    runner.after_pass(report)
    assert time.monotonic() - started < 0.5  # the pass does not wait for the hook
    labels = {"work_dir": str(target.work_dir), "project": "test", "hook": "on_new_best"}
    deadline = time.monotonic() + 20
    while registry.get_sample_value("ckptd_hook_failures_total", labels) != 1:
        assert time.monotonic() < deadline, "the hook's failure was never counted"
        time.sleep(0.05)
    runner.after_pass(reconcile(target, PassOptions(settle=0)))  # no new best: no hook
    runner.stop(5)
    assert registry.get_sample_value("ckptd_hook_failures_total", labels) == 1
    metrics.forget(str(target.work_dir))  # no longer watched: its series go
    assert registry.get_sample_value("ckptd_hook_failures_total", labels) is None
