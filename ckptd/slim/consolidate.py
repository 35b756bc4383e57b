"""One unsharded file written from byte ranges of many shard files, without holding the model.

A sharded format (``slim/deepspeed.py``) says where each output tensor's bytes lie
(``OutTensor.parts``, see ``slim/zero_layout.py``); this module writes them as a torch zip
(``torch.load(weights_only=True)`` reads it) or a safetensors file:

1. Every shard record a tensor comes from is read once, front to back, in 1 MiB chunks: its CRC
   must match the shard's zip directory (a damaged shard is refused, naming it), and the CRC of
   each tensor's part is taken on the way; the parts' CRCs are combined into each tensor's.
2. The output is laid out (the zip's data descriptors and central directory need those CRCs),
   and each tensor is copied part after part in the kernel (``copy_file_range``) from its shard.
3. The output is read back for its sha256, each tensor's bytes checked against its CRC.

Memory stays at a few MiB whatever the model size: nothing holds more than one chunk. A small
tensor whose dtype changes (DeepSpeed's consolidation turns 16-bit buffers into fp32) is
converted chunk by chunk.
"""

from __future__ import annotations

import array
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.core.cancel import CancelToken, check
from ckptd.slim.copyhash import CrcMismatch, crc32_combine, write_archive
from ckptd.slim.crc import crc32
from ckptd.slim.errors import CheckpointChangedError, CorruptCheckpointError
from ckptd.slim.picklewriter import PickleWriter
from ckptd.slim.safepickle import StorageRef, stand_in
from ckptd.slim.safetensors_writer import DTYPES, header_bytes
from ckptd.slim.slimmer import zip_records
from ckptd.slim.source import CheckpointSource, write_output
from ckptd.slim.tensors import ITEMSIZE
from ckptd.slim.torchzip import Copy, OutRecord, layout_archive
from ckptd.slim.zero_layout import Part

_CHUNK = 1 << 20
_STORAGE_CLASSES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}  # fmt: skip
_TORCH_RECORDS = {"version": b"3\n", "byteorder": b"little"}
CONVERTIBLE = {"bfloat16", "float16", "float64"}  # to float32, as DeepSpeed's ``.float()``


@dataclass(frozen=True, slots=True)
class OutTensor:
    name: str
    dtype: str  # of the output
    shape: tuple[int, ...]
    parts: tuple[Part, ...]  # the source bytes, concatenated in row-major order
    source_dtype: str | None = None  # set when the bytes are converted to ``dtype``
    same_as: str | None = None  # a tied parameter: stored as the tensor it names (torch zip)

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A storage record of a shard: the bytes its zip directory's CRC vouches for."""

    path: Path
    fd: int
    offset: int
    size: int
    crc32: int
    name: str  # the record's name inside the shard, for messages


class ShardFiles:
    """The open shard files of a folder checkpoint (``CheckpointSource``s, re-checked by path
    and fd): what ``source.write_output`` re-checks once the output is written."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.sources: list[CheckpointSource] = []

    def add(self, source: CheckpointSource) -> None:
        self.sources.append(source)

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.sources.clear()

    def check_unchanged(self) -> None:
        for source in self.sources:
            source.check_unchanged()

    def small_record(self, name: str) -> bytes | None:
        """The records ``slimmer.zip_records`` copies: torch.save's own."""
        return _TORCH_RECORDS.get(name)


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise CheckpointChangedError(path, f"ended early at byte {offset + len(data)}.")
    return data


def _convert(data: bytes, source: str) -> bytes:
    """Elements of dtype ``source`` as float32 (round to nearest, as torch's ``.float()``)."""
    if source == "bfloat16":  # the high half of a float32: shift in 16 zero bits
        out = bytearray(len(data) * 2)
        out[2::4], out[3::4] = data[0::2], data[1::2]
        return bytes(out)
    values = [v for (v,) in struct.iter_unpack("<e" if source == "float16" else "<d", data)]
    return array.array("f", values).tobytes()  # beyond float32's range: inf, as in torch


class _Converted:
    """A converted tensor's output bytes, made chunk by chunk (a ``copyhash.Gather``)."""

    def __init__(self, tensor: OutTensor, path: Path) -> None:
        self.tensor, self.path, self.size = tensor, path, tensor.nbytes

    def chunks(self, src_fd: int) -> Iterator[bytes]:
        step = _CHUNK - _CHUNK % 8
        for part in self.tensor.parts:
            for at in range(0, part.size, step):
                n = min(step, part.size - at)
                yield _convert(
                    _pread(part.fd, n, part.offset + at, self.path), self.tensor.source_dtype or ""
                )


def tensor_crcs(
    tensors: Sequence[OutTensor],
    records: Sequence[ShardRecord],
    cancel: CancelToken | None = None,
) -> list[int]:
    """Check each record's CRC (reading it once) and return each tensor's output CRC."""
    by_fd: dict[int, list[tuple[int, int, Part]]] = {}
    for t, tensor in enumerate(tensors):
        if tensor.source_dtype is None:
            for p, part in enumerate(tensor.parts):
                by_fd.setdefault(part.fd, []).append((t, p, part))
    part_crcs: dict[tuple[int, int], int] = {}
    for record in records:
        end = record.offset + record.size
        inside = sorted(
            (x for x in by_fd.get(record.fd, ()) if record.offset <= x[2].offset < end),
            key=lambda x: x[2].offset,
        )
        crc, first = 0, 0
        for at in range(record.offset, end, _CHUNK):
            check(cancel)
            data = _pread(record.fd, min(_CHUNK, end - at), at, record.path)
            crc = crc32(data, crc)
            while first < len(inside) and inside[first][2].offset + inside[first][2].size <= at:
                first += 1
            for t, p, part in inside[first:]:
                if part.offset >= at + len(data):
                    break
                lo, hi = max(part.offset, at), min(part.offset + part.size, at + len(data))
                if lo < hi:
                    part_crcs[t, p] = crc32(data[lo - at : hi - at], part_crcs.get((t, p), 0))
        if crc != record.crc32:
            raise CorruptCheckpointError(record.path, f"has a CRC mismatch in {record.name}.")
    out = []
    for t, tensor in enumerate(tensors):
        if tensor.source_dtype is not None:
            crc = 0
            for chunk in _Converted(tensor, records[0].path if records else Path()).chunks(-1):
                crc = crc32(chunk, crc)
            out.append(crc)
            continue
        crc = 0
        for p, part in enumerate(tensor.parts):
            if part.size and (t, p) not in part_crcs:
                raise AssertionError(f"{tensor.name}: a part outside every checked record")
            crc = crc32_combine(crc, part_crcs.get((t, p), 0), part.size)
        out.append(crc)
    return out


