"""Hugging Face ``Trainer`` output_dirs: one ``checkpoint-N/`` folder per save.

Measured on transformers 5.x (see docs/DESIGN.md): ``_save_checkpoint`` writes the model
(``model.safetensors`` or shards + index, ``config.json``), then ``training_args.bin``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and last ``trainer_state.json``, all in
place. So a folder is complete when its ``trainer_state.json`` parses and says
``global_step == N``, and no temporary ``.tmp*`` file is inside. ``trainer_state.json`` holds the
whole ``log_history``; evaluation entries carry ``eval_*`` keys and the ``step`` they evaluated,
which is the N of the folder saved right after. ``resume_from_checkpoint=True`` resumes from the
highest N.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.model import (
    Checkpoint,
    EvalRecord,
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
from ckptd.layouts.hf_deepspeed import FolderOrShards, consolidated_suffix, deepspeed_complete
from ckptd.layouts.logtail import Cursor
from ckptd.layouts.memo import TUPLE_CODEC
from ckptd.layouts.peek import object_state, peek
from ckptd.slim.artifact import ArtifactWriter
from ckptd.slim.folder import FolderCopy

FOLDER = re.compile(r"checkpoint-(\d+)", re.ASCII)
STATE = "trainer_state.json"
ARGS = "training_args.bin"
# A year of logging every step is ~100 MB of log_history; a larger file is not a Trainer's.
MAX_STATE_BYTES = 512 * 1024 * 1024
MAX_ARGS_PICKLE = 4 * 1024 * 1024
# eval_* keys that describe the evaluation run, not the model.
NOT_METRICS = re.compile(
    r"eval_(runtime|samples_per_second|steps_per_second|model_preparation_time)"
)


DEFAULT_METRIC_WHY = "the Trainer's default metric_for_best_model"


def is_temporary(name: str) -> bool:
    return name.startswith(".tmp") or name.endswith(".tmp")


def hf_rule(key: str) -> str:
    """TrainingArguments' default: greater unless metric_for_best_model ends with 'loss'."""
    return "less" if key.endswith("loss") else "greater"


def _folders(work_dir: Path) -> list[tuple[int, os.DirEntry[str]]]:
    try:
        entries = list(os.scandir(work_dir))
    except OSError:
        return []
    found = [(int(m.group(1)), e) for e in entries if (m := FOLDER.fullmatch(e.name))]
    return sorted(found, key=lambda item: item[0])


