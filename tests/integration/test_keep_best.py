"""``retention.keep_best: k`` on simulated MMEngine runs, and the history chart of ``status``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jsonschema

from tests.helpers import REPO, checkpoints, cli, cli_process, simulate, write_config

KEY = "coco/bbox_mAP"


def test_keep_best_keeps_the_k_best_saved_evaluations(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    # 2 and 4 tie (the earlier ranks higher), 5 is NaN (never ranks), 8 is third
    values = [0.3, 0.5, 0.4, 0.5, math.nan, 0.45, 0.2, 0.48, 0.1, 0.1]
    simulate(run, epochs=10, metric_values=values)
    write_config(tmp_path, retention={"keep_last": 1, "keep_best": 3})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    assert checkpoints(run) == ["epoch_2.pth", "epoch_4.pth", "epoch_8.pth", "epoch_10.pth"]
    assert f"keep_best #1 ({KEY} = 0.5)" in out and f"keep_best #3 ({KEY} = 0.48)" in out
    line = next(ln for ln in out.splitlines() if "epoch_4.pth" in ln)
    assert line.startswith("  keep ") and line.endswith(f"keep_best #2 ({KEY} = 0.5)")
    assert (run / "best" / "best_coco_bbox_mAP_epoch_2.pth").is_file()
    # the ranking counts the deleted ones too (they had a checkpoint): a second pass is a no-op
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0 and "deleted " not in out, out + err


def test_a_resumed_runs_superseded_evaluations_do_not_rank(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    simulate(run, epochs=6, metric_values=[0.3, 0.4, 0.5, 0.9, 0.8, 0.1])
    # resumed from epoch 3: epochs 4..6 are trained again, their first scores describe nothing
    (run / "last_checkpoint").write_text(str(run / "epoch_3.pth"))
    time.sleep(1.1)  # a new launch folder needs a new timestamp
    simulate(run, epochs=6, metric_values=[0.3, 0.4, 0.5, 0.35, 0.45, 0.2], resume=True)
    write_config(tmp_path, retention={"keep_last": 1, "keep_best": 3})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    assert checkpoints(run) == ["epoch_2.pth", "epoch_3.pth", "epoch_5.pth", "epoch_6.pth"]
    assert f"keep_best #2 ({KEY} = 0.45)" in out


def test_status_draws_each_metrics_history_with_best_and_kept_marks(tmp_path: Path) -> None:
    run = tmp_path / "work_dirs" / "r"
    simulate(run, epochs=6, metric_values=[0.1, 0.5, 0.32, math.nan, 0.2, 0.4])
    config = write_config(tmp_path, retention={"keep_last": 1, "keep_best": 2})
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "100"}
    result = cli_process("status", "-c", str(config), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("  history"))
    assert lines[head] == f"  history       {KEY}  epoch 1-6  (▲ best, ● kept, ◆ both, × NaN)"
    assert lines[head + 1] == " " * 16 + "▁█▅×▃▆"
    # kept: 2 (best, keep_best #1), 6 (newest, keep_best #2); 1, 3, 4, 5 would be deleted
    assert lines[head + 2] == " " * 16 + " ◆   ●"
    # a stdout that cannot take Unicode (here a StringIO without an encoding) gets ASCII
    code, out, _ = cli("status", "-c", str(config))
    assert code == 0 and "_^-x.'" in out and " @   o" in out
    # never in --json, and not in the listing of once
    code, out, _ = cli("status", "-c", str(config), "--json")
    assert code == 0 and "history" not in out
    schema = json.loads((REPO / "docs" / "report.schema.json").read_text())
    jsonschema.validate(json.loads(out), schema)
    rules = {c["name"]: c["rules"] for c in json.loads(out)["work_dirs"][0]["checkpoints"]}
    assert rules["epoch_2.pth"] == ["best_artifact_pending", "keep_best"]
    assert rules["epoch_6.pth"][-1] == "keep_best"
    code, out, _ = cli("once", "--dry-run", "-c", str(config))
    assert code == 0 and "history" not in out


def test_check_shows_the_default_and_the_deprecated_key(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, out, _ = cli("check", "-c", str(config))
    assert code == 0 and "    keep_best: 0\n" in out and "keep_best_full" not in out
    config = write_config(tmp_path, retention={"keep_best_full": True})
    code, out, err = cli("check", "-c", str(config))
    assert code == 0 and "    keep_best: 1\n" in out, out + err
    assert "# note: projects[0].retention.keep_best_full is deprecated; write keep_best: 1" in out
    # the other commands log it once, at start
    code, out, err = cli("once", "--dry-run", "-c", str(config))
    assert err.count("keep_best_full is deprecated") == 1, err
