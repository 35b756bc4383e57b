"""Copy byte ranges in the kernel, and verify what was written in background threads.

The copy uses ``copy_file_range`` (no bytes pass through this process; on filesystems with
reflinks or server-side copy not even through the page cache), falling back to a bounded
read/write loop where the kernel refuses. ``ReadBackVerifier`` reads the output back while it is
being written, for its sha256 and the CRC32 of each copied range: reading the *output* proves
the bytes the file holds are the ones the source's central directory vouches for, whatever
the copy did (hashing the source ranges instead would cost the same read and hash, and would
not catch a copy that went wrong: a kernel or filesystem copy bug would then put a sha256 in
the manifest that the file does not have). hashlib and the CRC (``ckptd.slim.crc``) release
the GIL on large buffers, so hashing and checking overlap the copy; the writeback of each
copied chunk is started right away (``sync_file_range``), so the final fsync waits for the last
chunk rather than for the whole file; and with ``drop_pages`` the output's pages leave the page
cache behind the read-back, so a slim leaves no residue a trainer's data loader would compete
with (``ckptd.slim.pagecache``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ckptd.core.cancel import CancelToken, check
from ckptd.core.reads import call_failed
from ckptd.fs.durable import pwrite_all
from ckptd.slim.crc import crc32
from ckptd.slim.pagecache import PageDrop, ReadAhead, Writeback
from ckptd.slim.torchzip import Copy

# Bounds the latency of progress reports and of an abort, and how far the verifier threads lag
# behind the copy: the sha256 thread is the critical path, so it should start early.
COPY_CHUNK = 16 * 1024 * 1024
READ_CHUNK = 1024 * 1024  # read-back buffer: the peak RSS does not grow with the checkpoint
_BUFFERS = 4  # read-back buffers in flight between the sha256 and the CRC thread
_FALLBACK_ERRNOS = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}
)


class Gather(Protocol):
    """Output bytes made in this process (e.g. a strided tensor's elements), in bounded chunks."""

    size: int

    def chunks(self, src_fd: int) -> Iterator[bytes | bytearray]: ...


class CrcMismatch(Exception):
    def __init__(self, copy: Copy) -> None:
        self.copy = copy
        super().__init__(copy.name)


_CRC_POLY = 0xEDB88320  # CRC-32 (zip, zlib), reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (zlib's multmodp); ``a`` is never 0 here."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, which
    Python's zlib does not expose): a record laid out from shards gets its CRC without its
    bytes being read."""
    if len2 <= 0:
        return crc1
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _copy_buffered(src_fd: int, dst_fd: int, src: int, dst: int, size: int) -> int:
    buffer = bytearray(min(size, READ_CHUNK))
    done = 0
    while done < size:
        view = memoryview(buffer)[: min(len(buffer), size - done)]
        n = os.preadv(src_fd, [view], src + done)
        if n == 0:
            break
        pwrite_all(dst_fd, view[:n], dst + done)
        done += n
    return done


def copy_range(
    src_fd: int, src: int, dst_fd: int, dst: int, size: int, on_chunk: Callable[[int], None]
) -> None:
    """Copy ``size`` bytes; ``on_chunk(done)`` after each chunk. EOFError if the source ends."""
    done = 0
    in_kernel = hasattr(os, "copy_file_range")
    while done < size:
        n = min(COPY_CHUNK, size - done)
        if in_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, src + done, dst + done)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise call_failed("copy_file_range", exc) from exc
                in_kernel = False
                continue
        else:
            copied = _copy_buffered(src_fd, dst_fd, src + done, dst + done, n)
        if copied == 0:
            raise EOFError(f"source ended {size - done} bytes early")
        done += copied
        on_chunk(done)


class ReadBackVerifier:
    """sha256 of a file being written front to back, plus CRC32 checks of given ranges.

    The output is read back once, as it becomes final, into a small ring of buffers: the
    reading thread hashes each buffer while a second thread checks the CRCs of the copied
    ranges in the same buffer (hashlib and the CRC release the GIL, so the two run on two cores
    and the bytes are copied out of the page cache only once). Call ``advance(n)`` whenever
    the first ``n`` bytes are final, ``finish(total)`` for the hex digest (it raises what a
    thread raised: ``CrcMismatch``, ``OSError``, ``EOFError``), or ``abort()`` on the way out
    of a failure.
    """

    def __init__(self, path: str | os.PathLike[str], checks: Sequence[Copy]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._checks = sorted(
            (c for c in checks if c.size and c.checked), key=lambda c: c.dest_offset
        )
        self._cond = threading.Condition()
        self._written = 0
        self._total = -1
        self._stop = False
        self.error: BaseException | None = None
        self._sha = hashlib.sha256()
        self._buffers = [memoryview(bytearray(READ_CHUNK)) for _ in range(_BUFFERS)]
        self._free = list(range(_BUFFERS))  # buffers the CRC thread is done with
        self.released = 0  # bytes both threads are done with: the output's pages may go
        self._filled: collections.deque[tuple[int, int, int]] = collections.deque()
        self._read_all = False  # the reading thread has handed over its last buffer
        self._threads = [
            threading.Thread(target=self._run, args=(loop,), name=f"ckptd-{name}", daemon=True)
            for name, loop in (("sha256", self._hash_all), ("crc32", self._check_crcs))
        ]
        for thread in self._threads:
            thread.start()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify_all()
        if self.error is not None:
            raise self.error

    def wait_released(self, beyond: int) -> int:
        """Block until more than ``beyond`` bytes are released (or the threads stopped)."""
        with self._cond:
            while self.released <= beyond and not self._stop and not self._read_all:
                self._cond.wait()
            return self.released

    def finish(self, total: int) -> str:
        with self._cond:
            self._written = self._total = total
            self._cond.notify_all()
        self._close()
        if self.error is not None:
            raise self.error
        return self._sha.hexdigest()

    def abort(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._close()

    def _close(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # handed to the writing thread
            with self._cond:
                self.error = self.error or exc
                self._stop = True
                self._cond.notify_all()

    def _final_up_to(self, pos: int) -> int:
        """Wait until bytes past ``pos`` are final; return how far, or -1 to stop."""
        with self._cond:
            while not self._stop and pos >= self._written and pos != self._total:
                self._cond.wait()
            return -1 if self._stop or pos == self._total else self._written

    def _read(self, view: memoryview, pos: int, end: int) -> memoryview:
        n = os.preadv(self._fd, [view[: min(len(view), end - pos)]], pos)
        if n == 0:
            raise EOFError("the output is shorter than what was written")
        return view[:n]

    def _take_buffer(self) -> int:
        with self._cond:
            while not self._stop and not self._free:
                self._cond.wait()
            return -1 if self._stop else self._free.pop()

    def _hash_all(self) -> None:
        pos = 0
        try:
            while (limit := self._final_up_to(pos)) >= 0:
                while pos < limit:
                    index = self._take_buffer()
                    if index < 0:
                        return
                    chunk = self._read(self._buffers[index], pos, limit)
                    with self._cond:
                        self._filled.append((index, pos, len(chunk)))
                        self._cond.notify_all()
                    self._sha.update(chunk)  # the CRC thread reads the same buffer meanwhile
                    pos += len(chunk)
        finally:
            with self._cond:
                self._read_all = True
                self._cond.notify_all()

    def _next_filled(self) -> tuple[int, int, int] | None:
        with self._cond:
            while not self._stop and not self._filled and not self._read_all:
                self._cond.wait()
            return None if self._stop or not self._filled else self._filled.popleft()

    def _check_crcs(self) -> None:
        checks, k, crc = self._checks, 0, 0
        while (item := self._next_filled()) is not None:
            index, start, size = item
            view, end = self._buffers[index], start + size
            while k < len(checks) and checks[k].dest_offset < end:
                check = checks[k]
                lo = max(start, check.dest_offset)
                hi = min(end, check.dest_offset + check.size)
                if lo < hi:
                    crc = crc32(view[lo - start : hi - start], crc)
                if hi < check.dest_offset + check.size:
                    break  # the range goes on in the next buffer
                if crc != check.crc32:
                    raise CrcMismatch(check)
                k, crc = k + 1, 0
            with self._cond:
                self._free.append(index)
                self.released = end
                self._cond.notify_all()
        if k < len(checks) and not self._stop:
            raise EOFError("the output ended before every copied range was checked")


def write_archive(
    src_fd: int,
    fd: int,
    temp: str | os.PathLike[str],
    pieces: Sequence[bytes | Copy | Gather],
    total: int,
    progress: Callable[[int, int], None] | None,
    cancel: CancelToken | None = None,
    checks: Sequence[Copy] = (),
    *,
    drop_pages: bool = False,
) -> str:
    """Write ``pieces`` (from ``layout_archive``) to ``fd`` (the file ``temp``), copying spans
    of ``src_fd`` (or of a copy's own ``fd``) and writing what ``Gather`` pieces make; return
    the output's sha256 once every checked copy's CRC, and every output range in ``checks``
    (pieced together from several copies), is verified. ``drop_pages``: drop the output's
    pages from the page cache behind the verifier (see ``pagecache.PageDrop``)."""
    copies = [p for p in pieces if isinstance(p, Copy)]
    verifier = ReadBackVerifier(temp, [*copies, *checks])
    writeback = Writeback(fd)
    page_drop = PageDrop(fd, drop_pages)
    # Read-ahead follows the copies out of ``src_fd``; copies from their own fds (the shards
    # of a consolidation) are each one sequential range and need no hint.
    read_ahead = ReadAhead(src_fd, [(c.source_offset, c.size) for c in copies if c.fd < 0])
    read_ahead.upto(0)
    if hasattr(os, "posix_fadvise"):  # read-ahead for a cold source (a no-op when cached)
        with contextlib.suppress(OSError):
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    try:
        pos = copied = 0
        pending = bytearray()
        for piece in pieces:
            if isinstance(piece, bytes):
                pending += piece
                continue
            pwrite_all(fd, pending, pos)
            pos += len(pending)
            pending.clear()
            verifier.advance(pos)
            is_copy = isinstance(piece, Copy) and piece.fd < 0

            def on_chunk(
                done: int, start: int = pos, before: int = copied, copying: bool = is_copy
            ) -> None:
                if copying:
                    read_ahead.upto(before + done)
                verifier.advance(start + done)
                writeback.start(start + done)
                page_drop.upto(verifier.released)
                check(cancel)
                if progress is not None:
                    progress(start + done, total)

            if isinstance(piece, Copy):
                from_src = piece.fd < 0
                from_fd = src_fd if from_src else piece.fd
                copy_range(from_fd, piece.source_offset, fd, pos, piece.size, on_chunk)
                if from_src:
                    copied += piece.size
            else:
                done = 0
                for chunk in piece.chunks(src_fd):
                    pwrite_all(fd, chunk, pos + done)
                    done += len(chunk)
                    on_chunk(done)
                if done != piece.size:
                    raise AssertionError(f"gathered {done} bytes of {piece.size}")
            pos += piece.size
        pwrite_all(fd, pending, pos)
        pos += len(pending)
        if pos != total:
            raise AssertionError(f"wrote {pos} bytes of a {total}-byte layout")
        verifier.advance(total)
        writeback.start(total)
        page_drop.drain(verifier.wait_released, total)
        sha256 = verifier.finish(total)
    except BaseException:
        verifier.abort()
        raise
    if progress is not None:
        progress(total, total)
    return sha256
