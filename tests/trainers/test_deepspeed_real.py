"""DeepSpeed ZeRO 1/2/3 checkpoints written by real engines on CPU, consolidated by ckptd.

The folders come from ``deepspeed_real.py`` (DeepSpeed's own ``save_checkpoint`` under
``torchrun --nproc-per-node 2``, ``DS_ACCELERATOR=cpu``, gloo); the oracle is DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint``. Hostile and broken copies of those folders must
be refused naming the file and the reason, with no code run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.slim.artifact import ArtifactRequest
from ckptd.slim.errors import CorruptCheckpointError, SlimError, UnsafeShardError
from ckptd.slim.sharded import sharded_format

pytestmark = [pytest.mark.trainer]
deepspeed = pytest.importorskip("deepspeed")
torch = pytest.importorskip("torch")
zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")

HERE = Path(__file__).parent
STAGES = (1, 2, 3)
# The ``deepspeed_saves`` fixture (tests/trainers/conftest.py) is the folder of real saves.


def consolidate(folder: Path, dest: Path, fmt: str = "torch") -> Path:
    found = sharded_format(folder)
    assert found is not None and found.kind == "deepspeed"
    name = "model" + found.suffix(fmt)
    return found.writer(fmt).write(ArtifactRequest(folder, dest, name, ("meta", "state_dict"))).path


def load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("stage", STAGES)
def test_real_engine_consolidation_equals_deepspeeds_own(
    deepspeed_saves: Path, tmp_path: Path, stage: int, fmt: str
) -> None:
    save_dir = deepspeed_saves / f"zero{stage}"
    expected = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(save_dir))
    for folder in (save_dir, save_dir / "global_step6"):  # via 'latest', and the tag itself
        got = load(consolidate(folder, tmp_path, fmt))
        assert list(got) == list(expected)
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
            assert torch.equal(got[key], tensor), key
        (tmp_path / ("model.pth" if fmt == "torch" else "model.safetensors")).unlink()
    older = load(consolidate(save_dir / "global_step2", tmp_path, fmt))
    expected2 = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(save_dir), "global_step2")
    assert all(torch.equal(older[k], v) for k, v in expected2.items())


def test_real_engine_meta_and_tied_weights(deepspeed_saves: Path, tmp_path: Path) -> None:
    saved = torch.load(consolidate(deepspeed_saves / "zero3", tmp_path), weights_only=True)
    assert saved["meta"]["zero_stage"] == 3 and saved["meta"]["dp_world_size"] == 2
    assert saved["meta"]["global_steps"] == 6 and saved["meta"]["epoch"] == 3
    sd = saved["state_dict"]
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()  # tied, as torch.save
    assert sd["scale"].dtype == torch.float32 and sd["seen"].dtype == torch.int64


def test_real_engine_folders_are_complete_and_every_shard_counts(deepspeed_saves: Path) -> None:
    fmt = sharded_format(deepspeed_saves / "zero3")
    assert fmt is not None
    for stage in STAGES:
        assert fmt.complete(deepspeed_saves / f"zero{stage}") == (True, "")
        assert fmt.complete(deepspeed_saves / f"zero{stage}" / "global_step2") == (True, "")


def broken_copy(deepspeed_saves: Path, tmp_path: Path, stage: int = 3) -> Path:
    copy = tmp_path / "save_dir"
    shutil.copytree(deepspeed_saves / f"zero{stage}", copy)
    return copy / "global_step6"


def assert_refused(folder: Path, dest: Path, error: type[SlimError], *words: str) -> SlimError:
    fmt = sharded_format(folder)
    assert fmt is not None
    with pytest.raises(error) as caught:
        consolidate(folder, dest)
    text = str(caught.value)
    for word in words:
        assert word in text, text
    assert not [p for p in dest.iterdir() if p.is_file()], "no partial output stays"
    return caught.value


class Payload:
    """Runs ``touch MARKER`` when unpickled by a loader that executes pickled calls."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["zero_pp_rank_0_mp_rank_00_model_states.pt", "optim"])
