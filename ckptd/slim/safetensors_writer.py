"""A best artifact in the safetensors format, cut out of a torch zip checkpoint.

The file is an 8-byte little-endian header length, a JSON header and the tensors' bytes back to
back. Tensor names are the ``state_dict`` keys (nested dicts and lists flattened with '.'); a
kept key other than ``state_dict`` that holds tensors contributes them as ``<key>.<name>``, and
every kept key without tensors (``meta``, Lightning's ``hyper_parameters``) goes into the
header's ``__metadata__`` as a JSON string (``json.loads`` gives the value back), next to
``"format": "pt"``, which Hugging Face loaders look for.

safetensors forbids tensors that share or overlap bytes, so each tensor gets its own: a
contiguous view (a whole storage, or a slice at an offset) is copied in the kernel
(``copyhash.copy_range``), once per tensor, so tied weights are stored twice; a
non-contiguous view (a transpose, a strided slice, an ``expand``) is gathered element by
element from the part of the storage it touches, read once into memory, up to
``MAX_GATHER_BYTES`` (beyond that the slim is refused: bounded memory comes first). The output
is read back for its sha256, and tensors that cover a whole storage record are checked against
the record's CRC on the way; it is written with ``ckptd.fs.durable.atomic_output``.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.cancel import CancelToken
from ckptd.slim.artifact import WrittenArtifact
from ckptd.slim.copyhash import Gather
from ckptd.slim.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedFormatError
from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS
from ckptd.slim.safepickle import Inert, InertGlobal, StorageRef, iter_storage_refs
from ckptd.slim.source import (
    CheckpointSource,
    KeepKeysWriter,
    write_single_file,
)
from ckptd.slim.tensors import (
    MAX_DEPTH,
    NotATensor,
    NotJson,
    TensorView,
    as_mapping,
    tensor_view,
    to_json,
)
from ckptd.slim.torchzip import Copy, Entry

SUFFIX = ".safetensors"
# torch dtype -> safetensors dtype (the names safetensors.torch maps back to the same dtypes)
DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}  # fmt: skip
# A non-contiguous view is gathered from the storage bytes it touches, held in memory at once:
# 16 MiB keeps a slim well within the 64 MiB RSS target (about 27 MiB without a gather).
MAX_GATHER_BYTES = 16 * 1024 * 1024
_GATHER_CHUNK = 1024 * 1024
_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}  # memoryview formats by element size
_TENSOR_ROOT = "state_dict"  # its tensors keep their own names


class _StridedGather:
    """The elements of a non-contiguous view, in row-major order, from the storage at ``base``."""

    def __init__(self, view: TensorView, base: int) -> None:
        self.view, self.base, self.size = view, base, view.nbytes

    def chunks(self, src_fd: int) -> Iterator[bytearray]:
        view = self.view
        lo, hi = view.span()
        data = bytearray(hi - lo)
        done = 0
        while done < len(data):
            n = os.preadv(src_fd, [memoryview(data)[done:]], self.base + lo + done)
            if n == 0:
                raise EOFError(f"data/{view.storage_key} ended early")
            done += n
        items = memoryview(data).cast(_FORMATS[view.itemsize])
        *outer, n = view.shape or (1,)
        *outer_stride, step = view.stride or (1,)
        out = bytearray()
        for index in itertools.product(*(range(k) for k in outer)):
            start = sum(i * s for i, s in zip(index, outer_stride, strict=True))
            if step == 0:  # an expanded dimension: one element repeated
                out += items[start : start + 1].tobytes() * n
            else:
                out += items[start : start + (n - 1) * step + 1 : step].tobytes()
            if len(out) >= _GATHER_CHUNK:
                yield out  # written before the next one is made: no copy
                out = bytearray()
        if out:
            yield out


def check_globals(
    path: Path, key: str, value: Any, allowed: Container[tuple[str, str]] = ALLOWED_GLOBALS
) -> None:
    """Refuse a kept value that names a global a safe load would reject (as the torch slim)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or type(obj) in (bool, int, float, str, bytes, type(None)):
            continue
        seen.add(id(obj))
        if isinstance(obj, InertGlobal):
            if obj.ref is not None and obj.ref not in allowed:
                raise UnsafeCheckpointError(path, key, ".".join(obj.ref))
        elif type(obj) is StorageRef:
            stack.append(obj.pid)
        elif type(obj) in (list, tuple, set, frozenset):
            stack.extend(obj)
        elif type(obj) is dict:
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, Inert):
            stack.extend((type(obj), obj.func, *obj.args, *obj.kwargs.values()))
            for op in obj.ops or ():
                stack.extend(op[1:])


