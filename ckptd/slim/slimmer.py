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

import contextlib
import hashlib
import os
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.cancel import CancelToken
from ckptd.core.model import FileStat
from ckptd.fs.durable import TEMP_PREFIX, atomic_output, fsync_dir
from ckptd.fs.names import plain_name
from ckptd.slim.artifact import (
    ArtifactRequest,
    Scalar,
    WrittenArtifact,
    split_keep_keys,
)
from ckptd.slim.copyhash import CrcMismatch, write_archive
from ckptd.slim.errors import (
    ArtifactWriteError,
    CheckpointChangedError,
    CorruptCheckpointError,
    MissingKeysError,
    SlimError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS, STORAGE_TYPES
from ckptd.slim.picklewriter import GlobalRefused, NotRepresentable, PickleWriter
from ckptd.slim.safepickle import (
    MAX_PICKLE_BYTES,
    Inert,
    InertGlobal,
    PickleRejected,
    PickleTooLarge,
    StorageRef,
    compact_pickle,
    load_compacted,
    top_level,
)
from ckptd.slim.torchzip import DEFAULT_ALIGNMENT, OutRecord, SourceArchive, layout_archive
from ckptd.slim.torchzip import looks_complete as looks_complete

__all__ = [
    "DEFAULT_KEEP_KEYS",
    "TorchZipSlim",
    "WrittenArtifact",
    "looks_complete",
    "slim_checkpoint",
]

DEFAULT_KEEP_KEYS = ("meta", "state_dict")
_MAX_SMALL_RECORD = 64
_MAX_ALIGNMENT = 1 << 20


class _Source:
    """An open checkpoint: its stat, central directory and inert ``data.pkl`` tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise CheckpointChangedError(path, "disappeared before it could be read.") from exc
        except OSError as exc:
            raise SlimError(path, f"cannot be opened: {exc.strerror or exc}.") from exc
        try:
            self.stat = FileStat.of(os.fstat(self.fd))
            self.check_unchanged()
            try:
                self.archive = SourceArchive(path, self.fd, self.stat.size)
                self.root: Any = _load_data_pkl(self.archive)
                mapping = top_level(self.root)
            except CorruptCheckpointError:
                self.check_unchanged()  # a rewrite in progress is not corruption
                raise
            if mapping is None:
                raise UnsupportedFormatError(
                    path,
                    f"holds a {_describe(self.root)} at the top level, not a dict of keys; "
                    "ckptd slims checkpoints saved as dicts (MMEngine, Lightning, ...).",
                )
            self.mapping: dict[Any, Any] = mapping[0]
            self.ordered = mapping[1]
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def release_tree(self) -> None:
        self.root, self.mapping = None, {}

    def check_unchanged(self) -> None:
        """Invariant 2 (docs/DESIGN.md): same inode, size and mtime by path and by fd, or retry."""
        try:
            by_path = FileStat.of(os.stat(self.path))
        except FileNotFoundError as exc:
            raise CheckpointChangedError(self.path, "was removed while being read.") from exc
        by_fd = FileStat.of(os.fstat(self.fd))
        if by_path != self.stat or by_fd != self.stat:
            raise CheckpointChangedError(
                self.path,
                f"changed while being read ((inode, size, mtime_ns) {self.stat.as_list()} -> "
                f"{by_path.as_list()}); it will be read again once it is stable.",
            )

    def small_record(self, name: str) -> bytes | None:
        if name not in self.archive.entries:
            return None
        return self.archive.read(name, _MAX_SMALL_RECORD)


def _load_data_pkl(archive: SourceArchive) -> Any:
    """The inert tree of ``data.pkl``, streamed: its long payloads stay in the file (``Blob``)."""
    path, entry = archive.path, archive.entries["data.pkl"]
    start = archive.data_offset(entry)

    def read(offset: int, size: int) -> bytes:
        return archive.pread(size, start + offset)

    def crc_mismatch() -> CorruptCheckpointError:
        return CorruptCheckpointError(path, f"has a CRC mismatch in {archive.prefix}/data.pkl.")

    try:
        compacted = compact_pickle(read, entry.size, MAX_PICKLE_BYTES)
        if compacted.crc32 != entry.crc32:
            raise crc_mismatch()
        return load_compacted(compacted, read)
    except PickleRejected as exc:
        crc = 0
        for offset in range(0, entry.size, 1 << 20):  # a damaged record is not a hostile one
            crc = zlib.crc32(read(offset, min(1 << 20, entry.size - offset)), crc)
        if crc != entry.crc32:
            raise crc_mismatch() from exc
        if isinstance(exc, PickleTooLarge):
            raise CorruptCheckpointError(
                path,
                f"has a {archive.prefix}/data.pkl whose structure (long strings aside) is over "
                f"{MAX_PICKLE_BYTES} bytes; ckptd refuses pickles of this kind above that.",
            ) from exc
        raise CorruptCheckpointError(
            path, f"has a data.pkl that cannot be read safely: {exc}."
        ) from exc


def _describe(obj: Any) -> str:
    if isinstance(obj, InertGlobal) and obj.ref is not None:
        return f"reference to {obj.ref[0]}.{obj.ref[1]}"
    if isinstance(obj, Inert) and obj.origin is not None:
        return f"{obj.origin[0]}.{obj.origin[1]} object"
    return f"{type(obj).__name__} object"


class _StoragePlan:
    """Renumbers the storages the kept keys reference, in first-use order, as torch.save does."""

    def __init__(self, source: _Source) -> None:
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
            what = ".".join(ref_name) if ref_name else _describe(storage_type)
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


def _check_name(name: str) -> str:
    if not plain_name(name) or name.startswith(TEMP_PREFIX):
        raise ValueError(f"artifact name {name!r} must be a plain file name")
    return name


def _refuse_overwriting_source(src: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        if os.path.samefile(src, target):
            raise ValueError(f"the artifact {target} would replace its source")


def _new_pickle(source: _Source, kept: Sequence[str], plan: _StoragePlan) -> bytes:
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


def _records(source: _Source, data_pkl: bytes, plan: _StoragePlan) -> tuple[list[OutRecord], int]:
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
        return OutRecord(name, len(data), zlib.crc32(data), data=data)

    identity = hashlib.sha256(data_pkl)
    for _, rec in plan.copies:
        identity.update(f"{rec.name}:{rec.size}:{rec.crc32};".encode())
    serialization_id = f"{int.from_bytes(identity.digest()[:16], 'big'):040d}".encode()
    records = [
        memory("data.pkl", data_pkl),
        memory(".format_version", b"1"),  # storages are in numeric key order
        memory(".storage_alignment", str(alignment).encode()),
    ]
    if byteorder is not None:
        records.append(memory("byteorder", byteorder))
    records += [rec for _, rec in plan.copies]
    records += [memory("version", version), memory(".data/serialization_id", serialization_id)]
    return records, alignment


def _kept_meta(value: Any) -> dict[str, Scalar]:
    if type(value) is not dict:
        return {}
    return {
        k: v
        for k, v in value.items()
        if type(k) is str
        and (type(v) in (int, float, bool, type(None)) or (type(v) is str and len(v) <= 256))
    }


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
    """Write ``dest_dir/final_name`` holding only ``keep_keys`` of the checkpoint ``src``.

    ``final_name`` may be a callable that receives the output's sha256 (hex) and returns the
    name. ``progress(done, total)`` gets output bytes; a set ``cancel`` token aborts the slim.
    Keys of ``keep_keys`` also in ``optional_keys`` are kept when present, skipped when not.
    Raises a ``SlimError`` subclass naming the file; on any error no output or temp file stays.
    """
    started = time.perf_counter()
    src, dest_dir = Path(src), Path(dest_dir)
    keep = tuple(dict.fromkeys(keep_keys))
    if not keep or not all(isinstance(k, str) for k in keep):
        raise ValueError(f"keep_keys must be a non-empty sequence of str, not {keep_keys!r}")
    if isinstance(final_name, str):
        _refuse_overwriting_source(src, dest_dir / _check_name(final_name))
    source = _Source(src)
    try:
        missing = [k for k in keep if k not in source.mapping and k not in optional_keys]
        if missing:
            raise MissingKeysError(src, missing, [str(k) for k in source.mapping])
        kept = tuple(k for k in source.mapping if k in keep)
        if not kept:
            raise MissingKeysError(src, keep, [str(k) for k in source.mapping])
        dropped = tuple(str(k) for k in source.mapping if k not in keep)
        plan = _StoragePlan(source)
        data_pkl = _new_pickle(source, kept, plan)
        records, alignment = _records(source, data_pkl, plan)
        pieces, total = layout_archive(source.archive.prefix, records, alignment)
        meta = _kept_meta(source.mapping.get("meta")) if "meta" in kept else {}
        source.release_tree()  # the copy can take a while; its memory is better returned now
        named = isinstance(final_name, str)
        staged = final_name if named else f"{TEMP_PREFIX}{secrets.token_hex(4)}-staged.pth"
        target = dest_dir / staged
        try:
            with atomic_output(target) as (fd, temp):
                try:
                    sha256 = write_archive(source.fd, fd, temp, pieces, total, progress, cancel)
                except CrcMismatch as exc:
                    source.check_unchanged()
                    raise CorruptCheckpointError(
                        src, f"has a CRC mismatch in {source.archive.prefix}/data/{exc.copy.name}."
                    ) from exc
                except EOFError as exc:
                    raise CheckpointChangedError(
                        src, f"got shorter while being read: {exc}."
                    ) from exc
                source.check_unchanged()
                name = (
                    final_name if isinstance(final_name, str) else _check_name(final_name(sha256))
                )
                _refuse_overwriting_source(src, dest_dir / name)
            if not named:
                target = dest_dir / name
                try:
                    os.replace(dest_dir / staged, target)
                    fsync_dir(dest_dir)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(dest_dir / staged)
                    raise
        except OSError as exc:
            raise ArtifactWriteError(src, target, exc) from exc
    finally:
        source.close()
    return WrittenArtifact(
        path=target,
        sha256=sha256,
        size=total,
        kept_keys=kept,
        dropped_keys=dropped,
        source_stat=source.stat,
        seconds=time.perf_counter() - started,
        meta=meta,
    )


class TorchZipSlim:
    """A torch zip checkpoint slimmed to the kept keys (MMEngine, mmcv, Lightning)."""

    kind: ClassVar[str] = "torch zip slim"

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        required, optional = split_keep_keys(request.keep)
        return slim_checkpoint(
            request.source,
            request.dest_dir,
            request.name,
            keep_keys=(*required, *optional),
            progress=request.progress,
            optional_keys=optional,
            cancel=request.cancel,
        )
