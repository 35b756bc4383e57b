"""A torch distributed checkpoint's ``.metadata``, read as plain values without running it.

``torch.distributed.checkpoint.save`` (``FileSystemWriter.finish``) pickles a ``Metadata``
dataclass into ``.metadata.tmp`` and renames it to ``.metadata`` once every rank's
``__<rank>_<i>.distcp`` file is written: it is the marker written last. The pickle is read with
``safepickle.load_inert`` (nothing is imported or called), every global it names must be in
``pickle_allowlist.DCP_METADATA_GLOBALS``, and the records are checked field by field into
``DcpMetadata``: the tensors (dtype, size, chunks), the byte items, where each item's bytes
are (file, offset, length) and ``planner_data`` (the nested key path of each flat key, which
``dcp_to_torch_save`` unflattens by).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.fs.names import plain_name
from ckptd.slim.errors import CorruptCheckpointError, UnsafeMetadataError, UnsupportedFormatError
from ckptd.slim.pickle_allowlist import DCP_METADATA_GLOBALS
from ckptd.slim.safepickle import Inert, InertGlobal, PickleRejected, StorageRef, load_inert
from ckptd.slim.tensors import ITEMSIZE

METADATA_FILE = ".metadata"
# ~200 bytes of pickle per chunk: 64 MiB is ~300k chunks (a 70B model over 64 ranks with its
# optimizer state is ~200k). Beyond it the file is refused rather than parsed into memory.
MAX_METADATA_BYTES = 64 * 1024 * 1024
_MODULE = "torch.distributed.checkpoint.metadata"
_STORAGE_INFO = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    (_MODULE, "_StorageInfo"),
}


class BadMetadata(Exception):
    """The records are not the shape torch writes (the text says where)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    fqn: str
    dtype: str  # torch's name, e.g. "float32"
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class Stored:
    """Where one item (a tensor chunk, or a byte item when ``offsets`` is None) is stored."""

    fqn: str
    offsets: tuple[int, ...] | None
    file: str  # relative to the checkpoint folder, a plain name
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DcpMetadata:
    tensors: dict[str, TensorMeta]
    byte_items: tuple[str, ...]
    stored: dict[tuple[str, tuple[int, ...] | None], Stored]
    paths: dict[str, tuple[str | int, ...]]  # flat key -> nested key path

    def files(self) -> dict[str, int]:
        """Each file the metadata names, with the size it must at least have."""
        sizes: dict[str, int] = {}
        for item in self.stored.values():
            sizes[item.file] = max(sizes.get(item.file, 0), item.offset + item.length)
        return sizes


def read_metadata(folder: Path, data: bytes) -> DcpMetadata:
    """Parse ``folder/.metadata``'s bytes. Raises a ``SlimError`` naming the file."""
    path = folder / METADATA_FILE
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            path, f"is {len(data)} bytes; ckptd refuses .metadata files over {MAX_METADATA_BYTES}."
        )
    try:
        root = load_inert(data)
    except PickleRejected as exc:
        raise CorruptCheckpointError(path, f"cannot be read safely: {exc}.") from exc
    for ref in _globals(root):
        if ref not in DCP_METADATA_GLOBALS:
            raise UnsafeMetadataError(path, f"{ref[0]}.{ref[1]}")
    try:
        return _metadata(root)
    except BadMetadata as exc:
        raise CorruptCheckpointError(path, f"is refused: {exc}.") from exc
    except _Unsupported as exc:
        raise UnsupportedFormatError(path, str(exc)) from exc


class _Unsupported(Exception):
    pass


def _globals(root: Any) -> set[tuple[str, str]]:
    """Every global the tree names (calls, their arguments, built state); persistent ids are
    refused, since torch never writes one into ``.metadata``."""
    found: set[tuple[str, str]] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or type(obj) in (bool, int, float, str, bytes, type(None)):
            continue
        seen.add(id(obj))
        if isinstance(obj, InertGlobal):
            if obj.ref is not None:
                found.add(obj.ref)
        elif isinstance(obj, Inert):
            stack += [obj.func, *obj.args, *obj.kwargs.values()]
            for op in obj.ops or ():
                stack.extend(op[1:])
        elif type(obj) in (list, tuple, set, frozenset):
            stack.extend(obj)
        elif type(obj) is dict:
            stack += [*obj.keys(), *obj.values()]
        elif type(obj) is StorageRef:
            found.add(("<persistent id>", repr(obj.pid)[:60]))
        else:
            found.add(("<object>", type(obj).__name__))
    return found


