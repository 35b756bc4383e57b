"""The restricted unpickler and opcode scan (``ckptd.slim.safepickle``), the protocol-2 writer
(``ckptd.slim.picklewriter``) and the allowlist (``ckptd.slim.pickle_allowlist``)."""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import os
import pickle
import resource
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._weights_only_unpickler as wo
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS, STORAGE_TYPES
from ckptd.slim.picklewriter import GlobalRefused, NotRepresentable, PickleWriter
from ckptd.slim.safepickle import (
    Inert,
    InertGlobal,
    PickleRejected,
    StorageRef,
    iter_storage_refs,
    load_inert,
    scan_pickle,
    top_level,
)


def _u(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(data)) + data


def hostile_bodies(marker: Path) -> dict[str, bytes]:
    """Opcode sequences (no PROTO/STOP, net one object on the stack). Under ``pickle.loads``
    all but NEWOBJ_EX and the reconstructor one (kept for opcode coverage) run ``touch marker``."""
    cmd = _u(f"touch {marker}")
    argv = b"]" + _u("touch") + b"a" + _u(str(marker)) + b"a"
    return {
        "GLOBAL+REDUCE": b"cos\nsystem\n" + cmd + b"\x85R",
        "STACK_GLOBAL": b"\x8c\x02os\x8c\x06system\x93" + cmd + b"\x85R",
        "INST": b"(" + cmd + b"ios\nsystem\n",
        "OBJ": b"(cos\nsystem\n" + cmd + b"o",
        "NEWOBJ+BUILD": (
            b"cargparse\nNamespace\n)\x81}" + _u("__setstate__") + b"cos\nsystem\nsb" + cmd + b"b"
        ),
        "NEWOBJ_EX": b"csubprocess\nPopen\n" + argv + b"\x85}\x92",
        "getattr chain": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n" + _u("os") + b"\x85R"
            + _u("system") + b"tR" + cmd + b"\x85R"
        ),
        "copyreg reconstructor": b"ccopyreg\n_reconstructor\n(cos\nsystem\nN" + cmd + b"tR",
        "SETITEMS/APPENDS/ADDITEMS": (
            b"cos\nsystem\n" + cmd + b"\x85R(" + cmd + cmd + b"u(" + cmd + b"e(" + cmd + b"\x90"
        ),
    }  # fmt: skip


def wrap(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@pytest.mark.parametrize("kind", list(hostile_bodies(Path("/x"))))
def test_hostile_opcodes_only_record(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    tree = load_inert(wrap(hostile_bodies(marker)[kind]))
    assert not marker.exists()
    assert isinstance(tree, Inert)
    assert tree.origin in {
        ("os", "system"),
        ("subprocess", "Popen"),
        ("argparse", "Namespace"),
        ("builtins", "getattr"),
        ("copyreg", "_reconstructor"),
    }
    with pytest.raises(GlobalRefused):
        PickleWriter(lambda ref: ()).save(tree)


def test_build_aimed_at_a_class_is_rejected_without_running_anything(tmp_path: Path) -> None:
    stand_in = load_inert(wrap(b"cos\nsystem\n"))
    assert isinstance(stand_in, InertGlobal) and stand_in.ref == ("os", "system")
    with pytest.raises(TypeError):
        stand_in.ref = ("builtins", "print")  # type: ignore[misc]
    with pytest.raises(PickleRejected):
        load_inert(wrap(b"cos\nsystem\n}(" + _u("ref") + b"K\x01ub"))


def test_find_class_never_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "ckptd_trap_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tree = load_inert(wrap(b"cckptd_trap_module\nanything\n)R"))
    assert tree.origin == ("ckptd_trap_module", "anything")
    assert not marker.exists() and "ckptd_trap_module" not in sys.modules


@pytest.fixture
def registered_extension() -> Any:
    code = 31337
    copyreg.add_extension("os", "system", code)
    # A real object in the cache must be ignored: that is what the C unpickler would hand back.
    copyreg._extension_cache[code] = os.system  # type: ignore[attr-defined]
    yield code
    copyreg.remove_extension("os", "system", code)


def test_ext_opcodes_resolve_to_stand_ins(tmp_path: Path, registered_extension: int) -> None:
    marker = tmp_path / "marker"
    body = b"\x83" + struct.pack("<H", registered_extension) + _u(f"touch {marker}") + b"\x85R"
    tree = load_inert(wrap(body))
    assert not marker.exists()
    assert tree.origin == ("os", "system")
    assert copyreg._extension_cache[registered_extension] is os.system  # type: ignore[attr-defined]


def test_unregistered_ext_code_is_rejected() -> None:
    with pytest.raises(PickleRejected, match="extension"):
        load_inert(wrap(b"\x82\x05"))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x80\x02K\x01r\x00\x00\x00\x10.", "memo index"),  # would allocate 2 GiB in C
        (b"\x80\x02K\x01p99999999999\n.", "memo index"),
        (b"\x80\x02K\x01p-1\n.", "memo index"),
        (b"\x80\x02K\x01", "truncated"),
        (b"\x80\x02cos\nsys", "truncated"),
        (b"\x80\x02\xff.", "unknown opcode"),
        (b"\x80\x02T\xff\xff\xff\xff.", "negative length"),
        (b"\x80\x02\x97.", "PickleBuffer|buffer"),  # NEXT_BUFFER without buffers
        (b"\x80\x02h\x05.", "Memo|memo"),  # GET of an unknown entry
    ],
)
def test_scan_and_load_reject_malformed(data: bytes, match: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PickleRejected, match=match):
        load_inert(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_scan_walks_every_protocol() -> None:
    value = {"a": [1, 2.5, "x", b"y", (None, True)], "b": {3, 4}, "c": 2**100, "d": bytearray(b"z")}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert scan_pickle(pickle.dumps(value, protocol=protocol)) is False


def test_torch_pickle_is_recorded_not_rebuilt() -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    import zipfile

    data = zipfile.ZipFile(buf).read("archive/data.pkl")
    tree = load_inert(data)
    tensor = tree["w"]
    assert tensor.origin == ("torch._utils", "_rebuild_tensor_v2")
    (ref,) = list(iter_storage_refs(tree))
    assert isinstance(ref, StorageRef)
    assert ref.pid[0] == "storage" and ref.pid[1].ref == ("torch", "FloatStorage")
    assert ref.pid[2:] == ("0", "cpu", 3)


def test_allowlist_is_a_subset_of_torchs_default_weights_only_globals() -> None:
    torch_allowed = set(wo._get_allowed_globals())
    ours = {f"{module}.{name}" for module, name in ALLOWED_GLOBALS}
    assert ours <= torch_allowed, sorted(ours - torch_allowed)


def test_storage_element_sizes_match_torch() -> None:
    allowed = wo._get_allowed_globals()
    for (module, name), size in STORAGE_TYPES.items():
        storage_type = allowed[f"{module}.{name}"]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        assert torch._utils._element_size(dtype) == size, name


def test_emitted_names_are_not_renamed_by_any_loader() -> None:
    for module, name in ALLOWED_GLOBALS:
        assert (module, name) not in _compat_pickle.NAME_MAPPING
        assert module not in _compat_pickle.IMPORT_MAPPING
        assert module not in torch._utils.IMPORT_MAPPING


def roundtrip(value: Any, protocol: int = 2) -> tuple[bytes, Any]:
    """Pickle ``{"meta": value, "dropped": ...}``, read it inert, write "meta" back, and load
    the result with torch's weights_only unpickler."""
    raw = pickle.dumps({"meta": value, "dropped": collections.Counter("ab")}, protocol=protocol)
    tree = load_inert(raw)
    found = top_level(tree)
    assert found is not None
    mapping, ordered = found
    writer = PickleWriter(lambda ref: pytest.fail("no storages expected"))
    writer.begin_root(tree, ordered)
    writer.save("meta")
    writer.save(mapping["meta"])
    out = writer.end_root()
    return out, wo.Unpickler(io.BytesIO(out), encoding="utf-8").load()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**600), 2**600)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(min_size=1, max_size=20)
    | st.complex_numbers(allow_nan=False)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children)
        | st.tuples(children, children, children, children)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=5)
        | st.dictionaries(st.text(max_size=5), children, max_size=5).map(collections.OrderedDict)
        | st.sets(st.integers() | st.text(max_size=5), max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from([2, 4, 5]))
