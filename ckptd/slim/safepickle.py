"""Read a checkpoint's ``data.pkl`` without running any of it.

``load_inert`` runs the C unpickler with a ``find_class`` that never imports. It returns
read-only stand-in *types* (NEWOBJ insists on a type) that record who they are; calling or
instantiating one (REDUCE, NEWOBJ, INST, OBJ) only records the arguments, and BUILD, SETITEMS,
APPENDS and ADDITEMS on the result only record the operation. Tensors stay persistent ids
(``StorageRef``). Two opcode paths could still reach real code or exhaust memory, so a quick scan
(``scan_pickle``) runs first: EXT1/2/4 make the C unpickler return whatever sits in
``copyreg._extension_cache`` without asking ``find_class`` (such pickles go through the
pure-Python unpickler, whose extension lookup we override), and PUT/LONG_BINPUT with a huge index
make it allocate and zero a memo array of that size (a 12-byte pickle can cost gigabytes).

``compact_pickle`` reads a large ``data.pkl`` as a stream instead: it does the same checks,
verifies the record's CRC, and leaves every long str/bytes payload in the file, putting a
``Blob`` (where the bytes are) in the tree in its place. MMEngine's message hub pickles numpy
arrays of every iteration's scalars (hundreds of MB in a long run); those are never read into
memory unless they belong to a key that is written out.

``ckptd.slim.picklewriter`` writes the kept part of the tree back.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import pickle
import pickletools
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ckptd.slim.crc import crc32

__all__ = [
    "Blob",
    "Compacted",
    "Inert",
    "InertGlobal",
    "PickleRejected",
    "PickleTooLarge",
    "StorageRef",
    "compact_pickle",
    "iter_storage_refs",
    "load_compacted",
    "load_inert",
    "scan_pickle",
    "top_level",
]

# A legit pickle names a few dozen distinct globals; each stand-in type costs ~1 KB.
MAX_GLOBALS = 10_000
# torch.save puts tensor bytes in data/<key> records, so data.pkl mostly holds structure: about
# 100-300 bytes per tensor (1 MB for ~5k tensors with their optimizer state). Parsing costs about
# 12x its size in memory, so the 64 MiB RSS target holds up to ~3 MB; beyond 64 MiB the file is
# refused rather than letting a hostile one take the daemon's memory. Long str/bytes payloads
# do not count: MMEngine's message hub pickles numpy arrays of every iteration's scalars (~15 MB
# after 12 COCO epochs, 200 MB after a million iterations); they are streamed past and left in
# the file (``safepickle.compact_pickle``), read only if a kept key holds one.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Pickle memo indices are small and dense; see scan_pickle.
MEMO_SLACK = 1024


# str/bytes payloads at least this long stay in the file when a pickle is compacted.
BLOB_MIN = 64 * 1024
_STREAM_CHUNK = 1024 * 1024


class PickleRejected(Exception):
    """``data.pkl`` is malformed, or hostile in a way that stops it from being read at all."""


class PickleTooLarge(PickleRejected):
    """The pickle's structure (without its long payloads) exceeds the caller's limit."""


class InertGlobal(type):
    """Metaclass of the stand-ins: read-only, so a BUILD aimed at a class cannot alter it."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise TypeError("inert stand-in types are read-only")

    def __delattr__(cls, name: str) -> None:
        raise TypeError("inert stand-in types are read-only")


class Inert(metaclass=InertGlobal):
    """A call that was recorded instead of made. Subclasses stand for one global each."""

    __slots__ = ("args", "func", "how", "kwargs", "ops")
    ref: ClassVar[tuple[str, str] | None] = None

    args: tuple[Any, ...]
    func: Any
    how: str
    kwargs: dict[str, Any]
    ops: list[tuple[Any, ...]] | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = object.__new__(cls)
        self.how, self.func, self.args, self.kwargs, self.ops = "newobj", cls, args, kwargs, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # type.__call__ runs __init__ after __new__, i.e. this was REDUCE/INST/OBJ, not NEWOBJ.
        self.how = "reduce"

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        out = object.__new__(Inert)
        out.how, out.func, out.args, out.kwargs, out.ops = "reduce", self, args, kwargs, None
        return out

    def _record(self, op: tuple[Any, ...]) -> None:
        if self.ops is None:
            self.ops = []
        self.ops.append(op)

    def __setstate__(self, state: Any) -> None:
        self._record(("build", state))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._record(("setitem", key, value))

    def extend(self, items: Any) -> None:
        self._record(("extend", list(items)))

    def append(self, item: Any) -> None:
        self._record(("extend", [item]))

    def add(self, item: Any) -> None:
        self._record(("add", item))

    @property
    def origin(self) -> tuple[str, str] | None:
        """The global this object was built from, following calls of calls."""
        func = self.func
        while isinstance(func, Inert):
            func = func.func
        return func.ref if isinstance(func, InertGlobal) else None


