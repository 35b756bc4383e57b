"""A restarted ckptd reads no checkpoint whose stat is unchanged (``ckptd.layouts.memo``).

The oracle is the first pass's own result from parsing the pickles: a later process that
recalls the memo instead must decide exactly the same, and must parse again as soon as the
file changes or the memo is damaged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.config import load_config
from ckptd.core.model import FileStat
from ckptd.engine.reconcile import PassOptions, reconcile
from ckptd.engine.targets import discover
from ckptd.layouts import peek as peek_module
from ckptd.layouts.memo import TUPLE_CODEC, PeekMemo, remembering
from tests.helpers import simulate, write_config


def _pass(root: Path) -> Any:
    loaded = load_config(root / "ckptd.yaml")
    (target,) = discover(loaded).targets
    report = reconcile(target, PassOptions(settle=0.0, one_shot=True))
    assert not report.errors, report.errors
    return report


def _fresh_process(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Forget what this process parsed (as a restart does) and count the pickles parsed."""
    monkeypatch.setattr(peek_module, "_CACHE", type(peek_module._CACHE)())
    parsed: list[Path] = []
    real = peek_module.read_inert_root

    def counting(path: Path, **kwargs: Any) -> Any:
        parsed.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(peek_module, "read_inert_root", counting)
    return parsed


def _state(work_dir: Path) -> dict[str, Any]:
    return json.loads((work_dir / ".ckptd" / "state.json").read_bytes())


def test_a_restart_recalls_the_trainer_best_instead_of_parsing_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work_dir = simulate(
        tmp_path / "work_dirs" / "run",
        epochs=5,
        save_best="coco/bbox_mAP",
        metric_values=[0.1, 0.4, 0.3, 0.2, 0.35],
    )
    write_config(tmp_path, retention={"keep_last": 2})
    parsed = _fresh_process(monkeypatch)
    first = _pass(tmp_path)
    assert parsed, "the first pass must parse the newest checkpoint's message hub"
    trainer = first.observation.bests
    assert [b.index for b in trainer.values()] == [2]
    remembered = _state(work_dir)["peeked"]
    assert list(remembered) == ["mmengine-hub epoch_5.pth"]

    parsed = _fresh_process(monkeypatch)
    second = _pass(tmp_path)
    assert parsed == []  # recalled, not parsed
    assert second.observation.bests == trainer
    assert second.observation.disputes == first.observation.disputes
    assert _state(work_dir)["peeked"] == remembered  # an unchanged pass keeps its entry

    # the checkpoint changes (re-saved in place): parsed again, whatever the memo says
    newest = work_dir / "epoch_5.pth"
    stat = os.stat(newest)
    os.utime(newest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    parsed = _fresh_process(monkeypatch)
    _pass(tmp_path)
    assert parsed == [newest]


def test_a_damaged_memo_entry_is_read_from_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(b"x")
    stat = FileStat.lstat(path)
    memo = PeekMemo(tmp_path, {"what x.pth": [*stat.as_list(), 17]})  # 17 is no tuple
    assert memo.recall(path, stat, "what", TUPLE_CODEC) == (False, None)
    memo = PeekMemo(tmp_path, {"what x.pth": [stat.inode, stat.size, stat.mtime_ns + 1, [1]]})
    assert memo.recall(path, stat, "what", TUPLE_CODEC) == (False, None)  # another version
    assert memo.to_json() == {}  # neither is kept
    memo.remember(path, stat, "what", TUPLE_CODEC, ("a", 1.0))
    again = PeekMemo(tmp_path, memo.to_json())
    assert again.recall(path, stat, "what", TUPLE_CODEC) == (True, ("a", 1.0))


def test_reads_outside_a_pass_remember_nothing(tmp_path: Path) -> None:
    """Only the engine scopes a memo: a layout used on its own (ckptd status, tests) still
    parses and caches in-process, and no memo leaks from one pass into another thread."""
    from ckptd.layouts.memo import active_memo

    assert active_memo() is None
    memo = PeekMemo(tmp_path)
    with remembering(memo):
        assert active_memo() is memo
    assert active_memo() is None
