"""Which work_dirs the daemon manages, and which folders it watches for them.

Discovery (the project globs) runs at start, on reload, every ``Timings.rediscover_every`` and
when a watched parent folder changes; ``WorkDirSet.apply`` turns its result into slots. The
watch set is cached per work_dir by the mtimes of its watched folders, so layout detection and
listing run again only when one of them changed (the idle cost at hundreds of work_dirs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ckptd.core.config import LoadedConfig
from ckptd.core.timings import Timings
from ckptd.engine.state import WorkDirLock
from ckptd.engine.targets import Target, discover, discovery_folders
from ckptd.layouts import LayoutError, choose_layout
from ckptd.service.schedule import WorkDirSlot, folder_stamps
from ckptd.service.watch import watch_plan

log = logging.getLogger("ckptd.daemon")


class WorkDirSet:
    def __init__(self, timings: Timings) -> None:
        self.timings = timings
        self.slots: dict[Path, WorkDirSlot] = {}
        # work_dir -> (mtimes of its watched folders, those folders)
        self._watch_folders: dict[Path, tuple[tuple[int, ...], list[Path]]] = {}
        self._notes: set[str] = set()

    def discover(self, loaded: LoadedConfig) -> dict[Path, Target]:
        """Run the globs; a note about what was skipped is logged once, not every time."""
        found = discover(loaded)
        for note in found.notes:
            if note not in self._notes:
                log.warning(note, extra={"fields": {"action": "skip"}})
        self._notes = set(found.notes)
        return {t.work_dir: t for t in found.targets}

    def apply(
        self, wanted: dict[Path, Target], now: float, forget: Callable[[Path], None]
    ) -> list[WorkDirSlot]:
        """Add slots for new work_dirs (due now), drop the ones no longer matched (``forget``
        is called for each), and return the slots whose project changed (due again)."""
        for path in list(self.slots):
            slot = self.slots[path]
            if path not in wanted and not slot.running:
                slot.lock.release()
                del self.slots[path]
                self._watch_folders.pop(path, None)
                forget(path)
                log.info("work_dir gone or no longer matched", extra=_f(path))
        changed = []
        for path, target in wanted.items():
            slot = self.slots.get(path)
            if slot is None:
                self.slots[path] = WorkDirSlot(target, WorkDirLock(path), due=now)
                log.info("watching new work_dir", extra=_f(path, project=target.project.name))
            elif slot.target != target:
                slot.target = target
                changed.append(slot)
        return changed

    def watch_plan(self, loaded: LoadedConfig) -> dict[Path, Path]:
        """Folder -> the root its events are reported under, for ``Watcher.sync``."""
        per_dir = []
        cache: dict[Path, tuple[tuple[int, ...], list[Path]]] = {}
        for path, slot in list(self.slots.items()):
            cached = self._watch_folders.get(path)
            if cached is not None and folder_stamps(cached[1]) == cached[0]:
                cache[path] = cached  # none of its folders changed: same layout, same folders
                per_dir.append((path, cached[1]))
                continue
            try:
                layout = choose_layout(path, slot.target.project.layout, slot.target.project)
            except (LayoutError, OSError):
                layout = None
            folders = layout.watch_folders(path) if layout else [path]
            stamps = folder_stamps(folders)
            recent = time.time() - self.timings.settled_folder  # may still change: not cached
            if layout is not None and stamps and max(stamps) < recent * 1e9:
                cache[path] = (stamps, folders)
            per_dir.append((path, folders))
        self._watch_folders = cache
        return watch_plan(per_dir, discovery_folders(loaded))


def _f(work_dir: Path, **fields: object) -> dict[str, dict[str, object]]:
    """``extra=`` for a log call about one work_dir."""
    return {"fields": {"work_dir": str(work_dir), **fields}}
