"""The best-artifact folder: its manifest, and the rule for when an artifact is up to date.

``manifest.json`` is the artifact folder's truth: it is replaced atomically and only ever names
files that are complete and durable, so a reader that trusts it never sees a partial artifact.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptd.core.model import Best, Checkpoint, FileStat
from ckptd.core.reads import read_file
from ckptd.fs.durable import atomic_write_bytes

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


@dataclass(frozen=True, slots=True)
class ArtifactEntry:
    key: str
    file: str
    rule: str
    value: float
    unit: str
    index: int
    epoch: int | None
    step: int | None  # global iteration when known
    sha256: str
    bytes: int
    source_checkpoint: str
    source_stat: tuple[int, int, int]
    kept_keys: tuple[str, ...]
    time: str
    # artifact.format when it was written; manifests from before the field read as torch
    format: str = "torch"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["source_stat"] = list(self.source_stat)
        data["kept_keys"] = list(self.kept_keys)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactEntry:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["source_stat"] = tuple(fields.get("source_stat", (0, 0, 0)))
        fields["kept_keys"] = tuple(fields.get("kept_keys", ()))
        return cls(**fields)


def expand_artifact_dir(template: str, work_dir: Path, project: str, base_dir: Path) -> Path:
    expanded = Path(template.format(work_dir=work_dir, project=project, run=work_dir.name))
    return expanded if expanded.is_absolute() else base_dir / expanded


def read_manifest(folder: Path) -> dict[str, ArtifactEntry]:
    """Entries by metric key; a malformed manifest reads as empty (artifacts get rewritten);
    OSError if it cannot be read."""
    try:
        data = json.loads(read_file(folder / MANIFEST))
        return {k: ArtifactEntry.from_json(v) for k, v in data.get("artifacts", {}).items()}
    except (FileNotFoundError, NotADirectoryError):  # no artifact folder (yet)
        return {}
    except OSError as exc:
        # Not "no manifest": that would rewrite every artifact and say nothing (found by
        # injecting read EIO). The pass fails, naming the file, and the next one reads again.
        raise OSError(exc.errno, f"cannot read the manifest: {exc.strerror}", exc.filename) from exc
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def write_manifest(
    folder: Path, entries: dict[str, ArtifactEntry], work_dir: Path, project: str, layout: str
) -> None:
    data = {
        "schema": MANIFEST_SCHEMA,
        "project": project,
        "work_dir": str(work_dir),
        "layout": layout,
        "updated": now_iso(),
        "artifacts": {k: v.to_json() for k, v in sorted(entries.items())},
    }
    atomic_write_bytes(folder / MANIFEST, json.dumps(data, indent=2).encode() + b"\n")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_current(
    entry: ArtifactEntry | None,
    best: Best,
    checkpoint: Checkpoint | None,
    folder: Path,
    fmt: str = "torch",
) -> bool:
    """Does the artifact on disk already hold this best, in ``artifact.format`` ``fmt``?

    It must be in that format (changing it rewrites the artifact), describe the same
    evaluation (index and value), its file must be there with the
    recorded size, and the source checkpoint must not have changed since it was slimmed (a
    resumed run can rewrite an epoch with other weights). A source that is gone cannot change.
    """
    if entry is None or entry.index != best.index or entry.format != fmt:
        return False
    if not math.isclose(entry.value, best.value, rel_tol=0, abs_tol=0):
        return False
    if not is_in_place(entry, folder):
        return False
    if checkpoint is None:
        return True
    source = FileStat(*entry.source_stat)
    if checkpoint.name != entry.source_checkpoint:
        # Another file of the same index that is older than the one slimmed: a fit resumed
        # from an earlier checkpoint repeated this index in a new file, ckptd slimmed and then
        # deleted that one, and the abandoned run's copy now stands alone. It never replaces
        # the newer weights.
        return checkpoint.stat.mtime_ns < source.mtime_ns
    return checkpoint.stat == source


def is_in_place(entry: ArtifactEntry, folder: Path) -> bool:
    """Is the artifact ``entry`` names in ``folder``, with the size the manifest records?"""
    try:
        return _artifact_bytes(folder / entry.file) == entry.bytes
    except OSError:
        return False


def _artifact_bytes(path: Path) -> int:
    """A file's size; for a folder artifact (Hugging Face), the bytes of the files in it."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    return sum(
        e.stat(follow_symlinks=False).st_size
        for e in os.scandir(path)
        if e.is_file(follow_symlinks=False)
    )
