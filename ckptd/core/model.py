"""Plain values that flow between the layers: scan → plan → act → save state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FileStat:
    """The identity of a file's content as far as ``stat`` can tell."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def lstat(cls, path: str | os.PathLike[str]) -> FileStat:
        return cls.of(os.lstat(path))

    def as_list(self) -> list[int]:
        return [self.inode, self.size, self.mtime_ns]

    @classmethod
    def from_list(cls, values: list[int]) -> FileStat:
        inode, size, mtime_ns = values
        return cls(int(inode), int(size), int(mtime_ns))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint file (or folder, for Hugging Face) of a work_dir."""

    name: str  # path relative to the work_dir, '/'-separated
    unit: str  # "epoch" | "iter" | "step": what ``index`` counts
    index: int
    stat: FileStat
    complete: bool = False  # fully written and not changing: may be read, may be deleted
    incomplete_reason: str = ""


@dataclass(frozen=True, slots=True)
class Skipped:
    """Something that looks like a checkpoint but that ckptd will never read or delete."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One evaluation result, with ``index`` in the checkpoints' numbering (epoch or iter)."""

    index: int
    metrics: dict[str, float]  # numeric values only, in the order the trainer wrote them
    source: str
    line: int


@dataclass(frozen=True, slots=True)
class Problem:
    """Bad input found while reading a work_dir. ``blocking`` problems stop all deletions."""

    where: str  # a file (and line) or a key
    message: str
    blocking: bool = True

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Best:
    key: str
    rule: str
    value: float
    index: int
    source: str  # where the winning record was read
    line: int


@dataclass(frozen=True, slots=True)
class Ranked:
    """One of the k best evaluations of a metric that have a checkpoint (rank 1 is the best)."""

    key: str
    rank: int
    index: int
    value: float


@dataclass(frozen=True, slots=True)
class TrainerBest:
    """The best as the trainer itself recorded it, read from its own files.

    The trainer compared raw values, while its logs may round or smooth them, so where it
    records its choice that record is the authority (see ``best.agree_with_trainer``).
    """

    key: str | None  # the metric it ranks by; None when its record does not say
    index: int  # the index (epoch/iter/step) of the checkpoint it holds as best
    score: float | None  # its raw best score, when recorded
    as_of: int  # the last evaluated index the record accounts for
    source: str  # where it was read, e.g. "epoch_12.pth: meta.hook_msgs.best_ckpt"


@dataclass(frozen=True, slots=True)
class BestDispute:
    """The trainer's own best and the best ckptd derives from the logs name different indices."""

    key: str
    trainer_index: int
    log_index: int
    source: str


@dataclass(slots=True)
class WorkDirScan:
    """What a layout found on disk, before any policy is applied."""

    work_dir: Path
    layout: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    resume_target: str | None = None  # checkpoint name the trainer would resume from
    # Checkpoints that older resume pointers name (an earlier fit's link) -> that pointer.
    older_pointers: dict[str, str] = field(default_factory=dict)
    resume_note: str = ""
    problems: list[Problem] = field(default_factory=list)

    def checkpoint_named(self, name: str) -> Checkpoint | None:
        # layouts/lightning_best.py: the trainer's record names its best file
        return next((c for c in self.checkpoints if c.name == name), None)

    def checkpoint_at(self, index: int) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.index == index), None)
