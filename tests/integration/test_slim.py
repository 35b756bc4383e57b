"""Slimming real torch checkpoints (``ckptd.slim.slimmer``, ``ckptd.slim.torchzip``,
``ckptd.slim.copyhash``)."""

from __future__ import annotations

import collections
import copyreg
import errno
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.serialization import config as torch_config

import ckptd.slim.source as source_module
from ckptd.fs.durable import TEMP_PREFIX
from ckptd.slim.errors import (
    ArtifactWriteError,
    CheckpointChangedError,
    CorruptCheckpointError,
    MissingKeysError,
    SlimError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ckptd.slim.slimmer import looks_complete, slim_checkpoint
from tests.faults.hostile import payloads as hostile_payloads

DROPPED_MARK = b"DROPPED-STORAGE!"
PLACEHOLDER = "@@CKPTD-PAYLOAD@@"


class RunInfo:
    """A custom class in message_hub, as trainers store them."""

    def __init__(self) -> None:
        self.note = "custom"


class Evil:
    """Runs ``touch marker`` when a normal unpickler loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: two keys, one storage


def mmengine_like(extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    from mmengine.logging import MessageHub

    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.head(model.bn(model.fc(model.emb(torch.arange(4))))).sum().backward()
    opt.step()
    sd = model.state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd.update(
        {
            "extra.base": base,
            "extra.strided": base[:, ::2],
            "extra.transposed": base.t(),
            "extra.offset": base[1:],
            "extra.bf16": torch.randn(5).to(torch.bfloat16),
            "extra.fp16": torch.randn(2, 3).to(torch.float16),
            "extra.int64": torch.arange(-3, 3),
            "extra.bool": torch.tensor([True, False, True]),
            "extra.empty": torch.empty(0, 3),
            "extra.scalar": torch.tensor(3.5),
            "extra.param": nn.Parameter(torch.randn(2, 2)),
            "extra.uint16": torch.tensor([1, 2, 3, 60000], dtype=torch.int32).to(torch.uint16),
            "extra.float8": torch.randn(4).to(torch.float8_e4m3fn),
            "extra.complex": torch.randn(2, dtype=torch.complex64),
        }
    )
    hub = MessageHub.get_instance("ckptd-test")
    hub.update_scalar("train/loss", 0.25)
    hub.update_info("np_array", np.arange(4))
    hub.update_info("run", RunInfo())
    optimizer = opt.state_dict()
    optimizer["ckptd_mark"] = torch.frombuffer(bytearray(DROPPED_MARK * 8), dtype=torch.uint8)
    meta: dict[str, Any] = {
        "epoch": 3,
        "iter": 300,
        "cfg": "model = dict(type='Tiny')\n",
        "seed": 42,
        "experiment_name": "exp",
        "time": "20240101_000000",
        "mmengine_version": "0.10.7",
        "dataset_meta": {"classes": ("cat", "dog"), "palette": [(1, 2, 3), (4, 5, 6)]},
        "extras": {"shape": torch.Size([2, 3]), "dtype": torch.float16, "blob": b"\x00\xff"},
        "ids": {1, 2},
        "counts": collections.Counter("aab"),
    }
    meta.update(extra_meta or {})
    return {
        "meta": meta,
        "state_dict": sd,
        "message_hub": hub.state_dict(),
        "optimizer": optimizer,
        "param_schedulers": [torch.optim.lr_scheduler.StepLR(opt, 3).state_dict()],
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "epoch_3.pth"
    torch.save(mmengine_like(), path)
    return path


@pytest.fixture
def src(ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the checkpoint that a test may damage."""
    path = tmp_path / "work" / "epoch_3.pth"
    path.parent.mkdir()
    path.write_bytes(ckpt.read_bytes())
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    return folder


def load_ways(path: Path) -> Iterator[tuple[str, Any]]:
    yield "plain", torch.load(path, weights_only=True)
    yield "mmap", torch.load(path, weights_only=True, mmap=True)
    # torch computes storage offsets from the miniz layout instead of reading local headers;
    # TORCH_SERIALIZATION_DEBUG makes it check them against the headers.
    old_env = os.environ.get("TORCH_SERIALIZATION_DEBUG")
    os.environ["TORCH_SERIALIZATION_DEBUG"] = "1"
    torch_config.load.calculate_storage_offsets = True
    try:
        yield "offsets", torch.load(path, weights_only=True, mmap=True)
    finally:
        torch_config.load.calculate_storage_offsets = False
        if old_env is None:
            del os.environ["TORCH_SERIALIZATION_DEBUG"]
        else:
            os.environ["TORCH_SERIALIZATION_DEBUG"] = old_env


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert type(got) is type(want), name
    assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (
        want.dtype,
        want.shape,
        want.stride(),
        want.storage_offset(),
    ), name
    assert bytes(got.untyped_storage()) == bytes(want.untyped_storage()), name
    if want.dtype not in (torch.float8_e4m3fn,):
        assert torch.equal(got, want), name


def assert_state_dict_equal(got: Any, want: Any) -> None:
    assert type(got) is collections.OrderedDict
    assert list(got) == list(want)
    assert got._metadata == want._metadata
    for name, tensor in want.items():
        assert_bit_identical(got[name], tensor, name)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_roundtrip_loads_safely_and_bit_identical(ckpt: Path, dest: Path) -> None:
    full = torch.load(ckpt, weights_only=False)
    result = slim_checkpoint(ckpt, dest, "best.pth")
    out = dest / "best.pth"
    assert result.path == out and listing(dest) == ["best.pth"]
    assert result.kept_keys == ("meta", "state_dict")
    assert result.dropped_keys == ("message_hub", "optimizer", "param_schedulers")
    assert result.size == out.stat().st_size < ckpt.stat().st_size
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.meta["epoch"] == 3 and result.meta["iter"] == 300
    assert result.source_stat.size == ckpt.stat().st_size
    assert out.stat().st_mode & 0o777 == 0o644
    for way, loaded in load_ways(out):
        assert list(loaded) == ["meta", "state_dict"], way
        assert loaded["meta"] == full["meta"], way
        assert_state_dict_equal(loaded["state_dict"], full["state_dict"])
        sd = loaded["state_dict"]
        assert isinstance(sd["extra.param"], nn.Parameter)
        ptr = [sd[k].untyped_storage().data_ptr() for k in ("emb.weight", "head.weight")]
        assert ptr[0] == ptr[1], way
        views = ("extra.base", "extra.strided", "extra.transposed", "extra.offset")
        assert len({sd[k].untyped_storage().data_ptr() for k in views}) == 1, way


def test_only_storages_of_kept_keys_are_copied(ckpt: Path, dest: Path) -> None:
    result = slim_checkpoint(ckpt, dest, "best.pth")
    data = (dest / "best.pth").read_bytes()
    assert DROPPED_MARK not in data
    assert DROPPED_MARK in ckpt.read_bytes()
    full = torch.load(ckpt, weights_only=False)
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in full["state_dict"].values()}  # fmt: skip
    with zipfile.ZipFile(dest / "best.pth") as archive:
        storages = [i for i in archive.infolist() if "/data/" in i.filename]
        assert archive.testzip() is None
    assert len(storages) == len(kept)
    assert sum(i.file_size for i in storages) == sum(kept.values())
    # every top-level key of the source is accounted for: kept, or dropped with its storages
    assert (*result.kept_keys, *result.dropped_keys) == (
        "meta",
        "state_dict",
        "message_hub",
        "optimizer",
        "param_schedulers",
    )


