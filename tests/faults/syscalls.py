"""Failing system calls inside a running ckptd: libfiu's POSIX preload library for the libc
calls it wraps, and wrappers at Python's system-call boundary for the ones it does not.

Which way covers which call:

* **libfiu** (``fiu_posix_preload.so`` in ``LD_PRELOAD``; each point enabled by name with
  ``fiu_enable_external``, so a Python callback decides and counts every failure): ``open``
  (also ``open()`` of Python's ``io``), ``read``, ``pread``, ``write``, ``pwrite``, ``fsync``,
  ``rename`` and ``unlink`` by path. The failed call returns -1 with the errno we chose.
* **in-process** (a wrapper around the ``os``/``fcntl``/watchdog function, same decision and
  count): ``copy_file_range``, ``flock``, ``rmdir``, ``inotify_add_watch`` (watchdog's ctypes
  function), and the ``*at`` forms libfiu does not wrap (``openat``, ``unlinkat``, ``renameat``:
  ``os.open``/``os.unlink``/``os.rename`` with ``dir_fd``); and every short read or write
  (``os.read``, ``os.pread``, ``os.write``, ``os.pwrite``, ``os.copy_file_range`` returning
  fewer bytes than asked: the wrapper can see the count, libfiu's ``reduce`` points cannot and
  divide by it).

A call is eligible only while the injector is armed, when ckptd's code is on the calling
thread's Python stack, and neither an import nor ``logging`` is: Python's own I/O (loading a
module, writing a log line to a captured stream) is not what is tested. EINTR is injected only
where libfiu fails the libc call: CPython retries those calls itself (PEP 475), which the test
counts as *absorbed*; a Python-level wrapper cannot stand for that retry.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

PRELOAD = Path("/usr/lib/fiu/fiu_posix_preload.so")
LIBFIU = "libfiu.so.0"
ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EINTR, errno.EAGAIN)
# the libc calls CPython retries on EINTR (PEP 475); rename and unlink it does not
RETRIED_ON_EINTR = {"open", "read", "pread", "write", "pwrite", "fsync"}
LIBFIU_POINTS = {
    "posix/io/oc/open": "open",
    "posix/io/rw/read": "read",
    "posix/io/rw/pread": "pread",
    "posix/io/rw/write": "write",
    "posix/io/rw/pwrite": "pwrite",
    "posix/io/sync/fsync": "fsync",
    "posix/io/dir/rename": "rename",
    "posix/io/dir/unlink": "unlink",
}
CKPTD_DIR = str(Path(__file__).resolve().parents[2] / "ckptd") + os.sep
_NOT_OURS = (os.sep + "logging" + os.sep, "<frozen importlib")

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_uint),
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure: the call, its errno (0: a short read or write), where in ckptd."""

    seq: int
    call: str
    code: int
    site: str  # the innermost ckptd frame: module:function:line
    thread: str

    @property
    def kind(self) -> str:
        return "short" if self.code == 0 else errno.errorcode[self.code]

    @property
    def busy(self) -> bool:
        """flock's EAGAIN (EWOULDBLOCK) is its answer for "another process holds it"."""
        return self.call == "flock" and self.code == errno.EAGAIN

    @property
    def absorbed(self) -> bool:
        """CPython retries it, or the caller gets all its bytes by asking again."""
        return self.code == 0 or (self.code == errno.EINTR and self.call in RETRIED_ON_EINTR)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "call": self.call, "kind": self.kind, "site": self.site}


