"""Durable, atomic file operations shared by the state store, the manifest and the slimmer.

Every file ckptd writes goes through a temp file in the destination folder, fsync, rename and
fsync of the folder, so a reader (or a restart after ``kill -9``) sees the old file or the new
one, never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ckptd.core.reads import call_failed

# Temp files carry this prefix so a restart can find and remove the ones a crash left behind,
# without ever touching files that ckptd did not create.
TEMP_PREFIX = ".ckptd-tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise call_failed("open the folder to fsync it", exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (e.g. certain FUSE mounts) refuse fsync on directories; the rename
        # itself is still atomic there, so this is not worth failing the write over.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise call_failed("fsync the folder", exc, path) from exc
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    return final.parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final.name}"


def drop_cached_pages(fd: int) -> None:
    """Ask the kernel to drop the file's clean pages from the page cache (a hint: no error).

    Only pages already written back can go, so call it after the fsync. ckptd's artifacts are
    written once and not read again by this host soon, and a trainer's data loader wants the
    memory; see docs/performance.md for what it costs and what it frees.
    """
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def atomic_output(
    final: Path, mode: int = 0o644, *, drop_cache: bool = False
) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` for writing; on success the temp file becomes ``final``.

    The caller writes through ``fd``; this helper fsyncs, renames over ``final`` and fsyncs the
    folder. On any exception the temp file is removed and ``final`` is untouched. With
    ``drop_cache`` the file's pages leave the page cache once they are durable.
    """
    temp = temp_path_for(final)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise call_failed("create a temp file for", exc, final) from exc
    try:
        # The umask must not make artifacts unreadable for the group that deploys them.
        os.fchmod(fd, mode)
        try:
            yield fd, temp
        except OSError as exc:
            raise exc if exc.filename else call_failed("write", exc, final) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise call_failed("fsync", exc, temp) from exc
        if drop_cache:
            drop_cached_pages(fd)
    except BaseException:
        os.close(fd)
        _remove_temp(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, final)
    except BaseException as exc:
        _remove_temp(temp)
        if isinstance(exc, OSError):
            raise call_failed(f"rename {temp.name} to", exc, final) from exc
        raise
    fsync_dir(final.parent)


def _remove_temp(temp: Path) -> None:
    """Remove a failed write's temp file. If that fails too, the first error is the one to
    report (found by injecting unlink EIO: it replaced the ENOSPC that mattered); the next
    pass removes the file (``remove_stale_temp_files``)."""
    with contextlib.suppress(OSError):
        os.unlink(temp)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as exc:
            raise call_failed("write", exc) from exc
        view = view[written:]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a write may take fewer than asked)."""
    view = memoryview(data)
    while view:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise call_failed("pwrite", exc) from exc
        view = view[written:]
        offset += written


def atomic_write_bytes(final: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_output(final, mode) as (fd, _temp):
        write_all(fd, data)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temp files a crashed ckptd left in ``folder``; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise call_failed("remove a stale temp file", exc) from exc
            removed.append(Path(entry.path))
    return removed
