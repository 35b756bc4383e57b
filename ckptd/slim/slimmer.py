"""Slim a training checkpoint to the keys a deployment needs (default ``meta`` + ``state_dict``).

No torch import, no pickled code run, no tensor bytes read into this process that are not
written. The zip's central directory and ``data.pkl`` are read (the latter as inert records, see
``ckptd.slim.safepickle``); a new ``data.pkl`` holding only the kept keys is written with every
global checked against what ``torch.load(weights_only=True)`` accepts; the ``data/<key>``
storages those keys reference are renumbered in first-use order (as ``torch.save`` numbers them)
and copied in the kernel. The output is read back in a second thread for its sha256 and the CRC
of every copied storage, and it is written with ``ckptd.fs.durable.atomic_output`` (temp file,
fsync, rename).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ckptd.core.cancel import CancelToken
from ckptd.slim.artifact import (
    WrittenArtifact,
)
from ckptd.slim.crc import crc32
from ckptd.slim.errors import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS, STORAGE_TYPES
from ckptd.slim.picklewriter import GlobalRefused, NotRepresentable, PickleWriter
from ckptd.slim.safepickle import (
    InertGlobal,
    StorageRef,
)
from ckptd.slim.source import (
    CheckpointSource,
    KeepKeysWriter,
    describe,
    write_single_file,
)
from ckptd.slim.torchzip import DEFAULT_ALIGNMENT, OutRecord, layout_archive
from ckptd.slim.torchzip import looks_complete as looks_complete

__all__ = [
    "DEFAULT_KEEP_KEYS",
    "TorchZipSlim",
    "WrittenArtifact",
    "looks_complete",
    "slim_checkpoint",
]

DEFAULT_KEEP_KEYS = ("meta", "state_dict")
_MAX_ALIGNMENT = 1 << 20


class _StoragePlan:
    """Renumbers the storages the kept keys reference, in first-use order, as torch.save does."""

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source
        self.new_keys: dict[str, str] = {}  # old key -> new key (kept alive: memoized by id)
        self.copies: list[tuple[str, OutRecord]] = []

    def persistent_id(self, ref: StorageRef) -> tuple[Any, ...]:
        pid = ref.pid
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise NotRepresentable(f"a persistent id other than a torch storage: {pid!r:.100}")
        tag, storage_type, key, location, numel = pid
        ref_name = storage_type.ref if isinstance(storage_type, InertGlobal) else None
        if ref_name is not None and ref_name not in ALLOWED_GLOBALS:
            raise GlobalRefused(ref_name)
        if ref_name is None or ref_name not in STORAGE_TYPES:
            what = ".".join(ref_name) if ref_name else describe(storage_type)
            raise NotRepresentable(f"a storage whose type {what} is not a torch storage type")
        if type(key) is not str or type(location) is not str or type(numel) is not int:
            raise NotRepresentable(f"a malformed storage id {pid!r:.100}")
        new = self.new_keys.get(key)
        if new is None:
            archive = self.source.archive
            entry = archive.entries.get(f"data/{key}")
            if entry is None:
                raise CorruptCheckpointError(
                    self.source.path,
                    f"has a data.pkl that references {archive.prefix}/data/{key}, "
                    "which is not in the archive.",
                )
            nbytes = numel * STORAGE_TYPES[ref_name]
            if entry.size != nbytes:
                raise CorruptCheckpointError(
                    self.source.path,
                    f"has {entry.size} bytes in {archive.prefix}/data/{key} where data.pkl "
                    f"expects {numel} x {ref_name[1]} ({nbytes} bytes).",
                )
            new = self.new_keys[key] = str(len(self.new_keys))
            offset = archive.data_offset(entry) if entry.size else 0
            self.copies.append(
                (key, OutRecord(f"data/{new}", entry.size, entry.crc32, source_offset=offset))
            )
        return (tag, storage_type, new, location, numel)


def _new_pickle(source: CheckpointSource, kept: Sequence[str], plan: _StoragePlan) -> bytes:
    writer = PickleWriter(plan.persistent_id)
    writer.begin_root(source.root, source.ordered)
    for key in kept:
        try:
            writer.save(key)
            writer.save(source.mapping[key])
        except GlobalRefused as exc:
            raise UnsafeCheckpointError(source.path, key, str(exc)) from exc
        except NotRepresentable as exc:
            raise UnsupportedFormatError(
                source.path,
                f"key {key!r} holds {exc}, which cannot be written so that "
                "torch.load(weights_only=True) reads it.",
                "Remove the key from artifact.keep_keys.",
            ) from exc
    return writer.end_root()


class SmallRecords(Protocol):
    """Where ``zip_records`` reads the small records of the archive it mimics."""

    path: Path

    def small_record(self, name: str) -> bytes | None: ...


def zip_records(
    source: SmallRecords, data_pkl: bytes, copies: Sequence[tuple[str, OutRecord]]
) -> tuple[list[OutRecord], int]:
    """The records of a torch zip written like ``source`` (version, alignment, byteorder):
    ``data.pkl``, then the storages ``copies`` (in key order), then the trailing records."""
    version = source.small_record("version")
    if version is None or not version.strip().isdigit():
        raise CorruptCheckpointError(source.path, f"has no valid version record ({version!r}).")
    alignment = DEFAULT_ALIGNMENT
    raw_alignment = source.small_record(".storage_alignment")
    if raw_alignment is not None:
        # Keep a page alignment someone chose for mmap (torch's config.save.storage_alignment).
        text = raw_alignment.strip()
        alignment = int(text) if text.isdigit() else 0
        if not 0 < alignment <= _MAX_ALIGNMENT or alignment & (alignment - 1):
            raise CorruptCheckpointError(source.path, f"has a bad .storage_alignment {text!r}.")
    byteorder = source.small_record("byteorder")
    if byteorder not in (None, b"little", b"big"):
        raise CorruptCheckpointError(source.path, f"has a bad byteorder record {byteorder!r}.")

    def memory(name: str, data: bytes) -> OutRecord:
        return OutRecord(name, len(data), crc32(data), data=data)

    identity = hashlib.sha256(data_pkl)
    for _, rec in copies:
        identity.update(f"{rec.name}:{rec.size}:{rec.crc32};".encode())
    serialization_id = f"{int.from_bytes(identity.digest()[:16], 'big'):040d}".encode()
    records = [
        memory("data.pkl", data_pkl),
        memory(".format_version", b"1"),  # storages are in numeric key order
        memory(".storage_alignment", str(alignment).encode()),
    ]
    if byteorder is not None:
        records.append(memory("byteorder", byteorder))
    records += [rec for _, rec in copies]
    records += [memory("version", version), memory(".data/serialization_id", serialization_id)]
    return records, alignment


def _zip_output(source: CheckpointSource, kept: tuple[str, ...]) -> tuple[Sequence[Any], int]:
    plan = _StoragePlan(source)
    data_pkl = _new_pickle(source, kept, plan)
    records, alignment = zip_records(source, data_pkl, plan.copies)
    return layout_archive(source.archive.prefix, records, alignment)


def slim_checkpoint(
    src: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    final_name: str | Callable[[str], str],
    keep_keys: Sequence[str] = DEFAULT_KEEP_KEYS,
    progress: Callable[[int, int], None] | None = None,
    *,
    optional_keys: Sequence[str] = (),
    cancel: CancelToken | None = None,
) -> WrittenArtifact:
    """Write ``dest_dir/final_name``, a torch zip checkpoint holding only ``keep_keys`` of the
    checkpoint ``src`` (the contract of ``source.write_single_file``)."""
    return write_single_file(
        src,
        dest_dir,
        final_name,
        keep_keys,
        ".pth",
        _zip_output,
        progress,
        optional_keys=optional_keys,
        cancel=cancel,
    )


class TorchZipSlim(KeepKeysWriter):
    """A torch zip checkpoint slimmed to the kept keys (MMEngine, mmcv, Lightning)."""

    kind: ClassVar[str] = "torch zip slim"
    write_file = staticmethod(slim_checkpoint)
