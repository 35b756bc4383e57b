"""MMEngine (and MMDetection 3.x / MMPretrain / MMSeg 1.x) work_dirs.

Measured on MMEngine 0.10.7 (see docs/DESIGN.md): ``epoch_N.pth`` / ``iter_N.pth`` written in place
and non-atomically; ``last_checkpoint`` holds the absolute path of the newest checkpoint; per
launch a ``<timestamp>/vis_data/scalars.json`` of JSON lines. Val lines carry no ``epoch`` or
``iter`` key and their ``step`` is the epoch (by-epoch runs) or the iteration (iter-based runs
with ``log_metric_by_epoch=False``).
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.model import EvalRecord, Problem, Skipped, TrainerBest, WorkDirScan
from ckptd.layouts.base import (
    Candidate,
    EvalRead,
    Layout,
    SourceState,
    checkpoint_stat,
    match_pointer,
    numeric_metrics,
    read_pointer_file,
    tail_json_lines,
)
from ckptd.layouts.mmengine_folders import FileOrFolder, folder_complete, is_folder_checkpoint
from ckptd.slim.artifact import ArtifactWriter

# ASCII digits only: str.format writes no others, and e.g. 'epoch_١.pth' is not a checkpoint
CHECKPOINT_NAME = re.compile(r"(epoch|iter)_(\d+)\.pth", re.ASCII)
POINTER = "last_checkpoint"
# MMEngine's per-launch folder, e.g. 20240101_120000
LAUNCH_NAME = re.compile(r"\d{8}_\d{6}", re.ASCII)
# Added by MMEngine's LoggerHook/LogProcessor to every val line; not evaluation metrics.
NOT_METRICS = frozenset({"step", "data_time", "time"})
# LogProcessor logs val keys matching its mean_pattern as the mean of the last `window_size`
# evaluations (defaults below), while CheckpointHook compares the raw value; see as_evaluated.
SMOOTHED_KEY = re.compile(r".*(loss|time|data_time|grad_norm).*")


@functools.lru_cache(maxsize=4096)
def is_smoothed(key: str) -> bool:
    """Does LogProcessor log ``key`` as a running mean? (Asked for every key of every record of
    every pass: the regex search was ~15 % of a warm pass.)"""
    return SMOOTHED_KEY.search(key) is not None


SMOOTHING_WINDOW = 10
# Enough digits to undo float64 rounding of the running mean, few enough to keep true ties.
RAW_DIGITS = 12
# Train lines always carry one of these keys, val lines never; checking the bytes first keeps
# a million-line iter-based log cheap (json.dumps writes '"key": value').
_TRAIN_MARKERS = (b'"epoch": ', b'"iter": ')
_EPOCH_MARKER, _ITER_MARKER = _TRAIN_MARKERS


def scalars_files(work_dir: Path) -> list[Path]:
    """``<launch>/vis_data/scalars.json`` of every launch, oldest launch first."""
    found = []
    try:
        launches = sorted(os.scandir(work_dir), key=lambda e: e.name)
    except OSError:
        return []
    for entry in launches:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        candidate = Path(entry.path, "vis_data", "scalars.json")
        if candidate.is_file() and not candidate.is_symlink():
            found.append(candidate)
    return found


def _is_val_line(line: bytes) -> bool:
    return _EPOCH_MARKER not in line and _ITER_MARKER not in line  # once per line: no generator


def _parse_val(data: dict[str, Any], source: str, line: int) -> EvalRecord | None:
    if "epoch" in data or "iter" in data:
        return None  # a train line written with unusual separators
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"evaluation record without an integer 'step' (got {step!r})")
    if step < 0:
        raise ValueError(f"evaluation record with a negative step ({step})")
    return EvalRecord(step, numeric_metrics(data, NOT_METRICS), source, line)


def _means_match(raw: list[float], means: list[float]) -> bool:
    """Do the running means of ``raw`` give the logged ``means`` (NaN where they are NaN)?"""
    for n in range(len(raw)):
        window = raw[max(0, n - SMOOTHING_WINDOW + 1) : n + 1]
        mean, logged = sum(window) / len(window), means[n]
        if math.isnan(mean) != math.isnan(logged):
            return False
        if not math.isnan(mean) and not math.isclose(mean, logged, rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


class MMEngineLayout(Layout):
    name: ClassVar[str] = "mmengine"
    default_keep_keys: ClassVar[tuple[str, ...]] = ("meta", "state_dict")
    signature: ClassVar[str] = "last_checkpoint or <timestamp>/vis_data/scalars.json"
    pointer_files: ClassVar[tuple[str, ...]] = (POINTER,)

    def __init__(self) -> None:
        self._listed: tuple[Path, list[Candidate]] | None = None  # what list_checkpoints found

    @classmethod
    def detect(cls, work_dir: Path) -> bool:
        return os.path.lexists(work_dir / POINTER) or bool(scalars_files(work_dir))

    def list_checkpoints(self, work_dir: Path) -> tuple[list[Candidate], list[Skipped]]:
        candidates: list[Candidate] = []
        skipped: list[Skipped] = []
        for entry in os.scandir(work_dir):
            match = CHECKPOINT_NAME.fullmatch(entry.name)
            if not match:
                continue
            if entry.is_symlink():
                skipped.append(Skipped(entry.name, "a symlink; ckptd never deletes or follows it"))
                continue
            folder = entry.is_dir(follow_symlinks=False)
            if folder and not is_folder_checkpoint(Path(entry.path)):
                why = "not a regular file; nor a FlexibleRunner folder ckptd knows (yet)"
                skipped.append(Skipped(entry.name, why))
                continue
            if not folder and not entry.is_file(follow_symlinks=False):
                skipped.append(Skipped(entry.name, "not a regular file"))
                continue
            # a FlexibleRunner folder (DeepSpeed, FSDP) is one checkpoint: its tree stat
            stat = checkpoint_stat(entry, entry.name, skipped, folder=folder)
            if stat is None:
                continue
            candidates.append(Candidate(entry.name, match.group(1), int(match.group(2)), stat))
        self._listed = (work_dir, candidates)
        return candidates, skipped

    def format_check(self, path: Path) -> tuple[bool | None, str]:
        if path.is_dir() and not path.is_symlink():
            return folder_complete(path)
        return super().format_check(path)

    def artifact_output(self, fmt: str = "torch") -> tuple[ArtifactWriter, str]:
        writer, suffix = super().artifact_output(fmt)
        return FileOrFolder(writer, fmt), suffix

    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        text, note = read_pointer_file(work_dir / POINTER)
        if not text:
            return None, note
        return match_pointer(text, work_dir, names, POINTER)

    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        read = tail_json_lines(
            work_dir, scalars_files(work_dir), previous, _is_val_line, _parse_val
        )
        if unit == "iter" and read.records and all(r.index == 0 for r in read.records):
            first = read.records[0]
            read.problems.append(
                Problem(
                    f"{first.source}:{first.line}",
                    "validation records have step 0 while checkpoints count iterations: "
                    "MMEngine's LoggerHook logs val metrics by epoch unless told otherwise. Set "
                    "default_hooks.logger.log_metric_by_epoch=False (and log_processor.by_epoch="
                    "False) so ckptd can match evaluations to iter_N.pth",
                )
            )
        return read

    def watch_folders(self, work_dir: Path) -> list[Path]:
        # A launch folder appears first, then its vis_data/ inside it, then scalars.json.
        folders = [work_dir]
        try:
            entries = sorted(os.scandir(work_dir), key=lambda e: e.name)
        except OSError:
            return folders
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or not LAUNCH_NAME.fullmatch(entry.name):
                continue
            folders.append(Path(entry.path))
            vis_data = Path(entry.path, "vis_data")
            if vis_data.is_dir() and not vis_data.is_symlink():
                folders.append(vis_data)
        return folders

    def _complete(self, path: Path) -> bool:
        try:
            return self.format_check(path)[0] is not False
        except OSError:  # removed meanwhile
            return False

    def _hub_raw(self, records: list[EvalRecord]) -> dict[str, list[float]]:
        """Raw values of smoothed val keys from the message hub of the checkpoint written
        last, for the keys whose logged means they reproduce (see mmengine_hub)."""
        from ckptd.layouts.mmengine_hub import read_hub

        keys = {k for r in records for k in r.metrics if is_smoothed(k)}
        if not keys or self._listed is None:
            return {}
        work_dir, candidates = self._listed
        # The newest file may be being written (torch.save in place): then the one before it.
        by_age = sorted(candidates, key=lambda c: (c.stat.mtime_ns, c.index), reverse=True)
        last = next((c for c in by_age if self._complete(work_dir / c.name)), None)
        hub = read_hub(work_dir, last.name) if last else None
        if hub is None:
            return {}
        found = {}
        for key in keys:
            raw = hub.raw.get(key)
            means = [r.metrics[key] for r in records if key in r.metrics]
            if raw is not None and len(raw) <= len(means) and _means_match(raw, means):
                found[key] = raw
        return found

    def as_evaluated(self, records: list[EvalRecord]) -> list[EvalRecord]:
        """Recover raw values of smoothed keys (e.g. ``val/loss``).

        MMEngine writes mean(raw[n-9..n]) to scalars.json but picks the best by raw[n], so
        comparing logged values would choose another epoch. The newest checkpoint's message
        hub holds raw[0..k] (mmengine_hub); later ones are inverted from the running means,
        whose window carries across resumed launches (the hub is restored), in one pass over
        the records in order. Without the hub, a NaN poisons every later inversion (a window
        mean holding it is NaN, and the values under it are then unknown).
        """
        hub = self._hub_raw(records)
        history: dict[str, list[float]] = {}
        out = []
        for record in records:
            metrics = dict(record.metrics)
            for key, mean in record.metrics.items():
                if not is_smoothed(key):
                    continue
                previous = history.setdefault(key, [])[-(SMOOTHING_WINDOW - 1) :]
                known = hub.get(key, [])
                if len(history[key]) < len(known):
                    history[key].append(known[len(history[key])])
                    metrics[key] = history[key][-1]
                    continue
                raw = mean * (len(previous) + 1) - sum(previous)
                if math.isfinite(raw):
                    raw = float(f"{raw:.{RAW_DIGITS}g}")
                history[key].append(raw)
                metrics[key] = raw
            out.append(EvalRecord(record.index, metrics, record.source, record.line))
        return out

    def trainer_bests(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[TrainerBest]:
        """CheckpointHook's best_ckpt/best_score, from the checkpoint written last (see
        ckptd.layouts.mmengine_hub); nothing when the run does not use save_best."""
        from ckptd.layouts.mmengine_hub import trainer_bests

        return trainer_bests(work_dir, scan.checkpoints, records)
