"""PyTorch's zip checkpoint container, read and written without importing torch.

``torch.save`` (miniz, driven by ``caffe2/serialize/inline_container.cc``) writes an uncompressed
zip whose entries all live in one folder ``<prefix>/``: ``data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/<key>``..., ``version``, ``.data/serialization_id``.
Each entry's data starts on a ``.storage_alignment`` boundary (64 by default) thanks to an ``FB``
padding record in the local header's extra field; local headers carry zero sizes and CRC, which
follow the data in a data descriptor; a zip64 end record is always written.

``layout_archive`` reproduces that layout byte for byte, because ``torch.load`` with
``torch.utils.serialization.config.load.calculate_storage_offsets`` computes where storages start
from it instead of reading the local headers.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ckptd.core.reads import pread_full
from ckptd.slim.crc import crc32
from ckptd.slim.errors import (
    CheckpointChangedError,
    CorruptCheckpointError,
    SlimError,
    UnsupportedFormatError,
)

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
DEFAULT_ALIGNMENT = 64

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_Z64_LOCATOR = struct.Struct("<4sIQI")
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_Z64_LOCATOR_SIG = b"PK\x06\x07"
_Z64_EOCD_SIG = b"PK\x06\x06"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8 = 0x800
_FLAG_DESCRIPTOR = 0x8

# The end records of a torch archive take 98 bytes (zip64 record + locator + EOCD) and torch
# writes no comment, so the tail read stays tiny: this runs on every scan of every work_dir.
TAIL_BYTES = 128
# A 300M-parameter model with AdamW state has ~1.5k entries (~100 KB of central directory);
# these caps are >100x that and keep a hostile directory from costing more than a few MB.
MAX_ENTRIES = 200_000
MAX_CENTRAL_DIRECTORY = 16 * 1024 * 1024

# Legacy (``_use_new_zipfile_serialization=False``) files start with a pickled magic number.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
LEGACY_HINT = (
    "Re-save it in the zip format, e.g. torch.save(torch.load(path, weights_only=False), path) "
    "in a trusted environment (the default since torch 1.6; MMEngine's publish_model.py writes "
    "the legacy format)."
)


class _End(NamedTuple):
    entries: int
    cd_offset: int
    cd_size: int
    end_of_cd: int


@dataclass(frozen=True, slots=True)
class Entry:
    name: str  # relative to the archive folder, e.g. "data/0"
    raw_name: bytes  # full name as stored, e.g. b"archive/data/0"
    header_offset: int
    size: int
    crc32: int
    limit: int  # the next entry (or the central directory) starts here


def is_legacy_header(head: bytes) -> bool:
    return head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    try:
        data = pread_full(fd, size, offset)
    except OSError as exc:
        raise SlimError(path, f"reading failed: {exc.strerror or exc}.") from exc
    if len(data) != size:
        raise CheckpointChangedError(path, "the file got shorter while it was being read.")
    return data


def _read_end(fd: int, size: int, start: int = 0) -> _End | str:
    """Parse the end records of the ``size``-byte zip starting at ``start`` of the file; return a
    reason string if they do not describe a complete zip. Offsets returned are zip-relative."""
    if size < _LOCAL.size + _CENTRAL.size + _EOCD.size:
        return f"only {size} bytes long"
    n = min(size, TAIL_BYTES)
    tail = pread_full(fd, n, start + size - n)
    if len(tail) != n:
        return "shorter than its size while being read"
    base = size - n
    found = -1
    for i in range(n - _EOCD.size, -1, -1):
        if tail[i : i + 4] == _EOCD_SIG and i + _EOCD.size + _EOCD.unpack_from(tail, i)[7] == n:
            found = i
            break
    if found < 0:
        return "no end-of-central-directory record at its end (still being written or truncated)"
    _, disk, cd_disk, n_disk, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, found)
    if disk or cd_disk or n_disk != entries:
        return "a multi-disk zip"
    end_of_cd = base + found
    loc_at = found - _Z64_LOCATOR.size
    if loc_at >= 0 and tail[loc_at : loc_at + 4] == _Z64_LOCATOR_SIG:
        _, z_disk, z_offset, disks = _Z64_LOCATOR.unpack_from(tail, loc_at)
        loc_pos = base + loc_at
        if z_disk or disks != 1 or z_offset + _Z64_EOCD.size > loc_pos:
            return "an inconsistent zip64 locator"
        if z_offset >= base:
            record = tail[z_offset - base : z_offset - base + _Z64_EOCD.size]
        else:
            record = pread_full(fd, _Z64_EOCD.size, start + z_offset)
        if len(record) != _Z64_EOCD.size:
            return "shorter than its size while being read"
        sig, rec_size, _, _, d1, d2, n1, n2, cd_size64, cd_offset64 = _Z64_EOCD.unpack(record)
        if sig != _Z64_EOCD_SIG or z_offset + 12 + rec_size != loc_pos or d1 or d2 or n1 != n2:
            return "an inconsistent zip64 end record"
        if (
            entries not in (n1, U16_MAX)
            or cd_size not in (cd_size64, U32_MAX)
            or cd_offset not in (cd_offset64, U32_MAX)
        ):
            return "end records that disagree"
        entries, cd_size, cd_offset, end_of_cd = n1, cd_size64, cd_offset64, z_offset
    elif entries == U16_MAX or U32_MAX in (cd_size, cd_offset):
        return "a zip64 end record missing"
    if cd_offset + cd_size != end_of_cd:
        return "a central directory that does not end where the end record says"
    if entries == 0 or cd_size < entries * _CENTRAL.size:
        return "an empty or inconsistent central directory"
    return _End(entries, cd_offset, cd_size, end_of_cd)


def looks_complete(path: str | os.PathLike[str]) -> bool | None:
    """Cheap completeness check for a scan: are the zip end records consistent with the size?

    Returns True for a complete torch zip checkpoint, False while it is being written, truncated,
    rewritten in place, empty or not a checkpoint at all. Reads the first 32 bytes, at most 128
    bytes of tail (plus the zip64 record if it lies further back) and 4 bytes at the central
    directory. A legacy-format (non-zip) file is parsed instead (``legacy.legacy_complete``:
    its pickles and the sizes of its storages must add up to the file). A missing file gives
    False; other OS errors propagate.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        head = pread_full(fd, 32, 0)
        if not head.startswith(_LOCAL_SIG):
            if not is_legacy_header(head):
                return False
            from ckptd.slim.legacy import legacy_complete  # it builds on this module

            return legacy_complete(Path(path), fd, size)
        end = _read_end(fd, size)
        if isinstance(end, str):
            return False
        return pread_full(fd, 4, end.cd_offset) == _CENTRAL_SIG
    finally:
        os.close(fd)


