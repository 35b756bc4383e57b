"""PyTorch Lightning work_dirs: the folder given as ``Trainer(default_root_dir=...)``.

Measured on Lightning 2.6 (see docs/DESIGN.md): ``ModelCheckpoint`` writes
``<logger name>/version_N/checkpoints/epoch=E-step=S.ckpt`` (or into its ``dirpath``; a
``-vK`` suffix when a name repeats) through a temp file and a rename; ``last.ckpt`` is a full
copy (``save_last=True``) or a relative symlink (``save_last='link'``) and is what a resumed
fit loads. Every ``fit`` starts a new ``version_N``; a resumed one continues the step count.

Metrics come from CSVLogger's ``version_N/metrics.csv``: sparse rows, columns sorted by name,
and the whole file **rewritten** whenever a new column appears. Validation metrics get a row
of their own whose ``step`` is S-1 of the checkpoint saved after that validation, so a record's
index is ``step + 1``. A row is an evaluation when it has a value in a validation-looking column
(``val_*``, ``val/*``, ``valid*``, ``eval*``, ``*/val``; never a per-batch ``*_step`` column),
in a configured ``best.metric`` or in a ``ModelCheckpoint`` monitor.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptd.fsutil import FileStat
from ckptd.layouts.base import (
    AutoMetric,
    Candidate,
    EvalRead,
    Layout,
    SourceState,
)
from ckptd.layouts.lightning_csv import METRICS_FILE, read_metrics_csv
from ckptd.layouts.peek import peek, top_mapping
from ckptd.model import Checkpoint, EvalRecord, Problem, Skipped, WorkDirScan

if TYPE_CHECKING:
    from ckptd.config import ProjectConfig

CKPT_SUFFIX = ".ckpt"
STEP = re.compile(r"(?:^|[-_])step=(\d+)(?=$|[-_.])", re.ASCII)
LAST = re.compile(r"last(?:-v\d+)?\.ckpt", re.ASCII)
VERSION = re.compile(r"version_(\d+)", re.ASCII)
MODE_IN_KEY = re.compile(r"'mode': '(min|max)'")
# data.pkl holds the structure of every tensor; 64 MiB is far above any real checkpoint's.
MAX_PICKLE = 64 * 1024 * 1024


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _versions(parent: Path) -> list[Path]:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    found = [
        (int(m.group(1)), Path(e.path))
        for e in entries
        if (m := VERSION.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
    ]
    return [p for _, p in sorted(found)]


def log_dirs(work_dir: Path) -> list[Path]:
    """Logger run folders, each logger's versions in order: work_dir itself when it is one,
    ``version_N`` (a logger with name=''), ``<name>/version_N``."""
    found = [work_dir] if (work_dir / METRICS_FILE).is_file() else []
    found += _versions(work_dir)
    try:
        entries = sorted(os.scandir(work_dir), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        if (
            entry.name.startswith(".")
            or VERSION.fullmatch(entry.name)
            or entry.name in ("checkpoints",)
        ):
            continue
        if entry.is_dir(follow_symlinks=False):
            found += _versions(Path(entry.path))
    return found


def _monitors_of(root: Any) -> list[tuple[str, str | None]]:
    """(monitor, mode) of every ModelCheckpoint-like callback state, in the checkpoint's order."""
    callbacks = top_mapping(root).get("callbacks")
    found: list[tuple[str, str | None]] = []
    if not isinstance(callbacks, dict):
        return found
    for state_key, value in callbacks.items():
        if not isinstance(value, dict) or "best_model_path" not in value:
            continue
        monitor = value.get("monitor")
        if isinstance(monitor, str) and monitor:
            mode = MODE_IN_KEY.search(state_key) if isinstance(state_key, str) else None
            found.append((monitor, mode.group(1) if mode else None))
    return found


