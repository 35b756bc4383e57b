"""Folder checkpoints written by sharding libraries, one entry per format.

A sharded checkpoint is a folder of per-rank files plus a marker the library writes last
(torch distributed checkpoint's ``.metadata``, DeepSpeed's ``latest`` tag and model-states
file). Layouts that can hold such folders (Lightning ``*.ckpt/``, Hugging Face
``checkpoint-N/``, plain DCP or DeepSpeed work_dirs) ask ``sharded_format`` which format a
folder is in, judge completeness with it, and write the best artifact with its consolidating
writer: one unsharded file, streamed, never the whole model in memory.

Each format module adds one ``ShardedFormat`` to ``FORMATS``; nothing registers itself at
import time, so the list below is the whole set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptd.slim.artifact import ArtifactWriter


@dataclass(frozen=True, slots=True)
class ShardedFormat:
    kind: str  # "dcp", "deepspeed": names the format in messages and docs
    # Cheap: looks at entry names only (never reads a shard), so a folder still being
    # written is recognised as this format and then judged incomplete, not misread.
    recognise: Callable[[Path], bool]
    # (True, "") when the marker written last is there and every file it names has its full
    # size; (False, why) otherwise. Never raises for a folder still being written.
    complete: Callable[[Path], tuple[bool, str]]
    # The consolidating writer for ``artifact.format`` "torch" or "safetensors".
    writer: Callable[[str], ArtifactWriter]
    suffix: Callable[[str], str]


def _formats() -> tuple[ShardedFormat, ...]:
    # Imported here so that a layout importing this module does not pay for every format.
    from ckptd.slim import dcp, dcp_writer, deepspeed

    found: list[ShardedFormat] = []

    found.append(
        ShardedFormat(
            kind="dcp",
            recognise=dcp.recognise,
            complete=dcp.complete,
            writer=dcp_writer.DcpConsolidation,
            suffix=dcp_writer.output_suffix,
        )
    )
    found.append(
        ShardedFormat(
            kind="deepspeed",
            recognise=deepspeed.recognise,
            complete=deepspeed.complete,
            writer=deepspeed.writer,
            suffix=deepspeed.output_suffix,
        )
    )
    return tuple(found)


def sharded_format(folder: Path) -> ShardedFormat | None:
    """The sharded format of ``folder``, or None when it is not a sharded checkpoint."""
    for fmt in _formats():
        if fmt.recognise(folder):
            return fmt
    return None
