"""Deleting a checkpoint (a file or a folder) inside a work_dir, and nothing else.

Every path component is opened relative to a descriptor of the work_dir with ``O_NOFOLLOW``, so
a symlink swapped in anywhere on the way makes the call fail instead of leading outside. A
checkpoint is removed only while its stat (for a folder: the ``tree_stat`` fingerprint) is the
one it was planned with. A folder is first renamed to a ckptd trash name in the same parent,
so the trainer never sees it half deleted and a crash mid-way leaves only trash, which the
next pass removes (``remove_stale_temp_dirs``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat as statmod
import time
from pathlib import Path

from ckptd.core.model import FileStat
from ckptd.fs.durable import TEMP_PREFIX
from ckptd.fs.names import plain_name

TRASH_PREFIX = f"{TEMP_PREFIX}del-"
# Every folder on a deletion path is opened so: never through a symlink, never inherited.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Checkpoint folders are flat or nearly so; deeper trees are refused rather than recursed.
MAX_DEPTH = 16


class NotPlainTree(Exception):
    """A folder holds a symlink or a special file, or is nested too deeply."""


def _tree_walk(dir_fd: int, where: str, depth: int) -> tuple[int, int]:
    """(bytes of regular files, newest mtime_ns) below ``dir_fd``; never follows a symlink."""
    if depth > MAX_DEPTH:
        raise NotPlainTree(f"{where} is nested more than {MAX_DEPTH} folders deep")
    total, newest = 0, os.fstat(dir_fd).st_mtime_ns
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        newest = max(newest, st.st_mtime_ns)
        if statmod.S_ISREG(st.st_mode):
            total += st.st_size
        elif statmod.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                size, mtime = _tree_walk(fd, f"{where}/{name}", depth + 1)
            finally:
                os.close(fd)
            total, newest = total + size, max(newest, mtime)
        elif statmod.S_ISLNK(st.st_mode):
            raise NotPlainTree(f"{where}/{name} is a symlink")
        else:
            raise NotPlainTree(f"{where}/{name} is not a regular file or folder")
    return total, newest


def tree_stat_fd(dir_fd: int, where: str = ".") -> FileStat:
    """A folder's fingerprint: its inode, the bytes of all files in it, the newest mtime.

    Any file written, added, removed or renamed inside changes it. Raises ``NotPlainTree``.
    """
    size, newest = _tree_walk(dir_fd, where, 0)
    return FileStat(os.fstat(dir_fd).st_ino, size, newest)


def tree_stat(path: Path) -> FileStat:
    fd = os.open(path, DIR_FLAGS)
    try:
        return tree_stat_fd(fd, path.name)
    finally:
        os.close(fd)


def _remove_tree(parent_fd: int, name: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise NotPlainTree(f"{name} is nested more than {MAX_DEPTH} folders deep")
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        for entry in os.listdir(fd):
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if statmod.S_ISDIR(st.st_mode):
                _remove_tree(fd, entry, depth + 1)
            else:
                os.unlink(entry, dir_fd=fd)  # never follows: removes a link, not its target
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _split(name: str) -> list[str] | None:
    parts = name.split("/")
    if not all(plain_name(p) for p in parts):
        return None
    return parts


def _open_parent(root_fd: int, parts: list[str]) -> int:
    fd = os.dup(root_fd)
    try:
        for part in parts:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def delete_checkpoint(work_dir: Path, name: str, planned: FileStat) -> tuple[bool, str]:
    """Remove the checkpoint ``name`` (relative, '/'-separated) if it is still as planned.

    Returns (done, detail); ``detail`` says why not, or "already gone".
    """
    parts = _split(name)
    if parts is None:
        return False, "not a plain path inside the work_dir; left alone"
    root_fd = os.open(work_dir, DIR_FLAGS)
    try:
        try:
            parent_fd = _open_parent(root_fd, parts[:-1])
        except FileNotFoundError:
            return True, "already gone"
        except NotADirectoryError:
            return False, "a folder on its path is not a folder (or is a symlink); left alone"
        except OSError as exc:
            return False, f"cannot open its folder: {exc.strerror}"
        try:
            return _delete_in(parent_fd, parts[-1], planned)
        finally:
            os.close(parent_fd)
    finally:
        os.close(root_fd)


def _delete_in(parent_fd: int, leaf: str, planned: FileStat) -> tuple[bool, str]:
    try:
        st = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True, "already gone"
    except OSError as exc:
        return False, f"cannot delete: {exc.strerror}"
    try:
        if statmod.S_ISREG(st.st_mode):
            if FileStat.of(st) != planned:
                return False, "changed since it was planned; left for later"
            os.unlink(leaf, dir_fd=parent_fd)
            return True, ""
        if statmod.S_ISDIR(st.st_mode):
            return _delete_folder(parent_fd, leaf, planned)
    except OSError as exc:
        return False, f"cannot delete: {exc.strerror}"
    return False, "not a regular file or folder (a symlink?); ckptd never deletes it"


def _delete_folder(parent_fd: int, leaf: str, planned: FileStat) -> tuple[bool, str]:
    fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
    try:
        try:
            if tree_stat_fd(fd, leaf) != planned:
                return False, "changed since it was planned; left for later"
        except NotPlainTree as exc:
            return False, f"{exc}; ckptd never deletes such a folder"
        trash = f"{TRASH_PREFIX}{secrets.token_hex(4)}-{leaf}"
        os.rename(leaf, trash, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        try:
            unchanged = tree_stat_fd(fd, leaf) == planned
        except NotPlainTree:
            unchanged = False
        if not unchanged:
            # Written to between the check and the rename: put it back if its name is free.
            try:
                os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(trash, leaf, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
                return False, "changed while being deleted; put back and left for later"
            kept = f"{leaf}.ckptd-changed-{secrets.token_hex(4)}"
            os.rename(trash, kept, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            return False, f"changed while being deleted and its name was taken; kept as {kept}"
    finally:
        os.close(fd)
    _remove_tree(parent_fd, trash)
    return True, ""


def remove_stale_temp_dirs(folder: Path, older_than: float = 0.0) -> list[str]:
    """Remove folders ckptd left behind in ``folder`` (trash of an interrupted deletion, the
    staging folder of an interrupted artifact copy): only names with ckptd's temp prefix, and
    only those unchanged for ``older_than`` seconds (another pass may still be writing one)."""
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return removed
    if not entries:
        return removed
    now = time.time()
    fd = os.open(folder, DIR_FLAGS)
    try:
        for entry in entries:
            with contextlib.suppress(OSError, NotPlainTree):
                st = entry.stat(follow_symlinks=False)
                if not statmod.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than:
                    continue
                _remove_tree(fd, entry.name)
                removed.append(entry.name)
    finally:
        os.close(fd)
    return removed


def remove_own_folder(folder: Path, name: str) -> None:
    """Remove ``folder/name``, a folder ckptd created, without following any symlink."""
    fd = os.open(folder, DIR_FLAGS)
    try:
        _remove_tree(fd, name)
    finally:
        os.close(fd)