class LightningLayout(Layout):
    name: ClassVar[str] = "lightning"
    default_keep_keys: ClassVar[tuple[str, ...]] = (
        "state_dict",
        "hyper_parameters?",
        "pytorch-lightning_version?",
    )
    signature: ClassVar[str] = (
        "<logger>/version_N/ with metrics.csv or checkpoints/*.ckpt, or checkpoints/*.ckpt"
    )

    def __init__(self, checkpoint_dirs: tuple[str, ...] = (), metrics: tuple[str, ...] = ()):
        self.checkpoint_dirs = tuple(
            posixpath.normpath(d.replace("\\", "/")) for d in checkpoint_dirs
        )
        self.metrics = metrics  # configured best.metric keys: their rows are evaluations
        self._listed: tuple[list[Candidate], list[Skipped]] | None = None
        self._pointer: tuple[str, str | None, str] | None = None  # (link, target, text)
        self._monitors: list[tuple[str, str | None, str]] | None = None

    @classmethod
    def from_project(cls, project: ProjectConfig | None) -> LightningLayout:
        if project is None:
            return cls()
        metrics = () if project.best.metric == "auto" else tuple(project.best.metric)
        return cls(tuple(project.lightning.checkpoint_dirs), metrics)

    @classmethod
    def detect(cls, work_dir: Path) -> bool:
        for folder in log_dirs(work_dir):
            if (folder / METRICS_FILE).is_file() or (folder / "hparams.yaml").is_file():
                return True
            if _real_dir(folder / "checkpoints"):
                return True
        try:
            return any(n.endswith(CKPT_SUFFIX) for n in os.listdir(work_dir / "checkpoints"))
        except OSError:
            return False

    def _checkpoint_dirs(self, work_dir: Path, skipped: list[Skipped]) -> list[str]:
        dirs = [f.relative_to(work_dir).as_posix() + "/checkpoints" for f in log_dirs(work_dir)]
        dirs = [d.removeprefix("./") for d in dirs]
        dirs.append("checkpoints")
        for configured in self.checkpoint_dirs:
            path = work_dir
            for part in configured.split("/"):
                path = path / part
                if path.is_symlink():
                    skipped.append(Skipped(configured, "a symlink on its path; never followed"))
                    break
            else:
                dirs.append(configured)
        unique = list(dict.fromkeys(dirs))
        return [d for d in unique if _real_dir(work_dir / d)]

    def list_checkpoints(self, work_dir: Path) -> tuple[list[Candidate], list[Skipped]]:
        candidates: list[Candidate] = []
        skipped: list[Skipped] = []
        links: list[tuple[int, str, str | None, str]] = []  # (mtime, link, target, text)
        for rel_dir in self._checkpoint_dirs(work_dir, skipped):
            try:
                entries = sorted(os.scandir(work_dir / rel_dir), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if not entry.name.endswith(CKPT_SUFFIX) or entry.name.startswith("."):
                    continue
                name = f"{rel_dir}/{entry.name}"
                if LAST.fullmatch(entry.name):
                    if entry.is_symlink():
                        text = os.readlink(entry.path)
                        mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        links.append((mtime, name, self._link_target(rel_dir, text), text))
                        why = "the resume pointer (a symlink); never deleted or followed"
                    else:
                        why = "the resume checkpoint save_last writes (a full copy); never deleted"
                    skipped.append(Skipped(name, why))
                    continue
                if entry.is_symlink():
                    skipped.append(Skipped(name, "a symlink; ckptd never deletes or follows it"))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    skipped.append(Skipped(name, "not a regular file"))
                    continue
                match = STEP.search(entry.name[: -len(CKPT_SUFFIX)])
                if not match:
                    skipped.append(
                        Skipped(
                            name,
                            "its name has no step=N, so ckptd cannot order it; add {step} to "
                            "ModelCheckpoint(filename=...) to have it managed. Left alone",
                        )
                    )
                    continue
                try:
                    stat = FileStat.of(entry.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue
                candidates.append(Candidate(name, "step", int(match.group(1)), stat))
        candidates = self._one_per_step(candidates, skipped)
        candidates = self._protect_old_pointers(candidates, skipped, links)
        self._listed = (candidates, skipped)
        return candidates, skipped

    @staticmethod
    def _link_target(rel_dir: str, text: str) -> str | None:
        if os.path.isabs(text):  # possibly another mount namespace: trust the file name only
            return f"{rel_dir}/{os.path.basename(text)}"
        target = posixpath.normpath(posixpath.join(rel_dir, text))
        return None if target == ".." or target.startswith("../") else target

    @staticmethod
    def _one_per_step(candidates: list[Candidate], skipped: list[Skipped]) -> list[Candidate]:
        """Two files for one step (a resumed run that repeated it, a second ModelCheckpoint, a
        -vK copy): the newest is managed, the others are left alone."""
        by_step: dict[int, list[Candidate]] = {}
        for c in candidates:
            by_step.setdefault(c.index, []).append(c)
        kept = []
        for group in by_step.values():
            newest = max(group, key=lambda c: (c.stat.mtime_ns, c.name))
            kept.append(newest)
            for c in group:
                if c is not newest:
                    skipped.append(
                        Skipped(
                            c.name,
                            f"step {c.index} again in the newer {newest.name}; ckptd manages "
                            "one checkpoint per step and leaves this one alone",
                        )
                    )
        return sorted(kept, key=lambda c: c.index)

    def _protect_old_pointers(
        self,
        candidates: list[Candidate],
        skipped: list[Skipped],
        links: list[tuple[int, str, str | None, str]],
    ) -> list[Candidate]:
        """The newest last*.ckpt link is the resume pointer; older runs' links keep their
        targets too, by leaving them unmanaged."""
        self._pointer = None
        if not links:
            return candidates
        links.sort()
        _, link, target, text = links[-1]
        self._pointer = (link, target, text)
        older = {t: name for _, name, t, _ in links[:-1] if t is not None and t != target}
        kept = []
        for c in candidates:
            if c.name in older:
                why = f"target of {older[c.name]}, the resume pointer of an earlier run; left alone"
                skipped.append(Skipped(c.name, why))
            else:
                kept.append(c)
        return kept

    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        if self._listed is None:
            self.list_checkpoints(work_dir)
        if self._pointer is None:
            return None, ""
        link, target, text = self._pointer
        if target in names:
            return target, ""
        return None, f"{link} points to {text!r}, which is not a checkpoint ckptd manages"

    def _newest_monitors(self, work_dir: Path) -> list[tuple[str, str | None, str]]:
        """ModelCheckpoint monitors stored in the newest complete checkpoint."""
        if self._monitors is not None:
            return self._monitors
        candidates = (self._listed or self.list_checkpoints(work_dir))[0]
        self._monitors = []
        for c in sorted(candidates, key=lambda c: c.index, reverse=True):
            if self.format_check(work_dir / c.name)[0] is not True:
                continue
            found = peek(work_dir / c.name, "monitors", MAX_PICKLE, _monitors_of)
            self._monitors = [(key, mode, c.name) for key, mode in found or []]
            break
        return self._monitors

    def auto_metrics(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[AutoMetric]:
        found: dict[str, AutoMetric] = {}
        for key, mode, source in self._newest_monitors(work_dir):
            if key in found:
                continue
            rule = {"max": "greater", "min": "less"}.get(mode or "")
            shown = f"ModelCheckpoint(monitor={key!r}, mode={mode!r}) in {source}"
            found[key] = AutoMetric(key, rule, shown)
        return list(found.values())

    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        keys = set(self.metrics) | {k for k, _, _ in self._newest_monitors(work_dir)}
        signature = ",".join(sorted(keys))
        states: dict[str, SourceState] = {}
        shown: list[EvalRecord] = []
        problems: list[Problem] = []
        for folder in log_dirs(work_dir):
            path = folder / METRICS_FILE
            if not path.is_file() or path.is_symlink():
                continue
            rel = path.relative_to(work_dir).as_posix()
            state, carried = read_metrics_csv(path, rel, previous.get(rel), keys, signature)
            if state is None:
                continue
            states[rel] = state
            shown += state.records + carried
            problems += state.problems
        return EvalRead(shown, states, problems)

    def artifact_name(self, key: str, checkpoint: Checkpoint) -> str:
        return f"best_{key}_{checkpoint.unit}_{checkpoint.index}{CKPT_SUFFIX}".replace("/", "_")

    def watch_folders(self, work_dir: Path) -> list[Path]:
        folders = [work_dir]
        for folder in log_dirs(work_dir):
            if folder != work_dir:
                folders += [folder.parent, folder]
        skipped: list[Skipped] = []
        folders += [work_dir / d for d in self._checkpoint_dirs(work_dir, skipped)]
        return list(dict.fromkeys(folders))
