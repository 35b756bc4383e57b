"""Lightning's sharded ``*.ckpt/`` folders: one checkpoint each, judged and slimmed whole.

``FSDPStrategy(state_dict_type="sharded").save_checkpoint`` (Lightning 2.6) makes the folder,
has every rank write its shards through ``torch.distributed.checkpoint.save`` (``{"model":
state_dict, "optimizer_0": ...}``; ``.metadata`` last), and then rank 0 writes ``meta.pt``:
``torch.save`` of the rest of the checkpoint (``epoch``, ``global_step``, ``callbacks``,
``hyper_parameters``, ...). So ``meta.pt`` is the marker written last: the folder is complete
when its sharded format says so *and* ``meta.pt`` is a complete torch file. Its facts (step,
``ModelCheckpoint`` state) are read from ``meta.pt``; the artifact is what Lightning's own
``consolidate_checkpoint`` makes of it (``model`` becomes ``state_dict``, ``meta.pt``'s keys
beside it), cut down to the kept keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from ckptd.core.model import FileStat
from ckptd.layouts.lightning_ckpt import CkptFacts, read_facts
from ckptd.slim.artifact import ArtifactRequest, ArtifactWriter, WrittenArtifact
from ckptd.slim.sharded import ShardedFormat, sharded_format
from ckptd.slim.torchzip import looks_complete

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def folder_format(path: Path) -> ShardedFormat | None:
    """The sharded format of a real (not symlinked) folder, else None."""
    if path.is_symlink() or not path.is_dir():
        return None
    return sharded_format(path)


def folder_complete(path: Path) -> tuple[bool | None, str]:
    fmt = sharded_format(path)
    if fmt is None:
        return False, "a folder that is no sharded checkpoint ckptd knows"
    done, why = fmt.complete(path)
    if not done or fmt.kind != "dcp":  # DeepSpeedStrategy keeps its client state in its shards
        return done, why
    meta = path / META_FILE
    if meta.is_symlink() or looks_complete(meta) is not True:
        return False, f"no complete {META_FILE} yet (Lightning's rank 0 writes it last)"
    return True, ""


def checkpoint_facts(path: Path, stat: FileStat) -> CkptFacts | None:
    """A checkpoint's own facts: of the file, or of a sharded folder's ``meta.pt``."""
    if not path.is_dir() or path.is_symlink():
        return read_facts(path, stat)
    meta = path / META_FILE
    if not meta.exists():  # DeepSpeedStrategy: the client state is in the model-states file
        from ckptd.slim.deepspeed import client_state_file

        meta = client_state_file(path) or meta
    try:
        meta_stat = FileStat.of(os.stat(meta, follow_symlinks=False))
    except OSError:
        return None
    return read_facts(meta, meta_stat) if not meta.is_symlink() else None


class FileOrFolder:
    """Lightning's artifact writer: the file writer for a ``.ckpt`` file, the folder's
    consolidating writer (Lightning's key names) for a sharded ``.ckpt/`` folder."""

    kind: ClassVar[str] = "lightning file or sharded folder"

    def __init__(self, file_writer: ArtifactWriter, fmt: str) -> None:
        self.file_writer, self.fmt = file_writer, fmt

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        fmt = folder_format(request.source)
        if fmt is None:
            return self.file_writer.write(request)
        if fmt.kind == "dcp":
            from ckptd.slim.dcp_writer import DcpConsolidation

            lightning = DcpConsolidation(self.fmt, {"model": "state_dict"}, META_FILE)
            return lightning.write(request)
        from ckptd.slim.deepspeed import DeepSpeedConsolidation

        # Lightning's convert_zero_checkpoint_to_fp32_state_dict drops its wrapper's prefix.
        return DeepSpeedConsolidation(self.fmt, "_forward_module.").write(request)