def stand_in(ref: tuple[str, str]) -> type[Inert]:
    """The inert stand-in for the global ``ref``: calling it records the call (also used to
    build trees for ``PickleWriter`` without importing what they name)."""
    return InertGlobal("InertStandIn", (Inert,), {"__slots__": (), "ref": ref})


class StorageRef:
    """A persistent id, i.e. ``('storage', storage_type, key, location, numel)`` for torch."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any) -> None:
        self.pid = pid


_UNKNOWN, _LINE, _LINES2, _COUNT1, _COUNT4, _COUNT4S, _COUNT8 = -1, -2, -3, -4, -5, -6, -7
_LONG_BINPUT, _PUT, _EXT1, _EXT2, _EXT4, _STOP = -8, -9, -10, -11, -12, -13


def _opcode_kinds() -> list[int]:
    by_n = {
        pickletools.UP_TO_NEWLINE: _LINE,
        pickletools.TAKEN_FROM_ARGUMENT1: _COUNT1,
        pickletools.TAKEN_FROM_ARGUMENT4: _COUNT4S,
        pickletools.TAKEN_FROM_ARGUMENT4U: _COUNT4,
        pickletools.TAKEN_FROM_ARGUMENT8U: _COUNT8,
    }
    special = {
        "LONG_BINPUT": _LONG_BINPUT, "PUT": _PUT, "EXT1": _EXT1, "EXT2": _EXT2, "EXT4": _EXT4,
        "STOP": _STOP, "GLOBAL": _LINES2, "INST": _LINES2,
    }  # fmt: skip
    kinds = [_UNKNOWN] * 256
    for op in pickletools.opcodes:
        n = op.arg.n if op.arg is not None else 0
        kinds[op.code.encode("latin-1")[0]] = special.get(op.name, by_n.get(n, n))
    return kinds


_KINDS = _opcode_kinds()
_EXT_WIDTH = {_EXT1: 1, _EXT2: 2, _EXT4: 4}


def scan_pickle(data: bytes) -> bool:
    """Walk the opcodes once without building anything; return whether EXT opcodes occur.

    A memo index may not exceed the offset it appears at (plus slack): every memo entry costs
    at least one byte of pickle (MEMOIZE), so this caps the C unpickler's memo array at 16
    bytes per pickle byte, no worse than what a legit pickle's objects cost anyway.
    """
    kinds, end, pos, uses_ext, find = _KINDS, len(data), 0, False, data.find
    while pos < end:
        k = kinds[data[pos]]
        pos += 1
        if k >= 0:  # fixed-size argument: most opcodes of a torch pickle
            pos += k
        elif k in (_COUNT4, _COUNT4S, _COUNT8):
            width = 8 if k == _COUNT8 else 4
            size = int.from_bytes(data[pos : pos + width], "little", signed=k == _COUNT4S)
            if size < 0:
                raise PickleRejected(f"negative length at offset {pos}")
            pos += width + size
        elif k == _COUNT1:
            pos += 1 + (data[pos] if pos < end else 0)
        elif k in (_LINE, _LINES2):
            for _ in range(1 if k == _LINE else 2):
                newline = find(b"\n", pos)
                if newline < 0:
                    raise PickleRejected("truncated (a line argument has no end)")
                pos = newline + 1
        elif k in (_LONG_BINPUT, _PUT):
            at = pos - 1
            if k == _PUT:
                newline = find(b"\n", pos)
                try:
                    index = int(data[pos:newline]) if newline >= 0 else -1
                except ValueError:
                    index = -1
                pos = newline + 1 if newline >= 0 else end
            else:
                index = int.from_bytes(data[pos : pos + 4], "little")
                pos += 4
            if not 0 <= index <= at + MEMO_SLACK:
                raise PickleRejected(f"memo index {index} out of range at offset {at}")
        elif k == _STOP:
            return uses_ext
        elif k in _EXT_WIDTH:
            uses_ext = True
            pos += _EXT_WIDTH[k]
        else:
            raise PickleRejected(f"unknown opcode {data[pos - 1]:#04x} at offset {pos - 1}")
    raise PickleRejected("truncated (no STOP opcode)")


class Blob:
    """A long str, bytes or bytearray of a compacted pickle, left where it is in the file.

    ``load()`` reads it (as the unpickler would have built it); blobs are compared by identity,
    like the memoized objects they stand for.
    """

    __slots__ = ("_read", "kind", "offset", "size")

    def __init__(self, kind: str, offset: int, size: int, read: Callable[[int, int], bytes]):
        self.kind = kind  # "str" | "bytes" | "bytearray"
        self.offset = offset  # in the pickle record
        self.size = size
        self._read = read

    def load(self) -> str | bytes | bytearray:
        data = self._read(self.offset, self.size)
        if self.kind == "str":
            return data.decode("utf-8", "surrogatepass")  # what the unpickler does
        return data if self.kind == "bytes" else bytearray(data)


@dataclass(frozen=True, slots=True)
class Compacted:
    """A pickle with its long payloads replaced by persistent ids only this reader knows."""

    data: bytes
    crc32: int  # of the whole original record, payloads included
    uses_ext: bool
    token: str
    blobs: tuple[tuple[str, int, int], ...]  # (kind, offset, size) per blob number
    end: int = 0  # where the pickle ended (after STOP), for pickles that follow one another


_FRAME = 0x95
# Opcodes whose payload may become a Blob: (kind, width of the length field).
_BLOB_OPS = {
    ord("X"): ("str", 4),  # BINUNICODE
    0x8D: ("str", 8),  # BINUNICODE8
    ord("B"): ("bytes", 4),  # BINBYTES
    0x8E: ("bytes", 8),  # BINBYTES8
    0x96: ("bytearray", 8),  # BYTEARRAY8
}


class _Stream:
    """The record read front to back in chunks, CRC'd as it goes; ``buf`` holds only
    ``[start, fetched)``: bytes before what the caller still needs are dropped."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read = read
        self.size = size
        self.buf = bytearray()
        self.start = 0
        self.fetched = 0
        self.crc = 0

    def require(self, keep_from: int, end: int) -> None:
        """Hold ``[keep_from, end)`` (``end`` clipped to the record), dropping what precedes."""
        if keep_from > self.start:
            drop = min(keep_from, self.fetched) - self.start
            del self.buf[:drop]
            self.start += drop
        end = min(end, self.size)
        while self.fetched < end:
            n = min(_STREAM_CHUNK, self.size - self.fetched)
            data = self._read(self.fetched, n)
            self.crc = crc32(data, self.crc)
            skip = min(max(0, keep_from - self.fetched), n)  # only while jumping a payload
            if skip:
                self.start = self.fetched + skip
                self.buf += data[skip:]
            else:
                self.buf += data
            self.fetched += n

    def drain(self) -> int:
        """Read the rest (for the CRC) and return the CRC of the whole record."""
        while self.fetched < self.size:
            n = min(_STREAM_CHUNK, self.size - self.fetched)
            self.crc = crc32(self._read(self.fetched, n), self.crc)
            self.fetched += n
        self.buf = bytearray()
        self.start = self.fetched
        return self.crc


