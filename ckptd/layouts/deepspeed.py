"""A DeepSpeed ``save_dir`` on its own: ``global_stepN/`` tag folders and ``latest``.

A training script that calls ``engine.save_checkpoint(save_dir)`` itself (no trainer
framework around it) leaves ``save_dir/global_stepN/`` per save, ``latest`` (the newest tag,
written by rank 0 last) and ``zero_to_fp32.py``. Each tag folder is one checkpoint, complete as
``slim/deepspeed.py`` judges it (every rank's shard whole, ``latest`` naming it or a later
step); ``latest`` is the resume pointer (what ``load_checkpoint(save_dir)`` reads). DeepSpeed
logs no evaluations, so there is no best to find: retention keeps the newest ``keep_last``
folders and the one ``latest`` names, and deletes the others whole; ``ckptd slim SAVE_DIR`` makes
the consolidated file of any of them by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

from ckptd.core.model import Skipped
from ckptd.layouts.base import Candidate, EvalRead, Layout, SourceState, checkpoint_stat
from ckptd.slim import deepspeed
from ckptd.slim.artifact import ArtifactWriter
from ckptd.slim.errors import SlimError

TAG = re.compile(r"global_step(\d+)", re.ASCII)


class DeepSpeedLayout(Layout):
    name: ClassVar[str] = "deepspeed"
    default_keep_keys: ClassVar[tuple[str, ...]] = ("meta", "state_dict")
    signature: ClassVar[str] = "latest beside global_stepN/ folders"

    def artifact_output(self, fmt: str = "torch") -> tuple[ArtifactWriter, str]:
        return deepspeed.DeepSpeedConsolidation(fmt), deepspeed.output_suffix(fmt)

    @classmethod
    def detect(cls, work_dir: Path) -> bool:
        if not (work_dir / deepspeed.LATEST).is_file():
            return False
        try:
            return any(TAG.fullmatch(e.name) and e.is_dir() for e in os.scandir(work_dir))
        except OSError:
            return False

    def list_checkpoints(self, work_dir: Path) -> tuple[list[Candidate], list[Skipped]]:
        candidates: list[Candidate] = []
        skipped: list[Skipped] = []
        for entry in os.scandir(work_dir):
            found = TAG.fullmatch(entry.name)
            if not found:
                continue
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                skipped.append(Skipped(entry.name, "not a real folder; ckptd never deletes it"))
                continue
            stat = checkpoint_stat(entry, entry.name, skipped, folder=True)
            if stat is None:
                continue
            candidates.append(Candidate(entry.name, "step", int(found.group(1)), stat))
        return candidates, skipped

    def format_check(self, path: Path) -> tuple[bool | None, str]:
        return deepspeed.complete(path)

    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        try:
            tag = deepspeed.read_latest(work_dir)
        except SlimError as exc:
            return None, str(exc)
        if tag is None:
            return None, "no latest yet"
        if tag not in names:
            return None, f"latest names {tag}, which is not a checkpoint folder here"
        return tag, ""

    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        return EvalRead([], {}, [])  # DeepSpeed logs no evaluations