class _Collector:
    """Tensors (name -> view) and ``__metadata__`` entries of the kept keys."""

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source
        self.tensors: dict[str, TensorView] = {}
        self.metadata: dict[str, str] = {"format": "pt"}

    def _refuse(self, key: str, what: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(
            self.source.path,
            f"key {key!r} holds {what}, which has no place in a safetensors file.",
            "Remove the key from artifact.keep_keys, or use artifact.format: torch.",
        )

    def add(self, key: str, value: Any) -> None:
        check_globals(self.source.path, key, value)
        if next(iter_storage_refs(value), None) is None:
            try:
                self.metadata[key] = json.dumps(to_json(value, key), ensure_ascii=False)
            except NotJson as exc:
                raise self._refuse(key, f"a value without a JSON form ({exc})") from exc
            return
        self._flatten(key, "" if key == _TENSOR_ROOT else key, value, 0)

    def _flatten(self, key: str, name: str, value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self._refuse(key, f"tensors nested deeper than {MAX_DEPTH} levels at {name!r}")
        try:
            view = tensor_view(value)
        except NotATensor as exc:
            raise self._refuse(key, f"{exc} at {name!r}") from exc
        if view is not None:
            if view.dtype not in DTYPES:
                raise self._refuse(key, f"a tensor of dtype {view.dtype} at {name!r}")
            if not name or name in self.tensors:
                raise self._refuse(key, f"two tensors named {name!r} once flattened")
            self.tensors[name] = view
            return
        mapping = value if type(value) is dict else as_mapping(value)
        if mapping is not None:
            items = list(mapping.items())
        elif type(value) in (list, tuple):
            items = list(enumerate(value))
        else:
            raise self._refuse(key, f"a non-tensor value ({type(value).__name__}) at {name!r}")
        for sub, item in items:
            if type(sub) not in (str, int):
                raise self._refuse(key, f"a key of type {type(sub).__name__} under {name!r}")
            self._flatten(key, f"{name}.{sub}" if name else str(sub), item, depth + 1)


def header_bytes(header: dict[str, Any]) -> bytes:
    """The length-prefixed JSON header; tensors start 8-byte aligned, as safetensors writes."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _plan(
    source: CheckpointSource, tensors: dict[str, TensorView], metadata: dict[str, str]
) -> tuple[list[bytes | Copy | Gather], int]:
    """(pieces for ``write_archive``, total size) of the safetensors file."""
    header: dict[str, Any] = {"__metadata__": metadata}
    located: list[tuple[str, TensorView, int, Entry]] = []  # name, view, data offset, record
    archive, pos = source.archive, 0
    for name, view in tensors.items():
        entry = archive.entries.get(f"data/{view.storage_key}")
        if entry is None or entry.size != view.storage_bytes:
            found = "missing" if entry is None else f"{entry.size} bytes"
            raise CorruptCheckpointError(
                source.path,
                f"has a tensor {name!r} on {archive.prefix}/data/{view.storage_key} "
                f"({found}; data.pkl says {view.storage_bytes} bytes).",
            )
        header[name] = {
            "dtype": DTYPES[view.dtype],
            "shape": list(view.shape),
            "data_offsets": [pos, pos + view.nbytes],
        }
        located.append((name, view, pos, entry))
        pos += view.nbytes
    prefix = header_bytes(header)
    pieces: list[bytes | Copy | Gather] = [prefix]
    for name, view, at, entry in located:
        if not view.nbytes:
            continue
        base = archive.data_offset(entry)
        lo, hi = view.span()
        if view.is_contiguous():
            whole = view.nbytes == entry.size  # then the record's CRC vouches for the bytes
            pieces.append(Copy(base + lo, len(prefix) + at, view.nbytes, entry.crc32, name, whole))
        elif hi - lo <= MAX_GATHER_BYTES and view.itemsize in _FORMATS:
            pieces.append(_StridedGather(view, base))
        else:
            raise UnsupportedFormatError(
                source.path,
                f"has a non-contiguous tensor {name!r} (size {view.shape}, stride "
                f"{view.stride}, {view.dtype}) spread over {hi - lo} bytes of its storage; "
                f"ckptd gathers such views only up to {MAX_GATHER_BYTES} bytes of 1-8 byte "
                "elements.",
                "Save it .contiguous(), or use artifact.format: torch.",
            )
    return pieces, len(prefix) + pos


def _safetensors_output(
    source: CheckpointSource, kept: tuple[str, ...]
) -> tuple[Sequence[Any], int]:
    collector = _Collector(source)
    for key in kept:
        collector.add(key, source.mapping[key])
    return _plan(source, collector.tensors, collector.metadata)


def write_safetensors(
    src: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    final_name: str | Callable[[str], str],
    keep_keys: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    *,
    optional_keys: Sequence[str] = (),
    cancel: CancelToken | None = None,
) -> WrittenArtifact:
    """Write ``dest_dir/final_name``: the tensors and metadata of ``keep_keys`` of ``src``.

    Same contract as ``slimmer.slim_checkpoint`` (``source.write_single_file``: names,
    progress, cancel, errors, no partial output); only the format differs.
    """
    return write_single_file(
        src,
        dest_dir,
        final_name,
        keep_keys,
        SUFFIX,
        _safetensors_output,
        progress,
        optional_keys=optional_keys,
        cancel=cancel,
    )


class SafetensorsWriter(KeepKeysWriter):
    """A torch zip checkpoint written as a ``.safetensors`` file (``artifact.format``)."""

    kind: ClassVar[str] = "safetensors"
    write_file = staticmethod(write_safetensors)
