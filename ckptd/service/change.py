"""``Change``: what a watch event becomes, whichever watcher saw it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Change:
    """A hint that something changed under ``root`` (a work_dir or a discovery folder)."""

    root: Path
    path: Path
    closed_after_write: bool
