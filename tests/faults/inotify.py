"""A minimal inotify reader (ctypes over libc), for tests that must see every filesystem action in
the order the kernel made it.

All watches of one ``Inotify`` share one kernel queue, so events from different folders arrive
in the order they happened; that is what lets the fault tests order ckptd's deletions against
the simulated trainer's writes without trusting clocks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

NAMES = {
    IN_ACCESS: "ACCESS",
    IN_MODIFY: "MODIFY",
    IN_ATTRIB: "ATTRIB",
    IN_CLOSE_WRITE: "CLOSE_WRITE",
    IN_CLOSE_NOWRITE: "CLOSE_NOWRITE",
    IN_OPEN: "OPEN",
    IN_MOVED_FROM: "MOVED_FROM",
    IN_MOVED_TO: "MOVED_TO",
    IN_CREATE: "CREATE",
    IN_DELETE: "DELETE",
    IN_DELETE_SELF: "DELETE_SELF",
    IN_MOVE_SELF: "MOVE_SELF",
    IN_Q_OVERFLOW: "Q_OVERFLOW",
    IN_IGNORED: "IGNORED",
}
_HEADER = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


class QueueOverflow(RuntimeError):
    """The kernel dropped events: nothing about their order can be proven any more."""


@dataclass(frozen=True, slots=True)
class Event:
    folder: Path
    name: str
    mask: int

    @property
    def path(self) -> Path:
        return self.folder / self.name if self.name else self.folder

    def is_(self, flag: int) -> bool:
        return bool(self.mask & flag)

    def __str__(self) -> str:
        kinds = "|".join(n for bit, n in NAMES.items() if self.mask & bit)
        return f"{kinds} {self.path}"


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self._folders: dict[int, Path] = {}

    def watch(self, folder: Path, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", str(folder))
        self._folders[wd] = Path(folder)

    def read(self, timeout: float | None) -> Iterator[Event]:
        """Events available within ``timeout`` seconds (all of them that are queued)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                offset += _HEADER.size
                raw = data[offset : offset + length].split(b"\0", 1)[0]
                offset += length
                if mask & IN_Q_OVERFLOW:
                    raise QueueOverflow("inotify queue overflowed; raise max_queued_events")
                folder = self._folders.get(wd)
                if folder is None or mask & IN_IGNORED:
                    continue
                yield Event(folder, os.fsdecode(raw), mask)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