def compact_pickle(
    read: Callable[[int, int], bytes], size: int, max_out: int, *, drain: bool = True
) -> Compacted:
    """Stream a pickle record of ``size`` bytes (``read(offset, n)``) through ``scan_pickle``'s
    checks, replacing str/bytes payloads of ``BLOB_MIN`` bytes or more by persistent ids.

    Memory stays around ``_STREAM_CHUNK`` plus the compacted output, which may not exceed
    ``max_out`` bytes (``PickleTooLarge``). Memo indices are checked against offsets in the
    compacted output, which is what the C unpickler sizes its memo by. ``drain=False`` stops
    at STOP (the legacy torch format puts pickles and raw storages one after another): the CRC
    is then of the bytes read so far, and ``end`` says where the next thing starts.
    """
    stream = _Stream(read, size)
    token = f"ckptd-blob-{secrets.token_hex(8)}:"
    out = bytearray()
    blobs: list[tuple[str, int, int]] = []
    kinds, uses_ext = _KINDS, False
    pos = copy_from = 0

    def flush(upto: int) -> None:
        nonlocal copy_from
        if len(out) + upto - copy_from > max_out:
            raise PickleTooLarge(f"its structure is larger than {max_out} bytes")
        stream.require(copy_from, upto)
        out.extend(stream.buf[copy_from - stream.start : upto - stream.start])
        copy_from = upto

    while True:
        if pos >= size:
            raise PickleRejected("truncated (no STOP opcode)")
        if pos + 9 > stream.fetched:  # an opcode and its length field must be at hand
            flush(pos)
            stream.require(pos, pos + 9)
        buf, base = stream.buf, stream.start
        code = buf[pos - base]
        k = kinds[code]
        at, pos = pos, pos + 1
        if k >= 0:  # fixed-size argument: most opcodes of a torch pickle
            pos += k
            if code == _FRAME:  # frames are optional, and their lengths would be wrong now
                flush(at)
                copy_from = pos
        elif k in (_COUNT4, _COUNT4S, _COUNT8):
            width = 8 if k == _COUNT8 else 4
            if pos + width > size:
                raise PickleRejected("truncated (a length field runs past the end)")
            length = int.from_bytes(
                buf[pos - base : pos - base + width], "little", signed=k == _COUNT4S
            )
            if length < 0:
                raise PickleRejected(f"negative length at offset {pos}")
            pos += width + length
            blob = _BLOB_OPS.get(code)
            if blob is not None and length >= BLOB_MIN and blob[1] == width:
                if pos > size:
                    raise PickleRejected("truncated (a payload runs past the end)")
                flush(at)
                marker = f"{token}{len(blobs)}".encode()
                out += b"X" + len(marker).to_bytes(4, "little") + marker + b"Q"  # BINPERSID
                blobs.append((blob[0], pos - length, length))
                copy_from = pos
        elif k == _COUNT1:
            pos += 1 + (buf[pos - base] if pos < size else 0)
        elif k in (_LINE, _LINES2):
            for _ in range(1 if k == _LINE else 2):
                while (newline := stream.buf.find(b"\n", pos - stream.start)) < 0:
                    if stream.fetched >= size:
                        raise PickleRejected("truncated (a line argument has no end)")
                    flush(at)
                    stream.require(at, stream.fetched + _STREAM_CHUNK)
                pos = newline + stream.start + 1
        elif k in (_LONG_BINPUT, _PUT):
            if k == _PUT:
                while (newline := stream.buf.find(b"\n", pos - stream.start)) < 0:
                    if stream.fetched >= size:
                        break
                    flush(at)
                    stream.require(at, stream.fetched + _STREAM_CHUNK)
                buf, base = stream.buf, stream.start
                try:
                    index = int(buf[pos - base : newline]) if newline >= 0 else -1
                except ValueError:
                    index = -1
                pos = newline + base + 1 if newline >= 0 else size
            else:
                index = int.from_bytes(buf[pos - base : pos - base + 4], "little")
                pos += 4
            if not 0 <= index <= len(out) + (at - copy_from) + MEMO_SLACK:
                raise PickleRejected(f"memo index {index} out of range at offset {at}")
        elif k == _STOP:
            flush(pos)
            break
        elif k in _EXT_WIDTH:
            uses_ext = True
            pos += _EXT_WIDTH[k]
        else:
            raise PickleRejected(f"unknown opcode {code:#04x} at offset {at}")
    crc = stream.drain() if drain else stream.crc
    return Compacted(bytes(out), crc, uses_ext, token, tuple(blobs), pos)


