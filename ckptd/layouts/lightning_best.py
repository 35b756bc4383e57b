"""Lightning's own best: ``ModelCheckpoint.best_model_path`` as stored in its checkpoints.

``ModelCheckpoint._update_best_and_save`` sets ``best_k_models``, ``best_model_path`` and
``best_model_score`` *before* ``trainer.save_checkpoint`` writes the file, so a checkpoint that
a callback ranked holds that callback's best as of its own evaluation: ``as_of`` is the file's
index. A callback's state inside a file another callback wrote may lag one evaluation behind
(callbacks run in order), so only the files a callback ranked itself are read for it.

How far back the record reaches: ``load_state_dict`` restores the ranking only when the
resumed fit saves into the same ``dirpath``; the default folder is the logger's new
``version_N/checkpoints``, so there the record covers that version's evaluations alone, and
ckptd does not use it when earlier versions were evaluated too (the logs then decide, and
CSVLogger writes the values Lightning compared, unrounded).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable
from pathlib import Path

from ckptd.core.model import Checkpoint, EvalRecord, TrainerBest, WorkDirScan
from ckptd.layouts.lightning_ckpt import (
    CallbackFacts,
    in_work_dir,
    remembered_step,
    step_in_name,
)
from ckptd.layouts.lightning_csv import METRICS_FILE
from ckptd.layouts.lightning_sharded import checkpoint_facts

# The newest files read per pass while looking for each callback's own record.
MAX_FILES_READ = 4


# Lightning compares float32 tensors (or float64 ones a module logs); CSVLogger writes the
# value widened to a Python float. Differences below float32's resolution are not a contest.
FLOAT32_EPS = 2.0**-23


def _beats(value: float, score: float, mode: str) -> bool:
    if not math.isfinite(value) or abs(value - score) <= 2 * FLOAT32_EPS * max(1.0, abs(score)):
        return False
    return value > score if mode == "max" else value < score


def _step_of(name: str, work_dir: Path, scan: WorkDirScan) -> int | None:
    on_disk = scan.checkpoint_named(name)
    if on_disk is not None:
        return on_disk.index
    # Gone already (ckptd deleted it after writing its artifact): its name, or what an
    # earlier pass of this process read from it.
    step = step_in_name(name)
    return step if step is not None else remembered_step(work_dir / name)


def _covered_sources(rel_dir: str, version_dirs: Iterable[str]) -> str | None:
    """The only metrics file a callback saving into ``rel_dir`` has ranked, or None (all)."""
    parent = posixpath.dirname(rel_dir)
    if posixpath.basename(rel_dir) == "checkpoints" and parent in version_dirs:
        return f"{parent}/{METRICS_FILE}" if parent else METRICS_FILE
    return None


def _contradicted(
    callback: CallbackFacts, records: list[EvalRecord], scan: WorkDirScan, as_of: int
) -> bool:
    """A saved evaluation the record accounts for beats its best: the record is partial
    (e.g. the run moved to another ``dirpath``), so it must not override the logs.

    Not for step- or time-triggered saves: Lightning ranks such a file by the validation
    before it, while the evaluation logged at its step (the one after it) is what the logs
    pair it with, so the two disagree by design and the record is the authority.
    """
    score, key = callback.best_model_score, callback.monitor
    if callback.between_validations:
        return False
    if score is None or not math.isfinite(score) or callback.mode is None or key is None:
        return False
    for record in records:
        value = record.metrics.get(key)
        if record.index > as_of or value is None or scan.checkpoint_at(record.index) is None:
            continue
        if _beats(value, score, callback.mode):
            return True
    return False


def _record_of(
    callback: CallbackFacts,
    holder: Checkpoint,
    work_dir: Path,
    scan: WorkDirScan,
    records: list[EvalRecord],
    version_dirs: list[str],
) -> TrainerBest | None:
    rel_dir = posixpath.dirname(holder.name) or "."
    if not callback.monitor or not callback.best_model_path:
        return None
    covered = _covered_sources(rel_dir, version_dirs)
    if covered is not None and any(r.source != covered for r in records if r.index <= holder.index):
        return None
    if _contradicted(callback, records, scan, holder.index):
        return None
    name = in_work_dir(callback.best_model_path, callback.dirpath, rel_dir)
    step = _step_of(name, work_dir, scan) if name else None
    if step is None:
        return None
    return TrainerBest(
        key=callback.monitor,
        index=step,
        score=callback.best_model_score,
        as_of=holder.index,
        source=f"{holder.name}: callbacks[{callback.state_key!r}].best_model_path",
    )


def lightning_bests(
    work_dir: Path, scan: WorkDirScan, records: list[EvalRecord], log_folders: list[Path]
) -> list[TrainerBest]:
    """Each monitoring ModelCheckpoint's best, from the newest complete file it ranked.

    Newest by mtime, not step: a fit resumed from an early checkpoint leaves the abandoned
    run's later steps on disk, and those hold the abandoned run's ranking.
    """
    version_dirs = [
        posixpath.normpath(f.relative_to(work_dir).as_posix()).removeprefix(".")
        for f in log_folders
    ]
    complete = [c for c in scan.checkpoints if c.complete]
    complete.sort(key=lambda c: (c.stat.mtime_ns, c.index), reverse=True)
    found: dict[str, TrainerBest | None] = {}
    for holder in complete[:MAX_FILES_READ]:
        facts = checkpoint_facts(work_dir / holder.name, holder.stat)
        rel_dir = posixpath.dirname(holder.name) or "."
        for callback in facts.callbacks if facts else ():
            if callback.state_key in found:
                continue
            ranked = {in_work_dir(p, callback.dirpath, rel_dir) for p in callback.ranked}
            if holder.name not in ranked:
                continue  # another callback's file: this state may lag behind
            found[callback.state_key] = _record_of(
                callback, holder, work_dir, scan, records, version_dirs
            )
    return [best for best in found.values() if best is not None]
