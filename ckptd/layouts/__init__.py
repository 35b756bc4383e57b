"""Trainer layouts and auto-detection."""

from __future__ import annotations

from pathlib import Path

from ckptd.layouts.base import Layout
from ckptd.layouts.mmengine import MMEngineLayout

LAYOUTS: dict[str, type[Layout]] = {
    MMEngineLayout.name: MMEngineLayout,
}


class LayoutError(Exception):
    pass


def detect_layouts(work_dir: Path) -> list[str]:
    return [name for name, layout in LAYOUTS.items() if layout.detect(work_dir)]


def choose_layout(work_dir: Path, configured: str) -> Layout | None:
    """The layout for a work_dir; None when it does not (yet) look like a work_dir.

    Raises LayoutError when auto-detection is ambiguous, naming the candidates and the fix.
    """
    if configured != "auto":
        return LAYOUTS[configured]()
    found = detect_layouts(work_dir)
    if not found:
        return None
    if len(found) > 1:
        raise LayoutError(
            f"{work_dir}: looks like a work_dir of several trainers ({', '.join(found)}); "
            "set layout: to one of them for this project"
        )
    return LAYOUTS[found[0]]()
