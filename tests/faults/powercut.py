"""What a power cut left, judged from the rebooted disk alone (for ``test_fault_powercut``).

``surviving_view`` reads the trainer's state as it survived: the checkpoints whose bytes equal
one the trainer wrote (a torn or emptied one is incomplete), the resume pointer, the evaluation
records of the metric log (a torn line is not a record). ``judge_cut`` then checks:

* every artifact the manifest names exists, has its sha256 and loads with ``weights_only=True``;
  once an artifact had survived a cut, one survives every later cut;
* no checkpoint ckptd deleted (and whose deletion survived) is protected in the surviving
  state (``invariants.protected``: newest complete, resume target, pending evaluation, best
  without an artifact): ckptd must not have deleted on the strength of a newer checkpoint, a
  pointer, a log record or an artifact that did not survive;
* ``state.json`` and ``publish.json``, where they survived, are valid JSON;
* a published copy (a local folder standing for object storage, which does not lose power)
  names only complete files.

What the trainer itself lost (its checkpoints are never fsynced: MMEngine does not, see
``trainer_losses``) is counted separately and is not ckptd's loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.invariants import (
    MANIFEST,
    STATE_DIR,
    TrainerView,
    artifact_problems,
    protected,
    read_manifest,
)
from tests.faults.trainer import CHECKPOINT, POINTER, Op, Recording, _val_records


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Survivors:
    view: TrainerView
    torn: list[str] = field(default_factory=list)  # checkpoints that are there but incomplete


def surviving_view(work_dir: Path, recording: Recording) -> Survivors:
    complete: dict[str, set[str]] = {}
    for op in recording.ops:
        if op.checkpoint is not None and op.kind == "write":
            complete.setdefault(op.path, set()).add(_digest(op.data))
    out = Survivors(TrainerView())
    for path in sorted(work_dir.iterdir()):
        match = CHECKPOINT.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        if _digest(path.read_bytes()) in complete.get(path.name, set()):
            out.view.present[path.name] = int(match.group(2))
        else:
            out.torn.append(path.name)
    try:
        pointer = (work_dir / POINTER).read_text().strip()
        out.view.resume = Path(pointer).name if pointer else None
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    logs = {
        op.path for op in recording.ops if op.kind == "append" and op.path.endswith("scalars.json")
    }
    for log in sorted(logs):
        try:
            lines = (work_dir / log).read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                records = _val_records(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn line, or one torn and appended to
            for record in records:
                out.view.apply(Op("append", log, val=record))
    return out


def valid_artifact_indices(artifact_dir: Path) -> list[int]:
    manifest = read_manifest(artifact_dir) or {}
    return [entry["index"] for entry in manifest.get("artifacts", {}).values()]


@dataclass
class CutVerdict:
    problems: list[str] = field(default_factory=list)
    trainer_lost: list[str] = field(default_factory=list)  # the trainer's own unsynced files
    has_artifact: bool = False
    state: str = "none"  # "valid" | "none" | "invalid"


def judge_cut(
    work_dir: Path,
    recording: Recording,
    metric: str,
    ckptd_deleted: list[str],
    trainer_present: dict[str, int],
    had_artifact: bool,
    remote: Path | None = None,
    artifact_dir: Path | None = None,
) -> CutVerdict:
    """Everything checked on the rebooted disk (see the module docstring)."""
    verdict = CutVerdict()
    artifact_dir = artifact_dir or work_dir / "best"
    verdict.problems += [f"artifact: {p}" for p in artifact_problems(artifact_dir)]
    indices = valid_artifact_indices(artifact_dir) if not verdict.problems else []
    verdict.has_artifact = bool(indices)
    if had_artifact and not verdict.has_artifact:
        verdict.problems.append("a best artifact had survived an earlier cut; now there is none")
    survivors = surviving_view(work_dir, recording)
    for name in sorted(set(ckptd_deleted)):
        if name in survivors.view.present or (work_dir / name).exists():
            continue  # the deletion did not survive the cut
        view = survivors.view.copy()
        index = CHECKPOINT.fullmatch(name)
        assert index is not None
        view.present[name] = int(index.group(2))
        why = protected(view, metric, "greater", indices).get(name)
        if why is not None:
            verdict.problems.append(
                f"ckptd deleted {name}; after the power cut it is protected ({why}): "
                f"surviving checkpoints {sorted(survivors.view.present)}, torn "
                f"{survivors.torn}, pointer {survivors.view.resume}, "
                f"{len(survivors.view.evals)} eval records, artifacts at {indices}"
            )
    lost = set(trainer_present) - set(survivors.view.present) - set(ckptd_deleted)
    verdict.trainer_lost = sorted(lost | set(survivors.torn))
    for name in ("state.json", "publish.json"):
        path = work_dir / STATE_DIR / name
        try:
            json.loads(path.read_bytes())
            if name == "state.json":
                verdict.state = "valid"
        except FileNotFoundError:
            pass
        except ValueError as exc:
            verdict.problems.append(f"{path} survived but is not JSON: {exc}")
            verdict.state = "invalid"
    if remote is not None and (remote / MANIFEST).exists():
        verdict.problems += [f"published copy: {p}" for p in artifact_problems(remote, load=False)]
    return verdict
