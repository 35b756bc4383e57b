"""The interface every trainer layout implements, and the pieces layouts share.

A layout knows a trainer's files: which entries are checkpoints and what they count, when a
checkpoint is complete, what the trainer would resume from, where evaluation records are and
how to read them incrementally, and how the best artifact is named. It never deletes or
writes; the reconciler does that.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptd.core.model import (
    Checkpoint,
    EvalRecord,
    FileStat,
    Problem,
    Skipped,
    TrainerBest,
    WorkDirScan,
)
from ckptd.core.reads import read_text
from ckptd.fs.delete import NotPlainTree, tree_stat
from ckptd.layouts.logtail import Cursor, read_new_lines
from ckptd.slim.artifact import ArtifactWriter
from ckptd.slim.safetensors_writer import SUFFIX as SAFETENSORS_SUFFIX
from ckptd.slim.safetensors_writer import SafetensorsWriter
from ckptd.slim.slimmer import TorchZipSlim

if TYPE_CHECKING:
    from ckptd.core.config import ProjectConfig

# Bigger than any resume pointer a trainer writes; a larger file is not one.
MAX_POINTER_BYTES = 4096


@dataclass(slots=True)
class SourceState:
    """What was consumed of one metric log, persisted between passes."""

    cursor: Cursor = field(default_factory=Cursor)
    records: list[EvalRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # What a layout needs to read on from the cursor (e.g. a CSV header), or to tell that the
    # source is no longer the one it read (e.g. a whole-file JSON's stat).
    info: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {
            "cursor": self.cursor.to_json(),
            "records": [[r.index, r.line, r.metrics] for r in self.records],
            "problems": [[p.where, p.message, p.blocking] for p in self.problems],
        }
        if self.info:
            data["info"] = dict(self.info)
        return data

    @classmethod
    def from_json(cls, source: str, data: dict[str, Any]) -> SourceState:
        return cls(
            cursor=Cursor.from_json(data.get("cursor", {})),
            records=[
                EvalRecord(int(i), {str(k): float(v) for k, v in m.items()}, source, int(line))
                for i, line, m in data.get("records", [])
            ],
            problems=[Problem(str(w), str(m), bool(b)) for w, m, b in data.get("problems", [])],
            info={str(k): str(v) for k, v in data.get("info", {}).items()},
        )


@dataclass(slots=True)
class EvalRead:
    records: list[EvalRecord]  # across all sources, in trainer order
    sources: dict[str, SourceState]  # keyed by path relative to the work_dir
    problems: list[Problem]


@dataclass(frozen=True, slots=True)
class AutoMetric:
    """What ``best.metric: auto`` means for a trainer whose files name its own choice."""

    key: str
    rule: str | None  # None: infer it from the key
    why: str  # shown to the user, e.g. "ModelCheckpoint(monitor='val_acc', mode='max')"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A directory entry that names a checkpoint; completeness is judged afterwards."""

    name: str
    unit: str
    index: int
    stat: FileStat

    def as_checkpoint(self, complete: bool, reason: str = "") -> Checkpoint:
        return Checkpoint(self.name, self.unit, self.index, self.stat, complete, reason)


def checkpoint_stat(
    entry: os.DirEntry[str], name: str, skipped: list[Skipped], *, folder: bool
) -> FileStat | None:
    """The stat a checkpoint entry is judged by (a folder's tree stat, a file's own); None when
    it vanished since the listing, or is a folder ckptd must never delete (said in ``skipped``
    under ``name``)."""
    try:
        if folder:
            return tree_stat(Path(entry.path))
        return FileStat.of(entry.stat(follow_symlinks=False))
    except NotPlainTree as exc:
        skipped.append(Skipped(name, f"{exc}; ckptd never deletes such a folder"))
    except FileNotFoundError:
        pass
    return None