def test_layout_matches_torch_save(tmp_path: Path, dest: Path) -> None:
    """Keeping every key reproduces torch.save's records, numbering, order, alignment and
    miniz header style."""
    ckpt = tmp_path / "safe.pth"
    full = mmengine_like()
    del full["message_hub"]
    torch.save(full, ckpt)
    slim_checkpoint(ckpt, dest, "best.pth", keep_keys=list(full))
    with zipfile.ZipFile(ckpt) as a, zipfile.ZipFile(dest / "best.pth") as b:
        names_a = [i.filename.split("/", 1)[1] for i in a.infolist()]
        names_b = [i.filename.split("/", 1)[1] for i in b.infolist()]
        assert names_a == names_b
        for ia, ib in zip(a.infolist(), b.infolist(), strict=True):
            assert (ia.flag_bits, ia.compress_type, ia.create_version) == (
                ib.flag_bits,
                ib.compress_type,
                ib.create_version,
            )
            if "/data/" in ia.filename:
                assert (ia.CRC, ia.file_size) == (ib.CRC, ib.file_size)
                assert b.read(ib) == a.read(ia)
    raw = (dest / "best.pth").read_bytes()
    with zipfile.ZipFile(dest / "best.pth") as b:
        for info in b.infolist():
            nlen, elen = struct.unpack_from("<HH", raw, info.header_offset + 26)
            assert (info.header_offset + 30 + nlen + elen) % 64 == 0


