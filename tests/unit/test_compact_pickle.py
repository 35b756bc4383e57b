"""Streaming ``data.pkl`` reads (``ckptd.slim.safepickle.compact_pickle``): long payloads stay
in the file as ``Blob`` nodes, everything else behaves exactly like ``load_inert``."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.slim import safepickle
from ckptd.slim.errors import CorruptCheckpointError, SlimError
from ckptd.slim.picklewriter import PickleWriter
from ckptd.slim.safepickle import (
    Blob,
    PickleRejected,
    PickleTooLarge,
    StorageRef,
    compact_pickle,
    load_compacted,
    load_inert,
    top_level,
)
from ckptd.slim.slimmer import slim_checkpoint


def reader(data: bytes):  # type: ignore[no-untyped-def]
    return lambda offset, size: data[offset : offset + size]


def write_meta(tree: Any) -> bytes:
    mapping, ordered = top_level(tree) or pytest.fail("not a mapping")
    writer = PickleWriter(lambda ref: pytest.fail("no storages expected"))
    writer.begin_root(tree, ordered)
    writer.save("meta")
    writer.save(mapping["meta"])
    return writer.end_root()


def outcome(tree: Any) -> bytes | str:
    """What the writer makes of the tree's "meta", or the name of what it raised."""
    try:
        return write_meta(tree)
    except Exception as exc:  # e.g. b"" pickles as builtins.bytes(), which it refuses
        return type(exc).__name__


