"""Every inotify watch of the daemon behind one reader thread.

watchdog's ``InotifyObserver`` runs one emitter thread per scheduled folder (3 threads per
work_dir, 607 at 200 work_dirs). Its building block below the emitters, ``InotifyFD``, is one
inotify instance read by one thread that calls a callback per watch descriptor; ckptd's
events are hints that mark a work_dir due, so a callback that turns the raw event into a
``Change`` right there is all it needs. The thread count no longer grows with the work_dirs.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from ckptd.service.change import Change

log = logging.getLogger("ckptd.watch")

# What changes a folder's direct entries or a file's content; not "opened" nor "closed without
# writing", so reads (ckptd's own scans included) wake nothing.
FOLDER_EVENTS = Mask(
    InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE
    | InotifyConstants.IN_MODIFY
    | InotifyConstants.IN_ATTRIB
    | InotifyConstants.IN_MOVED_FROM
    | InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_CLOSE_WRITE
    | InotifyConstants.IN_DELETE_SELF
    | InotifyConstants.IN_MOVE_SELF
    | InotifyConstants.IN_DONT_FOLLOW
    | InotifyConstants.IN_ONLYDIR
)
OVERFLOW_LOG_EVERY = 10.0  # seconds: one warning per burst of overflows, not one per folder


class _FolderWatch:
    """The callback of one watched folder: its events become ``Change``s under its root."""

    def __init__(self, owner: InotifyWatches, folder: Path, root: Path) -> None:
        self.owner = owner
        self.folder = folder
        self.root = root
        self.wd = WatchDescriptor(-1)

    @property
    def id(self) -> CallbackId:
        return CallbackId(id(self))

    def on_event(self, event: InotifyEvent) -> None:
        path = self.folder / os.fsdecode(event.name) if event.name else self.folder
        self.owner.sink(Change(self.root, path, bool(event.is_close_write)))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        # The folder was deleted or moved away (IN_IGNORED): forget it, so that the next sync
        # watches it again if it comes back; its work_dir is due either way.
        self.owner.dropped(self)
        self.owner.sink(Change(self.root, self.folder, False))

    def on_queue_overflow(self) -> None:
        # The kernel dropped events: every watched root is due (events are only hints).
        self.owner.overflowed()
        self.owner.sink(Change(self.root, self.folder, False))


class InotifyWatches:
    """Folders watched through one ``InotifyFD`` (one inotify instance, one reader thread)."""

    def __init__(self, sink: Callable[[Change], None]) -> None:
        self.sink = sink
        self._fd: InotifyFD | None = None
        self._watches: dict[Path, _FolderWatch] = {}
        self._lock = threading.Lock()
        self._last_overflow_log = -OVERFLOW_LOG_EVERY

    def _reader(self) -> InotifyFD:
        if self._fd is None:  # the instance and its thread only once something is watched
            self._fd = InotifyFD()
            self._fd.start()
        return self._fd

    def add(self, folder: Path, root: Path) -> None:
        """Watch ``folder``; raises ``OSError`` (ENOSPC at the watch limit, ENOENT, …)."""
        watch = _FolderWatch(self, folder, root)
        with self._lock:
            reader = self._reader()
            watch.wd = reader.add_callback(os.fsencode(folder), FOLDER_EVENTS, watch, watch.id)
            if watch.wd < 0:  # InotifyFD lets EACCES through as wd -1
                reader.remove_callbacks([(watch.wd, watch.id)])
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            self._watches[folder] = watch

    def remove(self, folder: Path) -> None:
        with self._lock:
            watch = self._watches.pop(folder, None)
            if watch is not None and self._fd is not None:
                self._fd.remove_callbacks([(watch.wd, watch.id)])

    def dropped(self, watch: _FolderWatch) -> None:
        with self._lock:
            if self._watches.get(watch.folder) is watch:
                del self._watches[watch.folder]

    def overflowed(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_overflow_log < OVERFLOW_LOG_EVERY:
                return
            self._last_overflow_log = now
        log.warning(
            "inotify queue overflowed: events were lost; every work_dir is due for a pass "
            "(raise fs.inotify.max_queued_events if this repeats)",
            extra={"fields": {"action": "watch-overflow"}},
        )

    @property
    def folders(self) -> set[Path]:
        with self._lock:
            return set(self._watches)

    def stop(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            self._watches.clear()
        if fd is not None:
            fd.stop()
            fd.join(timeout=5)
