"""ckptd's own CPU and I/O priority, set at the start of ``ckptd run`` and ``ckptd once``.

The systemd unit sets ``Nice=10`` and ``IOSchedulingClass=idle``, but a sidecar container or a
``ckptd once`` from cron has no unit: ckptd lowers itself (``priority:`` in ckptd.yaml). Only
ever lower: a value already at least as low (a unit's, ``nice -n 19``) is left alone. Linux
keeps both values per thread and new threads inherit them, so this runs before any thread
starts. What could not be set (not permitted, another platform) is reported, never fatal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

# ioprio_set(2) / ioprio_get(2): no wrapper in glibc nor in os.*; syscall numbers per arch.
IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
IOPRIO_CLASS_IDLE = 3


@dataclass(frozen=True, slots=True)
class PriorityOutcome:
    nice: int | None  # the nice value now (None: unknown)
    io_class: str | None  # "idle", "best-effort", … (None: unknown on this platform)
    notes: tuple[str, ...]  # what could not be set, and what to do


def _syscall(number: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(number, *args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _ioprio_numbers() -> tuple[int, int] | None:
    if platform.system() != "Linux":
        return None
    return IOPRIO_SYSCALLS.get(platform.machine())


def io_class() -> str | None:
    """This thread's I/O scheduling class, or None where it cannot be read."""
    numbers = _ioprio_numbers()
    if numbers is None:
        return None
    try:
        value = _syscall(numbers[1], IOPRIO_WHO_PROCESS, 0)
    except OSError:
        return None
    return IOPRIO_CLASSES.get(value >> IOPRIO_CLASS_SHIFT, str(value >> IOPRIO_CLASS_SHIFT))


def _set_io_idle() -> str | None:
    """Put this thread in the idle I/O class; a note when that could not be done."""
    numbers = _ioprio_numbers()
    if numbers is None:
        return (
            f"I/O priority: ioprio_set is not known on {platform.system()} "
            f"{platform.machine()}; left as it is"
        )
    if io_class() == "idle":
        return None
    try:
        _syscall(numbers[0], IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc))
        return (
            f"I/O priority: could not set the idle class ({reason}); run ckptd under "
            "`ionice -c 3`, or set priority.io_idle: false to stop trying"
        )
    return None


def _set_nice(level: int) -> tuple[int | None, str | None]:
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError) as exc:
        return None, f"nice: cannot read this platform's priority ({exc}); left as it is"
    if now >= level:
        return now, None  # already as low or lower: never raise it
    try:
        os.setpriority(os.PRIO_PROCESS, 0, level)
    except OSError as exc:
        return now, (
            f"nice: could not set {level} (now {now}: {exc.strerror}); run ckptd under "
            f"`nice -n {level}`, or set priority.nice: null to stop trying"
        )
    return os.getpriority(os.PRIO_PROCESS, 0), None


def lower_priority(nice: int | None, io_idle: bool) -> PriorityOutcome:
    """Lower this process to ``nice`` (None: leave it) and the idle I/O class (if asked)."""
    notes: list[str] = []
    now: int | None = None
    if nice is not None:
        now, note = _set_nice(nice)
        if note:
            notes.append(note)
    else:
        try:
            now = os.getpriority(os.PRIO_PROCESS, 0)
        except (OSError, AttributeError):
            now = None
    if io_idle:
        note = _set_io_idle()
        if note:
            notes.append(note)
    return PriorityOutcome(nice=now, io_class=io_class(), notes=tuple(notes))
