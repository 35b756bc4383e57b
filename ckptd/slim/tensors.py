"""Tensors of an inert ``data.pkl`` tree, read as plain values: storage key, dtype, view.

``torch.save`` pickles a tensor as a call of a rebuild function (``torch._utils
._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)``, ``_rebuild_tensor_v3`` with
an explicit dtype for the newer dtypes, wrapped by ``_rebuild_parameter`` for an
``nn.Parameter`` or by ``torch._tensor._rebuild_from_type_v2``); the storage is a persistent id
``('storage', <torch.FloatStorage>, key, location, numel)`` naming the archive record
``data/<key>``. ``safepickle`` records those calls without making them; this module reads
their arguments, checks them (a view must lie inside its storage) and turns the rest of a kept
value into JSON, for formats that hold tensors and metadata apart (safetensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptd.slim.pickle_allowlist import STORAGE_TYPES
from ckptd.slim.safepickle import Blob, Inert, InertGlobal, StorageRef, top_level

# torch storage class (torch.<Kind>Storage) -> the dtype of its tensors (quantized ones left out:
# their scale and zero point live outside the storage).
_STORAGE_DTYPES = {
    "Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16",
    "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8",
    "Bool": "bool", "ComplexDouble": "complex128", "ComplexFloat": "complex64",
}  # fmt: skip
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex128": 16, "complex64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip
_DTYPE_STORAGES = {dtype: f"{kind}Storage" for kind, dtype in _STORAGE_DTYPES.items()}


def storage_type_of(dtype: str) -> tuple[str, str] | None:
    """The legacy storage class ``torch.save`` names for a dtype's tensors (``_rebuild_tensor_v2``),
    None for the newer dtypes that have none."""
    name = _DTYPE_STORAGES.get(dtype)
    return ("torch", name) if name else None


_V2 = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}
_V3 = ("torch._utils", "_rebuild_tensor_v3")
_PARAMETER = {
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
_FROM_TYPE = ("torch._tensor", "_rebuild_from_type_v2")
_PLAIN_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}
MAX_DEPTH = 200
# Globals whose one argument is their JSON form; dtypes print as their names.
_AS_ARGUMENT = {
    ("torch", "Size"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "Counter"),
}
_DTYPE_NAMES = {*ITEMSIZE, "complex32", "qint8", "qint32", "quint8", "quint4x2", "quint2x4"}


class NotATensor(Exception):
    """A tensor record that cannot be read as a plain strided tensor (the reason is the text)."""


@dataclass(frozen=True, slots=True)
class TensorView:
    """A strided view of one storage; offset and strides count elements, as in torch."""

    storage_key: str
    storage_bytes: int  # the size of the record data/<key>
    dtype: str  # torch's name, e.g. "float32"
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def is_contiguous(self) -> bool:
        """torch's rule: row-major strides, ignoring dimensions of size 1 (and empty tensors)."""
        if self.numel == 0:
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def span(self) -> tuple[int, int]:
        """The byte range of the storage the view touches (empty for an empty tensor)."""
        start = self.offset * self.itemsize
        if self.numel == 0:
            return start, start
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return start, (last + 1) * self.itemsize


def _ref(obj: Any) -> tuple[str, str] | None:
    return obj.ref if isinstance(obj, InertGlobal) else None


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or not all(type(v) is int and v >= 0 for v in value):
        raise NotATensor(f"a tensor whose {what} is not a tuple of non-negative ints")
    return tuple(value)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorView:
    if type(storage) is not StorageRef:
        raise NotATensor("a tensor whose storage is not a persistent id")
    pid = storage.pid
    if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
        raise NotATensor(f"a persistent id other than a torch storage: {pid!r:.100}")
    _, storage_type, key, _, numel = pid
    ref = _ref(storage_type)
    if ref not in STORAGE_TYPES or type(key) is not str or type(numel) is not int or numel < 0:
        raise NotATensor(f"a malformed storage id {pid!r:.100}")
    if dtype is None:
        kind = ref[1].removesuffix("Storage")
        dtype = _STORAGE_DTYPES.get(kind)
        if dtype is None:
            raise NotATensor(f"a tensor of storage type {ref[0]}.{ref[1]} (quantized)")
    if type(offset) is not int or offset < 0:
        raise NotATensor("a tensor with a bad storage offset")
    view = TensorView(
        key, numel * STORAGE_TYPES[ref], dtype, offset, _ints(size, "size"), _ints(stride, "stride")
    )
    if len(view.shape) != len(view.stride):
        raise NotATensor("a tensor whose size and stride differ in length")
    if view.span()[1] > view.storage_bytes:
        raise NotATensor(
            f"a view (offset {offset}, size {view.shape}, stride {view.stride}) that reaches "
            f"past the end of its {view.storage_bytes}-byte storage"
        )
    return view


