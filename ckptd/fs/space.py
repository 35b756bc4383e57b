"""Free space of the filesystems that hold given folders: one ``statvfs`` per filesystem
(folders deduplicated by ``st_dev``), named by its mountpoint."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FilesystemSpace:
    device: int
    mountpoint: str
    free_bytes: int  # available to an unprivileged writer (f_bavail), like df's "Avail"
    size_bytes: int


def mountpoint_of(path: Path) -> Path:
    """The mountpoint of the filesystem holding ``path``: its nearest ancestor that is one."""
    path = path.absolute()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def filesystems_of(
    folders: Iterable[str | Path], mountpoints: dict[tuple[str, int], str] | None = None
) -> list[FilesystemSpace]:
    """One entry per filesystem holding any of ``folders`` (ones that cannot be stat'ed are
    left out), ordered by mountpoint. ``mountpoints``: a cache (folder, device) → mountpoint
    the caller keeps, so that a repeated call costs one ``stat`` per folder and one
    ``statvfs`` per filesystem."""
    cache = {} if mountpoints is None else mountpoints
    found: dict[int, FilesystemSpace] = {}
    for folder in folders:
        try:
            device = os.stat(folder).st_dev
        except OSError:
            continue
        if device in found:
            continue
        key = (str(folder), device)
        if key not in cache:
            cache[key] = str(mountpoint_of(Path(folder)))
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        found[device] = FilesystemSpace(
            device, cache[key], st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        )
    return sorted(found.values(), key=lambda fs: fs.mountpoint)