def test_hostile_code_running_payload_is_refused_unrun(
    deepspeed_saves: Path, tmp_path: Path, which: str
) -> None:
    tag = broken_copy(deepspeed_saves, tmp_path)
    name = which if which != "optim" else "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(tag / name, weights_only=False)
    state["innocent"] = Payload(marker)
    torch.save(state, tag / name)
    out = tmp_path / "out"
    out.mkdir()
    error = assert_refused(tag, out, UnsafeShardError, name, "innocent", "posix.system")
    assert Path(error.path) == tag / name
    assert not marker.exists()


def test_missing_shard_is_incomplete_and_refused(deepspeed_saves: Path, tmp_path: Path) -> None:
    tag = broken_copy(deepspeed_saves, tmp_path)
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    fmt = sharded_format(tag)
    assert fmt is not None
    ok, why = fmt.complete(tag)
    assert not ok and "rank 1" in why
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(tag, out, CorruptCheckpointError, str(tag), "rank 1")


def test_short_shard_is_incomplete_and_refused(deepspeed_saves: Path, tmp_path: Path) -> None:
    tag = broken_copy(deepspeed_saves, tmp_path)
    shard = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(shard, shard.stat().st_size - 300)
    fmt = sharded_format(tag)
    assert fmt is not None
    ok, why = fmt.complete(tag)
    assert not ok and shard.name in why
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(tag, out, CorruptCheckpointError, shard.name)


def test_damaged_shard_bytes_fail_the_crc(deepspeed_saves: Path, tmp_path: Path) -> None:
    tag = broken_copy(deepspeed_saves, tmp_path, stage=2)
    shard = tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    from ckptd.slim.source import CheckpointSource
    from ckptd.slim.tensors import tensor_view

    source = CheckpointSource(shard)
    try:
        group = source.mapping["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
        view = tensor_view(group)  # the fp32 partition the consolidation reads
        assert view is not None
        start = source.archive.data_offset(source.archive.entries[f"data/{view.storage_key}"])
    finally:
        source.close()
    data = bytearray(shard.read_bytes())
    data[start + 8] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SlimError) as caught:
        consolidate(tag, out)
    assert shard.name in str(caught.value) and "CRC" in str(caught.value)


@pytest.mark.parametrize("tag", ["../../outside", "/etc", "global_step6/../../x"])
def test_latest_naming_a_folder_outside_is_refused(
    deepspeed_saves: Path, tmp_path: Path, tag: str
) -> None:
    save_dir = broken_copy(deepspeed_saves, tmp_path).parent
    (save_dir / "latest").write_text(tag)
    fmt = sharded_format(save_dir)
    assert fmt is not None
    ok, why = fmt.complete(save_dir)
    assert not ok and "latest" in why
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(save_dir, out, SlimError, "latest", "outside")


def test_cli_slim_folder_is_the_streaming_zero_to_fp32(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "slim", str(deepspeed_saves / "zero2"), "-o", str(out),
         "--format", "safetensors"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_saves / "zero2"))
    got = load(out)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_tag_newer_than_latest_is_still_being_saved(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    tag = broken_copy(deepspeed_saves, tmp_path)  # global_step6
    (tag.parent / "latest").write_text("global_step4")  # rank 0 has not written it yet
    fmt = sharded_format(tag)
    assert fmt is not None
    ok, why = fmt.complete(tag)
    assert not ok and "global_step4" in why
    assert fmt.complete(tag.parent / "global_step2") == (True, "")


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
def test_consolidation_peak_rss_stays_under_64_mib(tmp_path: Path) -> None:
    """A 128 MiB model (ZeRO 3, 2 ranks, DeepSpeed's format): the process's own peak RSS."""
    save_dir = tmp_path / "save_dir"
    repo = HERE.parent.parent
    subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "make_deepspeed.py"), str(save_dir),
         "--params", str(32 << 20), "--hidden", "512"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    out = tmp_path / "model.pth"
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "ckptd", "slim", str(save_dir),
         "-o", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    assert out.stat().st_size > 128 << 20
    assert peak_kib < 64 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
