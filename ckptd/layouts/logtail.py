"""Incremental readers for append-only metric logs.

A :class:`Cursor` remembers how far a file was consumed (byte offset, inode, and a fingerprint
of the bytes just before the offset). Only complete lines are consumed; a partial last line
waits for its newline. A file that was truncated, replaced (new inode) or rewritten in place
(Lightning's CSVLogger rewrites ``metrics.csv`` from scratch when a column appears) is
detected and read again from the start, and the caller drops what it had from that file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.reads import pread_full

# Enough bytes to tell an append from a rewrite, small enough to read on every pass.
_FINGERPRINT_BYTES = 256
_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class Cursor:
    inode: int = 0
    offset: int = 0
    lines: int = 0  # complete lines consumed, so problems can name 1-based line numbers
    fingerprint: str = ""  # sha1 of up to 256 bytes before ``offset``

    def to_json(self) -> dict[str, int | str]:
        return {
            "inode": self.inode,
            "offset": self.offset,
            "lines": self.lines,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Cursor:
        return cls(
            inode=int(data.get("inode", 0)),  # type: ignore[call-overload]
            offset=int(data.get("offset", 0)),  # type: ignore[call-overload]
            lines=int(data.get("lines", 0)),  # type: ignore[call-overload]
            fingerprint=str(data.get("fingerprint", "")),
        )


@dataclass(frozen=True, slots=True)
class TailRead:
    """New complete lines since the cursor; ``restarted`` means drop earlier results."""

    lines: list[tuple[int, bytes]]  # (1-based line number, line without newline)
    cursor: Cursor
    restarted: bool


def _fingerprint(fd: int, end: int) -> str:
    start = max(0, end - _FINGERPRINT_BYTES)
    data = pread_full(fd, end - start, start)
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _still_ours(fd: int, st: os.stat_result, cursor: Cursor) -> bool:
    if cursor.offset == 0:
        return True
    if st.st_ino != cursor.inode or st.st_size < cursor.offset:
        return False
    return _fingerprint(fd, cursor.offset) == cursor.fingerprint


def _complete_lines(fd: int, start: int, end: int) -> Iterator[tuple[list[bytes], int]]:
    """Yield (complete lines of a chunk, offset after the last one's newline) for [start, end).

    A chunk at a time, not a line at a time: a million-line log is a few hundred yields.
    """
    pending = b""
    position = start
    while position < end:
        chunk = pread_full(fd, min(_CHUNK, end - position), position)
        if not chunk:
            break
        position += len(chunk)
        data = pending + chunk
        consumed_base = position - len(data)
        cut = data.rfind(b"\n")
        if cut < 0:
            pending = data
            continue
        yield data[:cut].split(b"\n"), consumed_base + cut + 1
        pending = data[cut + 1 :]


def read_new_lines(
    path: Path, cursor: Cursor, keep: Callable[[bytes], bool] | None = None
) -> TailRead:
    """Read complete lines appended since ``cursor``; restart when the file is not the same.

    ``keep`` filters lines cheaply before they are stored, so a million training-loss lines
    cost a scan, not a million objects.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        restarted = not _still_ours(fd, st, cursor)
        if restarted:
            cursor = Cursor(inode=st.st_ino)
        lines: list[tuple[int, bytes]] = []
        offset, count = cursor.offset, cursor.lines
        for chunk, end_offset in _complete_lines(fd, cursor.offset, st.st_size):
            kept: Iterable[tuple[int, bytes]] = enumerate(chunk, count + 1)
            if keep is not None:
                kept = ((number, line) for number, line in kept if keep(line))
            lines.extend((number, line.rstrip(b"\r")) for number, line in kept)
            count += len(chunk)
            offset = end_offset
        fingerprint = _fingerprint(fd, offset) if offset else ""
        new_cursor = Cursor(inode=st.st_ino, offset=offset, lines=count, fingerprint=fingerprint)
        return TailRead(lines=lines, cursor=new_cursor, restarted=restarted)
    finally:
        os.close(fd)
