"""mmcv 1.x work_dirs (MMDetection 2.x, MMClassification 0.x, MMSegmentation 0.x, ...).

Same checkpoint files as MMEngine (``epoch_N.pth`` / ``iter_N.pth``, written in place by
``torch.save``), but the resume pointer is the ``latest.pth`` symlink (a copy where symlinks
are not possible) and metrics are JSON lines in ``<timestamp>.log.json`` in the work_dir root,
one file per launch. The first line of each is usually the run's meta (``env_info``, ``config``,
``seed``, ``exp_name``...), not a record. Val records carry ``"mode": "val"`` and the 1-based
``epoch`` they evaluated; their ``iter`` is the length of the val loader, and ``lr`` (and
``memory`` on GPU) are logged alongside. Values are the evaluator's own (no smoothing), and
strings such as ``bbox_mAP_copypaste`` are not metrics. Checkpoint ``meta`` holds ``CLASSES``
and ``hook_msgs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.model import EvalRecord, Problem
from ckptd.layouts.base import (
    EvalRead,
    SourceState,
    match_pointer,
    numeric_metrics,
    tail_json_lines,
)
from ckptd.layouts.mmengine import MMEngineLayout

POINTER = "latest.pth"
LOG_SUFFIX = ".log.json"
NOT_METRICS = frozenset({"mode", "epoch", "iter", "lr", "memory", "time", "data_time"})


def log_files(work_dir: Path) -> list[Path]:
    """``<timestamp>.log.json`` files in the root, oldest launch first (names sort by time)."""
    try:
        entries = sorted(os.scandir(work_dir), key=lambda e: e.name)
    except OSError:
        return []
    return [
        Path(e.path)
        for e in entries
        if e.name.endswith(LOG_SUFFIX)
        and not e.name.startswith(".")
        and e.is_file(follow_symlinks=False)
    ]


def _maybe_val(line: bytes) -> bool:
    return b'"val"' in line


def _parse_val(data: dict[str, Any], source: str, line: int) -> EvalRecord | None:
    if data.get("mode") != "val":
        return None  # train records and the run's meta line
    epoch = data.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise ValueError(f"val record without an integer 'epoch' (got {epoch!r})")
    if epoch < 1:
        raise ValueError(f"val record with epoch {epoch}; mmcv counts epochs from 1")
    return EvalRecord(epoch, numeric_metrics(data, NOT_METRICS), source, line)


class MMCVLayout(MMEngineLayout):
    """Checkpoint listing, completeness and naming are MMEngine's; the rest differs."""

    name: ClassVar[str] = "mmcv"
    default_keep_keys: ClassVar[tuple[str, ...]] = ("meta", "state_dict")
    signature: ClassVar[str] = "a latest.pth symlink or <timestamp>.log.json in the work_dir"

    @classmethod
    def detect(cls, work_dir: Path) -> bool:
        return os.path.lexists(work_dir / POINTER) or bool(log_files(work_dir))

    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        pointer = work_dir / POINTER
        try:
            text = os.readlink(pointer)  # read, never followed
        except FileNotFoundError:
            return None, ""
        except OSError:
            if pointer.is_file():
                return None, (
                    f"{POINTER} is a copy, not a symlink (as mmcv writes where symlinks are not "
                    "possible); it is never deleted, and ckptd cannot tell which checkpoint it is"
                )
            return None, f"{POINTER} is neither a symlink nor a file; ignored"
        return match_pointer(text, work_dir, names, POINTER)

    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        read = tail_json_lines(work_dir, log_files(work_dir), previous, _maybe_val, _parse_val)
        if unit == "iter" and read.records:
            first = read.records[0]
            read.problems.append(
                Problem(
                    f"{first.source}:{first.line}",
                    "mmcv logs val results of iteration-based runs without the training "
                    "iteration they evaluated, so ckptd cannot match them to iter_N.pth; no best "
                    "is tracked for this work_dir (retention still applies)",
                    blocking=False,
                )
            )
            read.records = []
        return read

    def watch_folders(self, work_dir: Path) -> list[Path]:
        return [work_dir]

    def as_evaluated(self, records: list[EvalRecord]) -> list[EvalRecord]:
        return records  # mmcv logs the evaluator's values as they are