def tensor_view(obj: Any) -> TensorView | None:
    """The view ``obj`` rebuilds, None if ``obj`` is no tensor record; NotATensor if it is one
    that is not a plain dense strided tensor (quantized, sparse, nested, a subclass, ...)."""
    if not isinstance(obj, Inert) or obj.how != "reduce" or obj.kwargs:
        return None
    func, args = _ref(obj.func), obj.args
    if func == _FROM_TYPE:  # (func, new_type, args, state): a Tensor or Parameter, rebuilt
        if len(args) != 4 or _ref(args[1]) not in _PLAIN_TYPES or type(args[2]) is not tuple:
            raise NotATensor("a tensor subclass")
        func, args = _ref(args[0]), args[2]
    if func in _PARAMETER:
        inner = tensor_view(args[0]) if args else None
        if inner is None:
            raise NotATensor("a Parameter without a tensor")
        return inner
    if func in _V2 and len(args) >= 4:
        return _view(*args[:4], dtype=None)
    if func == _V3 and len(args) >= 7:
        dtype_ref = _ref(args[6])
        if dtype_ref is None or dtype_ref[0] != "torch" or dtype_ref[1] not in ITEMSIZE:
            raise NotATensor(f"a tensor of dtype {dtype_ref}")
        return _view(*args[:4], dtype=dtype_ref[1])
    if func is not None and func[0] == "torch._utils" and func[1].startswith("_rebuild_"):
        raise NotATensor(f"a tensor rebuilt by {func[0]}.{func[1]} (not a dense CPU tensor)")
    return None


def as_mapping(obj: Any) -> dict[Any, Any] | None:
    """A dict or an OrderedDict record as a dict (attributes such as ``_metadata`` dropped)."""
    found = top_level(obj)
    return found[0] if found is not None else None


class NotJson(Exception):
    """A value with no JSON form; the text says what and where."""


def to_json(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as JSON-ready Python values: tuples become lists, OrderedDicts dicts."""
    if depth > MAX_DEPTH:
        raise NotJson(f"{where} nests deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is Blob:
        loaded = value.load()
        if type(loaded) is str:
            return loaded
        value = loaded  # bytes: reported below
    if type(value) in (list, tuple):
        return [to_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    ref = _ref(value)
    if ref is not None and ref[0] == "torch" and ref[1] in _DTYPE_NAMES:
        return f"torch.{ref[1]}"  # a dtype, as str(dtype) prints it
    # torch.Size((2, 3)) -> [2, 3]; set([1, 2]) -> [1, 2]; Counter({'a': 2}) -> {'a': 2}
    if (
        isinstance(value, Inert)
        and value.how == "reduce"
        and value.origin in _AS_ARGUMENT
        and len(value.args) == 1
        and not value.ops
        and not value.kwargs
    ):
        return to_json(value.args[0], where, depth + 1)
    mapping = value if type(value) is dict else as_mapping(value)
    if mapping is not None:
        out: dict[str, Any] = {}
        for k, v in mapping.items():
            if k is not None and type(k) not in (str, int, float, bool):
                raise NotJson(f"{where} has a key of type {type(k).__name__}")
            out[str(k) if type(k) is not str else k] = to_json(v, f"{where}.{k}", depth + 1)
        return out
    what = type(value).__name__
    if isinstance(value, Inert) and value.origin == ("_codecs", "encode"):
        what = "bytes"  # how protocol 2 pickles bytes
    elif isinstance(value, Inert) and value.origin is not None:
        what = ".".join(value.origin)
    elif _ref(value) is not None:
        what = ".".join(_ref(value) or ())
    raise NotJson(f"{where} holds a {what} value")
