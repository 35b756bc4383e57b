"""Free space of the filesystem holding a folder (``statvfs``), named by its mountpoint and
identified by its device (``st_dev``), so that work_dirs on one filesystem count it once."""

from __future__ import annotations

import os
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


def space_of(
    folder: str | Path, mountpoints: dict[tuple[str, int], str] | None = None
) -> FilesystemSpace | None:
    """The filesystem holding ``folder`` now; None if the folder cannot be stat'ed.
    ``mountpoints``: a cache (folder, device) → mountpoint the caller keeps, so that a repeated
    call costs one ``stat`` and one ``statvfs``."""
    try:
        device = os.stat(folder).st_dev
        st = os.statvfs(folder)
    except OSError:
        return None
    cache = {} if mountpoints is None else mountpoints
    key = (str(folder), device)
    if key not in cache:
        cache[key] = str(mountpoint_of(Path(folder)))
    return FilesystemSpace(device, cache[key], st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
