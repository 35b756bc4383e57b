"""Run ``ckptd run`` as a real process in tests: start, wait for log lines, signal, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import REPO

CKPTD_RUN = [sys.executable, "-m", "ckptd", "--log-format", "json", "run"]


class DaemonProcess:
    """``ckptd --log-format json run -c CONFIG`` with its log in a file the test can read."""

    def __init__(
        self,
        config: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.config = config
        self.wrap = wrap  # e.g. run it in another mount namespace, as another user
        self.log_path = log or config.parent / f"ckptd-{time.monotonic_ns()}.log"
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        # At its default nice 10 the daemon would get a fraction of a loaded 2-core CI box
        # beside the tests' own trainers and miss their stop/ready timeouts; the priority
        # itself is tested in tests/integration/test_priority.py.
        argv = [*CKPTD_RUN, "-c", str(self.config), "--keep-priority", *self.extra]
        self.proc = subprocess.Popen(
            self.wrap(argv) if self.wrap else argv,
            stdout=self._log,
            stderr=self._log,
            cwd=REPO,
            env=self.env,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                found.append({"message": line, "level": "raw"})
        return found

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ckptd exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting in the log:\n{self.text()}")

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_for(lambda r: r.get("message", "").startswith("ready"), timeout)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        return code

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def actions(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("action") == action]
