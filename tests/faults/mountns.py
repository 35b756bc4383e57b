"""A private mount namespace for tests that need small or read-only filesystems.

A sleeping ``unshare --mount --propagation private`` process holds the namespace; commands run
in it through ``nsenter`` (same pid: nsenter execs), so nothing mounted here is ever visible
outside, and everything disappears with the holder even if the test dies. Needs root (skips
with the reason otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import CKPTD_RUN, DaemonProcess
from tests.helpers import REPO


def require_root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces, tmpfs, chattr); run the suite as root")
    for tool in ("unshare", "nsenter", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (util-linux / e2fsprogs)")


class MountNamespace:
    def __init__(self) -> None:
        require_root_tools("mount")
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "infinity"]
        )
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == mine:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                pytest.skip("cannot create a mount namespace here (unshare -m failed)")
            time.sleep(0.01)
        self.prefix = ["nsenter", f"--target={self.holder.pid}", "--mount", "--"]

    def run(
        self, argv: Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *argv], check=check, capture_output=True, text=True, timeout=120, **kw
        )

    def ckptd(self, *args: str) -> subprocess.CompletedProcess:
        """``python -m ckptd ARGS`` inside the namespace."""
        return self.run([sys.executable, "-m", "ckptd", *args], check=False, cwd=REPO)

    def mount_tmpfs(self, where: Path, size: str) -> None:
        self.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)])

    def resize(self, where: Path, size: str) -> None:
        self.run(["mount", "-o", f"remount,size={size}", str(where)])

    def bind_read_only(self, where: Path) -> None:
        self.run(["mount", "--bind", str(where), str(where)])
        self.run(["mount", "-o", "remount,bind,ro", str(where)])

    def view(self, path: Path) -> Path:
        """``path`` as seen inside the namespace, from outside it."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()

    def __enter__(self) -> MountNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NamespacedDaemon(DaemonProcess):
    """``ckptd run`` inside a ``MountNamespace`` (nsenter execs, so ``pid`` is ckptd's)."""

    def __init__(self, namespace: MountNamespace, config: Path, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.namespace = namespace

    def start(self) -> NamespacedDaemon:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.namespace.prefix, *CKPTD_RUN, "-c", str(self.config), *self.extra],
            stdout=self._log,
            stderr=self._log,
            cwd=REPO,
            env=self.env,
        )
        return self
