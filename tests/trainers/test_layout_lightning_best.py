"""Lightning: the best is the one the trainer keeps, whatever ModelCheckpoint is told.

Real-trainer tests (``trainer``) for ``every_n_epochs`` above the validation interval,
``every_n_train_steps``, and file names without ``step=``; the rest reads hand-made
checkpoints written with ``torch.save`` in Lightning's structure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.model import EvalRecord, WorkDirScan
from ckptd.layouts import lightning_ckpt
from ckptd.layouts.lightning import LightningLayout
from tests.helpers import REPO, manifest, once_ok, run_harness, run_harness_batch
from tests.trainers.test_layout_lightning import CKPTS, assert_artifact_is, ckpt_files

HARNESS = REPO / "tests" / "trainers" / "lightning_real.py"
STATE_KEY = "ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max', 'every_n_train_steps': 0}"


def train(root: Path, *args: str) -> dict[str, Any]:
    return run_harness(HARNESS, root, "--top1-dir", str(root.parent / f"{root.name}-top1"), *args)


@pytest.mark.trainer
def test_real_every_n_epochs_best_is_the_best_saved_epoch(tmp_path: Path) -> None:
    """every_n_epochs=2, validation every epoch, the top score on an epoch without a file."""
    run = tmp_path / "work_dirs" / "lit"
    values = "[0.5, 0.7, 0.95, 0.6, 0.65, 0.55]"  # peak at epoch 2 (step 30): never saved
    result = train(run, "--every-n-epochs", "2", "--values", values, "--save-last", "link")
    top1 = Path(result["top1_best_model_path"])
    assert Path(result["best_model_path"]).name == top1.name == "epoch=1-step=20.ckpt"

    out = once_ok(tmp_path)
    assert "[missing]" not in out
    assert "top score (0.95) was at step 30, which the trainer saved no checkpoint of" in out
    entry = manifest(run / "best")["artifacts"]["val_acc"]
    assert entry["source_checkpoint"] == f"{CKPTS}/{top1.name}" and entry["index"] == 20
    assert_artifact_is(run / "best" / "best_val_acc_step_20.ckpt", top1)
    assert ckpt_files(run / CKPTS) == ["epoch=3-step=40.ckpt", "epoch=5-step=60.ckpt", "last.ckpt"]


@pytest.mark.trainer
def test_real_names_without_step_are_managed(tmp_path: Path) -> None:
    """The documented templates without {step}; also auto_insert_metric_name=False."""
    top1 = tmp_path / "top1"
    forms = {
        "plain": ["--filename", "{epoch:02d}-{val_acc:.2f}"],
        "bare": ["--filename", "sample-{epoch}-{step}", "--no-metric-name"],
    }
    runs = [
        (tmp_path / "work_dirs" / name, ["--top1-dir", str(top1 / name), *args])
        for name, args in forms.items()
    ]
    results = dict(zip(forms, run_harness_batch(HARNESS, runs), strict=True))
    assert Path(results["plain"]["best_model_path"]).name == "epoch=03-val_acc=0.72.ckpt"
    assert Path(results["bare"]["best_model_path"]).name == "sample-3-40.ckpt"

    out = once_ok(tmp_path)
    assert "skipped" not in out and "no step=N" not in out
    kept = {
        "plain": ["epoch=04-val_acc=0.66.ckpt", "epoch=05-val_acc=0.70.ckpt"],
        "bare": ["sample-4-50.ckpt", "sample-5-60.ckpt"],
    }
    for name, result in results.items():
        run = tmp_path / "work_dirs" / name
        assert ckpt_files(run / CKPTS) == kept[name]
        entry = manifest(run / "best")["artifacts"]["val_acc"]
        assert entry["index"] == 40
        assert entry["source_checkpoint"] == f"{CKPTS}/{Path(result['best_model_path']).name}"
        trainers = top1 / name / "epoch=3-step=40.ckpt"
        assert_artifact_is(run / "best" / "best_val_acc_step_40.ckpt", trainers)
    again = once_ok(tmp_path)
    assert "\n  deleted " not in again


@pytest.mark.trainer
def test_real_every_n_train_steps_follows_the_trainers_best(tmp_path: Path) -> None:
    """Step-interval checkpoints are ranked by the last validation before them: with 7 steps
    no file has an evaluation of its own step; with 10 (the epoch's length) the file of step
    S is saved before the validation logged at S, and ranked by the one at S-10, so the last
    validation ranks nothing. Only ModelCheckpoint's record names the best."""
    values = {
        "7": "[0.5, 0.7, 0.95, 0.6, 0.65, 0.55]",  # validated at step 30, ranked at 35
        "10": "[0.5, 0.7, 0.6, 0.65, 0.55, 0.95]",  # top at the last validation: unranked
    }
    runs = [
        (
            tmp_path / "work_dirs" / f"every{n}",
            ["--every-n-steps", n, "--values", v, "--top1-dir", str(tmp_path / "top1" / n)],
        )
        for n, v in values.items()
    ]
    seven, ten = run_harness_batch(HARNESS, runs)
    expected = {"every7": (seven, "epoch=3-step=35.ckpt"), "every10": (ten, "epoch=2-step=30.ckpt")}
    for result, name in expected.values():
        assert Path(result["best_model_path"]).name == Path(result["top1_best_model_path"]).name
        assert Path(result["best_model_path"]).name == name

    out = once_ok(tmp_path)
    for root, (result, name) in expected.items():
        run, top1 = tmp_path / "work_dirs" / root, Path(result["top1_best_model_path"])
        entry = manifest(run / "best")["artifacts"]["val_acc"]
        step = entry["index"]
        assert entry["source_checkpoint"] == f"{CKPTS}/{name}" and f"step={step}." in name
        assert entry["value"] == result["top1_best_model_score"]
        assert_artifact_is(run / "best" / f"best_val_acc_step_{step}.ckpt", top1)
    assert ckpt_files(tmp_path / "work_dirs" / "every7" / CKPTS) == [
        "epoch=4-step=49.ckpt",
        "epoch=5-step=56.ckpt",
    ]
    # step 60's file was validated at 0.95 (the logs' best), Lightning ranked it 0.55
    assert "the trainer holds 30 as best" in out and "its logged values make it 60" in out
    assert ckpt_files(tmp_path / "work_dirs" / "every10" / CKPTS) == [
        "epoch=2-step=30.ckpt",
        "epoch=4-step=50.ckpt",
        "epoch=5-step=60.ckpt",
    ]


# --- hand-made checkpoints -----------------------------------------------------------------


def save_ckpt(
    path: Path, step: int, *, best: str = "", score: Any = None, dirpath: str = ""
) -> Path:
    import torch

    state = {
        "monitor": "val_acc",
        "best_model_score": score,
        "best_model_path": best,
        "dirpath": dirpath,
        "best_k_models": {f"{dirpath}/{path.name}": torch.tensor(0.5), best: score},
    }
    body = {
        "epoch": step // 10 - 1,
        "global_step": step,
        "state_dict": {"w": torch.ones(2) * step},
        "callbacks": {STATE_KEY: state},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(body, path)
    return path


def scan_of(layout: LightningLayout, run: Path) -> WorkDirScan:
    candidates, skipped = layout.list_checkpoints(run)
    scan = WorkDirScan(run, "lightning", skipped=skipped)
    scan.checkpoints = [c.as_checkpoint(True) for c in candidates]
    return scan


def records(*pairs: tuple[int, float], source: str = f"{CKPTS[:-12]}/metrics.csv") -> list:
    return [EvalRecord(i, {"val_acc": v}, source, n) for n, (i, v) in enumerate(pairs, 2)]


def test_step_read_from_the_file_once_per_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    folder = run / CKPTS
    save_ckpt(folder / "epoch=00.ckpt", 10)
    save_ckpt(folder / "1-20.ckpt", 20)  # auto_insert_metric_name=False
    reads: list[Path] = []
    real = lightning_ckpt.open_inert
    monkeypatch.setattr(lightning_ckpt, "open_inert", lambda p, *a: reads.append(p) or real(p, *a))
    for _ in range(3):  # a daemon's passes: each file is read once
        candidates, skipped = LightningLayout().list_checkpoints(run)
        assert [(c.name.rsplit("/", 1)[1], c.index) for c in candidates] == [
            ("epoch=00.ckpt", 10),
            ("1-20.ckpt", 20),
        ]
        assert skipped == []
    assert sorted(p.name for p in reads) == ["1-20.ckpt", "epoch=00.ckpt"]
    os.utime(folder / "1-20.ckpt", ns=(1, 1))  # rewritten: read again
    LightningLayout().list_checkpoints(run)
    assert len(reads) == 3


def test_unreadable_or_unfinished_file_without_step_is_left_alone_and_says_why(
    tmp_path: Path,
) -> None:
    import torch

    run = tmp_path / "run"
    folder = run / CKPTS
    whole = save_ckpt(folder / "epoch=02.ckpt", 30).read_bytes()
    (folder / "epoch=03.ckpt").write_bytes(whole[: len(whole) // 2])  # being written
    torch.save([1, 2, 3], folder / "other.ckpt")  # a torch file, not a Lightning checkpoint
    candidates, skipped = LightningLayout().list_checkpoints(run)
    assert [c.index for c in candidates] == [30]
    reasons = {s.name.rsplit("/", 1)[1]: s.reason for s in skipped}
    assert "no step=N and it is not complete yet (no valid end of zip" in reasons["epoch=03.ckpt"]
    assert "cannot read a global_step" in reasons["other.ckpt"]
    assert "{step}" in reasons["other.ckpt"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_trainer_best_from_another_mount_point(tmp_path: Path, dtype: str) -> None:
    """The trainer saw the volume at /mnt/train; ckptd matches best_model_path by the part
    below the work_dir, and reads best_model_score's tensor without unpickling it."""
    import torch

    run = tmp_path / "run"
    folder = run / CKPTS
    theirs = f"/mnt/train/lit/{CKPTS}"
    score = torch.tensor(0.72, dtype=getattr(torch, dtype))
    best = f"{theirs}/epoch=01-val_acc=0.72.ckpt"
    save_ckpt(folder / "epoch=01-val_acc=0.72.ckpt", 20, best=best, score=score, dirpath=theirs)
    save_ckpt(folder / "epoch=02-val_acc=0.61.ckpt", 30, best=best, score=score, dirpath=theirs)
    layout = LightningLayout()
    scan = scan_of(layout, run)
    (found,) = layout.trainer_bests(run, scan, records((10, 0.5), (20, 0.72), (30, 0.61)))
    assert (found.key, found.index, found.as_of) == ("val_acc", 20, 30)
    assert found.score == score.item()
    assert found.source.startswith(f"{CKPTS}/epoch=02-val_acc=0.61.ckpt: callbacks[")


def test_trainer_record_not_used_where_it_does_not_reach(tmp_path: Path) -> None:
    """A fit resumed into a new version_N ranks only its own files, and another callback's
    file (written outside the work_dir here) says nothing about this one."""
    run = tmp_path / "run"
    v1 = CKPTS.replace("version_0", "version_1")
    theirs = str(run / v1)
    save_ckpt(run / v1 / "epoch=2-step=30.ckpt", 30, best=f"{theirs}/epoch=2-step=30.ckpt",
              score=0.61, dirpath=theirs)  # fmt: skip
    layout = LightningLayout()
    scan = scan_of(layout, run)
    both = records((10, 0.5), (20, 0.72)) + records((30, 0.61), source=f"{v1[:-12]}/metrics.csv")
    assert layout.trainer_bests(run, scan, both) == []
    only_v1 = [r for r in both if r.index == 30]
    assert [b.index for b in layout.trainer_bests(run, scan, only_v1)] == [30]
    elsewhere = tmp_path / "run2"
    shutil.copytree(run, elsewhere)
    other = str(tmp_path / "top1")  # the state of a callback saving outside the work_dir
    save_ckpt(elsewhere / v1 / "epoch=2-step=30.ckpt", 30, best=f"{other}/x.ckpt", dirpath=other)
    assert layout.trainer_bests(elsewhere, scan_of(LightningLayout(), elsewhere), only_v1) == []


def test_in_work_dir_trusts_only_what_lies_below_the_work_dir() -> None:
    rel = "lightning_logs/version_1/checkpoints"
    theirs = f"/mnt/x/run/{rel}"
    assert lightning_ckpt.in_work_dir(f"{theirs}/a.ckpt", theirs, rel) == f"{rel}/a.ckpt"
    old = "/mnt/x/run/lightning_logs/version_0/checkpoints/b.ckpt"  # kept over a resume
    assert lightning_ckpt.in_work_dir(old, theirs, rel) == old.removeprefix("/mnt/x/run/")
    assert lightning_ckpt.in_work_dir("/elsewhere/a.ckpt", theirs, rel) is None
    assert lightning_ckpt.in_work_dir(f"{theirs}/../../../../x.ckpt", theirs, rel) is None
    assert lightning_ckpt.in_work_dir(f"{theirs}/a.ckpt", "/mnt/x/other", rel) is None
    assert lightning_ckpt.in_work_dir("/r/ckpts/a.ckpt", "/r/ckpts", "ckpts") == "ckpts/a.ckpt"


def test_an_earlier_fits_pointer_target_is_kept_and_can_be_best(tmp_path: Path) -> None:
    """A fit resumed into the same dirpath from a file saved before its first last.ckpt
    writes last-v1.ckpt; last.ckpt still names the old file, which may hold the best."""
    from ckptd.core.config import RetentionConfig
    from ckptd.core.explain import describe_all
    from ckptd.core.policy import PolicyInput, plan

    run = tmp_path / "run"
    folder = run / "ckpts"
    for name, step in (("epoch=2.ckpt", 30), ("epoch=4.ckpt", 50), ("epoch=5.ckpt", 60)):
        save_ckpt(folder / name, step)
    os.symlink("epoch=2.ckpt", folder / "last.ckpt")
    os.symlink("epoch=5.ckpt", folder / "last-v1.ckpt")
    os.utime(folder / "last.ckpt", ns=(1, 1), follow_symlinks=False)
    layout = LightningLayout(checkpoint_dirs=("ckpts",))
    scan = scan_of(layout, run)
    assert [c.index for c in scan.checkpoints] == [30, 50, 60]  # all candidates for best
    names = {c.name for c in scan.checkpoints}
    assert layout.resume_target(run, names) == ("ckpts/epoch=5.ckpt", "")
    older = layout.older_pointers(run, names)
    assert older == {"ckpts/epoch=2.ckpt": "ckpts/last.ckpt"}
    given = PolicyInput(
        checkpoints=scan.checkpoints,
        evaluated=frozenset({30, 50, 60}),
        latest_evaluated=60,
        best={},
        artifact_ready=frozenset(),
        resume_target="ckpts/epoch=5.ckpt",
        now=0.0,
        older_pointers=older,
    )
    decided = {d.checkpoint.name: d for d in plan(given, RetentionConfig(keep_last=1)).decisions}
    assert decided["ckpts/epoch=2.ckpt"].keep and decided["ckpts/epoch=2.ckpt"].protected
    why = describe_all(decided["ckpts/epoch=2.ckpt"].reasons)
    assert why == "target of ckpts/last.ckpt, the resume pointer of an earlier run"
    assert not decided["ckpts/epoch=4.ckpt"].keep


def test_an_older_copy_of_a_step_never_replaces_its_artifact(tmp_path: Path) -> None:
    """A fit resumed from step 30 repeats step 40 in version_1; ckptd slims that copy and
    deletes it; version_0's copy (the abandoned run's weights) then stands alone."""
    from ckptd.core.model import Best, Checkpoint, FileStat
    from ckptd.engine.artifacts import ArtifactEntry, is_current

    (tmp_path / "best_val_acc_step_40.ckpt").write_bytes(b"x" * 10)
    entry = ArtifactEntry(
        *("val_acc", "best_val_acc_step_40.ckpt", "greater", 0.7, "step", 40, None, 40, "0"),
        *(10, "lightning_logs/version_1/checkpoints/epoch=3.ckpt", (5, 100, 2_000), (), ""),
    )
    best = Best("val_acc", "greater", 0.7, 40, "metrics.csv", 3)
    older = Checkpoint("lightning_logs/version_0/checkpoints/epoch=3.ckpt", "step", 40,
                       FileStat(6, 100, 1_000), True)  # fmt: skip
    assert is_current(entry, best, older, tmp_path)
    newer = Checkpoint(older.name, "step", 40, FileStat(7, 100, 3_000), True)
    assert not is_current(entry, best, newer, tmp_path)  # e.g. re-saved after the slim
