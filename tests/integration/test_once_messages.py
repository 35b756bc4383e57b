"""What ``ckptd once`` says about a best it cannot slim in this pass: true for once, which exits,
and for the daemon, which passes again by itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ckptd.core.config import load_config
from ckptd.demo.simulate import SimConfig, SimulatedTrainer
from ckptd.engine.outcome import PassOptions
from ckptd.engine.reconcile import reconcile
from ckptd.engine.targets import Target
from tests.helpers import cli, write_config

VALUES = [0.3, 0.5, 0.4, 0.6, 0.55]  # bests at epochs 2 and 4
ARTIFACT = "best_coco_bbox_mAP_epoch_{}.pth"


def trainer(root: Path) -> SimulatedTrainer:
    return SimulatedTrainer(
        root / "work_dirs" / "run", SimConfig(epochs=len(VALUES), metric_values=VALUES)
    )


def best_of(config: Path) -> dict[str, Any]:
    """The one best of the one work_dir, as ``ckptd once --json`` reports it."""
    _code, out, err = cli("once", "-c", str(config), "--json")
    assert out, err
    (best,) = json.loads(out)["work_dirs"][0]["best"]
    return best


def epochs(t: SimulatedTrainer, n: int) -> None:
    for _ in range(n):
        t.run_epoch()


def test_once_says_to_run_again_after_the_settle_time(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    epochs(t, 2)
    config = write_config(tmp_path, watch={"settle": "1h"})
    best = best_of(config)
    assert best["status"] == "deferred"
    assert best["detail"].startswith("epoch_2.pth is modified "), best
    assert best["detail"].endswith(
        " ago, waiting for writes to settle; run `ckptd once` again in 1h to slim it, or use "
        "`ckptd run`, which slims it by itself"
    ), best
    # the daemon passes again by itself when the checkpoint is old enough: its text stays
    loaded = load_config(config)
    target = Target(t.work_dir, loaded.config.projects[0], loaded.base_dir)
    (artifact,) = reconcile(target, PassOptions(settle=3600)).artifacts
    assert artifact.status == "deferred"
    assert artifact.detail.endswith("waiting for writes to settle; will slim it then")


def unslimmable(t: SimulatedTrainer, epoch: int) -> None:
    """A pass sees the best's checkpoint complete but cannot write its artifact (a folder is
    in the way); then the checkpoint is gone, as a trainer's max_keep_ckpts would remove it."""
    blocker = t.work_dir / "best" / ARTIFACT.format(epoch)
    blocker.mkdir(parents=True)
    assert cli("once", "-c", str(t.work_dir.parents[1] / "ckptd.yaml"))[0] == 1
    shutil.rmtree(blocker, ignore_errors=True)  # the failed pass may have removed it
    (t.work_dir / f"epoch_{epoch}.pth").unlink()


def test_missing_checkpoint_and_no_earlier_artifact(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    epochs(t, 3)
    config = write_config(tmp_path)
    unslimmable(t, 2)
    best = best_of(config)
    assert best["status"] == "missing"
    assert best["detail"] == (
        "the best coco/bbox_mAP=0.5 is at epoch 2, whose checkpoint is gone from the "
        "work_dir, and no earlier best has an artifact either: coco/bbox_mAP has none until a "
        "later evaluation beats 0.5 with its checkpoint still there, or that checkpoint is put "
        "back into the work_dir (ckptd then slims it)"
    )
    assert "previous" not in best["detail"] and not (t.work_dir / "best" / "manifest.json").exists()


def test_missing_checkpoint_names_the_artifact_that_stays(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    epochs(t, 3)
    config = write_config(tmp_path)
    assert best_of(config)["status"] == "written"  # epoch 2's
    epochs(t, 1)  # a new best at epoch 4
    unslimmable(t, 4)
    best = best_of(config)
    assert best["status"] == "missing"
    assert best["detail"] == (
        "the best coco/bbox_mAP=0.6 is at epoch 4, whose checkpoint is gone from the "
        f"work_dir; the artifact stays at the previous best, {ARTIFACT.format(2)} "
        "(coco/bbox_mAP=0.5 at epoch 2), until a later evaluation beats 0.6 with its "
        "checkpoint still there, or that checkpoint is put back into the work_dir (ckptd then "
        "slims it)"
    )
    assert (t.work_dir / "best" / ARTIFACT.format(2)).exists()
