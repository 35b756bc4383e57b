"""The fault tests' checker must catch what it claims to catch: a bad actor in ckptd's place
deletes what invariant 1 protects, or leaves no artifact, and every such act is flagged."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.faults.invariants import Stream, StreamChecker, TrainerView, protected
from tests.faults.trainer import Op, Replayer, record


def _run_with(tmp_path: Path, act_after: int, act: str) -> StreamChecker:
    """Replay the recording; after trainer action ``act_after`` the bad actor does ``act``."""
    recording = record()
    work_dir, marks = tmp_path / "run", tmp_path / "marks"
    work_dir.mkdir()
    marks.mkdir()
    with Stream() as stream:
        checker = stream.add(
            StreamChecker(work_dir, recording.ops, metric=recording.metric, marks=marks)
        )
        done = threading.Event()

        def bad_actor(index: int, op: Op) -> None:
            if index != act_after:
                return
            best = work_dir / "best"
            if act == "delete newest":
                os.unlink(work_dir / op.path)
            elif act == "delete pointer target":
                os.unlink(work_dir / (work_dir / "last_checkpoint").read_text().rsplit("/")[-1])
            elif act == "delete a non-checkpoint":
                os.unlink(work_dir / "last_checkpoint")
            elif act == "publish then remove the only artifact":
                (best / ".ckptd-tmp-0000-best_coco_bbox_mAP_epoch_1.pth").write_bytes(b"x")
                os.replace(
                    best / ".ckptd-tmp-0000-best_coco_bbox_mAP_epoch_1.pth",
                    best / "best_coco_bbox_mAP_epoch_1.pth",
                )
                os.unlink(best / "best_coco_bbox_mAP_epoch_1.pth")
            elif act == "delete the best without an artifact":
                os.unlink(work_dir / "epoch_2.pth")
            done.set()

        replayer = Replayer(recording, work_dir, epoch_seconds=0, marks=marks, on_op=bad_actor)
        replayer.run()
        assert done.is_set()
        stream.drain()
    return checker


# index of the action after which the bad actor acts: see tests.faults.trainer.record
CASES = {
    "delete newest": (8, "epoch_1.pth was deleted while protected (newest complete)"),
    "delete pointer target": (20, "epoch_2.pth was deleted while protected"),
    "delete a non-checkpoint": (20, "last_checkpoint was deleted; it is not a checkpoint"),
    "publish then remove the only artifact": (
        13,
        "best_coco_bbox_mAP_epoch_1.pth was removed and no complete artifact was left",
    ),
    "delete the best without an artifact": (33, "epoch_2.pth was deleted while protected"),
}


@pytest.mark.parametrize("act", list(CASES))
def test_the_checker_flags_a_bad_actor(tmp_path: Path, act: str) -> None:
    after, expected = CASES[act]
    checker = _run_with(tmp_path, after, act)
    assert any(expected in v for v in checker.violations), checker.violations


def test_protection_model() -> None:
    view = TrainerView()
    for n in (1, 2, 3):
        view.apply(Op("write", f"epoch_{n}.pth"))
    view.apply(Op("pointer", "last_checkpoint", b"epoch_3.pth"))
    assert protected(view, "acc", "greater", []) == {
        "epoch_3.pth": "newest complete",
        "epoch_1.pth": "evaluation pending",
        "epoch_2.pth": "evaluation pending",
    }
    for n, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        view.apply(Op("append", "x/vis_data/scalars.json", val=(n, {"acc": acc})))
    assert protected(view, "acc", "greater", []) == {
        "epoch_3.pth": "newest complete",
        "epoch_2.pth": "best without an artifact",
    }
    assert "epoch_2.pth" not in protected(view, "acc", "greater", [2])
    view.apply(Op("pointer", "last_checkpoint", b"epoch_1.pth"))
    assert protected(view, "acc", "greater", [2])["epoch_1.pth"] == "resume pointer target"
    view.apply(Op("pointer", "last_checkpoint", b"epoch_3.pth"))
    # while epoch_3.pth is rewritten in place, epoch_2.pth is the newest complete one
    assert protected(view, "acc", "greater", [2], writing=["epoch_3.pth"]) == {
        "epoch_3.pth": "being written",
        "epoch_2.pth": "newest complete",
    }
    # NaN never becomes best, a resumed run's repeated epoch replaces the later records
    view.apply(Op("append", "y/vis_data/scalars.json", val=(2, {"acc": float("nan")})))
    assert protected(view, "acc", "greater", []) == {
        "epoch_3.pth": "newest complete",
        "epoch_1.pth": "best without an artifact",
    }
