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

``ckptd.picklewriter`` writes the kept part of the tree back.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import pickle
import pickletools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

__all__ = [
    "Inert",
    "InertGlobal",
    "PickleRejected",
    "StorageRef",
    "iter_storage_refs",
    "load_inert",
    "scan_pickle",
    "top_level",
]

# A legit pickle names a few dozen distinct globals; each stand-in type costs ~1 KB.
MAX_GLOBALS = 10_000
# Pickle memo indices are small and dense; see scan_pickle.
MEMO_SLACK = 1024


class PickleRejected(Exception):
    """``data.pkl`` is malformed, or hostile in a way that stops it from being read at all."""


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


class _InertLoading:
    """``find_class``/``persistent_load`` shared by the C and the pure-Python unpickler."""

    _fix_imports: bool
    _types: dict[tuple[str, str], type[Inert]]

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
            stub = InertGlobal("InertStandIn", (Inert,), {"__slots__": (), "ref": key})
            self._types[key] = stub
        return stub

    def persistent_load(self, pid: Any) -> StorageRef:
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
    uses_ext = scan_pickle(data)
    proto = data[1] if data[:1] == b"\x80" and len(data) > 1 else 0
    cls = _PyInertUnpickler if uses_ext else _CInertUnpickler
    unpickler = cls(io.BytesIO(data), encoding="utf-8")  # torch.load's default encoding
    unpickler._fix_imports = proto < 3
    unpickler._types = {}
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
