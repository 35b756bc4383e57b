"""``ckptd once`` / ``status`` / ``slim`` end to end on simulated MMEngine work_dirs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ckptd.engine.state import WorkDirLock
from tests.conftest import VALUES
from tests.helpers import (
    assert_same_state_dict,
    checkpoints,
    cli,
    inventory,
    load_full,
    load_weights_only,
    manifest,
    simulate,
    write_config,
)


def once(root: Path, *extra: str) -> tuple[int, str, str]:
    return cli("once", "-c", str(root / "ckptd.yaml"), *extra)


def test_once_keeps_what_max_keep_ckpts_would_and_slims_the_best(run: Path) -> None:
    root = run.parent.parent
    best_epoch = load_full(run / "epoch_4.pth")
    code, out, err = once(root)
    assert code == 0, out + err
    assert checkpoints(run) == ["epoch_5.pth", "epoch_6.pth"]
    assert "keep          epoch_6.pth" in out and "newest complete checkpoint" in out
    assert "resume pointer of the trainer" in out and "keep_last #2" in out
    assert "deleted       epoch_1.pth" in out and "older than the 2 newest; evaluated" in out
    artifact = run / "best" / "best_coco_bbox_mAP_epoch_4.pth"
    assert f"coco/bbox_mAP = 0.5 (greater) at epoch 4 -> {artifact}" in out
    slim = load_weights_only(artifact)
    assert list(slim) == ["meta", "state_dict"]
    assert_same_state_dict(slim["state_dict"], best_epoch["state_dict"])
    assert slim["meta"] == best_epoch["meta"]
    entry = manifest(run / "best")["artifacts"]["coco/bbox_mAP"]
    assert entry["file"] == artifact.name and entry["epoch"] == 4 and entry["value"] == 0.5
    assert entry["rule"] == "greater" and entry["source_checkpoint"] == "epoch_4.pth"
    assert entry["bytes"] == artifact.stat().st_size
    import hashlib

    assert entry["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert "reclaimed" in out and "(dry run" not in out


def test_second_pass_is_a_no_op(run: Path) -> None:
    root = run.parent.parent
    once(root)
    before = inventory(run)
    code, out, _ = once(root)
    assert code == 0 and "[unchanged]" in out
    after = inventory(run)
    # only ckptd's own state file may be rewritten
    assert {k: v for k, v in after.items() if ".ckptd" not in k} == {
        k: v for k, v in before.items() if ".ckptd" not in k
    }


def test_dry_run_changes_nothing_on_disk(run: Path) -> None:
    root = run.parent.parent
    before = inventory(root)
    code, out, _ = once(root, "--dry-run")
    assert code == 0
    assert inventory(root) == before
    assert not (run / ".ckptd").exists() and not (run / "best").exists()
    assert "would delete  epoch_1.pth" in out and "[would write]" in out
    assert "dry run: nothing changed" in out


def test_status_json_reports_best_artifact_keep_reasons_and_bytes(run: Path) -> None:
    root = run.parent.parent
    once(root)
    code, out, _ = cli("status", "-c", str(root / "ckptd.yaml"), "--json")
    assert code == 0
    data = json.loads(out)["work_dirs"][0]
    assert data["layout"] == "mmengine" and data["work_dir"] == str(run)
    assert data["best"][0]["metric"] == "coco/bbox_mAP" and data["best"][0]["index"] == 4
    assert data["best"][0]["status"] == "unchanged"
    assert data["reclaimed_total_bytes"] > 0
    kept = {c["name"]: c["reasons"] for c in data["checkpoints"]}
    assert set(kept) == {"epoch_5.pth", "epoch_6.pth"}
    assert data["held_bytes"] == sum(p.stat().st_size for p in run.glob("epoch_*.pth"))
    code, text, _ = cli("status", "-c", str(root / "ckptd.yaml"))
    assert "[mmengine]" in text and "keep_last #2" in text


def test_val_interval_two_unevaluated_epochs_stop_waiting(tmp_path: Path) -> None:
    run = simulate(tmp_path / "work_dirs" / "r", epochs=7, val_interval=2, metric_values=VALUES)
    write_config(tmp_path, retention={"keep_last": 1})
    code, out, _ = once(tmp_path)
    assert code == 0, out
    # epochs 2,4,6 evaluated, 7 is the last epoch (MMEngine always validates it); best = 4
    assert checkpoints(run) == ["epoch_7.pth"]
    assert "not evaluated, a later epoch was" in out
    assert (run / "best" / "best_coco_bbox_mAP_epoch_4.pth").exists()


def test_checkpoint_waiting_for_its_evaluation_is_kept(run: Path) -> None:
    root = run.parent.parent
    shutil.copy(run / "epoch_6.pth", run / "epoch_7.pth")  # written, not yet evaluated
    (run / "last_checkpoint").write_text(str(run / "epoch_7.pth"))
    write_config(root, retention={"keep_last": 1})
    code, out, _ = once(root)
    assert code == 0
    assert checkpoints(run) == ["epoch_7.pth"]
    assert "waiting for its evaluation" in out


def test_resume_pointer_from_another_mount_namespace_is_protected(run: Path) -> None:
    root = run.parent.parent
    (run / "last_checkpoint").write_text("/mnt/elsewhere/work_dirs/retinanet/epoch_2.pth")
    code, out, _ = once(root)
    assert code == 0
    assert checkpoints(run) == ["epoch_2.pth", "epoch_5.pth", "epoch_6.pth"]
    assert "matched epoch_2.pth by file name" in out


def test_keep_every_budget_and_hash_in_name(tmp_path: Path) -> None:
    run = simulate(tmp_path / "work_dirs" / "r", epochs=9, metric_values=VALUES)
    size = (run / "epoch_9.pth").stat().st_size
    write_config(
        tmp_path,
        retention={"keep_last": 2, "keep_every": 3, "max_total_size": 3 * size + 100},
        artifact={"hash_in_name": True},
    )
    code, out, _ = once(tmp_path)
    assert code == 0, out
    # keep_every 3 keeps 3, 6, 9; keep_last 8, 9; the budget (3 files) drops the oldest: 3
    assert checkpoints(run) == ["epoch_6.pth", "epoch_8.pth", "epoch_9.pth"]
    assert "over max_total_size" in out
    entry = manifest(run / "best")["artifacts"]["coco/bbox_mAP"]
    assert entry["file"] == f"best_coco_bbox_mAP_epoch_4-{entry['sha256'][:8]}.pth"


def test_several_metrics_each_get_an_artifact(tmp_path: Path) -> None:
    values = {"coco/bbox_mAP": [0.1, 0.4, 0.3, 0.2], "coco/segm_mAP": [0.1, 0.2, 0.3, 0.25]}
    keys = ("coco/bbox_mAP", "coco/segm_mAP")
    run = simulate(tmp_path / "work_dirs" / "r", epochs=4, metric_keys=keys, metric_values=values)
    write_config(tmp_path, best={"metric": list(keys)}, retention={"keep_last": 1})
    code, out, _ = once(tmp_path)
    assert code == 0, out
    assert sorted(p.name for p in (run / "best").glob("*.pth")) == [
        "best_coco_bbox_mAP_epoch_2.pth",
        "best_coco_segm_mAP_epoch_3.pth",
    ]
    assert checkpoints(run) == ["epoch_4.pth"]


def test_best_across_a_resumed_launch(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    values = [0.3, 0.45, 0.4, 0.5, 0.48, 0.47, 0.6, 0.5]
    simulate(run, epochs=5, metric_values=values)
    time.sleep(1.1)  # a new launch folder needs a new timestamp
    simulate(run, epochs=8, metric_values=values, resume=True)
    write_config(tmp_path)
    code, out, _ = once(tmp_path)
    assert code == 0, out
    assert len(list(run.glob("2*/vis_data/scalars.json"))) == 2
    assert (run / "best" / "best_coco_bbox_mAP_epoch_7.pth").exists()
    assert checkpoints(run) == ["epoch_7.pth", "epoch_8.pth"]


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_payloads_in_dropped_keys_never_run(run: Path) -> None:
    root = run.parent.parent
    marker = root / "PWNED"
    ckpt = load_full(run / "epoch_4.pth")
    ckpt["message_hub"]["evil"] = Payload(marker)
    ckpt["optimizer"]["evil"] = Payload(marker)
    torch.save(ckpt, run / "epoch_4.pth")
    os.utime(run / "epoch_4.pth", (time.time() - 60, time.time() - 60))
    code, out, err = once(root)
    assert code == 0, out + err
    assert not marker.exists()
    slim = load_weights_only(run / "best" / "best_coco_bbox_mAP_epoch_4.pth")
    assert set(slim) == {"meta", "state_dict"}
    code, _, _ = cli("slim", str(run / "epoch_5.pth"), "-o", str(root / "out.pth"))
    assert code == 0 and not marker.exists()


def test_payload_in_a_kept_key_fails_clearly_and_deletes_nothing(run: Path) -> None:
    root = run.parent.parent
    marker = root / "PWNED"
    ckpt = load_full(run / "epoch_4.pth")
    ckpt["meta"]["evil"] = Payload(marker)
    torch.save(ckpt, run / "epoch_4.pth")
    os.utime(run / "epoch_4.pth", (time.time() - 60, time.time() - 60))
    code, out, _ = once(root)
    assert code == 1
    assert not marker.exists()
    assert checkpoints(run) == [f"epoch_{i}.pth" for i in range(1, 7)]
    assert "epoch_4.pth" in out and "'meta'" in out and "system" in out
    assert "held back until the errors above are fixed" in out
    assert not list((run / "best").glob("*.pth"))


def test_malformed_line_fails_the_work_dir_and_deletes_nothing(run: Path) -> None:
    root = run.parent.parent
    scalars = next(run.glob("*/vis_data/scalars.json"))
    with scalars.open("a") as f:
        f.write('{"coco/bbox_mAP": 0.9, "step": \n')
    code, out, _ = once(root)
    assert code == 1
    lines = scalars.read_text().count("\n")
    assert f"{scalars.relative_to(run)}:{lines}: not a JSON record" in out
    assert checkpoints(run) == [f"epoch_{i}.pth" for i in range(1, 7)]


def test_missing_metric_key_names_the_keys_present(run: Path) -> None:
    root = run.parent.parent
    write_config(root, best={"metric": "coco/segm_mAP"})
    code, out, _ = once(root)
    assert code == 1
    assert "no metric 'coco/segm_mAP'" in out and "coco/bbox_mAP" in out
    assert checkpoints(run) == [f"epoch_{i}.pth" for i in range(1, 7)]


def test_truncated_checkpoint_left_broken_is_reported(run: Path) -> None:
    root = run.parent.parent
    path = run / "epoch_2.pth"
    path.write_bytes(path.read_bytes()[:5000])
    old = time.time() - 3600
    os.utime(path, (old, old))
    code, out, _ = once(root)
    assert code == 1
    assert "epoch_2.pth" in out and "truncated or corrupt" in out
    assert len(checkpoints(run)) == 6


def test_unwritable_artifact_dir_fails_and_deletes_nothing(run: Path) -> None:
    root = run.parent.parent
    blocker = root / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    write_config(root, artifact={"dir": str(blocker / "{run}")})
    code, out, _ = once(root)
    assert code == 1
    assert str(blocker) in out and "nothing was deleted" in out
    assert checkpoints(run) == [f"epoch_{i}.pth" for i in range(1, 7)]


def test_a_second_ckptd_skips_a_locked_work_dir_and_says_who(run: Path) -> None:
    root = run.parent.parent
    lock = WorkDirLock(run)
    lock.acquire()
    try:
        code, out, _ = once(root)
    finally:
        lock.release()
    assert code == 0
    assert "locked by another ckptd (pid" in out and str(os.getpid()) in out
    assert len(checkpoints(run)) == 6


def test_not_matching_anything_is_said(tmp_path: Path) -> None:
    write_config(tmp_path)
    code, out, _ = once(tmp_path)
    assert code == 0 and "no folder matches" in out


def test_config_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "ckptd.yaml").write_text(
        "projects: [{name: a, work_dirs: [x], retention: {keep_last: 0}}]"
    )
    code, _, err = once(tmp_path)
    assert code == 2 and "keep_last" in err
    code, _, err = cli("check", "-c", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such config file" in err
    code, _, _ = cli("frobnicate")
    assert code == 2


def test_slim_command_like_publish_model(run: Path, tmp_path: Path) -> None:
    code, out, _ = cli(
        "slim", str(run / "epoch_3.pth"), "-o", str(tmp_path / "model.pth"), "--hash-in-name"
    )
    assert code == 0, out
    produced = next(tmp_path.glob("model-*.pth"))
    assert produced.name in out and "kept meta, state_dict" in out
    assert_same_state_dict(
        load_weights_only(produced)["state_dict"], load_full(run / "epoch_3.pth")["state_dict"]
    )
    code, _, err = cli("slim", str(run / "epoch_3.pth"), "--keep-keys", "meta,nope")
    assert code == 1 and "nope" in err


def test_ckptd_umask_makes_its_folders_group_writable(run: Path) -> None:
    from tests.helpers import cli_process

    root = run.parent.parent
    result = cli_process(
        "once", "-c", str(root / "ckptd.yaml"), env={**os.environ, "CKPTD_UMASK": "0002"}
    )
    assert result.returncode == 0, result.stderr
    for folder in (run / "best", run / ".ckptd"):
        assert folder.stat().st_mode & 0o777 == 0o775, folder


def test_two_files_with_one_index_hold_back_deletions(run: Path) -> None:
    root = run.parent.parent
    shutil.copy(run / "epoch_2.pth", run / "epoch_02.pth")
    code, out, _ = once(root)
    assert code == 1
    assert "epoch_02.pth and epoch_2.pth both count 2" in out
    assert len(checkpoints(run)) == 7
