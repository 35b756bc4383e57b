"""Hugging Face ``checkpoint-N/`` folders of a DeepSpeed run: decided per checkpoint.

With ``TrainingArguments(deepspeed=...)`` the Trainer has the engine save ``checkpoint-N/
global_stepN/`` (the ranks' shards), ``checkpoint-N/latest`` and ``zero_to_fp32.py`` beside its
own files. Under ZeRO 1/2 (or ZeRO 3 with ``stage3_gather_16bit_weights_on_model_save``) it
also writes ``model.safetensors``: the artifact is then the usual folder copy of the model
files. Under ZeRO 3 without gathered weights there is no usable model file, so the artifact is
the consolidated fp32 file (``slim/deepspeed.py``), named like the folder artifact plus
``.pth`` or ``.safetensors``. Either way the folder is complete only when its DeepSpeed shards
are too (``trainer_state.json`` alone is written by rank 0 only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from ckptd.slim.artifact import ArtifactRequest, ArtifactWriter, WrittenArtifact
from ckptd.slim.folder import is_weights_file
from ckptd.slim.sharded import ShardedFormat, sharded_format


def _deepspeed(folder: Path) -> ShardedFormat | None:
    fmt = sharded_format(folder) if folder.is_dir() and not folder.is_symlink() else None
    return fmt if fmt is not None and fmt.kind == "deepspeed" else None


def _has_model_files(folder: Path) -> bool:
    try:
        return any(is_weights_file(n) for n in os.listdir(folder))
    except OSError:
        return False


def consolidates(folder: Path) -> ShardedFormat | None:
    """The DeepSpeed format when the artifact must be consolidated from the shards."""
    fmt = _deepspeed(folder)
    return fmt if fmt is not None and not _has_model_files(folder) else None


def consolidated_suffix(folder: Path, fmt: str) -> str:
    found = consolidates(folder)
    return found.suffix(fmt) if found is not None else ""


def deepspeed_complete(folder: Path) -> tuple[bool, str]:
    fmt = _deepspeed(folder)
    return fmt.complete(folder) if fmt is not None else (True, "")


class FolderOrShards:
    """The folder copy, or DeepSpeed's consolidation where the folder has no model file."""

    kind: ClassVar[str] = "hf folder or deepspeed shards"

    def __init__(self, folder_writer: ArtifactWriter, fmt: str) -> None:
        self.folder_writer, self.fmt = folder_writer, fmt

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        found = consolidates(request.source)
        if found is None:
            return self.folder_writer.write(request)
        return found.writer(self.fmt).write(request)
