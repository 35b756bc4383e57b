"""ckptd lowers its own CPU and I/O priority (no systemd unit needed), read back from outside.

Oracles: the kernel's own view, /proc/<pid>/task/<tid>/stat (the nice field of every thread)
and util-linux ``ionice -p`` (ioprio_get), not ckptd's code.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="nice/ioprio per Linux thread")

CHILD = r"""
import json, os, sys
from ckptd.service.priority import lower_priority
nice = None if sys.argv[1] == "none" else int(sys.argv[1])
outcome = lower_priority(nice, sys.argv[2] == "1")
print(json.dumps({"nice": outcome.nice, "io": outcome.io_class, "notes": outcome.notes}))
sys.stdout.flush()
sys.stdin.read()  # stay alive while the test looks at it from outside
"""


def ionice_of(pid: int) -> str:
    return subprocess.run(
        ["ionice", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()


def thread_nices(pid: int) -> set[int]:
    nices = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        nices.add(int(stat.rsplit(")", 1)[1].split()[16]))  # field 19: nice
    return nices


def start_child(*args: str, preexec: object = None) -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # type: ignore[arg-type]
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


needs_ionice = pytest.mark.skipif(shutil.which("ionice") is None, reason="util-linux ionice")


@needs_ionice
def test_lowers_nice_and_io_class_as_the_kernel_reports_it() -> None:
    proc, seen = start_child("10", "1")
    try:
        assert seen["notes"] == []
        assert thread_nices(proc.pid) == {10}
        assert ionice_of(proc.pid) == "idle"
        assert (seen["nice"], seen["io"]) == (10, "idle")
    finally:
        stop(proc)


def test_never_raises_a_priority_already_lower() -> None:
    proc, seen = start_child("5", "0", preexec=lambda: os.nice(15))
    try:
        assert thread_nices(proc.pid) == {15}
        assert seen == {"nice": 15, "io": seen["io"], "notes": []}
    finally:
        stop(proc)


# setpriority and ioprio_set per architecture, as systemd's SystemCallFilter=~@resources denies
DENIED_SYSCALLS = {"x86_64": (141, 251), "aarch64": (140, 30)}


def deny_priority_syscalls() -> None:
    """A seccomp filter answering EPERM to setpriority and ioprio_set (the unit's filter)."""
    import struct

    set_nice, set_io = DENIED_SYSCALLS[platform.machine()]
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    program = [  # (code, jt, jf, k): load the syscall number, compare, return
        (0x20, 0, 0, 0),
        (0x15, 2, 0, set_nice),
        (0x15, 1, 0, set_io),
        (0x06, 0, 0, allow),
        (0x06, 0, 0, eperm),
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(filters))
    prog = ctypes.create_string_buffer(fprog)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    address = ctypes.c_void_p(ctypes.addressof(prog))  # a plain int would pass as 32 bits
    assert libc.prctl(22, 2, address, 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


@needs_ionice
@pytest.mark.skipif(platform.machine() not in DENIED_SYSCALLS, reason="syscall numbers")
def test_not_permitted_is_a_note_not_a_crash() -> None:
    proc, seen = start_child("10", "1", preexec=deny_priority_syscalls)
    try:
        assert thread_nices(proc.pid) == {0} and ionice_of(proc.pid).startswith("none")
        assert len(seen["notes"]) == 2
        assert "priority.nice: null" in seen["notes"][0]
        assert "EPERM" in seen["notes"][1] and "priority.io_idle: false" in seen["notes"][1]
    finally:
        stop(proc)


@needs_ionice
def test_ckptd_run_and_every_thread_it_starts_are_lowered(tmp_path: Path) -> None:
    (tmp_path / "work_dirs" / "run-1").mkdir(parents=True)
    config = tmp_path / "ckptd.yaml"
    config.write_text(json.dumps({"projects": [{"name": "p", "work_dirs": ["work_dirs/*"]}]}))
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "ckptd", "--log-format", "json", "run", "-c", str(config)]
    for extra, nice, io in (([], 10, "idle"), (["--keep-priority"], 0, "none: prio 0")):
        with log.open("wb") as out:
            proc = subprocess.Popen([*cmd, *extra], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while b"ready" not in log.read_bytes() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            assert b"ready" in log.read_bytes(), log.read_text()
            assert len(os.listdir(f"/proc/{proc.pid}/task")) >= 2  # the inotify reader too
            assert thread_nices(proc.pid) == {nice}
            assert ionice_of(proc.pid).startswith(io.split(":")[0])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