@pytest.fixture
def small_blobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every str/bytes of 8+ bytes becomes a blob; the stream moves in 16-byte chunks."""
    monkeypatch.setattr(safepickle, "BLOB_MIN", 8)
    monkeypatch.setattr(safepickle, "_STREAM_CHUNK", 16)


texts = st.text(min_size=0, max_size=40)
leaves = st.none() | st.integers() | st.floats(allow_nan=False) | texts | st.binary(max_size=40)
values = st.recursive(
    leaves | st.binary(max_size=40).map(bytearray),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(texts, children, max_size=4)
        | st.dictionaries(texts, children, max_size=3).map(collections.OrderedDict)
    ),
    max_leaves=20,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values, values, st.sampled_from([2, 4, 5]))
def test_same_tree_as_load_inert(small_blobs: None, meta: Any, dropped: Any, protocol: int) -> None:
    shared = "shared-long-string"
    raw = pickle.dumps({"meta": [meta, shared, shared], "dropped": [dropped, shared]}, protocol)
    compacted = compact_pickle(reader(raw), len(raw), max_out=len(raw) + 4096)
    assert compacted.crc32 == zlib.crc32(raw)
    tree = load_compacted(compacted, reader(raw))
    assert outcome(tree) == outcome(load_inert(raw))
    kept = top_level(tree)[0]["meta"]  # type: ignore[index]
    assert kept[1] is kept[2]  # memoized blobs stay shared


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x80\x02K\x01r\x00\x00\x00\x10.", "memo index"),
        (b"\x80\x02K\x01p99999999999\n.", "memo index"),
        (b"\x80\x02K\x01p-1\n.", "memo index"),
        (b"\x80\x02K\x01", "truncated"),
        (b"\x80\x02cos\nsys", "truncated"),
        (b"\x80\x02\xff.", "unknown opcode"),
        (b"\x80\x02T\xff\xff\xff\xff.", "negative length"),
        (b"\x80\x02X\x00\x00\x00\x01ab.", "truncated"),
    ],
)
def test_malformed_is_rejected(small_blobs: None, data: bytes, match: str) -> None:
    with pytest.raises(PickleRejected, match=match):
        load_compacted(compact_pickle(reader(data), len(data), 1 << 20), reader(data))


def test_structure_limit(small_blobs: None) -> None:
    raw = pickle.dumps({"meta": list(range(1000)), "x": "y" * 10_000}, 2)
    with pytest.raises(PickleTooLarge):
        compact_pickle(reader(raw), len(raw), max_out=500)
    assert len(compact_pickle(reader(raw), len(raw), max_out=4000).data) < 4000  # blob left out


def test_a_blob_marker_cannot_be_forged() -> None:
    one = pickle.dumps("z" * 100_000, 2)
    real = compact_pickle(reader(one), len(one), 1 << 20)
    assert real.blobs
    forged = b"\x80\x02" + b"X" + struct.pack("<I", len(real.token) + 1) + real.token.encode()
    forged += b"0Q."
    tree = load_compacted(compact_pickle(reader(forged), len(forged), 1 << 20), reader(forged))
    assert type(tree) is StorageRef and tree.pid == real.token + "0"


def test_a_huge_dropped_payload_is_streamed_past(tmp_path: Path) -> None:
    """A 96 MiB string (a long run's message hub) costs the reader about one chunk."""
    path = tmp_path / "big.pkl"
    size = 96 << 20
    with open(path, "wb") as f:
        f.write(b"\x80\x02}q\x00(X\x04\x00\x00\x00metaq\x01K\x07X\x03\x00\x00\x00hubq\x02")
        f.write(b"X" + struct.pack("<I", size))
        block = os.urandom(1 << 20).hex().encode()[: 1 << 20]
        for _ in range(size >> 20):
            f.write(block)
        f.write(b"q\x03u.")
    fd = os.open(path, os.O_RDONLY)
    try:

        def read(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        tracemalloc.start()
        compacted = compact_pickle(read, path.stat().st_size, 1 << 20)
        tree = load_compacted(compacted, read)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        os.close(fd)
    assert peak < 8 << 20, peak
    assert tree["meta"] == 7
    assert type(tree["hub"]) is Blob and tree["hub"].size == size


def _torch_checkpoint(path: Path, cfg: str, hub: bytes) -> None:
    meta = {"epoch": 3, "cfg": cfg}
    torch.save({"meta": meta, "state_dict": {"w": torch.arange(6.0)}, "hub": hub}, path)


def test_slim_keeps_a_long_meta_string_and_drops_a_long_hub(tmp_path: Path) -> None:
    src = tmp_path / "c.pth"
    cfg = "model = dict(type='X')\n" * 20_000  # ~460 KB: a blob that is written out
    _torch_checkpoint(src, cfg, b"\x00\xff" * 300_000)
    result = slim_checkpoint(src, tmp_path, "slim.pth")
    loaded = torch.load(result.path, weights_only=True)
    assert loaded["meta"] == {"epoch": 3, "cfg": cfg}
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(6.0))
    assert result.meta == {"epoch": 3}  # long strings are not manifest material


@pytest.mark.parametrize("where", ["meta", "hub"])
def test_a_flipped_byte_in_a_blob_is_a_crc_error(tmp_path: Path, where: str) -> None:
    src = tmp_path / "c.pth"
    _torch_checkpoint(src, "a" * 200_000, b"b" * 200_000)
    with zipfile.ZipFile(src) as archive:
        info = archive.getinfo("c/data.pkl")
        data = archive.read(info)
    raw = src.read_bytes()
    start = raw.index(data)
    needle = b"aaaa" if where == "meta" else b"bbbb"
    offset = start + data.index(needle) + 1000
    with open(src, "r+b") as f:
        f.seek(offset)
        f.write(b"!")
    with pytest.raises(CorruptCheckpointError, match=r"CRC mismatch in c/data\.pkl"):
        slim_checkpoint(src, tmp_path, "slim.pth")


def test_unpickler_sees_the_same_objects_as_pickle(small_blobs: None) -> None:
    value = {"meta": ["long string here", b"long bytes here", bytearray(b"long bytearray")]}
    for protocol in (2, 4, 5):
        raw = pickle.dumps(value, protocol)
        tree = load_compacted(compact_pickle(reader(raw), len(raw), 1 << 20), reader(raw))
        loaded = pickle.loads(write_meta(tree))
        assert loaded == {"meta": value["meta"]}
        assert [type(v) for v in loaded["meta"]] == [str, bytes, bytearray]


def test_a_kept_blob_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "c.pth"
    _torch_checkpoint(src, "a" * 100_000, b"")
    with zipfile.ZipFile(src) as archive:
        data = archive.read("c/data.pkl")
    bad = data.replace(b"a" * 100_000, b"\xff" * 100_000)
    raw = src.read_bytes().replace(data, bad)
    crc = zlib.crc32(bad).to_bytes(4, "little")
    raw = raw.replace(zlib.crc32(data).to_bytes(4, "little"), crc)  # keep the CRC right
    src.write_bytes(raw)
    with pytest.raises(SlimError, match="not valid UTF-8"):
        slim_checkpoint(src, tmp_path, "slim.pth")
    assert not (tmp_path / "slim.pth").exists()
