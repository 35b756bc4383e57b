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
from typing import TYPE_CHECKING, ClassVar

from ckptd.core.model import (
    EvalRecord,
    FileStat,
    Problem,
    Skipped,
    TrainerBest,
    WorkDirScan,
)
from ckptd.layouts.base import (
    AutoMetric,
    Candidate,
    EvalRead,
    Layout,
    SourceState,
    checkpoint_stat,
)
from ckptd.layouts.lightning_best import lightning_bests
from ckptd.layouts.lightning_ckpt import CKPT_SUFFIX, step_in_name
from ckptd.layouts.lightning_csv import METRICS_FILE, read_metrics_csv
from ckptd.layouts.lightning_sharded import (
    FileOrFolder,
    checkpoint_facts,
    folder_complete,
    folder_format,
)
from ckptd.slim.artifact import ArtifactWriter

if TYPE_CHECKING:
    from ckptd.core.config import ProjectConfig

LAST = re.compile(r"last(?:-v\d+)?\.ckpt", re.ASCII)
VERSION = re.compile(r"version_(\d+)", re.ASCII)


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
    artifact_suffix: ClassVar[str] = CKPT_SUFFIX

    def __init__(self, checkpoint_dirs: tuple[str, ...] = (), metrics: tuple[str, ...] = ()):
        self.checkpoint_dirs = tuple(
            posixpath.normpath(d.replace("\\", "/")) for d in checkpoint_dirs
        )
        self.metrics = metrics  # configured best.metric keys: their rows are evaluations
        self._listed: tuple[list[Candidate], list[Skipped]] | None = None
        self._pointer: tuple[str, str | None, str] | None = None  # (link, target, text)
        self._older: dict[str, str] = {}  # target -> an older run's last*.ckpt link
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
                folder = entry.is_dir(follow_symlinks=False)
                if folder and folder_format(Path(entry.path)) is None:
                    skipped.append(Skipped(name, "a folder that is no sharded checkpoint"))
                    continue
                if not folder and not entry.is_file(follow_symlinks=False):
                    skipped.append(Skipped(name, "not a regular file"))
                    continue
                stat = checkpoint_stat(entry, name, skipped, folder=folder)
                if stat is None:
                    continue
                step, why = step_in_name(entry.name), ""
                if step is None:
                    step, why = self._stored_step(entry, stat)
                if step is None:
                    skipped.append(Skipped(name, why))
                    continue
                candidates.append(Candidate(name, "step", step, stat))
        candidates = self._one_per_step(candidates, skipped)
        self._find_pointers(links)
        self._listed = (candidates, skipped)
        return candidates, skipped

    def _stored_step(self, entry: os.DirEntry[str], stat: FileStat) -> tuple[int | None, str]:
        """The step of a checkpoint whose name does not say (``filename='{epoch}'``, or
        ``auto_insert_metric_name=False``): its own ``global_step``, read once it is complete."""
        complete, reason = self.format_check(Path(entry.path))
        if complete is not True:
            return None, (
                f"its name has no step=N and it is not complete yet ({reason or 'unknown format'})"
                "; ckptd reads its step from it once it is. Left alone until then"
            )
        facts = checkpoint_facts(Path(entry.path), stat)
        if facts is None or facts.global_step is None:
            return None, (
                "its name has no step=N and ckptd cannot read a global_step from it (not a "
                "Lightning checkpoint ckptd can read safely); add {step} to "
                "ModelCheckpoint(filename=...) to have it managed. Left alone"
            )
        return facts.global_step, ""

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

    def _find_pointers(self, links: list[tuple[int, str, str | None, str]]) -> None:
        """The newest last*.ckpt link is the resume pointer; older runs' links keep their
        targets too (``older_pointers``). A resumed fit whose restored state lacks
        ``last_model_path`` writes ``last-v1.ckpt`` beside the old ``last.ckpt``."""
        self._pointer, self._older = None, {}
        if not links:
            return
        links.sort()
        _, link, target, text = links[-1]
        self._pointer = (link, target, text)
        self._older = {t: name for _, name, t, _ in links[:-1] if t is not None and t != target}

    def older_pointers(self, work_dir: Path, names: set[str]) -> dict[str, str]:
        if self._listed is None:
            self.list_checkpoints(work_dir)
        return {t: link for t, link in self._older.items() if t in names}

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
            facts = checkpoint_facts(work_dir / c.name, c.stat)
            callbacks = facts.callbacks if facts else ()
            self._monitors = [(cb.monitor, cb.mode, c.name) for cb in callbacks if cb.monitor]
            break
        return self._monitors

    def format_check(self, path: Path) -> tuple[bool | None, str]:
        if path.is_dir() and not path.is_symlink():  # a sharded folder (FSDP, DeepSpeed)
            return folder_complete(path)
        return super().format_check(path)

    def artifact_output(self, fmt: str = "torch") -> tuple[ArtifactWriter, str]:
        writer, suffix = super().artifact_output(fmt)
        return FileOrFolder(writer, fmt), suffix

    def trainer_bests(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[TrainerBest]:
        return lightning_bests(work_dir, scan, records, log_dirs(work_dir))

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

    def watch_folders(self, work_dir: Path) -> list[Path]:
        folders = [work_dir]
        for folder in log_dirs(work_dir):
            if folder != work_dir:
                folders += [folder.parent, folder]
        skipped: list[Skipped] = []
        folders += [work_dir / d for d in self._checkpoint_dirs(work_dir, skipped)]
        return list(dict.fromkeys(folders))
