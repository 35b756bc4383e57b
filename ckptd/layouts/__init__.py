"""Trainer layouts and auto-detection."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.core.timings import TIMINGS
from ckptd.layouts.base import Layout
from ckptd.layouts.deepspeed import DeepSpeedLayout
from ckptd.layouts.hf import HFLayout
from ckptd.layouts.lightning import LightningLayout
from ckptd.layouts.mmcv import MMCVLayout
from ckptd.layouts.mmengine import MMEngineLayout

if TYPE_CHECKING:
    from ckptd.core.config import ProjectConfig

LAYOUTS: dict[str, type[Layout]] = {
    MMEngineLayout.name: MMEngineLayout,
    MMCVLayout.name: MMCVLayout,
    LightningLayout.name: LightningLayout,
    HFLayout.name: HFLayout,
    DeepSpeedLayout.name: DeepSpeedLayout,
}


class LayoutError(Exception):
    pass


# work_dir -> (when, the one layout detected there): see choose_layout.
_DETECTED: OrderedDict[Path, tuple[float, str]] = OrderedDict()
_DETECTED_SIZE = 65_536


def detect_layouts(work_dir: Path) -> list[str]:
    return [name for name, layout in LAYOUTS.items() if layout.detect(work_dir)]


def _detected_layout(work_dir: Path, max_age: float) -> list[str]:
    """detect_layouts, reusing a single layout found less than ``max_age`` seconds ago.

    The daemon's start-up detects every work_dir twice within a second (to know what to watch,
    then in its first pass), and event-driven passes follow each other by seconds: detection
    was ~0.4 ms per work_dir each time, ~1.6 s of a start-up at 2,000. Only a clear answer is
    reused; none (not a work_dir yet) and several (ambiguous) are detected afresh each time.
    """
    now = time.monotonic()
    cached = _DETECTED.get(work_dir)
    if cached is not None and now - cached[0] < max_age:
        return [cached[1]]
    found = detect_layouts(work_dir)
    if len(found) == 1 and max_age > 0:
        _DETECTED[work_dir] = (now, found[0])
        _DETECTED.move_to_end(work_dir)
        while len(_DETECTED) > _DETECTED_SIZE:
            _DETECTED.popitem(last=False)
    return found


def no_layout_reason() -> str:
    """Why a folder is not managed (yet), naming what each layout looks for."""
    looked = "; ".join(f"{name}: {layout.signature}" for name, layout in LAYOUTS.items())
    return f"does not look like a work_dir of a supported trainer (yet); looked for {looked}"


def choose_layout(
    work_dir: Path, configured: str, project: ProjectConfig | None = None
) -> Layout | None:
    """The layout for a work_dir; None when it does not (yet) look like a work_dir.

    ``project`` carries layout options (e.g. ``lightning.checkpoint_dirs``). Raises LayoutError
    when auto-detection is ambiguous, naming the candidates and the fix.
    """
    if configured != "auto":
        return LAYOUTS[configured].from_project(project)
    found = _detected_layout(work_dir, TIMINGS.layout_redetect_after)
    if not found:
        return None
    if len(found) > 1:
        raise LayoutError(
            f"{work_dir}: looks like a work_dir of several trainers ({', '.join(found)}); "
            "set layout: to one of them for this project"
        )
    return LAYOUTS[found[0]].from_project(project)
