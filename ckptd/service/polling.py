"""Every polled folder behind one thread.

watchdog's ``PollingObserver`` runs one emitter thread per folder; here one thread takes a
watchdog ``DirectorySnapshot`` of each polled folder (its direct entries only) every
``poll_interval`` and turns the ``DirectorySnapshotDiff`` into ``Change``s. Used where inotify
cannot see other machines' writes (network filesystems) and past the inotify watch limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.utils.dirsnapshot import (
    DirectorySnapshot,
    DirectorySnapshotDiff,
    EmptyDirectorySnapshot,
)

from ckptd.service.change import Change


def _snapshot(folder: Path) -> DirectorySnapshot:
    try:
        return DirectorySnapshot(str(folder), recursive=False)
    except OSError:  # gone (or unreadable): its entries count as deleted, and back when it is
        return EmptyDirectorySnapshot()


def changed_paths(diff: DirectorySnapshotDiff) -> Iterable[str]:
    """Every path a diff names (both ends of a move)."""
    for paths in (
        diff.files_created,
        diff.files_deleted,
        diff.files_modified,
        diff.files_attrib,
        diff.dirs_created,
        diff.dirs_deleted,
        diff.dirs_modified,
        diff.dirs_attrib,
    ):
        yield from (os.fsdecode(p) for p in paths)
    for src, dest in (*diff.files_moved, *diff.dirs_moved):
        yield os.fsdecode(src)
        yield os.fsdecode(dest)


class FolderPoller:
    """Folders polled by one thread; started on the first ``add``."""

    def __init__(self, interval: float, sink: Callable[[Change], None]) -> None:
        self.interval = interval
        self.sink = sink
        self._folders: dict[
            Path, tuple[Path, DirectorySnapshot]
        ] = {}  # folder -> (root, last snapshot)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, folder: Path, root: Path) -> None:
        snapshot = _snapshot(folder)  # the reference: what changes after this is reported
        with self._lock:
            self._folders[folder] = (root, snapshot)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="ckptd-poll", daemon=True)
                self._thread.start()

    def remove(self, folder: Path) -> None:
        with self._lock:
            self._folders.pop(folder, None)

    @property
    def folders(self) -> set[Path]:
        with self._lock:
            return set(self._folders)

    def poll_once(self) -> None:
        with self._lock:
            folders = list(self._folders.items())
        for folder, (root, before) in folders:
            if self._stop.is_set():
                return
            after = _snapshot(folder)
            with self._lock:
                if folder not in self._folders:
                    continue  # removed meanwhile
                self._folders[folder] = (root, after)
            # a folder that went away is in its own diff: the snapshot holds the folder too
            for path in sorted(set(changed_paths(DirectorySnapshotDiff(before, after)))):
                self.sink(Change(root, Path(path), False))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
