"""Reads that finish or raise: a whole small file, or an exact byte range.

Python's unbuffered ``FileIO.read`` answers EAGAIN with ``None`` instead of raising, which
``Path.read_text`` turns into a ``TypeError`` and ``json.loads`` into "not JSON"; and ``pread``
may return fewer bytes than asked before the end of the file (network and FUSE filesystems,
signals). Both were found by injecting failing system calls
(``tests/faults/test_fault_syscalls.py``).
Here every failed read is an ``OSError`` that names the file, and a short read reads on.
"""

from __future__ import annotations

import errno
import os

CHUNK = 1 << 20


def call_failed(call: str, exc: OSError, path: str | os.PathLike[str] | None = None) -> OSError:
    """``exc`` as the failure of ``call`` on ``path``: ``str()`` says "cannot <call>" and names
    the file, which an ``OSError`` of ``write`` or ``fsync`` on a descriptor does not. The
    errno (and so the subclass, e.g. ``FileNotFoundError``) is kept."""
    filename = exc.filename or (os.fspath(path) if path is not None else None)
    if exc.strerror and exc.strerror.startswith("cannot "):  # it says which call already
        return exc if filename == exc.filename else OSError(exc.errno, exc.strerror, filename)
    return OSError(exc.errno, f"cannot {call}: {exc.strerror}", filename)


def _failed(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    # callers say "cannot read <what>" themselves; the file is what a read error lacks
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def read_file(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The file's bytes (at most ``limit``); an ``OSError`` naming the file if it cannot be read.

    Opening keeps the OSError of ``open`` (its ``filename`` is the path)."""
    parts: list[bytes] = []
    size = 0
    with open(path, "rb", buffering=0) as f:
        while limit is None or size < limit:
            try:
                chunk = f.read(CHUNK if limit is None else min(CHUNK, limit - size))
            except OSError as exc:
                raise _failed(exc, path) from exc
            if chunk is None:  # EAGAIN, FileIO's non-blocking answer
                raise _failed(OSError(errno.EAGAIN, os.strerror(errno.EAGAIN)), path)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    return b"".join(parts)


def read_text(path: str | os.PathLike[str]) -> str:
    """``read_file`` decoded as UTF-8 (undecodable bytes replaced)."""
    return read_file(path).decode("utf-8", "replace")


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, fewer only at the end of the file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