def _record(obj: Any, names: set[tuple[str, str]] | tuple[str, str], what: str) -> Any:
    """The state a dataclass record was built with (``copyreg.__newobj__`` + BUILD)."""
    allowed = names if isinstance(names, set) else {names}
    if not isinstance(obj, Inert) or obj.origin not in allowed or obj.how != "newobj":
        raise BadMetadata(f"{what} is not a {'/'.join(sorted(n[1] for n in allowed))} record")
    ops = obj.ops or []
    if obj.args or obj.kwargs or len(ops) != 1 or ops[0][0] != "build":
        raise BadMetadata(f"{what} is not built the way a dataclass is pickled")
    state = ops[0][1]
    if type(state) is tuple and len(state) == 2 and state[0] is None:  # (None, slots)
        state = state[1]
    return state


def _fields(obj: Any, name: str, what: str) -> dict[str, Any]:
    state = _record(obj, (_MODULE, name), what)
    if type(state) is not dict or not all(type(k) is str for k in state):
        raise BadMetadata(f"{what} has no field dict")
    return state


def _size(obj: Any, what: str) -> tuple[int, ...]:
    """A ``torch.Size`` (REDUCE of a tuple), or a plain tuple/list of non-negative ints."""
    if isinstance(obj, Inert) and obj.origin == ("torch", "Size") and obj.how == "reduce":
        if len(obj.args) != 1 or obj.kwargs or obj.ops:
            raise BadMetadata(f"{what} is a malformed torch.Size")
        obj = obj.args[0]
    if type(obj) not in (tuple, list) or not all(type(v) is int and v >= 0 for v in obj):
        raise BadMetadata(f"{what} is not a tuple of non-negative ints")
    return tuple(obj)


def _dtype(properties: Any, what: str) -> str:
    state = _record(properties, (_MODULE, "TensorProperties"), f"{what}.properties")
    dtype = state[0] if type(state) is tuple and state else None
    if type(state) is dict:
        dtype = state.get("dtype")
    ref = dtype.ref if isinstance(dtype, InertGlobal) else None
    if ref is None or ref[0] != "torch":
        raise BadMetadata(f"{what} has no dtype")
    if ref[1] not in ITEMSIZE:
        raise _Unsupported(f"holds {what} of dtype torch.{ref[1]}, which ckptd cannot consolidate")
    return ref[1]


def _tensor(fqn: str, obj: Any) -> TensorMeta:
    what = f"the tensor {fqn!r}"
    state = _fields(obj, "TensorStorageMetadata", what)
    size = _size(state.get("size"), f"{what}'s size")
    chunks_raw = state.get("chunks")
    if type(chunks_raw) is not list or not chunks_raw:
        raise BadMetadata(f"{what} has no chunk list")
    chunks = []
    for i, raw in enumerate(chunks_raw):
        chunk = _fields(raw, "ChunkStorageMetadata", f"chunk {i} of {what}")
        offsets = _size(chunk.get("offsets"), f"chunk {i} of {what}'s offsets")
        sizes = _size(chunk.get("sizes"), f"chunk {i} of {what}'s sizes")
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise BadMetadata(
                f"chunk {i} of {what} has {len(offsets)} dims, the tensor {len(size)}"
            )
        if any(o + n > s for o, n, s in zip(offsets, sizes, size, strict=True)):
            raise BadMetadata(f"chunk {i} of {what} (at {offsets}, {sizes}) lies outside {size}")
        chunks.append(Chunk(offsets, sizes))
    return TensorMeta(fqn, _dtype(state.get("properties"), what), size, tuple(chunks))


def _stored(key: Any, info: Any) -> Stored:
    index = _fields(key, "MetadataIndex", "a storage_data key")
    fqn, raw_offset = index.get("fqn"), index.get("offset")
    if type(fqn) is not str:
        raise BadMetadata("a storage_data key has no fqn")
    offsets = None if raw_offset is None else _size(raw_offset, f"{fqn!r}'s storage offset")
    state = _record(info, _STORAGE_INFO, f"the storage of {fqn!r}")
    if type(state) is not dict:
        raise BadMetadata(f"the storage of {fqn!r} has no field dict")
    file, offset, length = state.get("relative_path"), state.get("offset"), state.get("length")
    if type(file) is not str or not plain_name(file):
        raise BadMetadata(f"the storage of {fqn!r} is in {file!r}, not a file of this folder")
    if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
        raise BadMetadata(f"the storage of {fqn!r} has a bad offset or length")
    if state.get("transform_descriptors"):
        raise _Unsupported(
            f"stores {fqn!r} transformed ({state['transform_descriptors']!r}, e.g. compressed); "
            "ckptd consolidates only the default torch_save storage"
        )
    return Stored(fqn, offsets, file, offset, length)