def test_real_mmengine_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    work_dir = tmp_path_factory.mktemp("mmengine")
    script = textwrap.dedent(
        """
        import sys, torch, torch.nn as nn
        from mmengine.evaluator import BaseMetric
        from mmengine.model import BaseModel
        from mmengine.runner import Runner

        class Net(BaseModel):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)
                self.bn = nn.BatchNorm1d(2)
            def forward(self, inputs, labels, mode="tensor"):
                out = self.bn(self.fc(inputs))
                if mode == "loss":
                    return {"loss": nn.functional.cross_entropy(out, labels)}
                return [(out.argmax(1) == labels).float()] if mode == "predict" else out

        class Data(torch.utils.data.Dataset):
            metainfo = dict(classes=("cat", "dog"))
            def __len__(self):
                return 16
            def __getitem__(self, i):
                return dict(inputs=torch.randn(4), labels=i % 2)

        class Acc(BaseMetric):
            def process(self, data_batch, data_samples):
                self.results.extend(x.tolist() for x in data_samples)
            def compute_metrics(self, results):
                flat = [v for r in results for v in r]
                return dict(accuracy=sum(flat) / len(flat))

        loader = dict(dataset=Data(), batch_size=4, collate_fn=dict(type="default_collate"),
                      sampler=dict(type="DefaultSampler", shuffle=False))
        Runner(
            model=Net(), work_dir=sys.argv[1], train_dataloader=loader, val_dataloader=loader,
            val_evaluator=dict(type=Acc), val_cfg=dict(),
            train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
            param_scheduler=dict(type="MultiStepLR", milestones=[1]),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1,
                                               save_best="auto")),
            default_scope="mmengine",
        ).train()
        """
    )
    subprocess.run([sys.executable, "-c", script, str(work_dir)], check=True, capture_output=True)
    source = work_dir / "epoch_2.pth"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(source, weights_only=True)  # why the slim artifact exists
    full = torch.load(source, weights_only=False)
    assert {"message_hub", "optimizer", "param_schedulers"} <= set(full)
    assert looks_complete(source) is True
    result = slim_checkpoint(source, work_dir, lambda sha: f"best_accuracy_epoch_2-{sha[:8]}.pth")
    assert result.path.name == f"best_accuracy_epoch_2-{result.sha256[:8]}.pth"
    for _, loaded in load_ways(result.path):
        assert loaded["meta"] == full["meta"]
        assert loaded["meta"]["dataset_meta"]["classes"] == ("cat", "dog")
        assert_state_dict_equal(loaded["state_dict"], full["state_dict"])


def inject(source: Path, target: Path, body: bytes) -> Path:
    """Copy a torch checkpoint, replacing the pickled PLACEHOLDER string by raw opcodes."""
    with zipfile.ZipFile(source) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    encoded = PLACEHOLDER.encode()
    placeholder = b"X" + struct.pack("<I", len(encoded)) + encoded
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert data.count(placeholder) == 1
                data = data.replace(placeholder, body)
            archive.writestr(name, data)
    return target


