"""Making durable what a deletion is decided on, before the deletion.

A trainer does not fsync its checkpoints, its resume pointer or its metric log (MMEngine
writes them with plain ``write`` and ``close``); after a power cut the kernel may have kept
ckptd's unlink of an old checkpoint but not the newer checkpoint, pointer or log record that
made the old one deletable. So before a pass deletes anything it fsyncs those files and every
folder on their way up to the work_dir: once they are on disk, no deletion can outlive them.
Files already clean cost one journal check each, and only passes that delete pay it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ckptd.core.reads import call_failed
from ckptd.fs.names import plain_name

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# fsync is refused this way on filesystems that have nothing to flush (some FUSE mounts)
_NOT_SUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EROFS)


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NOT_SUPPORTED:
            raise call_failed("fsync", exc, path) from exc


def _fsync_at(dir_fd: int, name: str, path: Path) -> None:
    """fsync ``name`` in ``dir_fd`` (a folder: every file in it, then itself); never through a
    symlink. Gone is fine: what is not there justifies nothing. ``path`` names it in errors."""
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: its name is made durable with its folder
            return
        raise call_failed("open", exc, path) from exc
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            try:
                entries = os.listdir(fd)
            except OSError as exc:
                raise call_failed("list", exc, path) from exc
            for entry in entries:
                _fsync_at(fd, entry, path / entry)
        _fsync(fd, path)
    finally:
        os.close(fd)


def make_folders(folder: Path) -> None:
    """``mkdir -p folder``, each new folder's name fsynced in its parent: the artifact folder
    (possibly outside the work_dir) must survive a power cut once an artifact in it lets a
    checkpoint be deleted."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: its creator syncs it
            new.mkdir()
        _fsync_folder(new.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise call_failed("open", exc, folder) from exc
    try:
        _fsync(fd, folder)
    finally:
        os.close(fd)


def make_durable(work_dir: Path, names: Iterable[str]) -> None:
    """fsync each relative ``name`` under ``work_dir`` and the folders holding them, up to and
    including the work_dir. Raises ``OSError`` when the disk refuses (then: do not delete)."""
    try:
        root = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise call_failed("open", exc, work_dir) from exc
    try:
        folders = {"."}
        for name in sorted(set(names)):
            parts = name.split("/")
            if not all(plain_name(p) for p in parts):
                continue
            _fsync_at(root, name, work_dir / name)
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        for folder in sorted(folders, key=lambda f: -f.count("/")):  # deepest first
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                fd = root if folder == "." else os.open(folder, _READ, dir_fd=root)
                try:
                    _fsync(fd, work_dir / folder)
                finally:
                    if fd != root:
                        os.close(fd)
    finally:
        os.close(root)
