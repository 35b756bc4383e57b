"""The mmcv 1.x (MMDetection 2.x) layout: a real mmcv 1.7 runner, and hand-made files.

The ``test_real_*`` tests train with mmcv's own ``EpochBasedRunner`` (``tests/trainers/
mmcv_real.py``) and compare ckptd with mmcv's ``EvalHook(save_best=...)``. The others write a
work_dir to the format mmcv 1.x writes (``epoch_N.pth`` via ``torch.save`` with ``meta`` holding
``CLASSES`` and ``hook_msgs``; ``latest.pth`` a relative symlink to the newest checkpoint; per
launch a ``<timestamp>.log.json`` whose first line is the run's meta, then ``"mode": "train"``
lines and, after each checkpoint, a ``"mode": "val"`` line with the 1-based ``epoch``, the val
loader length as ``iter``, ``lr``, the metrics and the ``bbox_mAP_copypaste`` string), for
cases a real run cannot produce on demand (bad records, a copied ``latest.pth``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.layouts import LayoutError, choose_layout, detect_layouts
from ckptd.layouts.mmcv import MMCVLayout
from tests.helpers import (
    REPO,
    assert_same_state_dict,
    checkpoints,
    cli,
    load_full,
    load_weights_only,
    manifest,
    once_ok,
    run_harness,
    write_config,
)

HARNESS = REPO / "tests" / "trainers" / "mmcv_real.py"

CLASSES = ("person", "bicycle", "car")
# strict maximum at epoch 4; the tie at epoch 6 must not win (mmcv compares with '>')
VALUES = (0.3, 0.45, 0.4, 0.5, 0.48, 0.5, 0.46, 0.49)


def launch(work_dir: Path, timestamp: str, epochs: range, values: tuple[float, ...]) -> None:
    """One mmcv 1.x launch: checkpoints, the latest.pth symlink and <timestamp>.log.json."""
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(epochs.start)
    log = work_dir / f"{timestamp}.log.json"
    meta_line = {
        "env_info": "sys.platform: linux\nPython: 3.8.10\nPyTorch: 1.12.1",
        "config": "model = dict(type='RetinaNet')\n",
        "seed": 0,
        "exp_name": "retinanet_r50_fpn_1x_coco.py",
    }
    with log.open("a") as f:
        f.write(json.dumps(meta_line) + "\n")
    for epoch in epochs:
        with log.open("a") as f:
            for it in (50, 100):
                train = {"mode": "train", "epoch": epoch, "iter": it, "lr": 0.01, "memory": 2200}
                train |= {"data_time": 0.05, "loss_cls": 0.8, "loss_bbox": 0.5, "loss": 1.3}
                f.write(json.dumps({**train, "time": 0.4}) + "\n")
        state_dict = {"backbone.weight": torch.randn(4, 3), "bbox_head.bias": torch.randn(3)}
        best = max(values[:epoch])
        checkpoint = {
            "meta": {
                "mmcv_version": "1.7.1",
                "time": "Mon Jan  1 12:00:00 2024",
                "CLASSES": CLASSES,
                "epoch": epoch,
                "iter": epoch * 100,
                "hook_msgs": {
                    "last_ckpt": str(work_dir / f"epoch_{epoch}.pth"),
                    "best_score": best,
                },
                "config": "model = dict(type='RetinaNet')\n",
            },
            "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        }
        torch.save(checkpoint, work_dir / f"epoch_{epoch}.pth")
        latest = work_dir / "latest.pth"
        if latest.is_symlink():
            latest.unlink()
        os.symlink(f"epoch_{epoch}.pth", latest)  # mmcv.symlink(filename, dst): relative
        value = values[epoch - 1]
        val = {"mode": "val", "epoch": epoch, "iter": 625, "lr": 0.01, "bbox_mAP": value}
        val |= {"bbox_mAP_50": value + 0.2, "bbox_mAP_copypaste": f"{value} {value + 0.2} 0.1"}
        with log.open("a") as f:
            f.write(json.dumps(val) + "\n")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    work_dir = tmp_path / "work_dirs" / "retinanet"
    launch(work_dir, "20240101_120000", range(1, 7), VALUES)
    write_config(tmp_path)
    return work_dir


def once(run: Path) -> str:
    code, out, err = cli("once", "-c", str(run.parent.parent / "ckptd.yaml"))
    assert code == 0, out + err
    return out


def test_best_kept_set_and_artifact(run: Path) -> None:
    assert detect_layouts(run) == ["mmcv"]
    best = load_full(run / "epoch_4.pth")
    out = once(run)
    assert "[mmcv]" in out and "bbox_mAP = 0.5 (greater) at epoch 4" in out
    assert checkpoints(run) == ["epoch_5.pth", "epoch_6.pth"]
    assert os.readlink(run / "latest.pth") == "epoch_6.pth"
    artifact = run / "best" / "best_bbox_mAP_epoch_4.pth"  # EvalHook's name for it
    slim = load_weights_only(artifact)
    assert list(slim) == ["meta", "state_dict"]
    assert slim["meta"]["CLASSES"] == CLASSES and slim["meta"]["hook_msgs"]["best_score"] == 0.5
    assert_same_state_dict(slim["state_dict"], best["state_dict"])
    assert manifest(run / "best")["artifacts"]["bbox_mAP"]["epoch"] == 4


def test_resumed_launch_continues_and_the_pointer_target_survives(run: Path) -> None:
    once(run)
    launch(run, "20240102_080000", range(7, 9), VALUES)  # resume: a new .log.json
    os.unlink(run / "latest.pth")
    os.symlink("epoch_5.pth", run / "latest.pth")  # pointing somewhere older than the newest
    out = once(run)
    assert "bbox_mAP = 0.5 (greater) at epoch 4" in out  # 0.49 at epoch 8 is not better
    assert checkpoints(run) == ["epoch_5.pth", "epoch_7.pth", "epoch_8.pth"]
    assert "keep          epoch_5.pth" in out and "resume pointer of the trainer" in out
    assert (run / "latest.pth").is_symlink()


def test_meta_lines_strings_and_bad_records(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    launch(work_dir, "20240101_120000", range(1, 3), VALUES)
    with (work_dir / "20240101_120000.log.json").open("a") as f:
        f.write('{"mode": "val", "iter": 625, "bbox_mAP": 0.7}\n')
    read = MMCVLayout().read_evals(work_dir, {}, "epoch")
    assert [r.index for r in read.records] == [1, 2]
    assert list(read.records[0].metrics) == ["bbox_mAP", "bbox_mAP_50"]  # no lr, iter, strings
    (problem,) = read.problems
    assert problem.where == "20240101_120000.log.json:8" and "'epoch'" in problem.message


def test_val_workflow_lines_merge_across_passes(tmp_path: Path) -> None:
    # mmcv's two val lines of an epoch: EvalHook's, then the val workflow's (with 'time').
    log = tmp_path / "20240101_120000.log.json"
    evaluation = {"mode": "val", "epoch": 1, "iter": 2, "lr": 0.01, "bbox_mAP": 0.4}
    workflow = {"mode": "val", "epoch": 1, "iter": 2, "lr": 0.01, "loss": 0.7, "time": 0.1}
    log.write_text(json.dumps(evaluation) + "\n")
    layout = MMCVLayout()
    first = layout.read_evals(tmp_path, {}, "epoch")
    with log.open("a") as f:  # the second line arrives after a pass read the first
        f.write(json.dumps(workflow) + "\n")
        f.write(json.dumps({**workflow, "epoch": 2}) + "\n")  # eval interval 2: no EvalHook
    read = layout.read_evals(tmp_path, first.sources, "epoch")
    assert [(r.index, r.metrics, r.line) for r in read.records] == [
        (1, {"bbox_mAP": 0.4, "loss": 0.7}, 1)
    ]
    named = MMCVLayout(metrics=("loss",)).read_evals(tmp_path, {}, "epoch")
    assert [(r.index, list(r.metrics)) for r in named.records] == [
        (1, ["bbox_mAP", "loss"]),
        (2, ["loss"]),  # a val-loss-only epoch counts for a configured val loss
    ]


def test_latest_pth_copy_and_iteration_based_runs(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    launch(work_dir, "20240101_120000", range(1, 3), VALUES)
    os.unlink(work_dir / "latest.pth")
    (work_dir / "latest.pth").write_bytes((work_dir / "epoch_2.pth").read_bytes())
    layout = MMCVLayout()
    target, note = layout.resume_target(work_dir, {"epoch_1.pth", "epoch_2.pth"})
    assert target is None and "latest.pth is a copy" in note
    for n in (1, 2):
        os.rename(work_dir / f"epoch_{n}.pth", work_dir / f"iter_{n * 100}.pth")
    read = layout.read_evals(work_dir, {}, "iter")
    assert read.records == [] and not any(p.blocking for p in read.problems)
    assert "iteration-based" in read.problems[0].message


def test_mmengine_and_mmcv_are_told_apart(tmp_path: Path) -> None:
    mmcv_dir = tmp_path / "mmcv"
    launch(mmcv_dir, "20240101_120000", range(1, 2), VALUES)
    assert detect_layouts(mmcv_dir) == ["mmcv"]
    mmengine_dir = tmp_path / "mmengine"
    (mmengine_dir / "20240101_120000" / "vis_data").mkdir(parents=True)
    (mmengine_dir / "20240101_120000" / "vis_data" / "scalars.json").write_text("")
    assert detect_layouts(mmengine_dir) == ["mmengine"]
    (mmcv_dir / "last_checkpoint").write_text(str(mmcv_dir / "epoch_1.pth"))
    with pytest.raises(LayoutError, match=r"several trainers \(mmengine, mmcv\); set layout:"):
        choose_layout(mmcv_dir, "auto")
    assert isinstance(choose_layout(mmcv_dir, "mmcv"), MMCVLayout)


# --- a real mmcv 1.7 runner --------------------------------------------------------------


def real_run(root: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    work_dir = root / "work_dirs" / "run"
    return work_dir, run_harness(HARNESS, work_dir, *args)


def assert_artifact_is(work_dir: Path, key: str, epoch: int) -> None:
    entry = manifest(work_dir / "best")["artifacts"][key]
    assert entry["epoch"] == epoch, entry
    slim = load_weights_only(work_dir / "best" / f"best_{key}_epoch_{epoch}.pth")
    # EvalHook's own best file, which ckptd never touches: the weights of epoch N
    theirs = load_full(work_dir / f"best_{key}_epoch_{epoch}.pth")
    assert_same_state_dict(slim["state_dict"], theirs["state_dict"])


@pytest.mark.trainer
def test_real_val_workflow_lines_are_one_evaluation(tmp_path: Path) -> None:
    # Each epoch logs EvalHook's bbox_mAP line, then the val workflow's loss line.
    work_dir, result = real_run(tmp_path, "--epochs", "6", "--val-workflow")
    assert result["best_ckpt"] == "best_bbox_mAP_epoch_4.pth"
    lines = [json.loads(line) for line in next(work_dir.glob("*.log.json")).open()]
    val = [(d["epoch"], "time" in d, "bbox_mAP" in d) for d in lines if d.get("mode") == "val"]
    assert val[:2] == [(1, False, True), (1, True, False)]  # EvalHook's line first
    out = once_ok(tmp_path)  # metric: auto follows EvalHook(save_best='auto'): bbox_mAP
    assert "bbox_mAP = 0.5 (greater) at epoch 4" in out, out
    assert checkpoints(work_dir) == ["epoch_5.pth", "epoch_6.pth"]  # the artifact holds 4
    assert_artifact_is(work_dir, "bbox_mAP", 4)
    # a named metric: every evaluation has it; and the val loss from the workflow line
    out = once_ok(tmp_path, best={"metric": ["bbox_mAP", "loss"]})
    assert "has no metric" not in out and "bbox_mAP = 0.5 (greater) at epoch 4" in out, out


@pytest.mark.trainer
def test_real_best_follows_evalhook_when_the_log_rounds_a_tie(tmp_path: Path) -> None:
    # Epochs 2 and 4 differ in the 7th decimal: both are logged as 0.5, so the log alone
    # makes epoch 2 best (the earliest), while EvalHook compared 0.5000004 < 0.5000006.
    table = "bbox_mAP=0.3,0.5000004,0.4,0.5000006,0.45,0.5000005"
    work_dir, result = real_run(tmp_path, "--epochs", "6", "--tables", table)
    assert result["best_ckpt"] == "best_bbox_mAP_epoch_4.pth"
    assert result["best_score"] == 0.5000006
    log = next(work_dir.glob("*.log.json")).read_text().splitlines()
    logged = [json.loads(x)["bbox_mAP"] for x in log if '"bbox_mAP"' in x]
    assert logged == [0.3, 0.5, 0.4, 0.5, 0.45, 0.5]  # TextLoggerHook: round(v, 5)
    out = once_ok(tmp_path)
    assert "the trainer holds 4 as best" in out, out
    assert_artifact_is(work_dir, "bbox_mAP", 4)
    # kept: the newest two, mmcv's best, and epoch 2 while the log still disagrees
    assert checkpoints(work_dir) == ["epoch_2.pth", "epoch_4.pth", "epoch_5.pth", "epoch_6.pth"]
    assert "[unchanged]" in once_ok(tmp_path)


@pytest.mark.trainer
def test_real_best_at_the_last_epoch_is_read_from_evalhooks_best_file(tmp_path: Path) -> None:
    # epoch_4.pth is saved before epoch 4 is evaluated, so only best_bbox_mAP_epoch_4.pth
    # records that EvalHook found 0.5000006 better than epoch 2's 0.5000004.
    table = "bbox_mAP=0.3,0.5000004,0.4,0.5000006"
    work_dir, result = real_run(tmp_path, "--epochs", "4", "--tables", table)
    assert result["best_ckpt"] == "best_bbox_mAP_epoch_4.pth"
    epoch_4 = load_full(work_dir / "epoch_4.pth")["meta"]["hook_msgs"]
    assert epoch_4["best_ckpt"].endswith("best_bbox_mAP_epoch_2.pth")  # as of epoch 3
    once_ok(tmp_path)
    assert_artifact_is(work_dir, "bbox_mAP", 4)


@pytest.mark.trainer
def test_real_resume_from_the_best_epochs_own_checkpoint(tmp_path: Path) -> None:
    # The first launch's best is its last epoch, 4. Resuming from epoch_4.pth restores
    # hook_msgs as of epoch 3 (best: epoch 2, whose best file mmcv removed when 4 won), and
    # epoch 4 is never evaluated again: mmcv ends up naming a best file that is gone.
    table = "bbox_mAP=0.3,0.45,0.4,0.5,0.35,0.38"
    work_dir, _ = real_run(
        tmp_path, "--epochs", "4", "--tables", table, "--timestamp", "20240101_000000"
    )
    once_ok(tmp_path)
    assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
    _, result = real_run(
        tmp_path, "--epochs", "6", "--tables", table, "--resume-from", "epoch_4.pth",
        "--timestamp", "20240102_000000",
    )  # fmt: skip
    assert result["best_ckpt"] == "best_bbox_mAP_epoch_2.pth"
    assert "best_bbox_mAP_epoch_2.pth" not in result["files"]
    assert "best_bbox_mAP_epoch_4.pth" in result["files"]  # left behind
    out = once_ok(tmp_path)
    assert "bbox_mAP = 0.5 (greater) at epoch 4" in out and "trainer holds" not in out, out
    assert checkpoints(work_dir) == ["epoch_5.pth", "epoch_6.pth"]
    assert_artifact_is(work_dir, "bbox_mAP", 4)