def ckptd_site(frame: FrameType | None) -> str | None:
    """The innermost six ckptd frames (``module:function:line``, innermost first) of a stack
    ckptd is on, or None if the call is not ckptd's."""
    sites: list[str] = []
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in _NOT_OURS):
            return None
        if len(sites) < 6 and name.startswith(CKPTD_DIR):
            rel = name[len(CKPTD_DIR) :].removesuffix(".py").replace(os.sep, ".")
            sites.append(f"{rel}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(sites) or None


class Injector:
    """Decides, performs and records every injected failure of one process."""

    def __init__(self, seed: int, probability: float, short_probability: float) -> None:
        self.rng = random.Random(seed)
        self.probability = probability
        self.short_probability = short_probability
        self.armed = False
        self.faults: list[Fault] = []
        self.events: list[tuple[int, str]] = []  # (seq, what ckptd removed) beside the faults
        self._seq = 0
        self._lock = threading.Lock()
        self._fiu: ctypes.CDLL | None = None
        self._callback = _CALLBACK(self._libfiu_decides)  # kept alive as long as libfiu uses it

    # deciding

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _decide(
        self, call: str, codes: tuple[int, ...], chance: float, site: str | None = None
    ) -> int | None:
        """The errno to fail ``call`` with now (0 for a short one), or None to let it run.
        ``site``: the caller says whose call it is (else: ckptd must be on the stack)."""
        if not self.armed:
            return None
        try:
            site = site or ckptd_site(sys._getframe(2))
        except ValueError:  # no Python frame under the call (a C thread, interpreter exit)
            return None
        if site is None:
            return None
        with self._lock:
            if self.rng.random() >= chance:
                return None
            code = self.rng.choice(codes) if codes else 0
            fault = Fault(self._next_seq(), call, code, site, threading.current_thread().name)
            self.faults.append(fault)
        return code

    def note(self, what: str) -> None:
        if not self.armed:
            return
        with self._lock:
            self.events.append((self._next_seq(), what))

    def _libfiu_decides(self, name: bytes, failnum: Any, failinfo: Any, flags: Any) -> int:
        code = self._decide(LIBFIU_POINTS[name.decode()], ERRNOS, self.probability)
        if code is None:
            return 0
        failinfo[0] = code  # libfiu sets errno to failinfo
        return 1

    def error(self, call: str) -> None:
        """Raise the OSError of a failure of ``call`` if one is injected now (in-process)."""
        codes = tuple(c for c in ERRNOS if c != errno.EINTR)
        code = self._decide(call, codes, self.probability)
        if code:
            raise OSError(code, os.strerror(code))

    def shorten(self, call: str, count: int) -> int:
        """``count``, or fewer (at least 1) if a short read or write is injected now."""
        if count < 2 or self._decide(call, (), self.short_probability) is None:
            return count
        return self.rng.randint(1, count - 1)

    # installing

    def install(self) -> None:
        """Enable libfiu's points (needs the preload library) and the in-process wrappers."""
        if str(PRELOAD) not in Path("/proc/self/maps").read_text():
            raise RuntimeError(f"libfiu's wrappers are not loaded: run with LD_PRELOAD={PRELOAD}")
        self._fiu = ctypes.CDLL(LIBFIU)
        if self._fiu.fiu_init(0) != 0:
            raise RuntimeError("fiu_init failed")
        for point in LIBFIU_POINTS:
            if self._fiu.fiu_enable_external(point.encode(), 1, None, 0, self._callback) != 0:
                raise RuntimeError(f"fiu_enable_external({point}) failed")
        _wrap_python_calls(self)

    def counts(self) -> dict[str, dict[str, int]]:
        """call -> kind -> number injected."""
        table: dict[str, Counter[str]] = {}
        for fault in self.faults:
            table.setdefault(fault.call, Counter())[fault.kind] += 1
        return {call: dict(kinds) for call, kinds in sorted(table.items())}


def _wrap_python_calls(injector: Injector) -> None:
    """The in-process half: errors for what libfiu does not wrap, short reads and writes."""
    real = {name: getattr(os, name) for name in ("open", "unlink", "rename", "rmdir")}
    real_io = {name: getattr(os, name) for name in ("read", "pread", "write", "pwrite")}
    real_copy, real_flock = os.copy_file_range, fcntl.flock

    def at_form(name: str, call: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if any(k in kwargs for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                injector.error(call)  # the path form goes to libc's open/unlink/rename
            result = real[name](*args, **kwargs)
            if name in ("unlink", "rmdir", "rename"):
                injector.note(f"{name} {args[0]}")
            return result

        return wrapper

    def short(name: str) -> Callable[..., Any]:
        def wrapper(fd: int, data: Any, *rest: Any) -> Any:
            if name in ("read", "pread"):
                return real_io[name](fd, injector.shorten(name, data), *rest)
            view = memoryview(data)
            return real_io[name](fd, view[: injector.shorten(name, len(view))], *rest)

        return wrapper

    def copy_file_range(src: int, dst: int, count: int, *rest: Any) -> int:
        injector.error("copy_file_range")
        return real_copy(src, dst, injector.shorten("copy_file_range", count), *rest)

    def flock(fd: Any, operation: int) -> None:
        injector.error("flock")
        real_flock(fd, operation)

    os.open = at_form("open", "openat")  # type: ignore[assignment]
    os.unlink = at_form("unlink", "unlinkat")  # type: ignore[assignment]
    os.rename = at_form("rename", "renameat")  # type: ignore[assignment]
    os.rmdir = at_form("rmdir", "rmdir")  # type: ignore[assignment]
    for name in real_io:
        setattr(os, name, short(name))
    os.copy_file_range = copy_file_range
    fcntl.flock = flock
    _wrap_inotify(injector)


def _wrap_inotify(injector: Injector) -> None:
    from watchdog.observers import inotify_c

    real = inotify_c.inotify_add_watch

    def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
        codes = (errno.ENOSPC, errno.EIO, errno.EAGAIN)  # ENOSPC: max_user_watches reached
        # watchdog adds watches from its own threads, for ckptd.service.watch only
        site = "watchdog.observers.inotify_c (for service.watch)"
        code = injector._decide("inotify_add_watch", codes, injector.probability, site)
        if code:
            ctypes.set_errno(code)
            return -1
        return real(fd, path, mask)

    inotify_c.inotify_add_watch = inotify_add_watch
