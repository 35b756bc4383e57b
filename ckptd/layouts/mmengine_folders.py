"""MMEngine ``FlexibleRunner`` checkpoints that are folders named like files (``epoch_N.pth/``).

Measured in mmengine 0.10.7's ``_strategy``:

- ``DeepSpeedStrategy.save_checkpoint(filename)`` calls the engine's
  ``save_checkpoint(dirname(filename), tag=basename(filename), client_state=extra,
  save_latest=False)``: ``epoch_N.pth/`` is a DeepSpeed tag folder (``mp_rank_00_model_states.pt``,
  one optim-states file per rank), with no ``latest``; the runner's ``meta``, ``message_hub`` and
  schedulers ride in the model-states file. (With ``save_optimizer=False`` and no ZeRO-3 weight
  partitioning it writes an ordinary file on rank 0 instead: handled like any MMEngine file.)
- ``FSDPStrategy`` with a non-full ``state_dict_type`` makes ``epoch_N.pth/`` and has each rank
  ``torch.save`` its own shards as ``rank<R>.pth`` (no index of the ranks anywhere).

In both, ``CheckpointHook`` writes ``last_checkpoint`` after ``save_checkpoint`` returned on
every rank (DeepSpeed ends with a barrier): that is the marker written last. A folder is
complete when its files are whole and ``last_checkpoint`` names it or a later checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

from ckptd.layouts.base import PointerUnreadable, read_pointer_file
from ckptd.slim.artifact import ArtifactRequest, ArtifactWriter, WrittenArtifact
from ckptd.slim.errors import UnsupportedFormatError
from ckptd.slim.sharded import sharded_format
from ckptd.slim.torchzip import looks_complete

POINTER = "last_checkpoint"
NAME = re.compile(r"(epoch|iter)_(\d+)\.pth", re.ASCII)
FSDP_RANK = re.compile(r"rank(\d+)\.pth", re.ASCII)


def fsdp_ranks(path: Path) -> list[int] | None:
    """The ranks of an FSDP ``rank<R>.pth`` folder, or None when it is not one."""
    try:
        names = os.listdir(path)
    except OSError:
        return None
    ranks = sorted(int(m.group(1)) for n in names if (m := FSDP_RANK.fullmatch(n)))
    return ranks or None


def is_folder_checkpoint(path: Path) -> bool:
    return sharded_format(path) is not None or fsdp_ranks(path) is not None


def _order(name: str) -> tuple[str, int] | None:
    found = NAME.fullmatch(name)
    return (found.group(1), int(found.group(2))) if found else None


def _marker(path: Path) -> tuple[bool, str]:
    """``last_checkpoint`` names this folder or a later checkpoint of the same unit."""
    try:
        text, note = read_pointer_file(path.parent / POINTER)
    except PointerUnreadable as exc:
        return False, str(exc)
    if not text:
        return False, note or f"no {POINTER} yet (MMEngine's CheckpointHook writes it last)"
    named, mine = _order(os.path.basename(text.rstrip("/"))), _order(path.name)
    if named is None or mine is None or named[0] != mine[0] or named[1] < mine[1]:
        return False, f"{POINTER} names {text}, not this folder or a later one (still saving)"
    return True, ""


def folder_complete(path: Path) -> tuple[bool, str]:
    fmt = sharded_format(path)
    if fmt is not None:
        done, why = fmt.complete(path)
    else:
        ranks = fsdp_ranks(path) or []
        if ranks != list(range(len(ranks))) or not ranks:
            return False, f"rank files {ranks} are not ranks 0..N-1"
        whole = [looks_complete(path / f"rank{r}.pth") is True for r in ranks]
        done = all(whole)
        why = "" if done else f"rank{whole.index(False)}.pth is not whole yet"
    if not done:
        return False, why
    return _marker(path)


class FileOrFolder:
    """MMEngine's artifact writer: the file writer for ``epoch_N.pth`` files, DeepSpeed's
    consolidation for a DeepSpeedStrategy folder; FSDP rank folders are refused, named."""

    kind: ClassVar[str] = "mmengine file or folder"

    def __init__(self, file_writer: ArtifactWriter, fmt: str) -> None:
        self.file_writer, self.fmt = file_writer, fmt

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        source = request.source
        if not source.is_dir() or source.is_symlink():
            return self.file_writer.write(request)
        fmt = sharded_format(source)
        if fmt is None:
            raise UnsupportedFormatError(
                source,
                "is an FSDPStrategy folder of per-rank local shards (rank<R>.pth); ckptd keeps "
                "and deletes it whole but cannot consolidate it into one model file.",
                "Save with FSDPStrategy(state_dict_type='full') for a best artifact.",
            )
        return fmt.writer(self.fmt).write(request)
