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


def test_deepspeed_save_dir_on_its_own(deepspeed_saves: Path, tmp_path: Path) -> None:
    from ckptd.layouts import detect_layouts
    from ckptd.layouts.deepspeed import DeepSpeedLayout

    out = work_dir(deepspeed_saves, tmp_path, "zero2")
    assert detect_layouts(out) == ["deepspeed"]
    layout = DeepSpeedLayout()
    candidates, skipped = layout.list_checkpoints(out)
    names = {c.name for c in candidates}
    assert names == {"global_step2", "global_step4", "global_step6"} and not skipped
    assert layout.resume_target(out, names) == ("global_step6", "")
    assert all(layout.format_check(out / n) == (True, "") for n in names)
    (out / "latest").write_text("global_step4")  # global_step6 is being saved
    assert layout.format_check(out / "global_step6")[0] is False
    assert "[deepspeed]" in once_ok(tmp_path)


def test_hostile_best_folder_holds_every_deletion(deepspeed_saves: Path, tmp_path: Path) -> None:
    from tests.helpers import cli, write_config

    out = work_dir(deepspeed_saves, tmp_path, "mmengine")
    shard = out / "epoch_1.pth" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    state = torch.load(shard, weights_only=False)
    marker = tmp_path / "code-ran"
    state["message_hub"] = Payload(marker)
    torch.save(state, shard)
    write_config(tmp_path, retention={"keep_last": 1})
    code, text, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code != 0 and shard.name in text + err and "message_hub" in text + err
    assert sorted(p.name for p in out.glob("epoch_*.pth")) == [
        "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]  # fmt: skip
    assert not marker.exists()


class Payload:
    """Runs ``touch MARKER`` when unpickled by a loader that executes pickled calls."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_hf_checkpoint_with_model_file_is_copied_not_consolidated(
    deepspeed_saves: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    out = work_dir(deepspeed_saves, tmp_path, "hf")
    weights = {"w": torch.arange(6.0)}  # ZeRO 1/2, or gathered 16-bit weights: a model file
    save_file(weights, out / "checkpoint-2" / "model.safetensors")
    once_ok(tmp_path)
    entry = manifest(out / "best")["artifacts"]["eval_accuracy"]
    artifact = out / "best" / entry["file"]
    assert artifact.is_dir() and (artifact / "model.safetensors").is_file()
