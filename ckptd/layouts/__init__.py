"""Trainer layouts and auto-detection."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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


def detect_layouts(work_dir: Path) -> list[str]:
    return [name for name, layout in LAYOUTS.items() if layout.detect(work_dir)]


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
    found = detect_layouts(work_dir)
    if not found:
        return None
    if len(found) > 1:
        raise LayoutError(
            f"{work_dir}: looks like a work_dir of several trainers ({', '.join(found)}); "
            "set layout: to one of them for this project"
        )
    return LAYOUTS[found[0]].from_project(project)
