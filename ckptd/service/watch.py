"""Watching with watchdog: events only mark a work_dir dirty; the reconciler does the rest.

inotify where it sees every write; polling for filesystems where inotify cannot see other
machines' writes (NFS, CIFS/SMB, FUSE, Lustre, GPFS, …) and for any folder where the inotify
watch limit was reached. Only work_dir roots and their metric folders are watched, plus the
folders that globs match new work_dirs in. However many folders: one inotify reader thread
(``service/inotify``) and one polling thread (``service/polling``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ckptd.core.reads import read_text
from ckptd.service.change import Change
from ckptd.service.inotify import InotifyWatches
from ckptd.service.polling import FolderPoller

__all__ = ["Change", "Watcher", "fstype_of", "needs_polling", "read_mounts", "watch_plan"]

log = logging.getLogger("ckptd.watch")

# Filesystems where inotify only reports this machine's own writes (or nothing at all).
REMOTE_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "ceph",
        "glusterfs",
        "beegfs",
        "panfs",
        "afs",
        "9p",
        "davfs",
        "fuse",
        "fuseblk",
        "virtiofs",
    }
)
WATCH_LIMIT_HELP = (
    "inotify watch limit reached (fs.inotify.max_user_watches); polling this folder instead. "
    "Raise the limit with: sysctl -w fs.inotify.max_user_watches=524288 (and persist it in "
    "/etc/sysctl.d/)"
)


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return field.encode().decode("unicode_escape") if "\\" in field else field


def read_mounts(text: str | None = None) -> list[tuple[str, str]]:
    """(mount point, fstype) pairs from /proc/mounts, longest mount point first."""
    if text is None:
        try:
            text = read_text("/proc/mounts")
        except OSError:
            return []
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append((_unescape_mount(parts[1]), parts[2]))
    return sorted(mounts, key=lambda m: len(m[0]), reverse=True)


def fstype_of(path: Path, mounts: list[tuple[str, str]]) -> str:
    real = os.path.realpath(path)
    for point, fstype in mounts:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return fstype
    return ""


def needs_polling(fstype: str) -> bool:
    return fstype in REMOTE_FSTYPES or fstype.startswith("fuse.")


class Watcher:
    """Keeps one watch per folder in sync with what the daemon wants watched."""

    def __init__(self, mode: str, poll_interval: float, sink: Callable[[Change], None]) -> None:
        self.mode = mode
        self.sink = sink
        self._inotify = InotifyWatches(sink)
        self._polling = FolderPoller(poll_interval, sink)
        self._roots: dict[Path, Path] = {}  # folder -> the root it was watched for
        self._mounts = read_mounts()
        self._fstypes: dict[int, str] = {}  # st_dev -> fstype
        self._lock = threading.Lock()
        self.fell_back: set[Path] = set()  # folders polled because inotify could not watch them

    def start(self) -> None:
        """Nothing to start: each watcher's thread starts with its first folder."""

    def stop(self) -> None:
        self._inotify.stop()
        self._polling.stop()

    def kind_for(self, folder: Path) -> str:
        if self.mode != "auto":
            return self.mode
        try:
            device = os.stat(folder).st_dev
        except OSError:
            device = None
        fstype = self._fstypes.get(device) if device is not None else None
        if fstype is None:
            # realpath and the mount table once per filesystem, not per folder (2,000
            # work_dirs: 6,000 folders, ~0.3 s at start-up)
            fstype = fstype_of(folder, self._mounts)
            if device is not None:
                self._fstypes[device] = fstype
        return "poll" if needs_polling(fstype) else "inotify"

    @property
    def watched(self) -> dict[Path, str]:
        with self._lock:
            inotify, polled = self._inotify.folders, self._polling.folders
            return {
                p: "inotify" if p in inotify else "poll"
                for p in self._roots
                if p in inotify or p in polled
            }

    def sync(self, wanted: dict[Path, Path]) -> None:
        """Watch exactly ``wanted`` (folder -> the root its events are reported under).

        A folder whose inotify watch went away (deleted, moved) is watched again here."""
        with self._lock:
            live = self._inotify.folders | self._polling.folders
            for folder in list(self._roots):
                if folder not in wanted or self._roots[folder] != wanted[folder]:
                    self._unwatch(folder)
                elif folder not in live:
                    del self._roots[folder]  # its watch was dropped: try again below
            for folder, root in wanted.items():
                if folder not in self._roots and folder.is_dir():
                    self._schedule(folder, root)

    def _unwatch(self, folder: Path) -> None:
        del self._roots[folder]
        self._inotify.remove(folder)
        self._polling.remove(folder)

    def _schedule(self, folder: Path, root: Path) -> None:
        if self.kind_for(folder) == "poll" or folder in self.fell_back:
            self._polling.add(folder, root)
            self._roots[folder] = root
            return
        try:
            self._inotify.add(folder, root)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return  # vanished (or unreadable); the next sync tries again, passes report it
            # Any other failure of inotify_add_watch (EIO found by injecting it: it escaped
            # and stopped the daemon) falls back to polling this folder, like the limit.
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                text = WATCH_LIMIT_HELP
            else:
                text = f"{folder}: cannot watch it (inotify_add_watch: {exc.strerror}); polling it"
            log.warning(text, extra={"fields": {"folder": str(folder), "action": "watch-fallback"}})
            self.fell_back.add(folder)
            self._polling.add(folder, root)
        self._roots[folder] = root


def watch_plan(
    work_dirs: Iterable[tuple[Path, list[Path]]], discovery_folders: Iterable[Path]
) -> dict[Path, Path]:
    """Folder -> root for a set of work_dirs (with their layout's folders) and glob parents."""
    wanted: dict[Path, Path] = {}
    for folder in discovery_folders:
        wanted[folder] = folder
    for work_dir, folders in work_dirs:
        for folder in folders:
            wanted[folder] = work_dir
    return wanted
