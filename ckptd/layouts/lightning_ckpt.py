"""What a Lightning checkpoint says about itself, read without running any of it.

A ``.ckpt`` holds ``global_step`` and ``epoch`` at its top level and, under ``callbacks``, the
``state_dict()`` of every ``ModelCheckpoint``: ``monitor``, ``dirpath``, ``best_model_path``,
``best_model_score`` (a 0-d tensor), ``best_k_models``. ckptd reads them with the restricted
unpickler (``ckptd.slim.safepickle``): tensors stay storage references, and the one scalar it needs
is decoded from its storage record's bytes. One read per file, cached by its stat for the life
of the process, so a daemon re-reads a checkpoint only when it changes.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.core.model import FileStat
from ckptd.layouts.peek import open_inert, top_mapping
from ckptd.slim.errors import SlimError
from ckptd.slim.legacy import LegacyArchive
from ckptd.slim.safepickle import Inert, InertGlobal, PickleRejected, StorageRef
from ckptd.slim.torchzip import SourceArchive

CKPT_SUFFIX = ".ckpt"
STEP = re.compile(r"(?:^|[-_])step=(\d+)(?=$|[-_.])", re.ASCII)
MODE_IN_KEY = re.compile(r"'mode': '(min|max)'")
# ModelCheckpoint.state_key names its trigger; a step or time trigger saves between validations.
STEP_TRIGGER_IN_KEY = re.compile(r"'every_n_train_steps': [1-9]|'train_time_interval': (?!None)")
# data.pkl holds the structure of every tensor; 64 MiB is far above any real checkpoint's.
# Storage classes a scalar score may be saved in: struct format and item size.
SCALAR_STORAGE = {"FloatStorage": "<f", "DoubleStorage": "<d", "HalfStorage": "<e"}
_CACHE: OrderedDict[tuple[str, FileStat], CkptFacts | None] = OrderedDict()
# Enough for every checkpoint of hundreds of work_dirs; an entry is a few hundred bytes.
_CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class CallbackFacts:
    """One ``ModelCheckpoint`` state, as stored in a checkpoint."""

    state_key: str
    monitor: str | None
    mode: str | None  # from the state key, e.g. "ModelCheckpoint{'monitor': ..., 'mode': 'max'}"
    dirpath: str | None  # absolute, in the trainer's view of the file system
    best_model_path: str
    best_model_score: float | None  # None when absent or not a plain float tensor
    ranked: tuple[str, ...]  # best_k_models' paths: the files this callback wrote and ranks
    # Saves on a step or time trigger: a file is ranked by the last validation *before* it.
    between_validations: bool = False


@dataclass(frozen=True, slots=True)
class CkptFacts:
    global_step: int | None
    epoch: int | None
    callbacks: tuple[CallbackFacts, ...]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def scalar_value(obj: Any, archive: SourceArchive | LegacyArchive) -> float | None:
    """The value of a one-element CPU tensor pickled by ``torch.save``, or None.

    Only ``torch._utils._rebuild_tensor_v2(storage, offset, size, ...)`` of a float storage is
    understood; its bytes are read from ``data/<key>`` of the same archive.
    """
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return float(obj)
    if not isinstance(obj, Inert) or obj.origin != ("torch._utils", "_rebuild_tensor_v2"):
        return None
    if len(obj.args) < 3 or not isinstance(obj.args[0], StorageRef):
        return None
    pid, offset, size = obj.args[0].pid, obj.args[1], obj.args[2]
    if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(offset, int)):
        return None
    if not isinstance(size, tuple) or math.prod(s for s in size if isinstance(s, int)) != 1:
        return None
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, InertGlobal) or not isinstance(key, str):
        return None
    ref = storage_type.ref or ("", "")
    fmt = SCALAR_STORAGE.get(ref[1]) if ref[0] == "torch" else None
    if fmt is None:
        return None
    width = struct.calcsize(fmt)
    data = archive.read(f"data/{key}", width * (offset + 1))
    if len(data) < width * (offset + 1):
        return None
    return float(struct.unpack_from(fmt, data, width * offset)[0])


def _callbacks(
    top: dict[Any, Any], archive: SourceArchive | LegacyArchive
) -> tuple[CallbackFacts, ...]:
    callbacks = top.get("callbacks")
    if not isinstance(callbacks, dict):
        return ()
    found = []
    for state_key, value in callbacks.items():
        if not isinstance(value, dict) or not isinstance(value.get("best_model_path"), str):
            continue  # not a ModelCheckpoint state
        key = state_key if isinstance(state_key, str) else ""
        monitor = value.get("monitor")
        mode = MODE_IN_KEY.search(key)
        dirpath = value.get("dirpath")
        ranked = value.get("best_k_models")
        found.append(
            CallbackFacts(
                state_key=key,
                monitor=monitor if isinstance(monitor, str) and monitor else None,
                mode=mode.group(1) if mode else None,
                dirpath=dirpath if isinstance(dirpath, str) else None,
                best_model_path=value["best_model_path"],
                best_model_score=scalar_value(value.get("best_model_score"), archive),
                ranked=tuple(p for p in ranked if isinstance(p, str))
                if isinstance(ranked, dict)
                else (),
                between_validations=bool(STEP_TRIGGER_IN_KEY.search(key)),
            )
        )
    return tuple(found)


def _extract(root: Any, archive: SourceArchive | LegacyArchive) -> CkptFacts:
    top = top_mapping(root)
    return CkptFacts(
        global_step=_int_or_none(top.get("global_step")),
        epoch=_int_or_none(top.get("epoch")),
        callbacks=_callbacks(top, archive),
    )


def read_facts(path: Path, stat: FileStat) -> CkptFacts | None:
    """The facts of the complete checkpoint at ``path`` whose stat is ``stat``; None if it
    cannot be read (not a torch zip, a pickle the restricted unpickler refuses, ...).

    Callers check completeness first: a file being written is never read.
    """
    key = (str(path), stat)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        facts: CkptFacts | None = open_inert(path, _extract)
        changed = FileStat.of(os.stat(path, follow_symlinks=False)) != stat
    except (OSError, SlimError, PickleRejected, ValueError, TypeError, KeyError):
        facts, changed = None, False
    if changed:
        return None  # rewritten while read: neither trusted nor remembered
    _CACHE[key] = facts
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return facts


def remembered_step(path: Path) -> int | None:
    """The global_step this process last read from ``path``, whatever its stat was then
    (the file may be gone: ckptd deleted it after writing its artifact)."""
    for (cached, _), facts in reversed(_CACHE.items()):
        if cached == str(path) and facts is not None and facts.global_step is not None:
            return facts.global_step
    return None


def step_in_name(name: str) -> int | None:
    """S of a file named like Lightning's default ``epoch=E-step=S.ckpt``, or None."""
    base = name.rsplit("/", 1)[-1]
    match = STEP.search(base[: -len(CKPT_SUFFIX)]) if base.endswith(CKPT_SUFFIX) else None
    return int(match.group(1)) if match else None


def in_work_dir(recorded: str, dirpath: str | None, rel_dir: str) -> str | None:
    """A path the callback recorded, as a name relative to the work_dir, or None.

    The trainer may see the volume under another mount point than ckptd (a sidecar), so the
    work_dir's path in the trainer's view is the callback's ``dirpath`` less the trailing
    components ``rel_dir`` (the checkpoint folder inside the work_dir, as ckptd sees it); only
    what lies below it is trusted. A resumed fit in a new ``version_N`` keeps the previous
    run's ``best_model_path``, which maps into that version's folder the same way.
    """
    if not dirpath:
        return None
    parts = dirpath.rstrip("/").split("/")
    rel_parts = [] if rel_dir == "." else rel_dir.split("/")
    if rel_parts and parts[-len(rel_parts) :] != rel_parts:
        return None
    prefix = "/".join(parts[: len(parts) - len(rel_parts)]) + "/"
    if not recorded.startswith(prefix):
        return None
    below = recorded[len(prefix) :]
    if not below or any(part in ("", ".", "..") for part in below.split("/")):
        return None
    return below