class SourceArchive:
    """The central directory of a torch zip checkpoint, checked for sanity, open on ``fd``.

    ``base``: where the archive starts in the file (torch distributed checkpoint's ``.distcp``
    files hold one ``torch.save`` archive per tensor chunk, back to back); ``size`` is the
    archive's. Entry offsets are archive-relative; ``data_offset`` and ``pread`` are the file's.
    """

    def __init__(self, path: Path, fd: int, size: int, base: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.base = base
        head = _pread(fd, min(size, 32), base, path)
        if not head.startswith(_LOCAL_SIG):
            if is_legacy_header(head):
                raise UnsupportedFormatError(
                    path,
                    "is a legacy-format torch file (_use_new_zipfile_serialization=False), "
                    "which ckptd cannot read without executing it.",
                    LEGACY_HINT,
                )
            raise CorruptCheckpointError(
                path, f"is not a torch checkpoint (starts with {head[:8]!r}, not a zip header)."
            )
        try:
            end = _read_end(fd, size, base)
        except OSError as exc:
            raise SlimError(path, f"reading failed: {exc.strerror or exc}.") from exc
        if isinstance(end, str):
            raise CorruptCheckpointError(path, f"is not a complete zip archive: it has {end}.")
        if end.entries > MAX_ENTRIES or end.cd_size > MAX_CENTRAL_DIRECTORY:
            raise CorruptCheckpointError(
                path,
                f"has an absurd central directory ({end.entries} entries, {end.cd_size} bytes; "
                f"limits {MAX_ENTRIES} and {MAX_CENTRAL_DIRECTORY}).",
            )
        self.cd_offset = end.cd_offset
        self.prefix, self.entries = self._parse_directory(
            _pread(fd, end.cd_size, base + end.cd_offset, path), end
        )
        if "constants.pkl" in self.entries or any(n.startswith("code/") for n in self.entries):
            raise UnsupportedFormatError(
                path,
                "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint.",
            )
        if "data.pkl" not in self.entries:
            raise CorruptCheckpointError(path, f"has no {self.prefix}/data.pkl record.")

    def _corrupt(self, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, reason)

    def _parse_directory(self, cd: bytes, end: _End) -> tuple[str, dict[str, Entry]]:
        raw: list[tuple[bytes, int, int, int]] = []
        pos = 0
        packed = b""  # first compressed or encrypted entry: reported once we know the format
        for _ in range(end.entries):
            if pos + _CENTRAL.size > len(cd):
                raise self._corrupt("has a truncated central directory.")
            fields = _CENTRAL.unpack_from(cd, pos)
            sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen = fields[:13]
            disk, offset = fields[13], fields[16]
            name = cd[pos + 46 : pos + 46 + nlen]
            extra = cd[pos + 46 + nlen : pos + 46 + nlen + elen]
            pos += 46 + nlen + elen + clen
            if sig != _CENTRAL_SIG or pos > len(cd) or len(name) != nlen:
                raise self._corrupt("has a damaged central directory.")
            if (method != 0 or flags & _FLAG_ENCRYPTED) and not packed:
                packed = name
            usize, csize, offset = self._zip64(extra, usize, csize, offset, name)
            if (usize != csize and not packed) or disk != 0:
                raise self._corrupt(f"has an inconsistent entry {name!r}.")
            raw.append((name, offset, csize, crc))  # bytes on disk, for the overlap check
        if pos != len(cd):
            raise self._corrupt("has a central directory of the wrong size.")
        if packed and b"/constants.pkl" not in b"".join(item[0] for item in raw):
            raise UnsupportedFormatError(
                self.path,
                f"has a compressed or encrypted entry {packed!r}; torch.save never writes one.",
            )
        first = raw[0][0].decode("utf-8", "replace")
        if "/" not in first:
            raise self._corrupt(f"is not a torch archive: its first entry {first!r} has no folder.")
        prefix = first.split("/", 1)[0]
        # Entries must not overlap: otherwise the copied output could be far larger than the
        # source (the uncompressed cousin of a zip bomb).
        raw.sort(key=lambda item: item[1])
        entries: dict[str, Entry] = {}
        for i, (name, offset, size, crc) in enumerate(raw):
            limit = raw[i + 1][1] if i + 1 < len(raw) else self.cd_offset
            if offset + _LOCAL.size + len(name) + size > limit:
                raise self._corrupt(f"has overlapping or out-of-bounds entries at {name!r}.")
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self._corrupt(f"has a non-UTF-8 entry name {name!r}.") from exc
            if not text.startswith(prefix + "/"):
                continue  # torch's reader only ever looks inside the first entry's folder
            rel = text[len(prefix) + 1 :]
            if rel in entries:
                raise self._corrupt(f"has the entry {text!r} twice.")
            entries[rel] = Entry(rel, name, offset, size, crc, limit)
        return prefix, entries

    def _zip64(
        self, extra: bytes, usize: int, csize: int, offset: int, name: bytes
    ) -> tuple[int, int, int]:
        if U32_MAX not in (usize, csize, offset):
            return usize, csize, offset
        pos = 0
        while pos + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, pos)
            body = extra[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if tag != 1:
                continue
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            wanted = [usize == U32_MAX, csize == U32_MAX, offset == U32_MAX]
            if len(values) < sum(wanted):
                break
            usize = values.pop(0) if wanted[0] else usize
            csize = values.pop(0) if wanted[1] else csize
            offset = values.pop(0) if wanted[2] else offset
            return usize, csize, offset
        raise self._corrupt(f"has an entry {name!r} whose zip64 sizes are missing.")

    def data_offset(self, entry: Entry) -> int:
        """Where ``entry``'s bytes start, from its local header (which is checked)."""
        header = _pread(self.fd, _LOCAL.size, self.base + entry.header_offset, self.path)
        sig, _, _, method, _, _, _, _, _, nlen, elen = _LOCAL.unpack(header)
        start = entry.header_offset + _LOCAL.size
        if sig != _LOCAL_SIG or method != 0 or nlen != len(entry.raw_name):
            raise self._corrupt(f"has a damaged local header for {entry.raw_name!r}.")
        if _pread(self.fd, nlen, self.base + start, self.path) != entry.raw_name:
            raise self._corrupt(f"has a local header that disagrees about {entry.raw_name!r}.")
        offset = start + nlen + elen
        if offset + entry.size > entry.limit:
            raise self._corrupt(f"has overlapping or out-of-bounds data for {entry.raw_name!r}.")
        return self.base + offset

    def pread(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` of the file (CheckpointChangedError if it got shorter)."""
        return _pread(self.fd, size, offset, self.path)

    def read(self, name: str, max_size: int) -> bytes:
        """Read a whole (small) record and check its CRC."""
        entry = self.entries.get(name)
        if entry is None:
            raise self._corrupt(f"has no {self.prefix}/{name} record.")
        if entry.size > max_size:
            raise self._corrupt(
                f"has a {self.prefix}/{name} record of {entry.size} bytes; "
                f"ckptd refuses records of this kind above {max_size} bytes."
            )
        data = _pread(self.fd, entry.size, self.data_offset(entry), self.path)
        if crc32(data) != entry.crc32:
            raise self._corrupt(f"has a CRC mismatch in {self.prefix}/{name}.")
        return data


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One entry of the archive to write: bytes in memory, or a span of the source file."""

    name: str
    size: int
    crc32: int
    data: bytes | None = None
    source_offset: int = -1


@dataclass(frozen=True, slots=True)
class Copy:
    source_offset: int
    dest_offset: int
    size: int
    crc32: int
    name: str
    # False for part of a record (a tensor view at an offset): no CRC vouches for those bytes.
    checked: bool = True
    # The file to copy from when it is not the writer's one source (-1): a consolidating
    # writer copies each tensor chunk from the rank file that holds it.
    fd: int = -1


def layout_archive(
    prefix: str, records: Sequence[OutRecord], alignment: int
) -> tuple[list[bytes | Copy], int]:
    """The archive as a sequence of literal bytes and copies from the source, and its size.

    Mirrors miniz as driven by PyTorchStreamWriter: zip64 fields only where a size or offset
    reaches 0xFFFFFFFF, the same ``FB`` padding rule (``getPadding``), no descriptor for empty
    entries, and the zip64 end record always.
    """
    pieces: list[bytes | Copy] = []
    central = bytearray()
    pos = 0
    for rec in records:
        full = f"{prefix}/{rec.name}".encode()
        big_size, big_offset = rec.size >= U32_MAX, pos >= U32_MAX
        local64: tuple[int, ...] = ((rec.size, 0) if big_size else ()) + (
            (pos,) if big_offset else ()
        )
        extra = (
            struct.pack(f"<HH{len(local64)}Q", 1, 8 * len(local64), *local64) if local64 else b""
        )
        padding = -(pos + _LOCAL.size + len(full) + len(extra) + 4) % alignment
        extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if rec.size else 0)
        local = _LOCAL.pack(_LOCAL_SIG, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra))
        data_offset = pos + len(local) + len(full) + len(extra)
        pieces.append(local + full + extra)
        if rec.data is not None:
            pieces.append(rec.data)
        else:
            pieces.append(Copy(rec.source_offset, data_offset, rec.size, rec.crc32, rec.name))
        if rec.size:
            if big_size or big_offset:
                pieces.append(_DESCRIPTOR_SIG + struct.pack("<IQQ", rec.crc32, rec.size, rec.size))
            else:
                pieces.append(_DESCRIPTOR_SIG + struct.pack("<III", rec.crc32, rec.size, rec.size))
        central64 = ((rec.size, rec.size) if big_size else ()) + ((pos,) if big_offset else ())
        cextra = (
            struct.pack(f"<HH{len(central64)}Q", 1, 8 * len(central64), *central64)
            if central64
            else b""
        )
        small_size = U32_MAX if big_size else rec.size
        central += _CENTRAL.pack(
            _CENTRAL_SIG, 0, 0, flags, 0, 0, 0, rec.crc32, small_size, small_size,
            len(full), len(cextra), 0, 0, 0, 0, U32_MAX if big_offset else pos,
        )  # fmt: skip
        central += full + cextra
        pos = data_offset + rec.size + (len(pieces[-1]) if rec.size else 0)
    count = len(records)
    z64_offset = pos + len(central)
    central += _Z64_EOCD.pack(_Z64_EOCD_SIG, 44, 0x031E, 45, 0, 0, count, count, len(central), pos)
    central += _Z64_LOCATOR.pack(_Z64_LOCATOR_SIG, 0, z64_offset, 1)
    central += _EOCD.pack(
        _EOCD_SIG, 0, 0, min(count, U16_MAX), min(count, U16_MAX),
        min(z64_offset - pos, U32_MAX), min(pos, U32_MAX), 0,
    )  # fmt: skip
    pieces.append(bytes(central))
    return pieces, pos + len(central)
