"""The Hugging Face layout: conformance with real ``Trainer`` runs, completeness, safe deletion.

The ``trainer`` tests run ``tests/trainers/hf_real.py`` (real ``Trainer``, ``save_strategy`` and
``eval_strategy`` 'epoch', no ``save_total_limit``) in a subprocess, then ``ckptd once``: ckptd's
best must be ``trainer_state.json``'s ``best_model_checkpoint``, the artifact folder must hold
that checkpoint's ``model.safetensors`` (tensor for tensor) and ``config.json`` and nothing of
the optimizer, scheduler or RNG, and ckptd must keep exactly the newest ``keep_last`` folders
and ``best_model_checkpoint`` (which the Trainer reads again). More settings:
``tests/trainers/test_differential_hf.py``.
The other tests build folders by hand from the reference ``trainer_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ckptd.fs.delete import TRASH_PREFIX, delete_checkpoint, tree_stat
from ckptd.layouts import detect_layouts
from ckptd.layouts.hf import HFLayout
from tests.helpers import REPO, cli, manifest, once_ok, run_harness, write_config

HARNESS = REPO / "tests" / "trainers" / "hf_real.py"
REFERENCE = REPO / "tests" / "data" / "reference" / "hf" / "trainer_state.json"


def train(out: Path, *args: str) -> dict:
    return run_harness(HARNESS, out, *args)


def once(tmp_path: Path, **project: object) -> str:
    return once_ok(tmp_path, **project)


def folders(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def assert_artifact_is(artifact: Path, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    assert sorted(p.name for p in artifact.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "model.safetensors",
    ]
    ours, theirs = (
        load_file(artifact / "model.safetensors"),
        load_file(checkpoint / "model.safetensors"),
    )
    assert list(ours) == list(theirs)
    import torch

    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (artifact / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
    for line in (artifact / "SHA256SUMS").read_text().splitlines():  # sha256sum -c format
        digest, name = line.split("  ")
        assert hashlib.sha256((artifact / name).read_bytes()).hexdigest() == digest


@pytest.mark.trainer
def test_real_trainer_best_artifact_and_kept_set(tmp_path: Path) -> None:
    out = tmp_path / "work_dirs" / "bert"
    result = train(out, "--epochs", "5", "--metric", "accuracy")
    best = Path(result["best_model_checkpoint"]).name
    assert best == "checkpoint-12"
    saved = tmp_path / "saved-best"
    shutil.copytree(out / best, saved)  # ckptd deletes the folder once the artifact is durable

    text = once(tmp_path)
    assert "[hf]" in text and "metric_for_best_model='accuracy'" in text
    # keep_last 2, and the Trainer's best_model_checkpoint, which ckptd never deletes
    assert folders(out) == [best, "checkpoint-16", "checkpoint-20"]
    entry = manifest(out / "best")["artifacts"]["eval_accuracy"]
    assert entry["source_checkpoint"] == best and entry["rule"] == "greater"
    assert entry["value"] == result["best_metric"]
    artifact = out / "best" / "best_eval_accuracy_step_12"
    assert entry["file"] == artifact.name
    assert entry["sha256"] == hashlib.sha256((artifact / "SHA256SUMS").read_bytes()).hexdigest()
    assert_artifact_is(artifact, saved)
    assert "[unchanged]" in once(tmp_path)

    # A resumed run continues from the highest checkpoint-N, which ckptd kept.
    resumed = train(out, "--epochs", "6", "--metric", "accuracy", "--resume")
    assert resumed["global_step"] == 24
    once(tmp_path)
    assert folders(out) == [best, "checkpoint-20", "checkpoint-24"]
    assert manifest(out / "best")["artifacts"]["eval_accuracy"]["source_checkpoint"] == best


@pytest.mark.trainer
def test_real_trainer_loss_metric_without_training_args(tmp_path: Path) -> None:
    out = tmp_path / "work_dirs" / "bert"
    result = train(out, "--epochs", "5", "--metric", "score_loss")
    best = Path(result["best_model_checkpoint"]).name
    assert best == "checkpoint-16"  # greater_is_better=False: the name ends with 'loss'
    saved = tmp_path / "saved-best"
    shutil.copytree(out / best, saved)
    for args in out.glob("checkpoint-*/training_args.bin"):
        args.write_bytes(b"not a pickle ckptd can read")  # metric_for_best_model unknown
    text = once(tmp_path)
    assert "eval_score_loss (training_args.bin unreadable" in text
    entry = manifest(out / "best")["artifacts"]["eval_score_loss"]
    assert entry["source_checkpoint"] == best and entry["rule"] == "less"
    assert_artifact_is(out / "best" / "best_eval_score_loss_step_16", saved)


# --- hand-made folders from the reference trainer_state.json ------------------------------


def make_folder(out: Path, step: int, *, state: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * step)
    (folder / "config.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"o" * 100)
    if state:
        data = json.loads(REFERENCE.read_text())
        data["global_step"] = step
        data["log_history"] = [e for e in data["log_history"] if e["step"] <= step]
        (folder / "trainer_state.json").write_text(json.dumps(data))
    return folder


def test_completeness_needs_parsed_state_with_matching_step_and_no_temp_files(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    layout = HFLayout()
    assert layout.format_check(make_folder(out, 16)) == (True, "")
    missing = make_folder(out, 32, state=False)
    assert layout.format_check(missing) == (
        False,
        "no trainer_state.json yet (the Trainer writes it last)",
    )
    (missing / "trainer_state.json").write_text('{"global_step": 32, "log_his')
    assert layout.format_check(missing)[1] == "trainer_state.json is not complete JSON yet"
    other = make_folder(out, 48)
    (other / "trainer_state.json").write_text('{"global_step": 47}')
    assert "global_step 47, not 48" in layout.format_check(other)[1]
    tmp = make_folder(out, 64)
    (tmp / ".tmp_model.safetensors").write_bytes(b"")
    assert layout.format_check(tmp) == (
        False,
        "holds .tmp_model.safetensors, so it is still being written",
    )
    # metrics come from the newest *complete* folder; metric auto falls back to best_metric
    read = layout.read_evals(out, {}, "step")
    assert [r.index for r in read.records] == [16]
    assert read.records[0].metrics == {"eval_accuracy": 0.640625, "eval_loss": 0.6716974377632141}


def test_once_never_touches_incomplete_or_symlinked_folders(tmp_path: Path) -> None:
    out = tmp_path / "work_dirs" / "run"
    for step in (16, 32, 48):
        make_folder(out, step)
    make_folder(out, 64, state=False)  # being written
    os.symlink(out / "checkpoint-16", out / "checkpoint-80")
    with_link = make_folder(out, 8)
    os.symlink("/etc", with_link / "link")
    assert detect_layouts(out) == ["hf"]
    text = once(tmp_path, retention={"keep_last": 1, "pending_eval_grace": "0s"})
    assert "eval_accuracy (the eval key equal to" not in text  # training_args.bin is missing
    assert folders(out) == [
        "checkpoint-8",
        "checkpoint-16",
        "checkpoint-48",
        "checkpoint-64",
        "checkpoint-80",
    ]
    assert (with_link / "link").is_symlink() and os.path.isdir("/etc")
    entry = manifest(out / "best")["artifacts"]["eval_accuracy"]
    assert entry["source_checkpoint"] == "checkpoint-16"  # best_metric 0.640625 at step 16
    assert "is a symlink; ckptd never deletes such a folder" in text


def test_folder_deletion_rechecks_and_leaves_no_half_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = make_folder(out, 16)
    planned = tree_stat(folder)
    (folder / "scheduler.pt").write_bytes(b"new")  # written after the plan
    assert delete_checkpoint(out, "checkpoint-16", planned) == (
        False,
        "changed since it was planned; left for later",
    )
    assert delete_checkpoint(out, "checkpoint-16", tree_stat(folder)) == (True, "")
    assert not folder.exists() and not any(p.name.startswith(TRASH_PREFIX) for p in out.iterdir())
    # a crash mid-deletion leaves only ckptd's trash, which the next pass removes
    trash = out / f"{TRASH_PREFIX}0000-checkpoint-32"
    make_folder(out, 32).rename(trash)
    make_folder(out, 48)
    write_config(tmp_path, work_dirs=[str(out)])
    code, text, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, text + err
    assert not trash.exists() and folders(out) == ["checkpoint-48"]
    assert delete_checkpoint(out, "../out/checkpoint-48", planned)[0] is False


def test_metrics_follow_the_folder_written_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for step in (16, 32, 48):
        make_folder(out, step)
    # resumed from checkpoint-16: checkpoint-32 is written again, checkpoint-48 is stale
    state = out / "checkpoint-32" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["log_history"].append({"eval_accuracy": 0.9, "eval_loss": 0.5, "step": 32})
    state.write_text(json.dumps(data))
    newer = (out / "checkpoint-48" / "trainer_state.json").stat().st_mtime_ns + 10**9
    os.utime(state, ns=(newer, newer))
    read = HFLayout().read_evals(out, {}, "step")
    assert read.records[-1].index == 32 and read.records[-1].metrics["eval_accuracy"] == 0.9
    assert list(read.sources) == ["checkpoint-32/trainer_state.json"]


@pytest.mark.trainer
def test_real_trainer_keeps_the_best_it_loads_at_the_end_across_a_resume(tmp_path: Path) -> None:
    # load_best_model_at_end loads best_model_checkpoint when training ends, and a resumed
    # Trainer forgets a best whose folder is gone: ckptd must not delete it, even once its own
    # artifact of that step is written and keep_last has moved past it.
    out = tmp_path / "work_dirs" / "bert"
    values = ("--metric", "accuracy", "--values", "0.2,0.3,0.4,0.9,0.1,0.2,0.3,0.5")
    first = train(out, "--epochs", "3", "--load-best", *values)
    assert Path(first["best_model_checkpoint"]).name == "checkpoint-4"
    text = once(tmp_path, retention={"keep_last": 1})
    assert "the Trainer's best_model_checkpoint" in text
    assert folders(out) == ["checkpoint-4", "checkpoint-12"]
    resumed = train(out, "--epochs", "5", "--load-best", "--resume", *values)
    assert resumed["best_model_checkpoint"] is not None, "the resumed Trainer lost its best"
    assert Path(resumed["best_model_checkpoint"]).name == "checkpoint-4"
    once(tmp_path, retention={"keep_last": 1})
    assert folders(out) == ["checkpoint-4", "checkpoint-20"]
    entry = manifest(out / "best")["artifacts"]["eval_accuracy"]
    assert entry["source_checkpoint"] == "checkpoint-4" and entry["value"] == 0.9
