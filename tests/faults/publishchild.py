"""ckptd's publishing process (``ckptd.publishproc``) with a fault injected into its attempt.

A publish attempt runs in a child process, so a test's monkeypatch in its own process never
reaches it; ``inject`` makes ckptd start this script instead, which patches ``StoreAttempt``
and then runs the real child:

    python tests/faults/publishchild.py ROOT FAULT [ARG]

Faults: ``kill-before-manifest`` (the process dies of SIGKILL right before the manifest goes
up), ``stop-server PID`` (the store's process is killed at the first upload).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest


def inject(monkeypatch: pytest.MonkeyPatch, fault: str, *args: str) -> None:
    from ckptd import publishproc

    command = [sys.executable, os.path.abspath(__file__), publishproc.ROOT, fault, *args]
    monkeypatch.setattr(publishproc, "child_command", lambda: command)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as stat:  # a zombie until the test reaps it: gone
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.02)


def main() -> int:
    root, fault, *args = sys.argv[1:]
    sys.path.insert(0, root)
    from ckptd.publishproc import child_main
    from ckptd.publishstore import StoreAttempt

    if fault == "kill-before-manifest":

        def killed(self: StoreAttempt, raw: bytes) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        StoreAttempt.put_manifest = killed  # type: ignore[method-assign]
    elif fault == "stop-server":
        real_send = StoreAttempt.send

        def server_dies(self: StoreAttempt, *a: Any) -> None:
            os.kill(int(args[0]), signal.SIGKILL)
            _wait_gone(int(args[0]))
            real_send(self, *a)

        StoreAttempt.send = server_dies  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    return child_main()


if __name__ == "__main__":
    sys.exit(main())
