"""Pieces of the DCP consolidation that need no torchrun: the CRC combination, the
``.metadata`` allowlist against the installed torch, and hand-made ``.metadata`` files."""

from __future__ import annotations

import importlib
import os
import pickle
import zlib
from pathlib import Path

import pytest

from ckptd.slim.copyhash import crc32_combine
from ckptd.slim.dcp import complete
from ckptd.slim.dcp_metadata import read_metadata
from ckptd.slim.errors import CorruptCheckpointError, UnsafeMetadataError
from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS, DCP_METADATA_GLOBALS


@pytest.mark.parametrize("sizes", [(0, 0), (1, 0), (0, 5), (333, 1), (7, 1 << 16), (1 << 20, 3)])
def test_crc32_combine_is_zlibs(sizes: tuple[int, int]) -> None:
    a, b = os.urandom(sizes[0]), os.urandom(sizes[1])
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_metadata_allowlist_names_what_torch_has_and_nothing_of_the_artifacts() -> None:
    for module, name in DCP_METADATA_GLOBALS:
        if (module, name) == ("torch.distributed.checkpoint.metadata", "_StorageInfo"):
            continue  # where torch < 2.4 kept it
        assert hasattr(importlib.import_module(module), name), (module, name)
    rebuilds = {g for g in ALLOWED_GLOBALS if g[1].startswith("_rebuild")}
    assert not rebuilds & DCP_METADATA_GLOBALS


def test_real_metadata_of_a_plain_save_reads_back(tmp_path: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 4}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    meta = read_metadata(tmp_path, (tmp_path / ".metadata").read_bytes())
    assert meta.tensors["model.w"].size == (2, 3) and meta.tensors["model.w"].dtype == "float32"
    assert meta.byte_items == ("epoch",) and meta.paths["model.w"] == ("model", "w")
    assert complete(tmp_path) == (True, "")
    os.truncate(tmp_path / "__0_0.distcp", 10)
    done, why = complete(tmp_path)
    assert not done and "__0_0.distcp is 10 bytes; .metadata says" in why


class _Run:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("true",))


@pytest.mark.parametrize(
    ("payload", "error", "text"),
    [
        ({"a": _Run()}, UnsafeMetadataError, "references posix.system"),
        ({"a": 1}, CorruptCheckpointError, "is refused: the root is not a Metadata record"),
        (b"\x80\x04K", CorruptCheckpointError, "cannot be read safely"),
    ],
)
def test_hostile_or_foreign_metadata_is_refused(
    tmp_path: Path, payload: object, error: type[Exception], text: str
) -> None:
    data = payload if isinstance(payload, bytes) else pickle.dumps(payload)
    (tmp_path / ".metadata").write_bytes(data)
    with pytest.raises(error, match=text):
        read_metadata(tmp_path, data)
    done, why = complete(tmp_path)
    assert not done and why.startswith("refused:")


def test_a_folder_without_metadata_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "__0_0.distcp").write_bytes(b"x")
    assert complete(tmp_path) == (
        False,
        "no .metadata yet (torch writes it last, once every rank is done)",
    )