def _data_pieces(tensor: OutTensor, dest: int, path: Path) -> list[Any]:
    if tensor.source_dtype is not None:
        return [_Converted(tensor, path)]
    pieces, pos = [], dest
    for part in tensor.parts:
        pieces.append(Copy(part.offset, pos, part.size, 0, tensor.name, False, fd=part.fd))
        pos += part.size
    return pieces


def _torch_layout(
    shards: ShardFiles, tensors: Sequence[OutTensor], crcs: Sequence[int], meta: dict[str, Any]
) -> tuple[list[Any], int, list[Copy]]:
    path = shards.path
    od = stand_in(("collections", "OrderedDict"))
    rebuild = stand_in(("torch._utils", "_rebuild_tensor_v2"))
    state_dict = od()
    keys: dict[str, int] = {}  # tensor name -> its index in ``stored``
    stored: list[int] = []
    for t, tensor in enumerate(tensors):
        owner = keys.get(tensor.same_as or "", -1)
        if owner < 0:
            owner = keys[tensor.name] = len(stored)
            stored.append(t)
        numel = tensor.nbytes // ITEMSIZE[tensor.dtype]
        storage = stand_in(("torch", _STORAGE_CLASSES[tensor.dtype]))
        pid = StorageRef(("storage", storage, str(owner), "cpu", numel))
        stride, step = [], 1
        for n in reversed(tensor.shape):
            stride.insert(0, step)
            step *= n
        state_dict[tensor.name] = rebuild(pid, 0, tensor.shape, tuple(stride), False, od())
    writer = PickleWriter(lambda ref: ref.pid)
    root: dict[str, Any] = {"meta": meta, "state_dict": state_dict}
    writer.begin_root(root, False)
    for key, value in root.items():
        writer.save(key)
        writer.save(value)
    data_pkl = writer.end_root()
    storages = [
        (str(i), OutRecord(f"data/{i}", tensors[t].nbytes, crcs[t], source_offset=0))
        for i, t in enumerate(stored)
    ]
    records, alignment = zip_records(shards, data_pkl, storages)
    laid, total = layout_archive("archive", records, alignment)
    pieces: list[Any] = []
    checks: list[Copy] = []
    for piece in laid:
        if isinstance(piece, Copy) and piece.name.startswith("data/"):
            tensor = tensors[stored[int(piece.name[5:])]]
            pieces += _data_pieces(tensor, piece.dest_offset, path)
            checks.append(Copy(0, piece.dest_offset, piece.size, piece.crc32, tensor.name))
        else:
            pieces.append(piece)
    return pieces, total, checks


def _safetensors_layout(
    tensors: Sequence[OutTensor], crcs: Sequence[int], metadata: dict[str, str], path: Path
) -> tuple[list[Any], int, list[Copy]]:
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [pos, pos + tensor.nbytes],
        }
        pos += tensor.nbytes
    prefix = header_bytes(header)
    pieces: list[Any] = [prefix]
    checks: list[Copy] = []
    at = len(prefix)
    for tensor, crc in zip(tensors, crcs, strict=True):
        pieces += _data_pieces(tensor, at, path)
        checks.append(Copy(0, at, tensor.nbytes, crc, tensor.name))
        at += tensor.nbytes
    return pieces, at, checks


def write_consolidated(
    shards: ShardFiles,
    tensors: Sequence[OutTensor],
    records: Sequence[ShardRecord],
    meta: dict[str, Any],
    fmt: str,
    dest_dir: Path,
    final_name: str | Callable[[str], str],
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Path, str, int]:
    """Write ``tensors`` as one file of format ``fmt`` ("torch" or "safetensors"): the
    (path, sha256, size) written, atomically, named by ``final_name``."""
    crcs = tensor_crcs(tensors, records, cancel)
    if fmt == "safetensors":
        import json

        metadata = {"format": "pt", "meta": json.dumps(meta, ensure_ascii=False)}
        pieces, total, checks = _safetensors_layout(tensors, crcs, metadata, shards.path)
        suffix = ".safetensors"
    else:
        pieces, total, checks = _torch_layout(shards, tensors, crcs, meta)
        suffix = ".pth"

    def write(fd: int, temp: str) -> str:
        try:
            return write_archive(-1, fd, temp, pieces, total, progress, cancel, checks)
        except CrcMismatch as exc:  # the output differs from the bytes the shards' CRCs vouch for
            shards.check_unchanged()
            raise CorruptCheckpointError(
                shards.path,
                f"gave the tensor {exc.copy.name!r} bytes that changed as they were copied.",
            ) from exc

    path, sha256 = write_output(shards, dest_dir, final_name, suffix, write)  # type: ignore[arg-type]
    return path, sha256, total
