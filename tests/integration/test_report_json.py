"""``ckptd once/status --json``: its shape is docs/report.schema.json, and a held-back pass
says ``hold`` (never ``delete``) with the rule ids and error kinds that explain it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from ckptd.engine.state import WorkDirLock
from tests.helpers import REPO, checkpoints, cli

SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())


def as_json(root: Path, command: str, *extra: str) -> dict[str, Any]:
    _, out, _err = cli(command, "-c", str(root / "ckptd.yaml"), "--json", *extra)
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    return data


def actions(data: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["action"] for c in data["work_dirs"][0]["checkpoints"]}


def test_a_normal_pass_and_its_second_pass(run: Path) -> None:
    root = run.parent.parent
    first = as_json(root, "once")
    assert actions(first) == {
        "epoch_6.pth": "keep",
        "epoch_5.pth": "keep",
        **{f"epoch_{i}.pth": "deleted" for i in (4, 3, 2, 1)},
    }
    newest = first["work_dirs"][0]["checkpoints"][0]
    assert newest["rules"] == ["newest", "resume_pointer", "keep_last"]
    assert newest["reasons"][0] == "newest complete checkpoint"
    assert first["work_dirs"][0]["best"][0]["status"] == "written"
    second = as_json(root, "status")
    assert set(actions(second).values()) == {"keep"}


def test_dry_run_says_delete_and_deletes_nothing(run: Path) -> None:
    data = as_json(run.parent.parent, "once", "--dry-run")
    assert actions(data)["epoch_1.pth"] == "delete"
    assert data["work_dirs"][0]["dry_run"] is True
    assert len(checkpoints(run)) == 6


def test_held_back_pass_says_hold_with_the_error_kind(run: Path) -> None:
    scalars = next(run.glob("*/vis_data/scalars.json"))
    with scalars.open("a") as f:
        f.write('{"coco/bbox_mAP": 0.9, "step": \n')
    for command in ("once", "status"):
        data = as_json(run.parent.parent, command)
        wd = data["work_dirs"][0]
        assert wd["error_kinds"] == ["input"]
        held = [c for c in wd["checkpoints"] if c["action"] == "hold"]
        assert [c["name"] for c in held] == [f"epoch_{i}.pth" for i in (4, 3, 2, 1)]
        assert all(c["rules"] == ["held_by_errors", "not_kept"] for c in held)
        assert "held back by this pass's input error(s)" in held[0]["reasons"][0]
        assert "delete" not in actions(data).values()
    assert len(checkpoints(run)) == 6


def test_locked_work_dir_is_a_skip_id(run: Path) -> None:
    lock = WorkDirLock(run)
    lock.acquire()
    try:
        data = as_json(run.parent.parent, "once")
    finally:
        lock.release()
    wd = data["work_dirs"][0]
    assert wd["skip"] == "locked" and "locked by another ckptd" in wd["skipped"]