def _u(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def raw_payloads(marker: Path) -> dict[str, bytes]:
    """The opcode payloads of tests/faults/hostile.py, plus EXT2 through the copyreg registry."""
    shared = hostile_payloads(marker)
    return {
        "GLOBAL": shared["GLOBAL+REDUCE"],
        "STACK_GLOBAL": shared["STACK_GLOBAL+REDUCE"],
        "INST": shared["INST"],
        "OBJ": shared["OBJ"],
        "NEWOBJ+BUILD": shared["NEWOBJ+BUILD"],
        "EXT2": b"\x83" + struct.pack("<H", 31337) + _u(f"touch {marker}") + b"\x85R",
    }


@pytest.fixture
def os_system_extension() -> Iterator[None]:
    copyreg.add_extension("os", "system", 31337)
    copyreg._extension_cache[31337] = os.system  # type: ignore[attr-defined]
    yield
    copyreg.remove_extension("os", "system", 31337)


def place(ckpt: dict[str, Any], where: str, payload: Any) -> None:
    if where == "_metadata":
        ckpt["state_dict"]._metadata[""]["hidden"] = payload
    elif where in ("meta", "state_dict"):
        ckpt[where]["hidden"] = payload
    else:
        ckpt[where]["hidden"] = [payload]


@pytest.mark.usefixtures("os_system_extension")
@pytest.mark.parametrize("where", ["message_hub", "optimizer", "meta", "state_dict", "_metadata"])
@pytest.mark.parametrize("payload", ["__reduce__", *raw_payloads(Path("/x"))])
def test_hostile_pickles(tmp_path: Path, dest: Path, where: str, payload: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = mmengine_like()
    place(ckpt, where, Evil(marker) if payload == "__reduce__" else PLACEHOLDER)
    path = tmp_path / "epoch_1.pth"
    torch.save(ckpt, path)
    if payload != "__reduce__":
        path = inject(path, tmp_path / "epoch_2.pth", raw_payloads(marker)[payload])
    if where in ("message_hub", "optimizer"):
        result = slim_checkpoint(path, dest, "best.pth")
        assert set(torch.load(result.path, weights_only=True)) == {"meta", "state_dict"}
    else:
        with pytest.raises(UnsafeCheckpointError) as caught:
            slim_checkpoint(path, dest, "best.pth")
        message = str(caught.value)
        key = "state_dict" if where == "_metadata" else where
        assert str(path) in message and f"key {key!r}" in message
        assert any(g in message for g in ("posix.system", "os.system", "argparse.Namespace"))
        assert "weights_only=True" in message and "keep_keys" in message
        assert listing(dest) == []
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    ["missing storage", "compressed", "overlapping", "memo bomb", "not a dict", "wrong magic"],
)
def test_bad_archives(ckpt: Path, tmp_path: Path, dest: Path, damage: str) -> None:
    path = tmp_path / "bad.pth"
    with zipfile.ZipFile(ckpt) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    method = zipfile.ZIP_DEFLATED if damage == "compressed" else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in records:
            if damage == "missing storage" and name.endswith("/data/0"):
                continue
            if name.endswith("/data.pkl") and damage == "memo bomb":
                data = data[:-1] + b"r\xff\xff\xff\x7f."
            if name.endswith("/data.pkl") and damage == "not a dict":
                data = b"\x80\x02]q\x00(K\x01K\x02e."
            archive.writestr(name, data)
    if damage == "overlapping":
        raw = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            infos = {i.filename.split("/", 1)[1]: i for i in archive.infolist()}
        eocd = raw.rindex(b"PK\x05\x06")
        (cd_offset,) = struct.unpack_from("<I", raw, eocd + 16)
        at = raw.index(infos["data/1"].filename.encode(), cd_offset) - 46
        struct.pack_into("<I", raw, at + 42, infos["data/0"].header_offset)
        path.write_bytes(bytes(raw))
    if damage == "wrong magic":
        path.write_bytes(b"\x00" * 4096)
    expected: type[SlimError] = CorruptCheckpointError
    if damage in ("compressed", "not a dict"):
        expected = UnsupportedFormatError
    with pytest.raises(expected) as caught:
        slim_checkpoint(path, dest, "best.pth")
    assert str(path) in str(caught.value)
    assert listing(dest) == []


def test_truncated_checkpoints(src: Path, dest: Path) -> None:
    data = src.read_bytes()
    for length in [0, 10, 100, len(data) // 2, len(data) - 98, len(data) - 22, len(data) - 1]:
        src.write_bytes(data[:length])
        with pytest.raises(CorruptCheckpointError, match=r"complete zip|not a torch") as caught:
            slim_checkpoint(src, dest, "best.pth")
        assert str(src) in str(caught.value)
        assert listing(dest) == []


def _storage_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name))
    nlen, elen = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + nlen + elen


@pytest.mark.parametrize(("record", "error"), [("data/0", "CRC mismatch"), ("data.pkl", "CRC")])
def test_bad_crc(src: Path, dest: Path, record: str, error: str) -> None:
    offset = _storage_offset(src, record)
    with open(src, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=error) as caught:
        slim_checkpoint(src, dest, "best.pth")
    assert str(src) in str(caught.value)
    assert listing(dest) == []


def test_missing_key(ckpt: Path, dest: Path) -> None:
    with pytest.raises(MissingKeysError) as caught:
        slim_checkpoint(ckpt, dest, "best.pth", keep_keys=("meta", "ema_state_dict"))
    message = str(caught.value)
    assert str(ckpt) in message and "ema_state_dict" in message and "message_hub" in message
    assert listing(dest) == []


