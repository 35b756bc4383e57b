"""Page-cache hints of a slim's output and source: start writeback early, drop what is done,
read a cold source ahead.

None of these changes what is written or when it is durable (the fsync in
``ckptd.fs.durable.atomic_output`` does that); each makes a slim cost less of what a trainer on
the same box feels: the final fsync has little left (``Writeback``), the artifact leaves no
page-cache residue (``PageDrop``), and a cold source is read by the disk while the copy works
(``ReadAhead``). Where a call is refused or missing, each hint turns itself off.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence

DROP_STEP = 16 * 1024 * 1024  # the copy's chunk: one fadvise per chunk at most
READ_AHEAD = 64 * 1024 * 1024  # how far ahead of the copy a cold source is asked for


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>; the os module has no sync_file_range


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only a slim needs it: not at daemon start

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


class Writeback:
    """Starts writeback of the output as it is written, so the final fsync has little left.

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` only queues the pages for writing; durability
    still comes from the fsync in ``atomic_output``. Where it is not supported it is skipped.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._done = 0
        self._call = _sync_file_range()

    def start(self, upto: int) -> None:
        if self._call is None or upto <= self._done:
            return
        if self._call(self._fd, self._done, upto - self._done, _SYNC_FILE_RANGE_WRITE) != 0:
            self._call = None  # e.g. a filesystem that refuses: the fsync does it all
        self._done = upto


class PageDrop:
    """Drops the output's pages from the page cache behind the read-back, as the copy goes.

    ``posix_fadvise(POSIX_FADV_DONTNEED)`` on a range the verifier is done with frees the pages
    already written back and leaves the rest (still dirty or under writeback) alone; it never
    waits. What is left is dropped after the fsync (``atomic_output(drop_cache=True)``), which
    then has little to do: the drop costs the copying thread, not the end of the slim.
    """

    def __init__(self, fd: int, enabled: bool) -> None:
        self._fd = fd
        self._done = 0
        self._enabled = enabled and hasattr(os, "posix_fadvise")

    def drain(self, wait_released: Callable[[int], int], total: int) -> None:
        """Drop behind the verifier until it is done with ``total`` bytes (the copy is over):
        ``wait_released(n)`` blocks until it is done with more than ``n`` bytes, and returns
        how many (no more than ``n`` when it stopped)."""
        while self._enabled and total - self._done > DROP_STEP:
            released = wait_released(self._done + DROP_STEP)
            if released <= self._done + DROP_STEP:  # the verifier stopped (done or failed)
                return
            self.upto(released)

    def upto(self, offset: int) -> None:
        if not self._enabled or offset - self._done < DROP_STEP:
            return
        try:
            os.posix_fadvise(self._fd, self._done, offset - self._done, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._enabled = False
        self._done = offset


class ReadAhead:
    """Asks for the source's next ranges ahead of the copy (``POSIX_FADV_WILLNEED``).

    A cold source (a checkpoint written minutes ago on a busy box, its pages gone) is otherwise
    read by the copy itself, page fault by page fault, while nothing else can proceed; with the
    next ``READ_AHEAD`` bytes requested early, the disk reads them while the current chunk is
    copied. On a cached source each call only finds the pages there.
    """

    def __init__(self, src_fd: int, spans: Sequence[tuple[int, int]]) -> None:
        self._fd = src_fd
        self._spans = [span for span in spans if span[1] > 0]  # a length of 0 means "to EOF"
        self._index = self._offset = self._asked = 0
        self._enabled = hasattr(os, "posix_fadvise")

    def upto(self, copied: int) -> None:
        """``copied``: bytes of the spans copied so far; ask for the next ``READ_AHEAD``."""
        target = copied + READ_AHEAD
        while self._enabled and self._asked < target and self._index < len(self._spans):
            start, size = self._spans[self._index]
            n = min(size - self._offset, target - self._asked)
            try:
                os.posix_fadvise(self._fd, start + self._offset, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                self._enabled = False
            self._offset += n
            self._asked += n
            if self._offset == size:
                self._index, self._offset = self._index + 1, 0
