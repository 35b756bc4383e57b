"""The MMEngine layout's read side on real reference files and simulated work_dirs."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest

from ckptd.core.best import MetricChoice, resolve_metrics, select_best, supersede_resumed
from ckptd.core.config import BestConfig
from ckptd.core.model import EvalRecord
from ckptd.layouts import choose_layout, detect_layouts
from ckptd.layouts.mmengine import MMEngineLayout

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "mmengine"


def reference_work_dir(tmp_path: Path) -> Path:
    work_dir = tmp_path / "run"
    for i, name in enumerate(["scalars.json", "scalars.after-resume.json"]):
        vis = work_dir / f"2026112{i}_105039" / "vis_data"
        vis.mkdir(parents=True)
        shutil.copy(REFERENCE / name, vis / "scalars.json")
    (work_dir / "last_checkpoint").write_text(str(tmp_path / "elsewhere" / "epoch_8.pth"))
    return work_dir


def test_reads_val_records_from_every_launch(tmp_path: Path) -> None:
    work_dir = reference_work_dir(tmp_path)
    assert detect_layouts(work_dir) == ["mmengine"]
    layout = choose_layout(work_dir, "auto")
    assert isinstance(layout, MMEngineLayout)
    read = layout.read_evals(work_dir, {}, "epoch")
    assert not read.problems
    steps = [r.index for r in read.records]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6:] == [7, 8][: len(steps) - 6]
    first = read.records[0]
    assert next(iter(first.metrics)) == "coco/bbox_mAP"
    assert "data_time" not in first.metrics and "time" not in first.metrics
    choices, _ = resolve_metrics(BestConfig(), read.records)
    assert choices == [MetricChoice("coco/bbox_mAP", "greater")]
    best, _ = select_best(read.records, choices[0])
    assert best is not None and best.index == 4 and best.value == 0.5


def test_incremental_read_only_consumes_new_complete_lines(tmp_path: Path) -> None:
    work_dir = reference_work_dir(tmp_path)
    layout = MMEngineLayout()
    first = layout.read_evals(work_dir, {}, "epoch")
    scalars = sorted(work_dir.glob("*/vis_data/scalars.json"))[-1]
    with scalars.open("a") as f:
        f.write('{"coco/bbox_mAP": 0.9, "time": 0.1, "step": 9}\n{"coco/bbox_mAP": 0.95, "st')
    second = layout.read_evals(work_dir, first.sources, "epoch")
    assert [r.index for r in second.records][-1] == 9
    assert len(second.records) == len(first.records) + 1


def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    vis = work_dir / "20240101_000000" / "vis_data"
    vis.mkdir(parents=True)
    (vis / "scalars.json").write_text(
        '{"acc": 0.1, "step": 1}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"acc": 0.2}\n'
        '{"acc": 0.3, "step": "3"}\n'
        '{"acc": "high", "step": 4}\n'
        '{"lr": 0.1, "epoch": 1, "iter": 4, "step": 4}\n'
    )
    read = MMEngineLayout().read_evals(work_dir, {}, "epoch")
    wheres = [p.where for p in read.problems]
    assert wheres == [
        "20240101_000000/vis_data/scalars.json:2",
        "20240101_000000/vis_data/scalars.json:3",
        "20240101_000000/vis_data/scalars.json:4",
        "20240101_000000/vis_data/scalars.json:5",
    ]
    assert all(p.blocking for p in read.problems)
    assert "fix or remove the line" in str(read.problems[0])
    # a string value is not a metric; the record still counts as an evaluation of step 4
    assert [(r.index, r.metrics) for r in read.records] == [(1, {"acc": 0.1}), (4, {})]
    # problems persist with the source until the file is fixed
    again = MMEngineLayout().read_evals(work_dir, read.sources, "epoch")
    assert [p.where for p in again.problems] == wheres


def test_loss_smoothing_is_undone_like_checkpoint_hook_sees_it() -> None:
    raw = [0.9, 0.7, 0.75, 0.6, 0.65, 0.62, 0.61, 0.7, 0.66, 0.64, 0.63, 0.5, 0.55]
    logged = [
        sum(raw[max(0, n - 9) : n + 1]) / len(raw[max(0, n - 9) : n + 1]) for n in range(len(raw))
    ]
    records = [
        EvalRecord(i + 1, {"val/loss": m, "accuracy": 0.5}, "s", i) for i, m in enumerate(logged)
    ]
    restored = MMEngineLayout().as_evaluated(records)
    assert [r.metrics["val/loss"] for r in restored] == pytest.approx(raw, abs=1e-12)
    assert [r.metrics["accuracy"] for r in restored] == [0.5] * len(raw)
    best, _ = select_best(restored, MetricChoice("val/loss", "less"))
    assert best is not None and best.index == 12  # raw minimum 0.5; the logged minimum is later
    smoothed_best, _ = select_best(records, MetricChoice("val/loss", "less"))
    assert smoothed_best is not None and smoothed_best.index != best.index


def test_smoothing_window_continues_across_a_resume_that_repeats_epochs() -> None:
    raw = [0.9, 0.8, 0.7, 0.6]
    # first launch: epochs 1-4; resumed from epoch 2: epochs 3, 4 again with new raw values
    first = [sum(raw[: n + 1]) / (n + 1) for n in range(4)]
    again_raw = [0.65, 0.5]
    window = raw[:2]
    again = []
    for value in again_raw:
        window = [*window, value]
        again.append(sum(window) / len(window))
    records = [EvalRecord(i + 1, {"loss": m}, "a", i) for i, m in enumerate(first)]
    records += [EvalRecord(i + 3, {"loss": m}, "b", i) for i, m in enumerate(again)]
    restored = MMEngineLayout().as_evaluated(supersede_resumed(records))
    assert [r.metrics["loss"] for r in restored] == pytest.approx([0.9, 0.8, 0.65, 0.5])


def test_iter_runs_with_val_step_zero_are_a_clear_blocking_problem(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    vis = work_dir / "20240101_000000" / "vis_data"
    vis.mkdir(parents=True)
    (vis / "scalars.json").write_text('{"mIoU": 0.1, "step": 0}\n{"mIoU": 0.2, "step": 0}\n')
    read = MMEngineLayout().read_evals(work_dir, {}, "iter")
    assert read.problems and "log_metric_by_epoch=False" in str(read.problems[-1])


def test_checkpoint_listing_skips_symlinks_dirs_and_other_files(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    (work_dir / "last_checkpoint").write_text("/x/epoch_2.pth")
    for name in [
        "epoch_1.pth",
        "epoch_2.pth",
        "iter_300.pth",
        "best_acc_epoch_1.pth",
        "epoch_3.pth.tmp",
    ]:
        (work_dir / name).write_bytes(b"x")
    outside = tmp_path / "outside.pth"
    outside.write_bytes(b"secret")
    os.symlink(outside, work_dir / "epoch_9.pth")
    (work_dir / "epoch_10.pth").mkdir()
    candidates, skipped = MMEngineLayout().list_checkpoints(work_dir)
    assert sorted((c.unit, c.index) for c in candidates) == [
        ("epoch", 1),
        ("epoch", 2),
        ("iter", 300),
    ]
    assert {s.name: s.reason.split(";")[0] for s in skipped} == {
        "epoch_9.pth": "a symlink",
        "epoch_10.pth": "not a regular file",
    }
    target, note = MMEngineLayout().resume_target(work_dir, {c.name for c in candidates})
    assert target == "epoch_2.pth" and "matched epoch_2.pth by file name" in note


def test_resume_pointer_naming_a_missing_checkpoint(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    (work_dir / "last_checkpoint").write_text("/x/epoch_7.pth")
    target, note = MMEngineLayout().resume_target(work_dir, {"epoch_6.pth"})
    assert target is None and "not a checkpoint in this work_dir" in note


def test_not_a_work_dir(tmp_path: Path) -> None:
    assert detect_layouts(tmp_path) == []
    assert choose_layout(tmp_path, "auto") is None
    assert detect_layouts(Path("/")) == []


def hub_checkpoint(path: Path, runtime: dict[str, object], val_loss: list[float]) -> None:
    """A checkpoint whose message hub is pickled like MMEngine's (OrderedDicts, numpy values;
    a plain object with the HistoryBuffer's attributes stands in for it)."""
    from collections import OrderedDict

    import numpy as np
    import torch

    buffer = argparse.Namespace(_log_history=np.array(val_loss), _count_history=np.ones(3))
    hub = {
        "log_scalars": OrderedDict({"val/val/loss": buffer}),
        "runtime_info": OrderedDict(runtime),
        "resumed_keys": OrderedDict(),
    }
    torch.save({"meta": {}, "state_dict": {"w": torch.ones(2)}, "message_hub": hub}, path)


