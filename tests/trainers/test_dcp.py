"""torch distributed checkpoint (DCP) folders, written for real by ``torchrun`` on CPU (gloo).

``tests/trainers/dcp_real.py all`` runs once per session (two ranks): FSDP2 ``fully_shard``
(dim-0 shards), DTensors sharded along dim 1 (re-laid row by row), a ``no_dist`` plain save,
and a Lightning sharded folder written by Lightning's own ``FSDPStrategy.save_checkpoint``
(the real ``Trainer`` refuses FSDP without a GPU, so the tests whose name says
``lightning_save_code`` drive that save code by hand). The oracle of every consolidated
artifact is the library's own tool: ``dcp_to_torch_save`` (and Lightning's
``consolidate_checkpoint``), loaded with torch and compared tensor for tensor.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.slim import dcp
from ckptd.slim.dcp_writer import consolidate
from ckptd.slim.errors import CorruptCheckpointError, SlimError, UnsafeMetadataError
from tests.helpers import REPO, cli, load_full, load_weights_only, write_config

HARNESS = REPO / "tests" / "trainers" / "dcp_real.py"
CKPTS = "lightning_logs/version_0/checkpoints"
pytestmark = pytest.mark.trainer


def torchrun(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``torchrun`` of the harness in the background, its output in ``log`` (not a pipe that
    could fill up while nobody reads it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", str(HARNESS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def tail(log: Path) -> str:
    return log.read_bytes()[-4000:].decode(errors="replace")


@pytest.fixture(scope="session")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Any]]:
    """One torchrun launch for the session: the checkpoints of every mode, then the ranks
    wait to write a staggered Lightning folder where ``go`` says (or 'skip')."""
    out = tmp_path_factory.mktemp("dcp")
    go = out / ".go"
    log = out.parent / "torchrun.log"
    proc = torchrun("all", str(out), "--then-wait-for", str(go), "--delay-rank1", "6", log=log)
    try:
        deadline = time.monotonic() + 600
        while not (out / ".static-done").exists():
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.2)
        yield out, go, proc
    finally:
        if not go.exists():
            go.write_text("skip")
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="session")
def written(launch: tuple[Path, Path, Any]) -> Path:
    return launch[0]


def copy_of(written: Path, name: str, dest: Path) -> Path:
    shutil.copytree(written / name, dest)
    return dest


def reference(folder: Path, tmp_path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{folder.name}-reference.pth"
    dcp_to_torch_save(folder, out)
    return load_full(out)


def assert_same(got: Any, want: Any, where: str = "") -> int:
    """Equal tree; tensors by torch.equal, dtype and shape. Returns the tensors compared."""
    import torch

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
        return 1
    if isinstance(want, dict):
        assert list(got) == list(want), where
        return sum(assert_same(got[k], want[k], f"{where}.{k}") for k in want)
    if isinstance(want, list | tuple):
        assert len(got) == len(want), where
        return sum(
            assert_same(g, w, f"{where}[{i}]")
            for i, (g, w) in enumerate(zip(got, want, strict=True))
        )
    assert got == want, where
    return 0


@pytest.mark.parametrize(
    ("name", "tensors"), [("fsdp2", 24), ("dtensor", 6), ("plain", 7)], ids=str
)
def test_real_dcp_consolidates_to_what_dcp_to_torch_save_writes(
    written: Path, tmp_path: Path, name: str, tensors: int
) -> None:
    folder = written / name
    assert dcp.recognise(folder) and dcp.complete(folder) == (True, "")
    want = reference(folder, tmp_path)
    result = consolidate(folder, tmp_path, "all.pth", ["*"])
    got = load_weights_only(result.path)  # no code runs on load either
    assert assert_same(got, want) == tensors
    assert result.kept_keys == tuple(want)


@pytest.mark.parametrize("name", ["fsdp2", "dtensor", "plain"])
def test_real_dcp_to_safetensors_holds_the_model_tensors(
    written: Path, tmp_path: Path, name: str
) -> None:
    from safetensors.torch import load_file

    folder = written / name
    want = reference(folder, tmp_path)["model"]
    result = consolidate(folder, tmp_path, "model.safetensors", ["model"], "safetensors")
    got = load_file(result.path)
    assert assert_same(dict(sorted(got.items())), dict(sorted(want.items()))) == len(want)


def test_lightning_save_code_folder_is_consolidated_like_lightning_does(
    written: Path, tmp_path: Path
) -> None:
    folder = written / "lightning" / "epoch=1-step=20.ckpt"
    # what python -m lightning.pytorch.utilities.consolidate_checkpoint does, in-process
    from lightning.fabric.utilities.consolidate_checkpoint import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    want = _format_checkpoint(_load_distributed_checkpoint(folder))
    code, stdout, err = cli("slim", str(folder), "-o", str(tmp_path / "slim.ckpt"))
    assert code == 0, stdout + err
    got = load_weights_only(tmp_path / "slim.ckpt")
    assert list(got) == ["state_dict", "pytorch-lightning_version", "hyper_parameters"]
    assert assert_same(got["state_dict"], want["state_dict"]) == len(want["state_dict"])
    assert got["hyper_parameters"] == want["hyper_parameters"]


def lightning_work_dir(written: Path, root: Path, steps: list[int]) -> Path:
    work_dir = root / "work_dirs" / "run"
    ckpts = work_dir / CKPTS
    ckpts.mkdir(parents=True)
    source = written / "lightning" / "epoch=1-step=20.ckpt"
    for step in steps:
        shutil.copytree(source, ckpts / f"epoch={step // 10}-step={step}.ckpt")
    rows = "".join(f"{step // 10},{step - 1},{0.5 - step / 1000}\n" for step in steps)
    (work_dir / "lightning_logs/version_0/metrics.csv").write_text("epoch,step,val_loss\n" + rows)
    return work_dir


def test_lightning_save_code_work_dir_retention_and_artifact(written: Path, tmp_path: Path) -> None:
    work_dir = lightning_work_dir(written, tmp_path, [10, 20, 30])
    write_config(tmp_path, best={"metric": "val_loss"}, retention={"keep_last": 1})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    # the newest is the best too (val_loss falls): one folder left, deleted whole
    assert sorted(os.listdir(work_dir / CKPTS)) == ["epoch=3-step=30.ckpt"]
    artifact = work_dir / "best" / "best_val_loss_step_30.ckpt"
    want = load_full(written / "lightning" / "epoch=1-step=20.ckpt" / "meta.pt")
    got = load_weights_only(artifact)
    assert got["hyper_parameters"] == want["hyper_parameters"]
    assert set(got["state_dict"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# --- hostile and broken inputs: refused with the file and the reason, nothing deleted ---


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def break_folder(folder: Path, how: str, marker: Path) -> None:
    if how == "code-running .metadata":
        (folder / ".metadata").write_bytes(pickle.dumps({"x": Payload(marker)}))
    elif how == "shard missing":
        (folder / "__1_0.distcp").unlink()
    elif how == "shard short":
        path = folder / "__1_0.distcp"
        os.truncate(path, path.stat().st_size - 100)
    elif how == "chunks overlap":
        overlap_chunks(folder)


def overlap_chunks(folder: Path) -> None:
    """Move rank 1's chunk of the first 2-d weight one row up, over rank 0's (storage too)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    fqn = next(k for k, v in meta.state_dict_metadata.items() if len(getattr(v, "size", ())) == 2)
    chunks = meta.state_dict_metadata[fqn].chunks
    old = chunks[1].offsets
    new = type(old)([old[0] - 1, *old[1:]])
    chunks[1] = ChunkStorageMetadata(offsets=new, sizes=chunks[1].sizes)
    key = next(k for k in meta.storage_data if k.fqn == fqn and k.offset == old)
    meta.storage_data[MetadataIndex(fqn, new, key.index)] = meta.storage_data.pop(key)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