class _InertLoading:
    """``find_class``/``persistent_load`` shared by the C and the pure-Python unpickler."""

    _fix_imports: bool
    _types: dict[tuple[str, str], type[Inert]]
    _token: str | None = None
    _blobs: tuple[tuple[str, int, int], ...] = ()
    _read: Callable[[int, int], bytes] | None = None

    def find_class(self, module: str, name: str) -> type[Inert]:
        # Same renaming the stock find_class does for protocol < 3 pickles (py2 names).
        if self._fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        stub = self._types.get(key)
        if stub is None:
            if len(self._types) >= MAX_GLOBALS:
                raise PickleRejected(f"more than {MAX_GLOBALS} distinct globals")
            stub = self._types[key] = stand_in(key)
        return stub

    def persistent_load(self, pid: Any) -> StorageRef | Blob:
        token = self._token
        if token is not None and type(pid) is str and pid.startswith(token):
            kind, offset, size = self._blobs[int(pid[len(token) :])]
            assert self._read is not None
            return Blob(kind, offset, size, self._read)
        return StorageRef(pid)


class _CInertUnpickler(_InertLoading, pickle.Unpickler):
    pass


class _PyInertUnpickler(_InertLoading, pickle._Unpickler):  # type: ignore[name-defined,misc]
    append: Callable[[Any], None]

    def get_extension(self, code: int) -> None:
        # Unlike the stock method, never consult copyreg._extension_cache (real objects).
        key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        if not key:
            raise PickleRejected(f"unregistered pickle extension code {code}")
        self.append(self.find_class(*key))


