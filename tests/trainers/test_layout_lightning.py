"""The Lightning layout: conformance with real PyTorch Lightning runs, and its read side.

The ``trainer`` tests run ``tests/trainers/lightning_real.py`` (real ``Trainer``,
``ModelCheckpoint(save_top_k=-1)``, ``CSVLogger``) in a subprocess, then ``ckptd once``. A twin
``ModelCheckpoint(save_top_k=1)`` writing outside the work_dir gives the trainer's own best:
ckptd must pick the same checkpoint, its artifact must hold those weights tensor for tensor,
it must keep exactly the newest ``keep_last`` checkpoints, and ``last.ckpt`` must survive.
The other tests use the reference ``metrics.csv`` and hand-made files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from ckptd.layouts import choose_layout, detect_layouts
from ckptd.layouts.lightning import LightningLayout
from tests.helpers import (
    REPO,
    assert_same_state_dict,
    cli,
    load_full,
    load_weights_only,
    manifest,
    once_ok,
    run_harness,
    write_config,
)

HARNESS = REPO / "tests" / "trainers" / "lightning_real.py"
REFERENCE = REPO / "tests" / "data" / "reference" / "lightning" / "metrics.csv"
CKPTS = "lightning_logs/version_0/checkpoints"


def train(root: Path, *args: str) -> dict:
    return run_harness(HARNESS, root, "--top1-dir", str(root.parent / f"{root.name}-top1"), *args)


def once(tmp_path: Path, **project: object) -> str:
    return once_ok(tmp_path, **project)


def ckpt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".ckpt"))


def assert_artifact_is(artifact: Path, trainer_best: Path) -> None:
    slim = load_weights_only(artifact)  # loads without executing anything
    assert list(slim) == ["pytorch-lightning_version", "state_dict", "hyper_parameters"]
    full = load_full(trainer_best)
    assert_same_state_dict(slim["state_dict"], full["state_dict"])
    assert slim["hyper_parameters"] == full["hyper_parameters"]
    for dropped in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        assert dropped not in slim


@pytest.mark.trainer
def test_real_lightning_best_artifact_and_kept_set(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "lit"
    result = train(
        run, "--epochs", "6", "--monitor", "val_acc", "--mode", "max", "--save-last", "link"
    )
    top1 = Path(result["top1_best_model_path"])
    assert top1.name == Path(result["best_model_path"]).name == "epoch=3-step=40.ckpt"

    out = once(tmp_path)  # metric: auto follows the ModelCheckpoint monitor stored in the files
    assert "[lightning]" in out and "val_acc (ModelCheckpoint(monitor='val_acc', mode='max')" in out
    checkpoints = run / CKPTS
    assert ckpt_files(checkpoints) == ["epoch=4-step=50.ckpt", "epoch=5-step=60.ckpt", "last.ckpt"]
    assert os.readlink(checkpoints / "last.ckpt") == "epoch=5-step=60.ckpt"
    entry = manifest(run / "best")["artifacts"]["val_acc"]
    assert entry["source_checkpoint"] == f"{CKPTS}/{top1.name}"
    assert entry["value"] == result["top1_best_model_score"] and entry["rule"] == "greater"
    assert_artifact_is(run / "best" / "best_val_acc_step_40.ckpt", top1)

    again = once(tmp_path)  # idempotent: nothing more to do
    assert "\n  deleted " not in again and "[unchanged]" in again


@pytest.mark.trainer
def test_real_lightning_custom_dirpath_min_mode_and_last_copy(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "lit"
    result = train(
        run,
        *("--epochs", "6", "--monitor", "val_loss", "--mode", "min"),
        *("--save-last", "true", "--dirpath", str(run / "ckpts")),
    )
    top1 = Path(result["top1_best_model_path"])
    assert top1.name == "epoch=4-step=50.ckpt"
    # a named metric with rule auto: val_loss -> less, as ModelCheckpoint(mode='min')
    once(tmp_path, best={"metric": "val_loss"}, lightning={"checkpoint_dirs": ["ckpts"]})
    assert ckpt_files(run / "ckpts") == [
        "epoch=4-step=50.ckpt",
        "epoch=5-step=60.ckpt",
        "last.ckpt",
    ]
    assert (run / "ckpts" / "last.ckpt").is_file()
    entry = manifest(run / "best")["artifacts"]["val_loss"]
    assert entry["source_checkpoint"] == "ckpts/epoch=4-step=50.ckpt" and entry["rule"] == "less"
    assert_artifact_is(run / "best" / "best_val_loss_step_50.ckpt", top1)


@pytest.mark.trainer
def test_real_lightning_resumed_fit_reads_every_version(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "lit"
    common = ("--monitor", "val_acc", "--mode", "max", "--save-last", "link")
    train(run, "--epochs", "3", *common)
    once(tmp_path)  # between the launches, like a daemon would
    last = run / CKPTS / "last.ckpt"
    result = train(run, "--epochs", "8", *common, "--resume", str(last))
    version_1 = run / "lightning_logs" / "version_1"
    assert (version_1 / "metrics.csv").is_file()  # the resumed fit is a new logger version
    top1 = Path(result["top1_best_model_path"])
    assert top1.name == "epoch=3-step=40.ckpt"  # a best after the resume, in version_1
    once(tmp_path)
    entry = manifest(run / "best")["artifacts"]["val_acc"]
    assert entry["source_checkpoint"] == f"lightning_logs/version_1/checkpoints/{top1.name}"
    assert_artifact_is(run / "best" / "best_val_acc_step_40.ckpt", top1)
    # the newest two steps are kept, wherever they live; version_0's last.ckpt link keeps
    # its target (the checkpoint the first launch would resume from)
    assert ckpt_files(version_1 / "checkpoints") == [
        "epoch=6-step=70.ckpt",
        "epoch=7-step=80.ckpt",
        "last.ckpt",
    ]
    assert ckpt_files(run / CKPTS) == ["epoch=2-step=30.ckpt", "last.ckpt"]


# --- the read side, on reference and hand-made files -------------------------------------


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def reference_rows() -> tuple[list[str], list[dict[str, str]]]:
    with REFERENCE.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def lightning_dir(tmp_path: Path) -> Path:
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    return tmp_path / "run"


def test_reference_metrics_csv_val_rows_map_to_checkpoint_steps(tmp_path: Path) -> None:
    run = lightning_dir(tmp_path)
    shutil.copy(REFERENCE, run / "lightning_logs" / "version_0" / "metrics.csv")
    assert detect_layouts(run) == ["lightning"]
    read = LightningLayout().read_evals(run, {}, "step")
    assert not read.problems
    assert [r.index for r in read.records] == [10, 20, 30, 40, 50]  # val row step 9 -> step=10
    assert read.records[0].metrics == {"val_acc": 0.640625, "val_loss": 0.656456470489502}


def test_rewrite_with_a_new_column_neither_loses_nor_double_counts(tmp_path: Path) -> None:
    run = lightning_dir(tmp_path)
    path = run / "lightning_logs" / "version_0" / "metrics.csv"
    header, rows = reference_rows()
    layout = LightningLayout()
    write_csv(path, header, rows[:8])  # two epochs
    first = layout.read_evals(run, {}, "step")
    assert [r.index for r in first.records] == [10, 20]
    # CSVLogger rewrites the file from scratch when a column appears (sorted header)
    grown = sorted([*header, "val_f1"])
    extra = [dict(r, val_f1="0.5" if r["val_acc"] else "") for r in rows]
    write_csv(path, grown, extra[:12])
    second = layout.read_evals(run, first.sources, "step")
    assert [r.index for r in second.records] == [10, 20, 30]
    assert second.records[2].metrics["val_f1"] == 0.5
    # caught half way through a rewrite: the rows not rewritten yet still count, once
    text = path.read_text()
    path.write_text(text[: len(text) // 3])
    third = layout.read_evals(run, second.sources, "step")
    assert [r.index for r in third.records] == [10, 20, 30]
    write_csv(path, grown, extra)
    fourth = layout.read_evals(run, third.sources, "step")
    assert [r.index for r in fourth.records] == [10, 20, 30, 40, 50]
    fresh = LightningLayout().read_evals(run, {}, "step")
    assert fourth.records == fresh.records
    # persisted state round-trips through JSON without the carried rows
    from ckptd.layouts.base import SourceState

    rel = "lightning_logs/version_0/metrics.csv"
    restored = SourceState.from_json(rel, json.loads(json.dumps(third.sources[rel].to_json())))
    assert len(restored.records) < 3 and restored.records == fresh.records[: len(restored.records)]


def test_checkpoint_listing_pointers_duplicates_and_symlinks(tmp_path: Path) -> None:
    run = lightning_dir(tmp_path)
    ckpts = run / CKPTS
    for name in ("epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=1-step=20-v1.ckpt"):
        (ckpts / name).write_bytes(b"x")
    (ckpts / "model-val_acc=0.61.ckpt").write_bytes(b"x")  # no step in the name
    os.symlink("epoch=0-step=10.ckpt", ckpts / "last.ckpt")
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes(b"x")
    os.symlink(outside, ckpts / "epoch=2-step=30.ckpt")
    os.utime(ckpts / "epoch=1-step=20-v1.ckpt", ns=(1, 1))  # the older copy of step 20
    layout = LightningLayout()
    candidates, skipped = layout.list_checkpoints(run)
    assert [c.name for c in candidates] == [
        f"{CKPTS}/epoch=0-step=10.ckpt",
        f"{CKPTS}/epoch=1-step=20.ckpt",
    ]
    assert all(c.unit == "step" for c in candidates) and [c.index for c in candidates] == [10, 20]
    reasons = {s.name.rsplit("/", 1)[1]: s.reason for s in skipped}
    assert "resume pointer" in reasons["last.ckpt"]
    assert "symlink" in reasons["epoch=2-step=30.ckpt"]
    assert "step 20 again" in reasons["epoch=1-step=20-v1.ckpt"]
    assert "no step=N" in reasons["model-val_acc=0.61.ckpt"]
    names = {c.name for c in candidates}
    assert layout.resume_target(run, names) == (f"{CKPTS}/epoch=0-step=10.ckpt", "")


def test_detection_and_the_no_match_message(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_layouts(empty) == []
    write_config(tmp_path, work_dirs=[str(empty)])
    code, out, _ = cli("status", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0
    assert "does not look like a work_dir of a supported trainer (yet)" in out
    assert "lightning: <logger>/version_N/" in out and "hf: checkpoint-N/ folders" in out
    no_logger = tmp_path / "plain"
    (no_logger / "checkpoints").mkdir(parents=True)
    (no_logger / "checkpoints" / "epoch=0-step=5.ckpt").write_bytes(b"x")
    assert detect_layouts(no_logger) == ["lightning"]
    assert isinstance(choose_layout(no_logger, "auto"), LightningLayout)


def test_a_clear_detection_is_reused_briefly_an_unclear_one_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """choose_layout reuses a single detected layout for Timings.layout_redetect_after (the
    daemon's start-up detected every work_dir twice within a second); a folder that matched
    nothing, or several layouts, is detected afresh every time."""
    import ckptd.layouts as layouts

    calls: list[Path] = []
    real = layouts.detect_layouts

    def counting(work_dir: Path) -> list[str]:
        calls.append(work_dir)
        return real(work_dir)

    monkeypatch.setattr(layouts, "detect_layouts", counting)
    run = tmp_path / "run"
    run.mkdir()
    assert choose_layout(run, "auto") is None
    assert choose_layout(run, "auto") is None
    assert len(calls) == 2  # nothing found: not remembered
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch=0-step=5.ckpt").write_bytes(b"x")
    assert isinstance(choose_layout(run, "auto"), LightningLayout)  # found at once
    assert isinstance(choose_layout(run, "auto"), LightningLayout)
    assert len(calls) == 3  # the second came from the memory
    (run / "last_checkpoint").write_text("epoch_1.pth")  # now MMEngine's too: ambiguous
    monkeypatch.setattr(layouts.time, "monotonic", lambda: 1e12)  # the memory has expired
    for _ in range(2):
        with pytest.raises(layouts.LayoutError, match="several trainers"):
            choose_layout(run, "auto")
    assert len(calls) == 5
