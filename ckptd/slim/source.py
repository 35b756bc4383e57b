"""An open torch zip checkpoint, and the output step every file writer of the package shares.

``CheckpointSource`` holds the file open (by fd, re-checked by path and fd: invariant 2 of
docs/DESIGN.md), its central directory and its ``data.pkl`` as an inert tree. ``write_output``
writes an artifact through ``ckptd.fs.durable.atomic_output`` and names it. The torch-zip slim
(``slimmer.py``) and the safetensors writer (``safetensors_writer.py``) both build on them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.cancel import CancelToken
from ckptd.core.model import FileStat
from ckptd.fs.durable import TEMP_PREFIX, atomic_output, fsync_dir
from ckptd.fs.names import plain_name
from ckptd.slim.artifact import ArtifactRequest, Scalar, WrittenArtifact, split_keep_keys
from ckptd.slim.copyhash import CrcMismatch, write_archive
from ckptd.slim.crc import crc32
from ckptd.slim.errors import (
    ArtifactWriteError,
    CheckpointChangedError,
    CorruptCheckpointError,
    MissingKeysError,
    SlimError,
    UnsupportedFormatError,
)
from ckptd.slim.legacy import LegacyArchive, is_legacy
from ckptd.slim.safepickle import (
    MAX_PICKLE_BYTES,
    Inert,
    InertGlobal,
    PickleRejected,
    PickleTooLarge,
    compact_pickle,
    load_compacted,
    top_level,
)
from ckptd.slim.torchzip import SourceArchive

_MAX_SMALL_RECORD = 64
# An artifact's pages leave the page cache once durable (measured in docs/performance.md).
DROP_ARTIFACT_PAGES = True


class CheckpointSource:
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
                self.archive: SourceArchive | LegacyArchive
                if is_legacy(self.fd, path):  # read like a zip: see ckptd/slim/legacy.py
                    self.archive = LegacyArchive(path, self.fd, self.stat.size)
                    self.root: Any = self.archive.root
                else:
                    self.archive = SourceArchive(path, self.fd, self.stat.size)
                    self.root = _load_data_pkl(self.archive)
                mapping = top_level(self.root)
            except CorruptCheckpointError:
                self.check_unchanged()  # a rewrite in progress is not corruption
                raise
            if mapping is None:
                raise UnsupportedFormatError(
                    path,
                    f"holds a {describe(self.root)} at the top level, not a dict of keys; "
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

    def select(self, keep: Sequence[str], optional: Sequence[str]) -> tuple[tuple[str, ...], ...]:
        """(kept, dropped) top-level keys, in file order; MissingKeysError if one is missing."""
        missing = [k for k in keep if k not in self.mapping and k not in optional]
        if missing:
            raise MissingKeysError(self.path, missing, [str(k) for k in self.mapping])
        kept = tuple(k for k in self.mapping if k in keep)
        if not kept:
            raise MissingKeysError(self.path, keep, [str(k) for k in self.mapping])
        return kept, tuple(str(k) for k in self.mapping if k not in keep)

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
            crc = crc32(read(offset, min(1 << 20, entry.size - offset)), crc)
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


def describe(obj: Any) -> str:
    if isinstance(obj, InertGlobal) and obj.ref is not None:
        return f"reference to {obj.ref[0]}.{obj.ref[1]}"
    if isinstance(obj, Inert) and obj.origin is not None:
        return f"{obj.origin[0]}.{obj.origin[1]} object"
    return f"{type(obj).__name__} object"


def check_name(name: str) -> str:
    if not plain_name(name) or name.startswith(TEMP_PREFIX):
        raise ValueError(f"artifact name {name!r} must be a plain file name")
    return name


def refuse_overwriting_source(src: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        if os.path.samefile(src, target):
            raise ValueError(f"the artifact {target} would replace its source")


def scalar_meta(value: Any) -> dict[str, Scalar]:
    if type(value) is not dict:
        return {}
    return {
        k: v
        for k, v in value.items()
        if type(k) is str
        and (type(v) in (int, float, bool, type(None)) or (type(v) is str and len(v) <= 256))
    }


def write_output(
    source: CheckpointSource,
    dest_dir: Path,
    final_name: str | Callable[[str], str],
    staged_suffix: str,
    write: Callable[[int, str], str],
) -> tuple[Path, str]:
    """Run ``write(fd, temp_path) -> sha256`` into an atomic output in ``dest_dir`` and name it.

    Shared by every file writer of the package: the source is re-checked once the bytes are
    written (a checkpoint rewritten meanwhile is not slimmed), a CRC mismatch or a short read
    becomes the right ``SlimError``, and a name made from the sha256 is applied by a rename of
    the staged file. The artifact's pages are dropped from the page cache once durable
    (``DROP_ARTIFACT_PAGES``). Returns the final path and the sha256.
    """
    src = source.path
    named = isinstance(final_name, str)
    staged = final_name if named else f"{TEMP_PREFIX}{secrets.token_hex(4)}-staged{staged_suffix}"
    target = dest_dir / staged
    try:
        with atomic_output(target, drop_cache=DROP_ARTIFACT_PAGES) as (fd, temp):
            try:
                sha256 = write(fd, temp)
            except CrcMismatch as exc:
                source.check_unchanged()
                raise CorruptCheckpointError(
                    src, f"has a CRC mismatch in {source.archive.prefix}/data/{exc.copy.name}."
                ) from exc
            except EOFError as exc:
                raise CheckpointChangedError(src, f"got shorter while being read: {exc}.") from exc
            source.check_unchanged()
            name = final_name if isinstance(final_name, str) else check_name(final_name(sha256))
            refuse_overwriting_source(src, dest_dir / name)
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
    return target, sha256


# How a format lays out its output: (pieces for ``copyhash.write_archive``, total bytes).
BuildOutput = Callable[["CheckpointSource", tuple[str, ...]], tuple[Sequence[Any], int]]


def write_single_file(
    src: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    final_name: str | Callable[[str], str],
    keep_keys: Sequence[str],
    staged_suffix: str,
    build: BuildOutput,
    progress: Callable[[int, int], None] | None = None,
    *,
    optional_keys: Sequence[str] = (),
    cancel: CancelToken | None = None,
) -> WrittenArtifact:
    """Write ``dest_dir/final_name`` from the ``keep_keys`` of the checkpoint ``src``, laid out
    by ``build`` (one per output format: torch zip, safetensors).

    ``final_name`` may be a callable that receives the output's sha256 (hex) and returns the
    name. ``progress(done, total)`` gets output bytes; a set ``cancel`` token aborts the write.
    Keys of ``keep_keys`` also in ``optional_keys`` are kept when present, skipped when not.
    Raises a ``SlimError`` subclass naming the file; on any error no output or temp file stays.
    """
    started = time.perf_counter()
    src, dest_dir = Path(src), Path(dest_dir)
    keep = tuple(dict.fromkeys(keep_keys))
    if not keep or not all(isinstance(k, str) for k in keep):
        raise ValueError(f"keep_keys must be a non-empty sequence of str, not {keep_keys!r}")
    if isinstance(final_name, str):
        refuse_overwriting_source(src, dest_dir / check_name(final_name))
    source = CheckpointSource(src)
    try:
        kept, dropped = source.select(keep, optional_keys)
        pieces, total = build(source, kept)
        meta = scalar_meta(source.mapping.get("meta")) if "meta" in kept else {}
        source.release_tree()  # the copy can take a while; its memory is better returned now
        target, sha256 = write_output(
            source,
            dest_dir,
            final_name,
            staged_suffix,
            lambda fd, temp: write_archive(
                source.fd,
                fd,
                temp,
                pieces,
                total,
                progress,
                cancel,
                drop_pages=DROP_ARTIFACT_PAGES,
            ),
        )
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


class KeepKeysWriter:
    """An ``ArtifactWriter`` over a ``write_single_file``-shaped function of one format."""

    kind: ClassVar[str]
    write_file: ClassVar[Callable[..., WrittenArtifact]]

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        required, optional = split_keep_keys(request.keep)
        return type(self).write_file(
            request.source,
            request.dest_dir,
            request.name,
            (*required, *optional),
            progress=request.progress,
            optional_keys=optional,
            cancel=request.cancel,
        )
