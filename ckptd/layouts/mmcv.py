"""mmcv 1.x work_dirs (MMDetection 2.x, MMClassification 0.x, MMSegmentation 0.x, ...).

Measured on mmcv 1.7.2 (``tests/trainers/mmcv_real.py``). Same checkpoint files as MMEngine
(``epoch_N.pth`` / ``iter_N.pth``, written in place by ``torch.save``), but the resume pointer
is the ``latest.pth`` symlink (a copy where symlinks are not possible) and metrics are JSON
lines in ``<timestamp>.log.json`` in the work_dir root, one file per launch. The first line of
each is the run's meta (``env_info``, ``config``, ``seed``, ``exp_name``, ``hook_msgs``...), not
a record. Val records carry ``"mode": "val"`` and the 1-based ``epoch`` they evaluated; their
``iter`` is the length of the val loader, and ``lr`` is logged alongside. ``TextLoggerHook``
rounds every float to 5 decimals, while ``EvalHook`` compares the raw values; strings such as
``bbox_mAP_copypaste`` are not metrics.

With a val workflow (``workflow=[('train', 1), ('val', 1)]``) an epoch has two val lines:
EvalHook's metrics, then the val losses, which carry ``time``/``data_time`` (EvalHook's line
never does). They are one evaluation. EvalHook ranks only its own results, so an epoch with
only a val-loss line is an evaluation only for a configured metric it holds.

Checkpoint ``meta.hook_msgs`` holds EvalHook's ``best_ckpt`` (``best_<key>_epoch_N.pth``) and
raw ``best_score``: the trainer's own best. ``epoch_N.pth`` is saved before epoch N is
evaluated, so its record accounts for evaluations up to N-1; ``best_<key>_epoch_N.pth`` is
saved after, and its record includes N.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptd.core.model import EvalRecord, Problem, TrainerBest, WorkDirScan
from ckptd.layouts.base import (
    EvalRead,
    SourceState,
    match_pointer,
    numeric_metrics,
    tail_json_lines,
)
from ckptd.layouts.memo import TUPLE_CODEC
from ckptd.layouts.mmengine import MMEngineLayout
from ckptd.layouts.peek import peek, top_mapping

if TYPE_CHECKING:
    from ckptd.core.config import ProjectConfig

POINTER = "latest.pth"
LOG_SUFFIX = ".log.json"
NOT_METRICS = frozenset({"mode", "epoch", "iter", "lr", "memory", "time", "data_time"})
# IterTimerHook's key: on val-workflow lines, never on EvalHook's (LoggerHook.get_mode relies
# on that). Kept in a parsed record as the mark of a val-workflow line, dropped when merging.
WORKFLOW_MARK = "time"
# EvalHook._save_ckpt: f'best_{key_indicator}_{current}.pth', current = 'epoch_N' / 'iter_N'
BEST_FILE = re.compile(r"best_(.+)_(epoch|iter)_(\d+)\.pth", re.ASCII)
# TextLoggerHook's round(v, 5): the trainer's raw score is compared with logged values at the
# log's precision (rounding is monotone, so a logged value above it was above it raw too).
LOG_DECIMALS = 5
# data.pkl holds the structure of every tensor; as for Lightning, 64 MiB is far above any
# real checkpoint's.


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
    metrics = numeric_metrics(data, NOT_METRICS)
    if WORKFLOW_MARK in data:
        metrics[WORKFLOW_MARK] = 1.0
    return EvalRecord(epoch, metrics, source, line)


def merge_val_lines(records: list[EvalRecord], wanted: frozenset[str]) -> list[EvalRecord]:
    """One record per evaluation: EvalHook's line with the val-workflow line that follows it.

    Without merging, the second line of an epoch would look like a resumed run repeating it
    (``best.supersede_resumed``) and replace EvalHook's metrics. EvalHook's keys come first, so
    'auto' takes EvalHook's first key as its ``save_best='auto'`` does. A val-workflow line
    with no EvalHook line before it is kept only when it holds a ``wanted`` (configured) key.
    """
    merged: list[EvalRecord] = []
    open_eval = False  # the last record kept is an EvalHook line not merged yet
    for record in records:
        metrics = {k: v for k, v in record.metrics.items() if k != WORKFLOW_MARK}
        if WORKFLOW_MARK not in record.metrics:
            merged.append(EvalRecord(record.index, metrics, record.source, record.line))
            open_eval = True
            continue
        last = merged[-1] if merged else None
        if open_eval and last and (last.index, last.source) == (record.index, record.source):
            both = {**metrics, **last.metrics}  # EvalHook's value wins a shared key
            ordered = {k: both[k] for k in (*last.metrics, *metrics)}
            merged[-1] = EvalRecord(last.index, ordered, last.source, last.line)
        elif wanted & metrics.keys():
            merged.append(EvalRecord(record.index, metrics, record.source, record.line))
        open_eval = False
    return merged


def _best_of(root: Any) -> tuple[str, float | None] | None:
    """(best_ckpt, best_score) of ``meta.hook_msgs``, or None when EvalHook recorded none."""
    meta = top_mapping(root).get("meta")
    msgs = meta.get("hook_msgs") if isinstance(meta, dict) else None
    if not isinstance(msgs, dict) or not isinstance(msgs.get("best_ckpt"), str):
        return None
    score = msgs.get("best_score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        score = None  # e.g. a numpy scalar: the logged value stands in for it
    return msgs["best_ckpt"], None if score is None else float(score)


class MMCVLayout(MMEngineLayout):
    """Checkpoint listing, completeness and naming are MMEngine's; the rest differs."""

    name: ClassVar[str] = "mmcv"
    default_keep_keys: ClassVar[tuple[str, ...]] = ("meta", "state_dict")
    signature: ClassVar[str] = "a latest.pth symlink or <timestamp>.log.json in the work_dir"
    pointer_files: ClassVar[tuple[str, ...]] = (POINTER,)

    def __init__(self, metrics: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.metrics = frozenset(metrics)  # configured best.metric keys

    @classmethod
    def from_project(cls, project: ProjectConfig | None) -> MMCVLayout:
        if project is None or project.best.metric == "auto":
            return cls()
        return cls(tuple(project.best.metric))

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
        read.records = merge_val_lines(read.records, self.metrics)
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

    def trainer_bests(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[TrainerBest]:
        """EvalHook's ``hook_msgs`` from the newest complete ``epoch_N.pth`` and from every
        ``best_<key>_epoch_N.pth``, oldest written first (the newest is the trainer's latest
        word; a best file left behind by a resumed run is older than what replaced it)."""
        found: list[tuple[int, int, str]] = []  # (mtime_ns, as_of, name)
        complete = [c for c in scan.checkpoints if c.complete and c.unit == "epoch"]
        if complete:
            newest = max(complete, key=lambda c: (c.stat.mtime_ns, c.index))
            found.append((newest.stat.mtime_ns, newest.index - 1, newest.name))
        try:
            entries = list(os.scandir(work_dir))
        except OSError:
            entries = []
        for entry in entries:
            match = BEST_FILE.fullmatch(entry.name)
            if not match or match.group(2) != "epoch" or not entry.is_file(follow_symlinks=False):
                continue
            try:
                if self.format_check(Path(entry.path))[0] is not True:
                    continue  # being written
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
            except OSError:
                continue
            found.append((mtime, int(match.group(3)), entry.name))
        bests: list[TrainerBest] = []
        for _, as_of, name in sorted(found):
            recorded = peek(work_dir / name, "hook_msgs.best", _best_of, codec=TUPLE_CODEC)
            best_file = os.path.basename(recorded[0]) if recorded else ""
            match = BEST_FILE.fullmatch(best_file)
            # EvalHook removes its previous best file whenever it saves a new one, so a record
            # naming a file that is not there is one the trainer lost track of (resumed from
            # the best epoch's own checkpoint, whose record predates that evaluation).
            if not match or match.group(2) != "epoch" or not (work_dir / best_file).is_file():
                continue
            score = recorded[1] if recorded else None
            shown = None if score is None else round(score, LOG_DECIMALS)
            source = f"{name}: meta.hook_msgs.best_ckpt"
            bests.append(TrainerBest(match.group(1), int(match.group(3)), shown, as_of, source))
        return bests

    def watch_folders(self, work_dir: Path) -> list[Path]:
        return [work_dir]

    def as_evaluated(self, records: list[EvalRecord]) -> list[EvalRecord]:
        return records  # no smoothing; the 5-decimal rounding cannot be undone
