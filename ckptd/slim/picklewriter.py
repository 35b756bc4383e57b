"""Write the kept part of an inert ``data.pkl`` tree (``ckptd.slim.safepickle``) back as a pickle.

Protocol 2 with only the opcodes ``torch.load(weights_only=True)`` understands, every global
checked against ``ALLOWED_GLOBALS``, shared objects kept shared (memo by identity) and storages
renumbered by the caller's ``persistent_id``.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable, Container
from typing import Any

from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS
from ckptd.slim.safepickle import Blob, Inert, InertGlobal, StorageRef

__all__ = ["GlobalRefused", "NotRepresentable", "PickleWriter"]

# Meta and state_dict nest a handful of levels; the writer recurses, so bound it.
MAX_DEPTH = 200


class GlobalRefused(Exception):
    """The writer met a global outside the allowlist."""

    def __init__(self, ref: tuple[str, str]) -> None:
        self.ref = ref
        super().__init__(f"{ref[0]}.{ref[1]}")


class NotRepresentable(Exception):
    """A kept value cannot be written so that ``torch.load(weights_only=True)`` reads it."""


_DICT_LIKE = {("collections", "OrderedDict"), ("collections", "Counter")}
_BATCH = 1000


class PickleWriter:
    """Protocol-2 pickler over an ``load_inert`` tree, restricted to weights_only opcodes.

    Objects are memoized by ``id``, so everything saved must stay alive until ``getvalue``;
    temporaries the writer makes itself are written without a memo entry.
    """

    def __init__(
        self,
        persistent_id: Callable[[StorageRef], tuple[Any, ...]],
        allowed: Container[tuple[str, str]] = ALLOWED_GLOBALS,
    ) -> None:
        self._out = bytearray(b"\x80\x02")
        self._memo: dict[int, int] = {}
        self._globals: dict[tuple[str, str], int] = {}
        self._busy: set[int] = set()
        self._depth = 0
        self._persistent_id = persistent_id
        self._allowed = allowed

    def begin_root(self, root: Any, ordered: bool) -> None:
        """Open the top-level mapping; ``save`` key, value pairs next, then ``end_root``."""
        if ordered:
            self.save_global(("collections", "OrderedDict"))
            self._out += b")R"
        else:
            self._out += b"}"
        self._put(root)
        self._out += b"("

    def end_root(self) -> bytes:
        self._out += b"u."
        return bytes(self._out)

    def _put(self, obj: object | None, key: tuple[str, str] | None = None) -> None:
        index = len(self._memo) + len(self._globals)
        if key is None:
            self._memo[id(obj)] = index
        else:
            self._globals[key] = index
        self._out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, index: int) -> None:
        self._out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)

    def save_global(self, ref: tuple[str, str]) -> None:
        index = self._globals.get(ref)
        if index is not None:
            return self._get(index)
        if ref not in self._allowed:
            raise GlobalRefused(ref)
        self._out += b"c" + f"{ref[0]}\n{ref[1]}\n".encode()
        self._put(None, ref)

    def _save_str(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self._out += b"X" + struct.pack("<I", len(data)) + data

    def _save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self._out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self._out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self._out += b"J" + struct.pack("<i", value)
        else:
            data = pickle.encode_long(value)  # type: ignore[attr-defined]
            if len(data) > 255:
                raise NotRepresentable("an integer too large for LONG1 (weights_only has no LONG4)")
            self._out += b"\x8a" + bytes([len(data)]) + data

    def save(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None:
            self._out += b"N"
        elif kind is bool:
            self._out += b"\x88" if obj else b"\x89"
        elif kind is int:
            self._save_int(obj)
        elif kind is float:
            self._out += b"G" + struct.pack(">d", obj)
        elif id(obj) in self._memo:
            self._get(self._memo[id(obj)])
        elif kind is str:
            self._save_str(obj)
            self._put(obj)
        elif kind is Blob:
            self._save_blob(obj)
        elif isinstance(obj, InertGlobal):
            if obj.ref is None:
                raise NotRepresentable("an internal stand-in type")
            self.save_global(obj.ref)
        else:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise NotRepresentable(f"values nested more than {MAX_DEPTH} levels deep")
            try:
                self._save_compound(obj)
            finally:
                self._depth -= 1

    def _save_compound(self, obj: Any) -> None:
        kind = type(obj)
        if kind is tuple:
            self._save_tuple(obj)
        elif kind is list:
            self._out += b"]"
            self._put(obj)
            self._save_items(obj, b"a", b"e")
        elif kind is dict:
            self._out += b"}"
            self._put(obj)
            self._save_pairs(list(obj.items()))
        elif kind is StorageRef:
            self._out += b"("
            for item in self._persistent_id(obj):
                self.save(item)
            self._out += b"tQ"
        elif isinstance(obj, Inert):
            self._save_inert(obj)
        elif kind is bytes:
            self._save_bytes(obj)
            self._put(obj)
        elif kind is bytearray:
            self.save_global(("builtins", "bytearray"))
            if obj:
                self._save_bytes(bytes(obj))
                self._out += b"\x85"
            else:
                self._out += b")"
            self._out += b"R"
            self._put(obj)
        elif kind is set or kind is frozenset:
            self.save_global(("builtins", kind.__name__))
            try:
                items = sorted(obj)  # deterministic output: same checkpoint, same sha256
            except TypeError:
                items = list(obj)
            self._out += b"]"
            self._save_items(items, b"a", b"e")
            self._out += b"\x85R"
            self._put(obj)
        else:
            raise NotRepresentable(f"a {kind.__module__}.{kind.__qualname__} object")

    def _save_blob(self, blob: Blob) -> None:
        """A long str/bytes left in the source file: read it now, memoize it as the blob."""
        try:
            value = blob.load()
        except UnicodeDecodeError as exc:  # the unpickler would have refused it too
            raise NotRepresentable(f"a string that is not valid UTF-8 ({exc.reason})") from exc
        if isinstance(value, str):
            self._save_str(value)
        elif isinstance(value, bytes):
            self._save_bytes(value)
        else:
            self.save_global(("builtins", "bytearray"))
            self._save_bytes(bytes(value))
            self._out += b"\x85R"
        self._put(blob)

    def _save_bytes(self, data: bytes) -> None:
        # Protocol 2 has no bytes opcode; this is what pickle itself writes (bar the b"" case,
        # which it writes as builtins.bytes(), a global weights_only rejects).
        self.save_global(("_codecs", "encode"))
        self._save_str(data.decode("latin-1"))
        self._save_str("latin1")
        self._out += b"\x86R"

    def _save_tuple(self, obj: tuple[Any, ...]) -> None:
        if not obj:
            self._out += b")"
            return
        if id(obj) in self._busy:
            raise NotRepresentable("a tuple that contains itself")
        self._busy.add(id(obj))
        if len(obj) <= 3:
            for item in obj:
                self.save(item)
            self._out += b"\x85\x86\x87"[len(obj) - 1 : len(obj)]
        else:
            self._out += b"("
            for item in obj:
                self.save(item)
            self._out += b"t"
        self._busy.discard(id(obj))
        self._put(obj)

    def _save_items(self, items: list[Any], one: bytes, many: bytes) -> None:
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            if len(batch) > 1:
                self._out += b"("
            for item in batch:
                self.save(item)
            self._out += many if len(batch) > 1 else one

    def _save_pairs(self, pairs: list[tuple[Any, Any]]) -> None:
        for start in range(0, len(pairs), _BATCH):
            batch = pairs[start : start + _BATCH]
            if len(batch) > 1:
                self._out += b"("
            for key, value in batch:
                self.save(key)
                self.save(value)
            self._out += b"u" if len(batch) > 1 else b"s"

    def _save_inert(self, obj: Inert) -> None:
        if obj.kwargs:
            raise NotRepresentable("a constructor call with keyword arguments (NEWOBJ_EX)")
        if id(obj) in self._busy:
            raise NotRepresentable("an object whose constructor arguments contain itself")
        self._busy.add(id(obj))
        self.save(obj.func)
        self.save(obj.args)
        self._out += b"\x81" if obj.how == "newobj" else b"R"
        self._busy.discard(id(obj))
        self._put(obj)
        ops = obj.ops or []
        i = 0
        while i < len(ops):
            op = ops[i]
            if op[0] == "build":
                self.save(op[1])
                self._out += b"b"
                i += 1
            elif op[0] == "setitem" and obj.origin in _DICT_LIKE:
                j = i
                while j < len(ops) and ops[j][0] == "setitem":
                    j += 1
                self._save_pairs([(key, value) for _, key, value in ops[i:j]])
                i = j
            else:
                origin = obj.origin
                name = f"{origin[0]}.{origin[1]}" if origin else "an object"
                raise NotRepresentable(f"{op[0]} operations on {name}, which weights_only rejects")