class Layout(ABC):
    name: ClassVar[str]
    # What the artifact keeps with ``artifact.keep_keys: auto``; a trailing '?' marks a key
    # that is kept when present and skipped silently when not.
    default_keep_keys: ClassVar[tuple[str, ...]]
    # What ``detect`` looks for, for the message when no layout matches.
    signature: ClassVar[str] = ""
    # How the best artifact is written from a checkpoint, and what its name ends with.
    artifact_writer: ClassVar[ArtifactWriter] = TorchZipSlim()
    artifact_suffix: ClassVar[str] = ".pth"
    # Files in the work_dir that name the resume target: fsynced before a pass deletes.
    pointer_files: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_project(cls, project: ProjectConfig | None) -> Layout:
        """An instance configured for ``project`` (layouts without options ignore it)."""
        return cls()

    @classmethod
    @abstractmethod
    def detect(cls, work_dir: Path) -> bool:
        """Does this folder look like one of this trainer's work_dirs?"""

    @abstractmethod
    def list_checkpoints(self, work_dir: Path) -> tuple[list[Candidate], list[Skipped]]:
        """Checkpoint entries (regular files or folders, never symlinks) and what was skipped."""

    def format_check(self, path: Path) -> tuple[bool | None, str]:
        """Is this checkpoint complete by its format? ``None``: the format cannot tell.

        By default a torch zip archive, complete once its end-of-central-directory records
        are consistent with its size (a file being written, or truncated and rewritten in
        place, is not).
        """
        from ckptd.slim.torchzip import looks_complete

        verdict = looks_complete(path)
        if verdict is False:
            return False, "no valid end of zip archive yet (being written or truncated)"
        return verdict, ""

    @abstractmethod
    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        """The checkpoint name the trainer would resume from, and a note for the user."""

    def older_pointers(self, work_dir: Path, names: set[str]) -> dict[str, str]:
        """Checkpoints named by resume pointers older than the trainer's current one (e.g. an
        earlier fit's ``last.ckpt`` link), each with that pointer: they are kept like the
        resume target, and stay candidates for best."""
        return {}

    @abstractmethod
    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        """Evaluation records, reading only what was appended since ``previous``."""

    def artifact_output(self, fmt: str = "torch") -> tuple[ArtifactWriter, str]:
        """The writer and name suffix of the best artifact in ``artifact.format`` ``fmt``:
        the layout's own for torch, a ``.safetensors`` file cut from the torch zip otherwise."""
        if fmt == "safetensors":
            return SafetensorsWriter(), SAFETENSORS_SUFFIX
        return self.artifact_writer, self.artifact_suffix

    def auto_keep_keys(self, fmt: str = "torch") -> tuple[str, ...]:
        """What ``artifact.keep_keys: auto`` keeps in format ``fmt``."""
        return self.default_keep_keys

    def artifact_name(self, key: str, checkpoint: Checkpoint, fmt: str = "torch") -> str:
        """The best artifact's name for metric ``key``: MMEngine's ``CheckpointHook`` naming,
        ``best_{key}_{unit}_{index}`` with '/' replaced by '_', plus the format's suffix."""
        suffix = self.artifact_output(fmt)[1]
        return f"best_{key}_{checkpoint.unit}_{checkpoint.index}{suffix}".replace("/", "_")

    def as_evaluated(self, records: list[EvalRecord]) -> list[EvalRecord]:
        """Undo what the trainer's logger did to metric values (none by default)."""
        return records

    def auto_metrics(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[AutoMetric]:
        """The trainer's own best metric(s) when its files say; empty: the first key of the
        first evaluation record, like MMEngine's ``save_best='auto'``."""
        return []

    def trainer_bests(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[TrainerBest]:
        """The trainer's own record of its best, where its files keep one (read without running
        anything from them). ckptd compares it with the best it derives from the logs."""
        return []

    def trainer_holds(self, work_dir: Path, scan: WorkDirScan) -> dict[str, str]:
        """Checkpoints the trainer will read again (name -> why), e.g. the best it loads at the
        end of training: never deleted, whichever best ckptd chooses. Called after read_evals."""
        return {}

    def infer_rule(self, key: str) -> str:
        """greater/less for a metric given without a rule (MMEngine's inference by default)."""
        from ckptd.core.best import infer_rule

        return infer_rule(key)

    def watch_folders(self, work_dir: Path) -> list[Path]:
        """Folders whose direct entries change when the trainer writes (never whole trees)."""
        return [work_dir]


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_pointer_file(path: Path) -> tuple[str | None, str]:
    """The text of a small resume-pointer file, or None and why it is not usable."""
    st = lstat_or_none(path)
    if st is None:
        return None, ""
    if not os.path.isfile(path) or os.path.islink(path):
        return None, f"{path.name} is not a regular file; ignored"
    if st.st_size > MAX_POINTER_BYTES:
        return None, f"{path.name} is {st.st_size} bytes, too large to be a resume pointer"
    try:
        return read_text(path).strip(), ""
    except OSError as exc:
        raise PointerUnreadable(f"{path}: cannot read the resume pointer: {exc.strerror}") from exc


class PointerUnreadable(OSError):
    pass


def match_pointer(
    text: str, work_dir: Path, names: set[str], pointer: str
) -> tuple[str | None, str]:
    """Resolve a pointer by file name inside the work_dir.

    The path may come from another mount namespace (a sidecar that mounts the volume
    elsewhere), so only its last component is trusted, and only inside this work_dir.
    """
    base = os.path.basename(text.rstrip("/"))
    if base in names:
        if os.path.dirname(text) not in ("", str(work_dir)):
            return base, f"{pointer} names {text}; matched {base} by file name in this work_dir"
        return base, ""
    return None, f"{pointer} names {text!r}, which is not a checkpoint in this work_dir"


def tail_json_lines(
    work_dir: Path,
    sources: list[Path],
    previous: dict[str, SourceState],
    keep_line: Callable[[bytes], bool],
    parse: Callable[[dict[str, Any], str, int], EvalRecord | None],
) -> EvalRead:
    """Shared reader for JSON-lines metric logs (MMEngine scalars.json, mmcv .log.json)."""
    states: dict[str, SourceState] = {}
    problems: list[Problem] = []
    for path in sources:
        rel = path.relative_to(work_dir).as_posix()
        state = previous.get(rel, SourceState())
        try:
            tail = read_new_lines(path, state.cursor, keep_line)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(Problem(rel, f"cannot read: {exc.strerror}"))
            states[rel] = state
            continue
        if tail.restarted:
            state = SourceState()
        records = list(state.records)
        found = list(state.problems)
        for lineno, raw in tail.lines:
            where = f"{rel}:{lineno}"
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                found.append(Problem(where, f"not a JSON record ({exc}); fix or remove the line"))
                continue
            if not isinstance(data, dict):
                found.append(Problem(where, "not a JSON object; fix or remove the line"))
                continue
            try:
                record = parse(data, rel, lineno)
            except ValueError as exc:
                found.append(Problem(where, f"{exc}; fix or remove the line"))
                continue
            if record is not None:
                records.append(record)
        states[rel] = SourceState(tail.cursor, records, found)
        problems.extend(found)
    ordered = [r for rel in states for r in states[rel].records]
    return EvalRead(ordered, states, problems)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range: as good as infinite
        return float("inf") if value > 0 else float("-inf")


def numeric_metrics(data: dict[str, Any], ignore: frozenset[str]) -> dict[str, float]:
    """Numbers only, in file order; strings such as ``bbox_mAP_copypaste`` are not metrics."""
    return {
        str(k): _as_float(v)
        for k, v in data.items()
        if k not in ignore and isinstance(v, int | float) and not isinstance(v, bool)
    }