def _metadata(root: Any) -> DcpMetadata:
    fields = _fields(root, "Metadata", "the root")
    sd = fields.get("state_dict_metadata")
    if type(sd) is not dict or not all(type(k) is str for k in sd):
        raise BadMetadata("state_dict_metadata is not a dict of keys")
    tensors: dict[str, TensorMeta] = {}
    byte_items: list[str] = []
    bytes_ref = (_MODULE, "BytesStorageMetadata")
    for fqn, value in sd.items():
        if isinstance(value, Inert) and value.origin == bytes_ref:
            byte_items.append(fqn)
        else:
            tensors[fqn] = _tensor(fqn, value)
    raw_storage = fields.get("storage_data")
    if type(raw_storage) is not dict:
        raise BadMetadata("storage_data is not a dict (not written by FileSystemWriter)")
    stored: dict[tuple[str, tuple[int, ...] | None], Stored] = {}
    for key, info in raw_storage.items():
        item = _stored(key, info)
        if (item.fqn, item.offsets) in stored:
            raise BadMetadata(f"{item.fqn!r} at {item.offsets} is stored twice")
        stored[item.fqn, item.offsets] = item
    for fqn in byte_items:
        if (fqn, None) not in stored:
            raise BadMetadata(f"the byte item {fqn!r} has no storage")
    for meta in tensors.values():
        for chunk in meta.chunks:
            if (meta.fqn, chunk.offsets) not in stored:
                raise BadMetadata(f"chunk {chunk.offsets} of {meta.fqn!r} has no storage")
        _check_tiling(meta, stored)
    return DcpMetadata(tensors, tuple(byte_items), stored, _paths(fields.get("planner_data"), sd))


def _overlap(a: Chunk, b: Chunk) -> bool:
    return all(
        ao < bo + bn and bo < ao + an
        for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    )


def _check_tiling(meta: TensorMeta, stored: dict[tuple[str, Any], Stored]) -> None:
    """The chunks must cover the tensor exactly once: no two overlap, none is missing."""
    chunks = [c for c in meta.chunks if math.prod(c.sizes)]
    if all(c.sizes[1:] == meta.size[1:] for c in chunks):  # row blocks: neighbours suffice
        chunks.sort(key=lambda c: c.offsets[:1])
        pairs = list(itertools.pairwise(chunks))
    else:
        pairs = [(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1 :]]
    for a, b in pairs:
        if _overlap(a, b):
            fa, fb = stored[meta.fqn, a.offsets].file, stored[meta.fqn, b.offsets].file
            raise BadMetadata(
                f"the chunk of {meta.fqn!r} at {a.offsets} in {fa} overlaps another rank's "
                f"chunk (at {b.offsets} in {fb}); ckptd consolidates only chunks that tile "
                "the tensor exactly"
            )
    covered, total = sum(math.prod(c.sizes) for c in chunks), math.prod(meta.size)
    if covered != total:
        raise BadMetadata(f"the chunks of {meta.fqn!r} cover {covered} of its {total} elements")


def _paths(planner: Any, sd: dict[str, Any]) -> dict[str, tuple[str | int, ...]]:
    """Nested key paths (``DefaultSavePlanner``'s ``planner_data``); a flat key is its own."""
    paths: dict[str, tuple[str | int, ...]] = {}
    planner = planner if type(planner) is dict else {}
    for fqn in sd:
        path = planner.get(fqn, (fqn,))
        if type(path) not in (tuple, list) or not path or type(path[0]) is not str:
            raise BadMetadata(f"planner_data for {fqn!r} is not a key path")
        if not all(type(p) in (str, int) for p in path):
            raise BadMetadata(f"planner_data for {fqn!r} holds a key other than str or int")
        paths[fqn] = tuple(path)
    return paths
