"""Watching with watchdog: events only mark a work_dir dirty; the reconciler does the rest.

inotify where it sees every write; a polling observer for filesystems where inotify cannot see
other machines' writes (NFS, CIFS/SMB, FUSE, Lustre, GPFS, …) and for any folder where the
inotify watch limit was reached. Only work_dir roots and their metric folders are watched,
plus the folders that globs match new work_dirs in.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from ckptd.core.reads import read_text

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
# Every event but "opened" and "closed without writing", which _Handler ignores anyway. Asking
# the kernel not to report them at all keeps reads (ckptd's own scans included) from waking
# three threads per directory opened: at 200 work_dirs that was most of the idle wakeups.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent, FileModifiedEvent,
    DirModifiedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent, FileAttribEvent,
    DirAttribEvent,
]  # fmt: skip
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


@dataclass(frozen=True, slots=True)
class Change:
    """A hint that something changed under ``root`` (a work_dir or a discovery folder)."""

    root: Path
    path: Path
    closed_after_write: bool


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, sink: Callable[[Change], None]) -> None:
        self.root = root
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (including ckptd's own) change nothing
        src = event.src_path
        path = Path(os.fsdecode(src))
        self.sink(Change(self.root, path, event.event_type == "closed"))
        dest = getattr(event, "dest_path", "")
        if dest:
            self.sink(Change(self.root, Path(os.fsdecode(dest)), False))


class Watcher:
    """Keeps one watch per folder in sync with what the daemon wants watched."""

    def __init__(self, mode: str, poll_interval: float, sink: Callable[[Change], None]) -> None:
        self.mode = mode
        self.sink = sink
        self._inotify: BaseObserver = Observer()
        self._polling: BaseObserver = PollingObserver(timeout=poll_interval)
        self._watches: dict[Path, tuple[BaseObserver, ObservedWatch, Path]] = {}
        self._mounts = read_mounts()
        self._lock = threading.Lock()
        self.fell_back: set[Path] = set()  # folders polled because inotify could not watch them

    def start(self) -> None:
        self._inotify.start()
        self._polling.start()

    def stop(self) -> None:
        for observer in (self._inotify, self._polling):
            observer.stop()
        for observer in (self._inotify, self._polling):
            observer.join(timeout=5)

    def kind_for(self, folder: Path) -> str:
        if self.mode != "auto":
            return self.mode
        return "poll" if needs_polling(fstype_of(folder, self._mounts)) else "inotify"

    @property
    def watched(self) -> dict[Path, str]:
        with self._lock:
            return {
                p: ("poll" if obs is self._polling else "inotify")
                for p, (obs, _, _) in self._watches.items()
            }

    def sync(self, wanted: dict[Path, Path]) -> None:
        """Watch exactly ``wanted`` (folder -> the root its events are reported under)."""
        with self._lock:
            for folder in list(self._watches):
                if folder not in wanted or self._watches[folder][2] != wanted[folder]:
                    observer, watch, _ = self._watches.pop(folder)
                    with contextlib.suppress(KeyError, OSError):
                        observer.unschedule(watch)
            for folder, root in wanted.items():
                if folder not in self._watches and folder.is_dir():
                    self._schedule(folder, root)

    def _schedule(self, folder: Path, root: Path) -> None:
        handler = _Handler(root, self.sink)
        polling = self.kind_for(folder) == "poll" or folder in self.fell_back
        observer = self._polling if polling else self._inotify
        try:
            watch = observer.schedule(
                handler, str(folder), recursive=False, event_filter=WATCHED_EVENTS
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # vanished between listing and watching; the next sync sees it
            if observer is not self._inotify:
                raise
            # Any other failure of inotify_add_watch (EIO found by injecting it: it escaped
            # and stopped the daemon) falls back to polling this folder, like the limit.
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                text = WATCH_LIMIT_HELP
            else:
                text = f"{folder}: cannot watch it (inotify_add_watch: {exc.strerror}); polling it"
            log.warning(text, extra={"fields": {"folder": str(folder), "action": "watch-fallback"}})
            self.fell_back.add(folder)
            observer = self._polling
            watch = observer.schedule(
                handler, str(folder), recursive=False, event_filter=WATCHED_EVENTS
            )
        self._watches[folder] = (observer, watch, root)


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