def test_torchscript_format(tmp_path: Path, dest: Path) -> None:
    # the legacy format is read: tests/integration/test_legacy.py
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), script)
    with pytest.raises(UnsupportedFormatError, match="TorchScript"):
        slim_checkpoint(script, dest, "best.pth")
    assert listing(dest) == []


@pytest.mark.parametrize("change", ["append", "truncate", "touch", "replace"])
def test_source_changing_while_read(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    real = os.copy_file_range
    calls = []

    def meddle(*args: Any) -> int:
        if not calls:
            if change == "append":
                with open(src, "ab") as f:
                    f.write(b"more")
            elif change == "truncate":
                os.truncate(src, 0)
            elif change == "touch":
                os.utime(src, ns=(1, 1))
            else:
                other = src.with_name("other.pth")
                other.write_bytes(src.read_bytes())
                os.replace(other, src)
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", meddle)
    with pytest.raises(CheckpointChangedError) as caught:
        slim_checkpoint(src, dest, "best.pth")
    assert str(src) in str(caught.value)
    assert listing(dest) == []


def test_vanished_source(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(CheckpointChangedError, match="disappeared"):
        slim_checkpoint(tmp_path / "gone.pth", dest, "best.pth")


@pytest.mark.parametrize("how", ["EXDEV", "ENOSYS", "missing"])
def test_copy_fallback_gives_identical_output(
    ckpt: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    reference = slim_checkpoint(ckpt, dest, "a.pth").sha256
    if how == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:

        def refuse(*args: Any) -> int:
            raise OSError(getattr(errno, how), os.strerror(getattr(errno, how)))

        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr("ckptd.slim.copyhash.READ_CHUNK", 7)  # many partial reads and writes
    assert slim_checkpoint(ckpt, dest, "b.pth").sha256 == reference
    assert (dest / "a.pth").read_bytes() == (dest / "b.pth").read_bytes()


def test_hash_named_output_progress_and_determinism(ckpt: Path, dest: Path) -> None:
    calls: list[tuple[int, int]] = []
    umask = os.umask(0o077)
    try:
        first = slim_checkpoint(
            ckpt,
            dest,
            lambda sha: f"best_x_epoch_4-{sha[:8]}.pth",
            progress=lambda *a: calls.append(a),
        )
    finally:
        os.umask(umask)
    assert first.path.name == f"best_x_epoch_4-{first.sha256[:8]}.pth"
    assert first.path.stat().st_mode & 0o777 == 0o644
    assert listing(dest) == [first.path.name]
    assert calls[-1] == (first.size, first.size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    second = slim_checkpoint(ckpt, dest, "again.pth")
    assert second.sha256 == first.sha256


def test_name_and_destination_errors(ckpt: Path, dest: Path) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        slim_checkpoint(ckpt, dest, lambda sha: "../escape.pth")
    with pytest.raises(ValueError, match="plain file name"):
        slim_checkpoint(ckpt, dest, f"{TEMP_PREFIX}x.pth")
    with pytest.raises(ValueError, match="replace its source"):
        slim_checkpoint(ckpt, ckpt.parent, ckpt.name)
    with pytest.raises(ArtifactWriteError, match="No such file") as caught:
        slim_checkpoint(ckpt, dest / "missing", "best.pth")
    assert str(ckpt) in str(caught.value)
    with pytest.raises(RuntimeError, match="stop"):
        slim_checkpoint(ckpt, dest, "best.pth", progress=lambda *a: (_ for _ in ()).throw(
            RuntimeError("stop")))  # fmt: skip
    assert listing(dest) == []


def test_a_cancel_token_stops_the_slim_and_leaves_nothing(ckpt: Path, dest: Path) -> None:
    from ckptd.core.cancel import Cancelled, CancelToken

    stop = CancelToken(lambda: True, "ckptd is stopping")
    with pytest.raises(Cancelled, match="ckptd is stopping"):
        slim_checkpoint(ckpt, dest, "best.pth", cancel=stop)
    assert listing(dest) == []
    going_on = CancelToken(lambda: False, "never")
    assert slim_checkpoint(ckpt, dest, "best.pth", cancel=going_on).path == dest / "best.pth"


def test_absurd_pickle_is_refused(ckpt: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CorruptCheckpointError, match="refuses"):
        slim_checkpoint(ckpt, dest, "best.pth")


def test_looks_complete(src: Path, tmp_path: Path) -> None:
    data = src.read_bytes()
    assert looks_complete(src) is True
    for length in range(len(data) - 1, -1, -1):
        os.truncate(src, length)
        assert looks_complete(src) is False, length
    # MMEngine rewrites epoch_N.pth in place (open 'wb', write): incomplete until the last byte.
    with open(src, "wb") as f:
        for start in range(0, len(data), 4096):
            f.write(data[start : start + 4096])
            f.flush()
            assert looks_complete(src) is (start + 4096 >= len(data))
    assert looks_complete(tmp_path / "missing.pth") is False
    (tmp_path / "junk").write_bytes(os.urandom(1000))
    assert looks_complete(tmp_path / "junk") is False
    zipped = tmp_path / "plain.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}.")
    assert looks_complete(zipped) is True


def test_daemon_path_never_imports_torch_or_numpy(ckpt: Path, dest: Path) -> None:
    code = (
        "import sys; from ckptd.slim.slimmer import slim_checkpoint, looks_complete;"
        f"slim_checkpoint({str(ckpt)!r}, {str(dest)!r}, 'x.pth'); looks_complete({str(ckpt)!r});"
        "bad = [m for m in ('torch', 'numpy', 'mmengine') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


meta_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(min_size=1, max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta_values)
def test_meta_values_roundtrip(value: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pth"
        torch.save({"meta": {"v": value}, "state_dict": {"w": torch.ones(2)}, "opt": 1}, path)
        result = slim_checkpoint(path, tmp, "s.pth")
        assert torch.load(result.path, weights_only=True)["meta"] == {"v": value}


@pytest.mark.parametrize(
    ("storage_type", "error", "match"),
    [
        (b"cos\nsystem\n", UnsafeCheckpointError, "os.system"),
        (b"ctorch\nfloat32\n", UnsupportedFormatError, "not a torch storage type"),
    ],
)
def test_forged_storage_ids(
    tmp_path: Path, dest: Path, storage_type: bytes, error: type[SlimError], match: str
) -> None:
    path = tmp_path / "forged.pth"
    torch.save({"meta": {"x": PLACEHOLDER}, "state_dict": {}}, tmp_path / "plain.pth")
    pid = b"(" + _u("storage") + storage_type + _u("0") + _u("cpu") + b"K\x01tQ"
    inject(tmp_path / "plain.pth", path, pid)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("plain/data/0", b"\0\0\0\0")
    with pytest.raises(error, match=match):
        slim_checkpoint(path, dest, "best.pth")
    assert listing(dest) == []


def _hwm_kib(stdout: str) -> int:
    return int(next(line for line in stdout.splitlines() if line.startswith("VmHWM")).split()[1])


@pytest.mark.slow
def test_large_zip64_checkpoint_in_bounded_memory(tmp_path: Path) -> None:
    """> 4 GiB storage and offsets past 4 GiB (zip64 everywhere); peak RSS <= 64 MiB."""
    big = torch.zeros(4_400_000_000, dtype=torch.uint8)
    big[:16] = torch.frombuffer(bytearray(b"head-of-storage!"), dtype=torch.uint8)
    big[-16:] = torch.frombuffer(bytearray(b"tail-of-storage!"), dtype=torch.uint8)
    path = tmp_path / "big.pth"
    state = collections.OrderedDict(big=big, after=torch.arange(5.0))
    torch.save({"meta": {"epoch": 1}, "state_dict": state, "optimizer": {"x": torch.ones(3)}}, path)
    del big, state
    code = (
        "import sys; from ckptd.slim.slimmer import slim_checkpoint;"
        "r = slim_checkpoint(sys.argv[1], sys.argv[2], 'slim.pth'); print(r.seconds);"
        "print(open('/proc/self/status').read())"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), str(tmp_path)],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        path.unlink()  # 4.4 GB each: do not leave them to pytest's rotation
    try:
        assert _hwm_kib(done.stdout) <= 64 * 1024, done.stdout
        for _, loaded in load_ways(tmp_path / "slim.pth"):
            sd = loaded["state_dict"]
            assert bytes(sd["big"][:16]) == b"head-of-storage!"
            assert bytes(sd["big"][-16:]) == b"tail-of-storage!"
            assert torch.equal(sd["after"], torch.arange(5.0))
            del sd, loaded
    finally:
        (tmp_path / "slim.pth").unlink()
