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

# Temp files carry this prefix so a restart can find and remove the ones a crash left behind,
# without ever touching files that ckptd did not create.
TEMP_PREFIX = ".ckptd-tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (e.g. certain FUSE mounts) refuse fsync on directories; the rename
        # itself is still atomic there, so this is not worth failing the write over.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    return final.parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{final.name}"


@contextlib.contextmanager
def atomic_output(final: Path, mode: int = 0o644) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` for writing; on success the temp file becomes ``final``.

    The caller writes through ``fd``; this helper fsyncs, renames over ``final`` and fsyncs the
    folder. On any exception the temp file is removed and ``final`` is untouched.
    """
    temp = temp_path_for(final)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        # The umask must not make artifacts unreadable for the group that deploys them.
        os.fchmod(fd, mode)
        yield fd, temp
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(final.parent)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a write may take fewer than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