BROKEN = {
    "code-running .metadata": "references posix.system",
    "shard missing": "__1_0.distcp, named by .metadata, is missing",
    "shard short": "__1_0.distcp is ",
    "chunks overlap": "overlaps another rank's chunk",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_folder_is_refused_naming_file_and_reason(
    written: Path, tmp_path: Path, how: str
) -> None:
    folder = copy_of(written, "fsdp2", tmp_path / "ck")
    marker = tmp_path / "pwned"
    break_folder(folder, how, marker)
    code, _, err = cli("slim", str(folder), "-o", str(tmp_path / "out.pth"))
    assert code != 0 and BROKEN[how] in err and str(folder) in err, err
    assert not (tmp_path / "out.pth").exists() and not marker.exists()
    if how == "chunks overlap":
        with pytest.raises(CorruptCheckpointError, match=r"ck/\.metadata: is refused: the chunk"):
            consolidate(folder, tmp_path, "x.pth", ["model"])
    elif how == "code-running .metadata":
        with pytest.raises(UnsafeMetadataError, match=r"ck/.metadata: references posix.system"):
            dcp.DcpFolder(folder)
    else:
        with pytest.raises(SlimError):
            dcp.DcpFolder(folder)


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_folder_in_a_work_dir_is_never_deleted(
    written: Path, tmp_path: Path, how: str
) -> None:
    work_dir = lightning_work_dir(written, tmp_path, [10, 20, 30])
    broken = work_dir / CKPTS / "epoch=1-step=10.ckpt"
    marker = tmp_path / "pwned"
    break_folder(broken, how, marker)
    write_config(tmp_path, best={"metric": "val_loss"}, retention={"keep_last": 1})
    _, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert broken.is_dir() and not marker.exists(), out + err
    assert not (work_dir / CKPTS / "epoch=2-step=20.ckpt").exists()  # the sound one goes
    assert BROKEN[how].split(",")[0] in out, out  # listed as not complete, with the reason


# --- two ranks writing at different moments ---


def test_folder_is_neither_read_nor_deleted_until_metadata_lands(
    launch: tuple[Path, Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, go, proc = launch
    work_dir = lightning_work_dir(written, tmp_path, [10, 20])
    write_config(tmp_path, best={"metric": "val_loss"}, retention={"keep_last": 1})
    opened: list[Path] = []
    original = dcp.DcpFolder.__init__

    def recording(self: dcp.DcpFolder, path: Path) -> None:
        opened.append(Path(path))
        original(self, path)

    monkeypatch.setattr(dcp.DcpFolder, "__init__", recording)
    new = work_dir / CKPTS / "epoch=9-step=99.ckpt"
    go.write_text(str(new))  # the session's ranks write it now, rank 1 six seconds late
    deadline = time.monotonic() + 120
    while not (new / "__0_0.distcp").exists():  # rank 0 done, rank 1 still waiting
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    passes = 0
    while not (new / ".metadata").exists() and passes < 3:
        code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
        assert code == 0, out + err
        assert new.is_dir() and "no .metadata yet" in out, out
        assert not any(p.name == new.name for p in opened)
        passes += 1
    assert passes, "rank 1 finished before ckptd could look"
    assert proc.wait(timeout=180) == 0, tail(written.parent / "torchrun.log")
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    assert new.name in out and "no .metadata yet" not in out, out
    assert new.name in os.listdir(work_dir / CKPTS)  # the newest complete one now
    assert not (work_dir / CKPTS / "epoch=1-step=10.ckpt").exists()


def test_lightning_save_code_folder_waits_for_meta_pt(written: Path, tmp_path: Path) -> None:
    """Lightning's rank 0 writes meta.pt after the shards and .metadata: until then the folder
    is not complete, and retention leaves it alone."""
    work_dir = lightning_work_dir(written, tmp_path, [10, 20, 30])
    waiting = work_dir / CKPTS / "epoch=1-step=10.ckpt"
    (waiting / "meta.pt").unlink()
    write_config(tmp_path, best={"metric": "val_loss"}, retention={"keep_last": 1})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    assert waiting.is_dir() and "no complete meta.pt yet" in out, out
    assert not (work_dir / CKPTS / "epoch=2-step=20.ckpt").exists()
