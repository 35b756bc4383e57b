"""Conformance with the real MMEngine: ckptd outside the trainer ≡ CheckpointHook inside it.

For each scenario, run A trains with the trainer's own retention off (``interval=1``, no
``max_keep_ckpts``, no ``save_best``) and ckptd manages it; run B trains identically (same seed,
so bit-identical weights) with MMEngine's own ``save_best='auto', max_keep_ckpts=2``. ckptd must
pick MMEngine's best epoch, its artifact must hold MMEngine's best weights tensor for tensor,
it must keep exactly what MMEngine kept, and the resume pointer's target must survive.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    assert_same_state_dict,
    checkpoints,
    cli,
    load_full,
    load_weights_only,
    manifest,
    write_config,
)

pytestmark = pytest.mark.trainer
HARNESS = REPO / "tests" / "trainers" / "mmengine_real.py"


def train(work_dir: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), str(work_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def mmengine_best(work_dir: Path) -> Path:
    (best,) = work_dir.glob("best_*.pth")
    return best


def conform(tmp_path: Path, *args: str, resume_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """Run A with ckptd (after each launch), run B with MMEngine's own retention."""
    ours = tmp_path / "ours" / "work_dirs" / "run"
    theirs = tmp_path / "theirs" / "run"
    train(ours, *args)
    write_config(tmp_path / "ours")
    code, out, err = cli("once", "-c", str(tmp_path / "ours" / "ckptd.yaml"))
    assert code == 0, out + err
    if resume_args:
        time.sleep(1.1)  # MMEngine names launch folders by the second
        train(ours, *resume_args, "--resume")
        code, out, err = cli("once", "-c", str(tmp_path / "ours" / "ckptd.yaml"))
        assert code == 0, out + err
    final = resume_args or args
    train(theirs, *final, "--save-best", "auto", "--max-keep-ckpts", "2")
    return {"ours": ours, "theirs": theirs}


def assert_conforms(runs: dict[str, Path]) -> None:
    ours, theirs = runs["ours"], runs["theirs"]
    their_best = mmengine_best(theirs)
    artifacts = sorted((ours / "best").glob("best_*.pth"))
    assert [a.name for a in artifacts] == [their_best.name]
    assert_same_state_dict(
        load_weights_only(artifacts[0])["state_dict"], load_full(their_best)["state_dict"]
    )
    assert checkpoints(ours) == checkpoints(theirs)
    pointer = Path((ours / "last_checkpoint").read_text()).name
    assert (ours / pointer).exists()
    entry = next(iter(manifest(ours / "best")["artifacts"].values()))
    assert entry["file"] == their_best.name


def test_epoch_based_coco_metric(tmp_path: Path) -> None:
    assert_conforms(conform(tmp_path, "--epochs", "6"))


def test_val_loss_less_is_better_despite_logged_smoothing(tmp_path: Path) -> None:
    # MMEngine logs val/loss as a running mean of 10 but compares raw values: the raw minimum
    # is epoch 2, the logged (smoothed) minimum epoch 7.
    values = "0.9,0.3,0.5,0.4,0.45,0.42,0.41"
    runs = conform(tmp_path, "--epochs", "7", "--metric", "loss", "--values", values)
    assert_conforms(runs)
    assert mmengine_best(runs["theirs"]).name == "best_val_loss_epoch_2.pth"


def test_val_loss_after_a_nan_is_read_raw_from_the_message_hub(tmp_path: Path) -> None:
    # Every running mean whose window holds the NaN is NaN, so scalars.json alone cannot give
    # the raw val/loss of epochs 3-6; the newest checkpoint's message hub has them.
    values = "0.9,nan,0.5,0.3,0.6,0.4"
    runs = conform(tmp_path, "--epochs", "6", "--metric", "loss", "--values", values)
    assert_conforms(runs)
    assert mmengine_best(runs["theirs"]).name == "best_val_loss_epoch_4.pth"


def test_iter_based(tmp_path: Path) -> None:
    runs = conform(tmp_path, "--iter-based", "--max-iters", "48", "--val-interval", "8")
    assert_conforms(runs)
    assert mmengine_best(runs["theirs"]).name.endswith("_iter_32.pth")


def test_ema_weights_are_what_mmengine_keeps_as_best(tmp_path: Path) -> None:
    assert_conforms(conform(tmp_path, "--epochs", "6", "--ema"))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    runs = conform(tmp_path, "--epochs", "5", resume_args=("--epochs", "8"))
    assert_conforms(runs)