def load_inert(data: bytes) -> Any:
    """Unpickle ``data`` into plain containers, ``Inert`` records and ``StorageRef`` nodes."""
    return _load(data, scan_pickle(data))


def load_compacted(compacted: Compacted, read: Callable[[int, int], bytes]) -> Any:
    """``load_inert`` of a ``compact_pickle`` result; its blobs become ``Blob`` nodes that
    ``read(offset, size)`` from the original record."""
    return _load(compacted.data, compacted.uses_ext, compacted, read)


def _load(
    data: bytes,
    uses_ext: bool,
    compacted: Compacted | None = None,
    read: Callable[[int, int], bytes] | None = None,
) -> Any:
    proto = data[1] if data[:1] == b"\x80" and len(data) > 1 else 0
    cls = _PyInertUnpickler if uses_ext else _CInertUnpickler
    unpickler = cls(io.BytesIO(data), encoding="utf-8")  # torch.load's default encoding
    unpickler._fix_imports = proto < 3
    unpickler._types = {}
    if compacted is not None and compacted.blobs:
        unpickler._token, unpickler._blobs, unpickler._read = (
            compacted.token,
            compacted.blobs,
            read,
        )
    try:
        return unpickler.load()
    except PickleRejected:
        raise
    except Exception as exc:
        raise PickleRejected(f"{type(exc).__name__}: {exc}") from exc


def iter_storage_refs(root: Any) -> Iterator[StorageRef]:
    """Every persistent id reachable from ``root`` (each object visited once)."""
    seen: set[int] = set()
    stack = [root]
    atoms = (bool, int, float, str, bytes, bytearray, type(None))
    while stack:
        obj = stack.pop()
        if type(obj) in atoms or id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj) is StorageRef:
            yield obj
        elif type(obj) in (list, tuple, set, frozenset):
            stack.extend(obj)
        elif type(obj) is dict:
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, Inert):
            stack.append(obj.func)
            stack.extend(obj.args)
            stack.extend(obj.kwargs.values())
            for op in obj.ops or ():
                stack.extend(op[1:])


def top_level(root: Any) -> tuple[dict[Any, Any], bool] | None:
    """The checkpoint's top-level mapping and whether it is an OrderedDict, else None.

    Attributes set on a top-level OrderedDict by BUILD are not carried over: they would
    describe the whole mapping, not the keys kept.
    """
    if type(root) is dict:
        return root, False
    if (
        isinstance(root, Inert)
        and isinstance(root.func, InertGlobal)
        and root.func.ref == ("collections", "OrderedDict")
        and root.how == "reduce"
        and not root.args
        and not root.kwargs
    ):
        try:
            return {op[1]: op[2] for op in root.ops or () if op[0] == "setitem"}, True
        except TypeError:  # an unhashable key: not a mapping we can filter
            return None
    return None