def test_allowed_values_roundtrip_through_weights_only(value: Any, protocol: int) -> None:
    out, loaded = roundtrip(value, protocol)
    assert loaded == {"meta": value}
    assert pickle.loads(out) == {"meta": value}


def test_shared_and_recursive_containers_stay_shared() -> None:
    shared = [1, 2]
    loop: list[Any] = [shared]
    loop.append(loop)
    _, loaded = roundtrip({"a": shared, "b": shared, "loop": loop})
    meta = loaded["meta"]
    assert meta["a"] is meta["b"] is meta["loop"][0]
    assert meta["loop"][1] is meta["loop"]


def test_output_uses_only_opcodes_weights_only_knows() -> None:
    import pickletools

    out, _ = roundtrip({"x": [1, -1, 70000, 2**40, 1.5, "s", b"b", {1}, 1j, (1, 2, 3, 4)]}, 4)
    known = {"PROTO", "STOP", "GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID", "MARK", "TUPLE",
             "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "APPEND",
             "APPENDS", "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1",
             "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "BINPUT", "LONG_BINPUT", "BINGET",
             "LONG_BINGET"}  # fmt: skip
    assert {op.name for op, _, _ in pickletools.genops(out)} <= known


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (b"", "builtins.bytes"),  # protocol 2 pickles b"" as builtins.bytes()
        (frozenset({1}), "builtins.frozenset"),
        (collections.deque([1]), "collections.deque"),
        (Path("/x"), "pathlib.PosixPath"),
    ],
)
def test_globals_outside_the_allowlist_are_refused(value: Any, refused: str) -> None:
    with pytest.raises(GlobalRefused, match=refused.replace(".", r"\.")):
        roundtrip(value)


def test_values_weights_only_cannot_read_are_refused() -> None:
    nested: Any = 0
    for _ in range(300):
        nested = [nested]
    with pytest.raises(NotRepresentable, match="nested"):
        roundtrip(nested)
    cell: list[Any] = []
    cycle = (cell,)
    cell.append(cycle)
    with pytest.raises(NotRepresentable, match="tuple that contains itself"):
        roundtrip(cycle)
    with pytest.raises(NotRepresentable, match="LONG1"):
        roundtrip(2**4000)
    kwargs = load_inert(wrap(b"ctorch\nSize\n)}" + _u("a") + b"K\x01s\x92"))
    with pytest.raises(NotRepresentable, match="keyword"):
        PickleWriter(lambda ref: ()).save(kwargs)


def test_ordered_dict_with_metadata_survives() -> None:
    sd = collections.OrderedDict(a=1)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    _, loaded = roundtrip(sd)
    assert type(loaded["meta"]) is collections.OrderedDict
    assert loaded["meta"] == sd and loaded["meta"]._metadata == sd._metadata


def test_top_level_must_be_a_mapping() -> None:
    assert top_level(load_inert(pickle.dumps([1, 2], protocol=2))) is None
    mapping, ordered = top_level(load_inert(pickle.dumps(collections.OrderedDict(a=1))))
    assert ordered and mapping == {"a": 1}
