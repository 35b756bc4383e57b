"""DeepSpeed checkpoints inside the trainers' work_dirs: MMEngine FlexibleRunner's
``epoch_N.pth/`` folders, Lightning's DeepSpeedStrategy ``*.ckpt/`` folders, Hugging Face
``checkpoint-N/`` of a ZeRO-3 run without gathered weights.

Those trainers run DeepSpeed only on CUDA, so the shards come from real DeepSpeed engines on CPU
called with the arguments each trainer passes (``deepspeed_real.py --layouts``), and the
trainers' own small files beside them are written in their documented format; the names say
``documented_format``. Oracles: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` and
Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import manifest, once_ok

pytestmark = [pytest.mark.trainer]
torch = pytest.importorskip("torch")
zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")


def work_dir(deepspeed_saves: Path, tmp_path: Path, layout: str) -> Path:
    out = tmp_path / "work_dirs" / layout
    shutil.copytree(deepspeed_saves / layout, out)
    pointer = out / "last_checkpoint"
    if pointer.exists():  # MMEngine writes absolute paths
        pointer.write_text(str(out / Path(pointer.read_text()).name))
    return out


def assert_equal_state_dicts(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_mmengine_flexible_runner_deepspeed_documented_format(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    out = work_dir(deepspeed_saves, tmp_path, "mmengine")
    expected = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(out), "epoch_1.pth")
    text = once_ok(tmp_path)
    assert "[mmengine]" in text
    # keep_last 2 of the folders, each deleted whole once the best (epoch 1) is consolidated
    assert sorted(p.name for p in out.glob("epoch_*.pth")) == ["epoch_2.pth", "epoch_3.pth"]
    entry = manifest(out / "best")["artifacts"]["accuracy"]
    assert entry["source_checkpoint"] == "epoch_1.pth" and entry["epoch"] == 1
    saved = torch.load(out / "best" / entry["file"], weights_only=True)
    assert_equal_state_dicts(saved["state_dict"], expected)
    assert saved["meta"]["epoch"] == 1 and saved["meta"]["iter"] == 2


def test_mmengine_folder_still_being_saved_is_neither_read_nor_deleted(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    out = work_dir(deepspeed_saves, tmp_path, "mmengine")
    (out / "last_checkpoint").write_text(str(out / "epoch_2.pth"))  # epoch 3 is being saved
    shard = out / "epoch_1.pth" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(shard, shard.stat().st_size // 2)  # and the best's rank 1 is short
    text = once_ok(tmp_path, retention={"keep_last": 1})
    print(text)
    assert (out / "epoch_3.pth").is_dir() and (out / "epoch_1.pth").is_dir()
    assert "last_checkpoint names" in text and "is not whole yet" in text
    assert not list(out.glob("best/*.pth"))  # the best's folder is not complete: no artifact


def test_lightning_deepspeed_strategy_folder_documented_format(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from ckptd.layouts.lightning import LightningLayout
    from ckptd.slim.artifact import ArtifactRequest

    folder = deepspeed_saves / "lightning" / "checkpoints" / "epoch=2-step=6.ckpt"
    layout = LightningLayout()
    assert layout.format_check(folder) == (True, "")
    writer = layout.artifact_output("torch")[0]
    written = writer.write(ArtifactRequest(folder, tmp_path, "best.pth", ("state_dict",)))
    expected = convert_zero_checkpoint_to_fp32_state_dict(folder, tmp_path / "lightning.pt")
    saved = torch.load(written.path, weights_only=True)
    assert_equal_state_dicts(saved["state_dict"], expected["state_dict"])
    assert saved["meta"]["epoch"] == 2 and saved["meta"]["global_step"] == 6


def test_hf_checkpoint_of_zero3_run_is_consolidated_documented_format(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    out = work_dir(deepspeed_saves, tmp_path, "hf")
    expected = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2"))
    text = once_ok(tmp_path)
    assert "[hf]" in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    entry = manifest(out / "best")["artifacts"]["eval_accuracy"]
    assert entry["source_checkpoint"] == "checkpoint-2" and entry["file"].endswith(".pth")
    saved = torch.load(out / "best" / entry["file"], weights_only=True)
    assert_equal_state_dicts(saved["state_dict"], expected)
