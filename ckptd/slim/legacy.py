"""The legacy torch format (``torch.save(..., _use_new_zipfile_serialization=False)``, what torch
< 1.6 and MMEngine's ``publish_model.py`` write), read without running any of it.

``torch.serialization._legacy_save`` writes five things one after another: four pickles (the
magic number, the protocol version 1001, a ``sys_info`` dict, the object itself, whose tensors
name their storages by persistent ids ``('storage', <torch.FloatStorage>, key, location,
numel, view_metadata)``, then the sorted list of storage keys), followed by the raw storages in
that order, each an 8-byte little-endian element count and the bytes. Each pickle goes through
``safepickle.compact_pickle`` (same checks as a zip's ``data.pkl``, stopping at its STOP).

``LegacyArchive`` stands in for ``torchzip.SourceArchive``: its entries are ``data/<key>``
(the storage bytes where they lie in the file) plus the ``version`` and ``byteorder`` records a
zip would have, so the torch-zip slim and the safetensors writer read it unchanged; the
persistent ids become the zip format's 5-tuples. A storage's CRC (which the zip artifact
records and the copy is checked against) is computed when a writer first asks for its entry.

Complete means: every pickle ends with STOP, every storage listed is there with the size its
persistent id says, and the file ends exactly after the last one. A file being written fails
one of these (``torch.save`` writes front to back); so does a truncated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptd.core.reads import pread_full
from ckptd.slim.crc import crc32
from ckptd.slim.errors import CheckpointChangedError, CorruptCheckpointError, SlimError
from ckptd.slim.pickle_allowlist import STORAGE_TYPES
from ckptd.slim.safepickle import (
    MAX_PICKLE_BYTES,
    InertGlobal,
    PickleRejected,
    compact_pickle,
    iter_storage_refs,
    load_compacted,
)
from ckptd.slim.torchzip import Entry, is_legacy_header

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_SMALL = 1 << 20  # the magic number, version, sys_info and key list pickles
_CRC_CHUNK = 1 << 20
# What a zip written by torch 2.x records; the archive's storages are always little-endian.
_RECORDS = {"version": b"3\n", "byteorder": b"little"}


class _Entries(dict[str, Entry]):
    """``data/<key>`` entries whose CRC32 is computed on first access (a zip has it in its
    central directory): a writer reads only the storages of the keys it keeps."""

    def __init__(self, archive: LegacyArchive) -> None:
        super().__init__()
        self._archive = archive
        self._done: set[str] = set()

    def _fill(self, name: str) -> None:
        if name in self._done or not dict.__contains__(self, name):
            return
        entry = dict.__getitem__(self, name)
        crc, done = 0, 0
        while done < entry.size:
            n = min(_CRC_CHUNK, entry.size - done)
            crc = crc32(self._archive.pread(n, entry.header_offset + done), crc)
            done += n
        dict.__setitem__(self, name, Entry(name, entry.raw_name, entry.header_offset,
                                           entry.size, crc, entry.limit))  # fmt: skip
        self._done.add(name)

    def __getitem__(self, name: str) -> Entry:
        self._fill(name)
        return dict.__getitem__(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        self._fill(name)
        return dict.get(self, name, default)


class LegacyArchive:
    """A legacy-format checkpoint open on ``fd``, parsed and checked for completeness."""

    prefix = "archive"

    def __init__(
        self,
        path: Path,
        fd: int,
        size: int,
        *,
        with_crcs: bool = True,
        max_pickle: int = MAX_PICKLE_BYTES,
    ) -> None:
        self.path, self.fd, self.size, self._max_pickle = path, fd, size, max_pickle
        try:
            self._parse(with_crcs)
        except PickleRejected as exc:
            raise CorruptCheckpointError(
                path, f"is a legacy-format torch file that cannot be read safely: {exc}."
            ) from exc

    def _corrupt(self, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, f"is a legacy-format torch file that {reason}.")

    def pread(self, size: int, offset: int) -> bytes:
        try:
            data = pread_full(self.fd, size, offset)
        except OSError as exc:
            raise SlimError(self.path, f"reading failed: {exc.strerror or exc}.") from exc
        if len(data) != size:
            raise CheckpointChangedError(self.path, "the file got shorter while it was being read.")
        return data

    def _pickle(self, pos: int, limit: int) -> tuple[Any, int]:
        """The inert object of the pickle at ``pos`` and where the next thing starts."""

        def read(offset: int, n: int) -> bytes:
            return self.pread(n, pos + offset)

        compacted = compact_pickle(read, self.size - pos, limit, drain=False)
        return load_compacted(compacted, read), pos + compacted.end

    def _parse(self, with_crcs: bool) -> None:
        magic, pos = self._pickle(0, _SMALL)
        version, pos = self._pickle(pos, _SMALL)
        if magic != MAGIC_NUMBER or version != PROTOCOL_VERSION:
            raise self._corrupt(f"has magic {magic!r:.40} / protocol {version!r:.40}")
        sys_info, pos = self._pickle(pos, _SMALL)
        if type(sys_info) is not dict or sys_info.get("little_endian") is not True:
            raise self._corrupt("was written on a big-endian machine; ckptd reads little-endian")
        self.root, pos = self._pickle(pos, self._max_pickle)
        keys, pos = self._pickle(pos, _SMALL)
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise self._corrupt("has no list of storage keys after the object")
        storages = self._zip_ids()
        self.entries: dict[str, Entry] = _Entries(self) if with_crcs else {}
        for key in keys:
            if key not in storages:
                raise self._corrupt(f"lists a storage {key!r} that no tensor uses")
            itemsize, numel = storages[key]
            if pos + 8 > self.size:
                raise self._corrupt(f"ends before storage {key!r} (being written or truncated)")
            count = int.from_bytes(self.pread(8, pos), "little")
            if count != numel:
                raise self._corrupt(f"has {count} elements in storage {key!r}, not {numel}")
            start, nbytes = pos + 8, numel * itemsize
            pos = start + nbytes
            if pos > self.size:
                raise self._corrupt(f"ends inside storage {key!r} (being written or truncated)")
            name = f"data/{key}"
            dict.__setitem__(self.entries, name, Entry(name, name.encode(), start, nbytes, 0, pos))
        if pos != self.size:
            raise self._corrupt(f"has {self.size - pos} bytes after its last storage")
        missing = set(storages) - set(keys)
        if missing:
            raise self._corrupt(f"does not hold the storage {sorted(missing)[0]!r}")
        for name, data in _RECORDS.items():
            dict.__setitem__(self.entries, name, Entry(name, b"", -1, len(data), crc32(data), -1))
            if isinstance(self.entries, _Entries):
                self.entries._done.add(name)

    def _zip_ids(self) -> dict[str, tuple[int, int]]:
        """Rewrite every persistent id as the zip format's 5-tuple; (element size, numel) by key."""
        found: dict[str, tuple[int, int]] = {}
        for ref in iter_storage_refs(self.root):
            pid = ref.pid
            if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage":
                raise self._corrupt(f"has a persistent id other than a storage: {pid!r:.100}")
            tag, storage_type, key, location, numel, view = pid
            ref_name = storage_type.ref if isinstance(storage_type, InertGlobal) else None
            if view is not None:
                raise self._corrupt(f"has a storage view {view!r:.60} (torch < 1.0); re-save it")
            if ref_name not in STORAGE_TYPES or type(key) is not str or type(numel) is not int:
                raise self._corrupt(f"has a malformed storage id {pid!r:.100}")
            item = (STORAGE_TYPES[ref_name], numel)
            if found.setdefault(key, item) != item:
                raise self._corrupt(f"uses storage {key!r} with two types or sizes")
            ref.pid = (tag, storage_type, key, location, numel)
        return found

    def data_offset(self, entry: Entry) -> int:
        return entry.header_offset

    def read(self, name: str, max_size: int) -> bytes:
        """A whole (small) record, as ``SourceArchive.read``; storages have no CRC to check."""
        if name in _RECORDS:
            return _RECORDS[name]
        entry = dict.get(self.entries, name)
        if entry is None:
            raise self._corrupt(f"has no {name}")
        if entry.size > max_size:
            raise self._corrupt(f"has a {name} of {entry.size} bytes, over {max_size}")
        return self.pread(entry.size, entry.header_offset)


def is_legacy(fd: int, path: Path) -> bool:
    try:
        head = pread_full(fd, 32, 0)
    except OSError as exc:
        raise SlimError(path, f"reading failed: {exc.strerror or exc}.") from exc
    return is_legacy_header(head)


def legacy_complete(path: Path, fd: int, size: int) -> bool:
    """Is this legacy-format file complete? (Parses it: ``format_check`` runs once per stat.)"""
    try:
        LegacyArchive(path, fd, size, with_crcs=False)
    except SlimError:
        return False
    return True