def _load_state(path: Path) -> dict[str, Any] | None:
    """trainer_state.json as a dict, or None while it is missing or not complete JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size > MAX_STATE_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def _best_args(root: Any) -> tuple[str | None, bool | None, bool | None]:
    """(metric_for_best_model, greater_is_better, load_best_model_at_end) of TrainingArguments."""
    state = object_state(root)
    metric, greater = state.get("metric_for_best_model"), state.get("greater_is_better")
    load = state.get("load_best_model_at_end")
    return (
        metric if isinstance(metric, str) and metric else None,
        greater if isinstance(greater, bool) else None,
        load if isinstance(load, bool) else None,
    )


def _best_info(data: dict[str, Any]) -> dict[str, str]:
    """What trainer_state.json records of the Trainer's best, as SourceState.info strings.

    ``best_model_checkpoint`` is a path in the Trainer's view (another mount, another host):
    only its folder name is kept, and matched to ``checkpoint-N`` here.
    """
    info: dict[str, str] = {}
    value, step = data.get("best_metric"), data.get("best_global_step")
    if isinstance(value, int | float) and not isinstance(value, bool):
        info["best_metric"] = repr(float(value))
    if isinstance(step, int) and not isinstance(step, bool):
        info["best_global_step"] = str(step)
    path = data.get("best_model_checkpoint")
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if isinstance(path, str) else ""
    if FOLDER.fullmatch(name):
        info["best_model_checkpoint"] = name
    if isinstance(data.get("global_step"), int):
        info["global_step"] = str(data["global_step"])
    return info


def _records(data: dict[str, Any], rel: str) -> tuple[list[EvalRecord], list[Problem]]:
    history = data.get("log_history")
    if not isinstance(history, list):
        return [], [Problem(rel, "has no log_history list; is it a Trainer's trainer_state.json?")]
    records, problems = [], []
    for i, entry in enumerate(history, 1):
        if not isinstance(entry, dict):
            continue
        metrics = {
            k: float(v)
            for k, v in entry.items()
            if k.startswith("eval_")
            and not NOT_METRICS.fullmatch(k)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        if not metrics:
            continue
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            problems.append(Problem(f"{rel}:{i}", f"evaluation entry with step {step!r}"))
            continue
        records.append(EvalRecord(step, metrics, rel, i))
    return records, problems


class HFLayout(Layout):
    name: ClassVar[str] = "hf"
    # For this layout keep_keys are file names or globs inside checkpoint-N/.
    default_keep_keys: ClassVar[tuple[str, ...]] = (
        "model.safetensors?",
        "model-*-of-*.safetensors",
        "model.safetensors.index.json?",
        "pytorch_model.bin?",
        "pytorch_model-*-of-*.bin",
        "pytorch_model.bin.index.json?",
        "config.json?",
        "generation_config.json?",
    )
    signature: ClassVar[str] = "checkpoint-N/ folders"
    # a folder with the model files (keep_keys are names or globs) and SHA256SUMS
    artifact_writer: ClassVar[ArtifactWriter] = FolderCopy()
    artifact_suffix: ClassVar[str] = ""

    def artifact_output(self, fmt: str = "torch") -> tuple[ArtifactWriter, str]:
        # The folder artifact whatever the format: the Trainer writes safetensors itself;
        # a DeepSpeed folder without model files is consolidated (see hf_deepspeed.py).
        return FolderOrShards(self.artifact_writer, fmt), self.artifact_suffix

    def artifact_name(self, key: str, checkpoint: Checkpoint, fmt: str = "torch") -> str:
        name = super().artifact_name(key, checkpoint, fmt)
        folder = self._work_dir / checkpoint.name if self._work_dir is not None else None
        return name + consolidated_suffix(folder, fmt) if folder is not None else name

    def auto_keep_keys(self, fmt: str = "torch") -> tuple[str, ...]:
        """safetensors: only the safetensors weights (a folder with only pytorch_model*.bin
        fails: it has no weights to keep); torch: whichever weights the Trainer wrote."""
        if fmt != "safetensors":
            return self.default_keep_keys
        return tuple(k for k in self.default_keep_keys if ".bin" not in k)

    def __init__(self) -> None:
        self._source: SourceState | None = None  # the trainer_state.json metrics came from
        self._source_folder: Path | None = None
        self._listed: set[str] | None = None  # folders ckptd manages (not skipped)
        self._work_dir: Path | None = None  # where they were listed, for artifact names

    @classmethod
    def detect(cls, work_dir: Path) -> bool:
        return any(e.is_dir(follow_symlinks=False) for _, e in _folders(work_dir))

    def list_checkpoints(self, work_dir: Path) -> tuple[list[Candidate], list[Skipped]]:
        candidates: list[Candidate] = []
        skipped: list[Skipped] = []
        for step, entry in _folders(work_dir):
            if entry.is_symlink():
                skipped.append(Skipped(entry.name, "a symlink; ckptd never deletes or follows it"))
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            stat = checkpoint_stat(entry, entry.name, skipped, folder=True)
            if stat is None:
                continue
            candidates.append(Candidate(entry.name, "step", step, stat))
        self._listed = {c.name for c in candidates}
        self._work_dir = work_dir
        return candidates, skipped

    def format_check(self, path: Path) -> tuple[bool | None, str]:
        temporary = sorted(n for n in os.listdir(path) if is_temporary(n))
        if temporary:
            return False, f"holds {temporary[0]}, so it is still being written"
        data = _load_state(path / STATE)
        if data is None:
            if not (path / STATE).exists():
                return False, f"no {STATE} yet (the Trainer writes it last)"
            return False, f"{STATE} is not complete JSON yet"
        step = int(FOLDER.fullmatch(path.name).group(1))  # type: ignore[union-attr]
        if data.get("global_step") != step:
            return False, f"{STATE} says global_step {data.get('global_step')!r}, not {step}"
        return deepspeed_complete(path)

    def resume_target(self, work_dir: Path, names: set[str]) -> tuple[str | None, str]:
        # get_last_checkpoint: the highest checkpoint-N that is a folder, symlinks followed
        folders = [e for _, e in _folders(work_dir) if e.is_dir()]
        if not folders:
            return None, ""
        last = folders[-1]
        if not last.is_symlink():
            return (last.name if last.name in names else None), ""
        text = os.readlink(last.path)  # read, never followed
        base = os.path.basename(text.rstrip("/"))
        inside = os.path.dirname(text.rstrip("/")) in ("", ".", str(work_dir))
        if inside and base in names:
            return base, f"{last.name} is a symlink to {base}, which resume_from_checkpoint uses"
        return None, f"{last.name} is a symlink to {text!r}, which resume_from_checkpoint uses"

    def read_evals(
        self, work_dir: Path, previous: dict[str, SourceState], unit: str | None
    ) -> EvalRead:
        """Evaluations from the log_history of the complete folder the Trainer wrote last: it
        holds every evaluation of the current run (also across resumes). By mtime, not N: a run
        resumed from an early checkpoint leaves later folders of the abandoned run behind."""
        if self._listed is None:
            self.list_checkpoints(work_dir)
        found = []
        for step, entry in _folders(work_dir):
            if entry.name not in (self._listed or ()):
                continue  # symlinks, and folders ckptd leaves alone
            try:
                st = os.stat(Path(entry.path) / STATE, follow_symlinks=False)
            except OSError:
                continue
            found.append((st.st_mtime_ns, step, entry, st))
        for _, _, entry, st in sorted(found, key=lambda f: (f[0], f[1]), reverse=True):
            path = Path(entry.path) / STATE
            rel = f"{entry.name}/{STATE}"
            stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            state = previous.get(rel)
            if state is None or state.info.get("stat") != stamp:
                if self.format_check(Path(entry.path))[0] is not True:
                    continue
                data = _load_state(path)
                if data is None:
                    continue
                records, problems = _records(data, rel)
                info = {"stat": stamp, **_best_info(data)}
                state = SourceState(Cursor(st.st_ino, st.st_size), records, problems, info)
            self._source, self._source_folder = state, Path(entry.path)
            return EvalRead(list(state.records), {rel: state}, list(state.problems))
        return EvalRead([], {}, [])

    def infer_rule(self, key: str) -> str:
        return hf_rule(key)

    def auto_metrics(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[AutoMetric]:
        """The Trainer's metric_for_best_model, read from training_args.bin without running it;
        else the eval key whose value is trainer_state.json's best_metric at best_global_step;
        else eval_loss (the Trainer's default); else the first key, as for MMEngine."""
        folder = self._source_folder
        if folder is not None:
            metric, greater, _ = self._args()
            if metric:
                key = metric if metric.startswith("eval_") else f"eval_{metric}"
                rule = hf_rule(metric) if greater is None else ("greater" if greater else "less")
                why = (
                    f"metric_for_best_model={metric!r}, greater_is_better={greater} in "
                    f"{folder.name}/{ARGS}"
                )
                return [AutoMetric(key, rule, why)]
        info = self._source.info if self._source else {}
        if "best_metric" in info and "best_global_step" in info:
            value, step = float(info["best_metric"]), int(info["best_global_step"])
            at = [r for r in records if r.index == step]
            keys = [k for r in at for k, v in r.metrics.items() if v == value]
            if len(keys) == 1 and math.isfinite(value):
                why = f"{ARGS} unreadable; the eval key equal to best_metric at best_global_step"
                return [AutoMetric(keys[0], None, why)]
        if records and "eval_loss" in records[0].metrics:
            return [AutoMetric("eval_loss", "less", DEFAULT_METRIC_WHY)]
        return []

    def _args(self) -> tuple[str | None, bool | None, bool | None]:
        """_best_args of the source folder's training_args.bin (read once per file version)."""
        if self._source_folder is None:
            return None, None, None
        path = self._source_folder / ARGS
        args = peek(path, "hf-args", _best_args, max_pickle=MAX_ARGS_PICKLE, codec=TUPLE_CODEC)
        return args or (None, None, None)

    def trainer_bests(
        self, work_dir: Path, scan: WorkDirScan, records: list[EvalRecord]
    ) -> list[TrainerBest]:
        """trainer_state.json's best_model_checkpoint, when it is the checkpoint of the
        Trainer's best evaluation (``best_global_step``).

        The Trainer moves ``best_model_checkpoint`` only at a save where ``checkpoint-
        {best_global_step}`` exists; a best evaluated at a step without a save leaves it on an
        older folder, which is then neither the Trainer's best nor the best saved one.
        """
        info = self._source.info if self._source else {}
        folder = info.get("best_model_checkpoint")
        if folder is None or "global_step" not in info or self._source_folder is None:
            return []
        index = int(FOLDER.fullmatch(folder).group(1))  # type: ignore[union-attr]
        if info.get("best_global_step", str(index)) != str(index):
            return []
        found = self.auto_metrics(work_dir, scan, records)
        if not found or found[0].why == DEFAULT_METRIC_WHY:
            return []  # which key the Trainer ranked by is unknown: its record cannot be used
        score = float(info["best_metric"]) if "best_metric" in info else None
        source = f"{self._source_folder.name}/{STATE}: best_model_checkpoint"
        return [TrainerBest(found[0].key, index, score, int(info["global_step"]), source)]

    def trainer_holds(self, work_dir: Path, scan: WorkDirScan) -> dict[str, str]:
        """The folder trainer_state.json names as ``best_model_checkpoint``: what
        ``load_best_model_at_end`` loads when training ends (if it is gone the Trainer only
        warns and ends with the last weights), what a resumed Trainer forgets if it is gone
        ("does not exist anymore. Ignoring it"), and what its own save_total_limit never
        deletes. Held whichever best ckptd chooses, at the cost of at most one folder."""
        info = self._source.info if self._source else {}
        folder = info.get("best_model_checkpoint")
        if folder is None:
            return {}
        load = " (load_best_model_at_end loads it)" if self._args()[2] else ""
        return {folder: f"the Trainer's best_model_checkpoint{load}"}

    def watch_folders(self, work_dir: Path) -> list[Path]:
        # trainer_state.json lands inside the folder, last: watch the folders, not just the root.
        folders = [work_dir]
        folders += [Path(e.path) for _, e in _folders(work_dir) if e.is_dir(follow_symlinks=False)]
        return folders
