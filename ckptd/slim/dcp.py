"""torch distributed checkpoint (DCP) folders: when one is complete, and where its tensors are.

``torch.distributed.checkpoint.save`` with the default ``FileSystemWriter`` writes one or more
``__<rank>_<i>.distcp`` files per rank, each a run of ``torch.save`` archives (one per tensor
chunk or byte item), then ``.metadata`` (via ``.metadata.tmp`` and a rename) once every rank is
done. A folder is complete when ``.metadata`` is there, parses (``dcp_metadata``), and every
file it names has at least the bytes it says; a rank still writing is never read.

``DcpFolder`` holds a complete folder open (the folder and each rank file by fd, never through
a symlink; re-checked by its ``tree_stat``) and turns each tensor into ``TensorPlan``: its
chunks' byte ranges in the rank files (``dcp_metadata`` refuses chunks that overlap or leave
gaps, naming the files), in the order they land in the unsharded tensor.
Dim-0 chunks (FSDP2 ``fully_shard``) are contiguous byte ranges of the output, copied in the
kernel with the chunk's own CRC verified on the output; any other chunking is gathered run by
run (``RunGather``), in bounded buffers.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import stat as statmod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.core.model import FileStat
from ckptd.fs.delete import DIR_FLAGS, NotPlainTree, tree_stat_fd
from ckptd.slim.copyhash import crc32_combine
from ckptd.slim.crc import crc32
from ckptd.slim.dcp_metadata import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    DcpMetadata,
    Stored,
    TensorMeta,
    read_metadata,
)
from ckptd.slim.errors import (
    CheckpointChangedError,
    CorruptCheckpointError,
    SlimError,
    UnsupportedFormatError,
)
from ckptd.slim.safepickle import PickleRejected, iter_storage_refs, load_inert
from ckptd.slim.tensors import ITEMSIZE, NotATensor, tensor_view
from ckptd.slim.torchzip import Copy, SourceArchive

SHARD_SUFFIX = ".distcp"
_MAX_CHUNK_PICKLE = 1 << 20  # a chunk's data.pkl holds one tensor record: a few hundred bytes
_GATHER_BUFFER = 4 * 1024 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def recognise(folder: Path) -> bool:
    """A DCP folder by its entry names: ``.metadata`` (or its temp file) or ``*.distcp``."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(
        n in (METADATA_FILE, f"{METADATA_FILE}.tmp") or n.endswith(SHARD_SUFFIX) for n in names
    )


def _read_small(dir_fd: int, name: str, limit: int, where: Path) -> bytes:
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(where, f"is {size} bytes; ckptd refuses it above {limit}.")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


_cache: dict[tuple[str, FileStat], DcpMetadata] = {}


def _metadata(folder: Path, dir_fd: int) -> DcpMetadata:
    """The parsed ``.metadata``, cached by its stat (a scan checks every folder every pass)."""
    st = FileStat.of(os.stat(METADATA_FILE, dir_fd=dir_fd, follow_symlinks=False))
    key = (str(folder), st)
    found = _cache.get(key)
    if found is None:
        data = _read_small(dir_fd, METADATA_FILE, MAX_METADATA_BYTES, folder / METADATA_FILE)
        found = read_metadata(folder, data)
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = found
    return found