def test_trainer_bests_from_the_hub_of_the_checkpoint_written_last(tmp_path: Path) -> None:
    import numpy as np

    from ckptd.core.model import WorkDirScan
    from ckptd.layouts.mmengine_hub import read_hub

    work_dir = tmp_path / "run"
    work_dir.mkdir()
    one = {"best_score": np.float64(0.3), "best_ckpt": "/x/best_val_loss_epoch_2.pth"}
    hub_checkpoint(work_dir / "epoch_2.pth", one, [0.5, 0.3])  # re-saved after val 2
    hub_checkpoint(work_dir / "epoch_3.pth", one, [0.5, 0.3])  # saved before val 3
    later = os.stat(work_dir / "epoch_2.pth").st_mtime_ns + 10**9
    os.utime(work_dir / "epoch_3.pth", ns=(later, later))
    layout = MMEngineLayout()
    found, _ = layout.list_checkpoints(work_dir)
    scan = WorkDirScan(work_dir, "mmengine", [c.as_checkpoint(True) for c in found])
    records = [EvalRecord(i, {"val/loss": v}, "s.json", i) for i, v in ((1, 0.5), (2, 0.4))]
    (best,) = layout.trainer_bests(work_dir, scan, records)
    assert (best.key, best.index, best.score, best.as_of) == ("val/loss", 2, 0.3, 2)
    assert best.source == "epoch_3.pth: message_hub best_ckpt"
    hub = read_hub(work_dir, "epoch_3.pth")
    assert hub is not None and hub.raw == {"val/loss": [0.5, 0.3]}
    # logged means 0.5, 0.4 are those of raw 0.5, 0.3: the raw values replace them
    assert [r.metrics["val/loss"] for r in layout.as_evaluated(records)] == [0.5, 0.3]
    # several keys: best_ckpt_<key>, and the record covers N when a best names N
    two = {
        "best_score_coco/bbox_mAP": 0.6,
        "best_ckpt_coco/bbox_mAP": "/x/best_coco_bbox_mAP_epoch_1.pth",
        "best_ckpt_coco/bbox_mAP_75": "/x/best_coco_bbox_mAP_75_epoch_3.pth",
    }
    hub_checkpoint(work_dir / "epoch_3.pth", two, [0.5])
    bests = layout.trainer_bests(work_dir, scan, records)
    assert [(b.key, b.index, b.score, b.as_of) for b in bests] == [
        ("coco/bbox_mAP", 1, 0.6, 3),
        ("coco/bbox_mAP_75", 3, None, 3),
    ]
    # no save_best: no record
    hub_checkpoint(work_dir / "epoch_3.pth", {"epoch": 3}, [0.5])
    assert layout.trainer_bests(work_dir, scan, records) == []
