"""Legacy-format torch files (``_use_new_zipfile_serialization=False``): read with the
restricted unpickler, slimmed to a zip artifact or to safetensors, and judged complete only
when every storage is there (``ckptd/slim/legacy.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckptd.layouts.mmengine import MMEngineLayout
from ckptd.slim.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptd.slim.safetensors_writer import write_safetensors
from ckptd.slim.slimmer import looks_complete, slim_checkpoint
from tests.faults.hostile import PLACEHOLDER, _str, payloads, place
from tests.helpers import assert_same_state_dict, checkpoints, cli, manifest, simulate, write_config
from tests.integration.test_safetensors import assert_equal_tensors, flatten
from tests.integration.test_slim import DROPPED_MARK, mmengine_like


def save_legacy(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    ckpt = mmengine_like()
    ckpt["meta"].pop("extras")  # bytes: safetensors refuses them (tests/integration/...)
    return save_legacy(ckpt, tmp_path_factory.mktemp("legacy") / "epoch_3.pth"), ckpt


def test_slim_to_zip_loads_weights_only_and_equals(
    legacy: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    src, ckpt = legacy
    result = slim_checkpoint(src, tmp_path, "best.pth")
    assert result.kept_keys == ("meta", "state_dict")
    assert "message_hub" in result.dropped_keys and result.meta["epoch"] == 3
    out = torch.load(tmp_path / "best.pth", weights_only=True)
    assert_same_state_dict(out["state_dict"], ckpt["state_dict"])
    sd = out["state_dict"]
    assert sd["head.weight"].data_ptr() == sd["emb.weight"].data_ptr()  # still tied
    assert out["meta"] == ckpt["meta"]
    assert DROPPED_MARK in src.read_bytes()  # a storage of the optimizer state: not copied
    assert DROPPED_MARK not in (tmp_path / "best.pth").read_bytes()


def test_slim_to_safetensors(legacy: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, ckpt = legacy
    write_safetensors(src, tmp_path, "best.safetensors", keep_keys=("meta", "state_dict"))
    assert_equal_tensors(load_file(tmp_path / "best.safetensors"), flatten(ckpt["state_dict"]))


def test_complete_only_when_every_storage_is_there(
    legacy: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    src, _ = legacy
    data = src.read_bytes()
    assert looks_complete(src) is True
    assert MMEngineLayout().format_check(src) == (True, "")
    cut = tmp_path / "cut.pth"
    step = max(1, len(data) // 97)
    for length in [*range(0, len(data), step), len(data) - 1]:
        cut.write_bytes(data[:length])
        assert looks_complete(cut) is False, length
        with pytest.raises(CorruptCheckpointError, match=str(cut)):
            slim_checkpoint(cut, tmp_path, "x.pth")
    cut.write_bytes(data + b"\0")
    assert looks_complete(cut) is False
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pth") and n != "cut.pth"]


@pytest.mark.parametrize("where", ["meta", "state_dict", "message_hub", "top level"])
def test_hostile_payloads_never_run(tmp_path: Path, where: str) -> None:
    template = {
        "meta": {"epoch": 1},
        "state_dict": {"w": torch.ones(3)},
        "message_hub": {"log": [1]},
    }
    marker = tmp_path / "marker"
    for kind, body in payloads(marker).items():
        src = save_legacy(place(template, where), tmp_path / "staged.pth")
        data = src.read_bytes()
        assert data.count(_str(PLACEHOLDER)) == 1
        src.write_bytes(data.replace(_str(PLACEHOLDER), body))
        assert looks_complete(src) is True, kind  # inert: complete, never run
        if where in ("message_hub", "top level"):  # dropped keys: written without them
            slim_checkpoint(src, tmp_path, f"{len(kind)}.pth")
            continue
        with pytest.raises(UnsafeCheckpointError, match=str(src)):
            slim_checkpoint(src, tmp_path, "x.pth")
        with pytest.raises(UnsafeCheckpointError):
            write_safetensors(src, tmp_path, "x.safetensors", keep_keys=("meta", "state_dict"))
    assert not marker.exists()


def test_cli_slims_a_legacy_file(legacy: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, ckpt = legacy
    code, _, err = cli("slim", str(src), "-o", str(tmp_path / "slim.pth"))
    assert code == 0, err
    loaded = torch.load(tmp_path / "slim.pth", weights_only=True)
    assert_same_state_dict(loaded["state_dict"], ckpt["state_dict"])


def test_once_slims_a_legacy_best(tmp_path: Path) -> None:
    """An MMEngine work_dir whose checkpoints are legacy files: judged complete, best slimmed."""
    work_dir = simulate(tmp_path / "work_dirs" / "run", epochs=3)
    for name in checkpoints(work_dir):
        path = work_dir / name
        stat = path.stat()
        save_legacy(torch.load(path, weights_only=False), path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_config(tmp_path, artifact={"format": "safetensors"})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    (entry,) = manifest(work_dir / "best")["artifacts"].values()
    source = torch.load(work_dir / entry["source_checkpoint"], weights_only=False)
    got = load_file(work_dir / "best" / entry["file"])
    assert_equal_tensors(got, flatten(source["state_dict"]))


def test_trainer_facts_read_from_legacy_files(tmp_path: Path) -> None:
    """What layouts read from a checkpoint (peek) is the same for both formats."""
    from ckptd.core.model import FileStat
    from ckptd.layouts.lightning_ckpt import read_facts
    from ckptd.layouts.mmengine_hub import read_hub

    work_dir = simulate(tmp_path / "run", epochs=2)
    name = checkpoints(work_dir)[-1]
    zip_hub = read_hub(work_dir, name)
    save_legacy(torch.load(work_dir / name, weights_only=False), work_dir / name)
    assert zip_hub is not None and read_hub(work_dir, name) == zip_hub
    ckpt = {
        "epoch": 4,
        "global_step": 50,
        "state_dict": {"w": torch.ones(2)},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {
            "best_model_score": torch.tensor(0.75), "best_model_path": "x.ckpt",
            "monitor": "val_acc", "mode": "max"}},
    }  # fmt: skip
    facts = []
    for i, save in enumerate((torch.save, save_legacy)):
        path = tmp_path / f"{i}.ckpt"
        save(ckpt, path)
        facts.append(read_facts(path, FileStat.of(os.stat(path))))
    assert facts[0] is not None and facts[0] == facts[1]


def test_damaged_legacy_files_fail_cleanly(tmp_path: Path) -> None:
    """Random byte changes anywhere: a SlimError naming the file or an artifact, never else."""
    import random

    from ckptd.slim.errors import SlimError

    src = save_legacy(
        {"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(3, 2).t()}, "opt": {"m": [1]}},
        tmp_path / "l.pth",
    )
    data, rng = src.read_bytes(), random.Random(0)
    damaged, written = tmp_path / "m.pth", 0
    (tmp_path / "out").mkdir()
    for _ in range(200):
        b = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            b[rng.randrange(len(b))] = rng.randrange(256)
        damaged.write_bytes(bytes(b))
        looks_complete(damaged)
        for write in (slim_checkpoint, write_safetensors):
            try:
                write(damaged, tmp_path / "out", "o", keep_keys=("meta", "state_dict"))
            except SlimError as exc:
                assert str(damaged) in str(exc)
            else:
                (tmp_path / "out" / "o").unlink()
                written += 1
    assert written  # changes to bytes of tensors or strings still give an artifact