def complete(folder: Path) -> tuple[bool, str]:
    """(True, "") once ``.metadata`` is written and every file it names has its full size."""
    try:
        dir_fd = os.open(folder, DIR_FLAGS)
    except OSError as exc:
        return False, f"cannot be opened ({exc.strerror})"
    try:
        try:
            st = os.stat(METADATA_FILE, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False, f"no {METADATA_FILE} yet (torch writes it last, once every rank is done)"
        if not statmod.S_ISREG(st.st_mode):
            return False, f"{METADATA_FILE} is not a regular file; left alone"
        try:
            meta = _metadata(folder, dir_fd)
        except SlimError as exc:
            return False, f"refused: {exc.reason}"
        except OSError as exc:
            return False, f"{METADATA_FILE} cannot be read ({exc.strerror})"
        problem = _shard_problem(dir_fd, meta)
        return (False, problem[1]) if problem else (True, "")
    finally:
        os.close(dir_fd)


def _shard_problem(dir_fd: int, meta: DcpMetadata) -> tuple[str, str] | None:
    """(file, why) of the first file ``.metadata`` names that is missing or short, or None."""
    for name, need in sorted(meta.files().items()):
        try:
            fst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return name, f"{name}, named by {METADATA_FILE}, is missing"
        if not statmod.S_ISREG(fst.st_mode):
            return name, f"{name} is not a regular file; left alone"
        if fst.st_size < need:
            return name, f"{name} is {fst.st_size} bytes; {METADATA_FILE} says {need}"
    return None


@dataclass(frozen=True, slots=True)
class ChunkSource:
    """One chunk's bytes: ``nbytes`` at ``offset`` of ``fd`` (rank file ``file``)."""

    fd: int
    file: str
    offset: int
    nbytes: int
    crc32: int | None  # the chunk record's own CRC, when the record is exactly these bytes
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorPlan:
    meta: TensorMeta
    chunks: tuple[ChunkSource, ...]  # row blocks: in output order; else as listed
    rows: bool  # every chunk is a block of whole dim-0 rows: a contiguous output range

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


class DcpFolder:
    """A complete DCP folder held open: its metadata, and every rank file by fd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.dir_fd = os.open(path, DIR_FLAGS)
        except FileNotFoundError as exc:
            raise CheckpointChangedError(path, "disappeared before it could be read.") from exc
        except OSError as exc:
            raise SlimError(path, f"cannot be opened: {exc.strerror or exc}.") from exc
        self.fds: dict[str, int] = {}
        try:
            self.stat = self._tree_stat()
            try:
                self.meta = _metadata(path, self.dir_fd)
            except FileNotFoundError as exc:
                raise CheckpointChangedError(path, f"has no {METADATA_FILE} (yet).") from exc
            problem = _shard_problem(self.dir_fd, self.meta)
            if problem:
                raise CorruptCheckpointError(path / problem[0], f"is not usable: {problem[1]}.")
            for name in self.meta.files():
                self.fds[name] = os.open(name, _FILE_FLAGS, dir_fd=self.dir_fd)
            self._first: SourceArchive | None = None
        except BaseException:
            self.close()
            raise

    def _tree_stat(self) -> FileStat:
        try:
            return tree_stat_fd(self.dir_fd, self.path.name)
        except NotPlainTree as exc:
            raise SlimError(self.path, f"cannot be read safely: {exc}.") from exc

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)

    def check_unchanged(self) -> None:
        now = self._tree_stat()
        if now != self.stat:
            raise CheckpointChangedError(
                self.path,
                f"changed while being read ((inode, size, mtime_ns) {self.stat.as_list()} -> "
                f"{now.as_list()}); it will be read again once it is stable.",
            )

    def archive(self, item: Stored) -> SourceArchive:
        """The ``torch.save`` archive of one item, inside its rank file."""
        path = self.path / item.file
        archive = SourceArchive(path, self.fds[item.file], item.length, item.offset)
        if self._first is None:
            self._first = archive
        return archive

    def _first_archive(self) -> SourceArchive:
        if self._first is None:
            self.archive(next(iter(self.meta.stored.values())))
        assert self._first is not None
        return self._first

    def small_record(self, name: str) -> bytes | None:
        """A small record (``version``, ``byteorder``) of the first archive read: the output
        archive is written like the ``torch.save`` that wrote the shards."""
        archive = self._first_archive()
        return archive.read(name, 64) if name in archive.entries else None

    def prefix(self) -> str:
        return self._first_archive().prefix

    def byte_item(self, fqn: str) -> Any:
        """A byte item (a non-tensor value) as an inert tree; it may hold no tensors."""
        item = self.meta.stored[fqn, None]
        archive = self.archive(item)
        where = self.path / item.file
        try:
            root = load_inert(archive.read("data.pkl", _MAX_CHUNK_PICKLE))
        except PickleRejected as exc:
            raise CorruptCheckpointError(where, f"holds {fqn!r}, unreadable: {exc}.") from exc
        if next(iter_storage_refs(root), None) is not None:
            raise UnsupportedFormatError(
                where,
                f"holds {fqn!r} as a pickled object with tensors, which ckptd cannot lay out.",
            )
        return root

    def tensor(self, meta: TensorMeta) -> TensorPlan:
        """The chunks of ``meta`` with their byte ranges (``dcp_metadata`` checked that they
        tile the tensor exactly); row blocks in output order."""
        if meta.nbytes == 0:
            return TensorPlan(meta, (), True)
        chunks = [self._chunk(meta, c.offsets, c.sizes) for c in meta.chunks]
        chunks = [c for c in chunks if c.nbytes]
        rows = all(c.sizes[1:] == meta.size[1:] for c in chunks)
        if rows:
            chunks.sort(key=lambda c: c.offsets[:1])
        return TensorPlan(meta, tuple(chunks), rows)

    def _chunk(
        self, meta: TensorMeta, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> ChunkSource:
        item = self.meta.stored[meta.fqn, offsets]
        where = self.path / item.file
        archive = self.archive(item)
        try:
            view = tensor_view(load_inert(archive.read("data.pkl", _MAX_CHUNK_PICKLE)))
        except (PickleRejected, NotATensor) as exc:
            raise CorruptCheckpointError(
                where, f"holds chunk {offsets} of {meta.fqn!r}, not readable as a tensor: {exc}."
            ) from exc
        if view is None or view.dtype != meta.dtype or view.shape != sizes:
            found = "no tensor" if view is None else f"{view.dtype} {view.shape}"
            raise CorruptCheckpointError(
                where,
                f"holds {found} for chunk {offsets} of {meta.fqn!r}; .metadata says "
                f"{meta.dtype} {sizes}.",
            )
        if not view.is_contiguous():
            raise UnsupportedFormatError(
                where, f"holds chunk {offsets} of {meta.fqn!r} as a non-contiguous view."
            )
        entry = archive.entries.get(f"data/{view.storage_key}")
        if entry is None or entry.size != view.storage_bytes:
            raise CorruptCheckpointError(
                where, f"holds chunk {offsets} of {meta.fqn!r} without its storage record."
            )
        start = archive.data_offset(entry) + view.offset * view.itemsize
        if start + view.nbytes > item.offset + item.length:
            raise CorruptCheckpointError(where, f"holds chunk {offsets} of {meta.fqn!r} cut short.")
        whole = view.nbytes == entry.size
        fd = self.fds[item.file]
        return ChunkSource(
            fd, item.file, start, view.nbytes, entry.crc32 if whole else None, offsets, sizes
        )


def _chunk_runs(meta: TensorMeta, c: ChunkSource) -> Iterator[tuple[int, int, ChunkSource, int]]:
    """(output byte offset, length, chunk, chunk byte offset) of each contiguous run."""
    item, size = ITEMSIZE[meta.dtype], meta.size
    n = len(size)
    if n == 0:
        yield 0, item, c, 0
        return
    j = n - 1  # the last dim the chunk does not span whole: runs cover dims j.. of it
    while j > 0 and c.sizes[j] == size[j]:
        j -= 1
    out_strides = [math.prod(size[d + 1 :]) * item for d in range(n)]
    run = math.prod(c.sizes[j:]) * item
    base = sum(c.offsets[d] * out_strides[d] for d in range(n))
    outer = c.sizes[:j]
    done = 0
    for index in _indices(outer):
        at = base + sum(i * s for i, s in zip(index, out_strides, strict=False))
        yield at, run, c, done
        done += run


def _indices(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(n) for n in shape))


def _runs(
    meta: TensorMeta, chunks: list[ChunkSource]
) -> Iterator[tuple[int, int, ChunkSource, int]]:
    """Every chunk's runs, merged into output order (memory: one run per chunk)."""
    return heapq.merge(*(_chunk_runs(meta, c) for c in chunks), key=lambda r: r[0])


def row_copies(plan: TensorPlan, dest: int, name: str) -> tuple[list[Copy], int]:
    """Kernel copies of a row-block tensor at ``dest``, and the CRC of the whole tensor
    (combined from the chunks' own CRCs; a chunk without one is read for it)."""
    copies, crc, at = [], 0, dest
    for c in plan.chunks:
        chunk_crc = c.crc32 if c.crc32 is not None else _crc_of(c.fd, c.offset, c.nbytes)
        copies.append(Copy(c.offset, at, c.nbytes, chunk_crc, f"{c.file}: {name}", True, c.fd))
        crc = crc32_combine(crc, chunk_crc, c.nbytes)
        at += c.nbytes
    return copies, crc


def _crc_of(fd: int, offset: int, size: int) -> int:
    crc, done = 0, 0
    while done < size:
        data = os.pread(fd, min(_GATHER_BUFFER, size - done), offset + done)
        if not data:
            raise EOFError(f"a chunk ended {size - done} bytes early")
        crc, done = crc32(data, crc), done + len(data)
    return crc


class RunGather:
    """A tensor chunked other than by rows, gathered run by run into bounded buffers."""

    def __init__(self, plan: TensorPlan, where: Path) -> None:
        self.plan = plan
        self.size = plan.nbytes
        self.where = where

    def _pieces(self) -> Iterator[tuple[ChunkSource, bytes]]:
        """The tensor's bytes in output order, at most ``_GATHER_BUFFER`` per read."""
        for _, length, c, at in _runs(self.plan.meta, list(self.plan.chunks)):
            for start in range(0, length, _GATHER_BUFFER):
                n = min(_GATHER_BUFFER, length - start)
                data = os.pread(c.fd, n, c.offset + at + start)
                if len(data) != n:
                    raise CheckpointChangedError(self.where / c.file, "got shorter while read.")
                yield c, data

    def chunks(self, src_fd: int) -> Iterator[bytearray]:
        buffer = bytearray()
        for _, data in self._pieces():
            buffer += data
            if len(buffer) >= _GATHER_BUFFER:
                yield buffer
                buffer = bytearray()
        if buffer:
            yield buffer

    def crc32(self) -> int:
        """The output CRC, and each chunk's own CRC checked on the way (one read of the data)."""
        crc = 0
        by_chunk: dict[int, int] = {}
        for c, data in self._pieces():
            crc = crc32(data, crc)
            by_chunk[id(c)] = crc32(data, by_chunk.get(id(c), 0))
        for c in self.plan.chunks:
            if c.crc32 is not None and by_chunk.get(id(c), 0) != c.crc32:
                raise CorruptCheckpointError(
                    self.where / c.file,
                    f"has a CRC mismatch in chunk {c.offsets} of {self.plan.meta.fqn!r}.",
                )
        return crc
