"""The per-work_dir state file and the lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptd.engine.state import (
    LockBusy,
    StateError,
    WorkDirLock,
    WorkDirState,
    load_state,
    save_state,
    state_dir,
)


def test_round_trip_and_unchanged_state_is_not_rewritten(tmp_path: Path) -> None:
    state, note = load_state(tmp_path)
    assert note == "" and state == WorkDirState()
    state.reclaimed_bytes = 42
    assert save_state(tmp_path, state) is True
    path = state_dir(tmp_path) / "state.json"
    first = path.stat().st_mtime_ns, path.stat().st_ino
    loaded, _ = load_state(tmp_path)
    assert loaded.reclaimed_bytes == 42
    loaded.last_pass = {"time": "later"}  # bookkeeping alone is not a change
    assert save_state(tmp_path, loaded) is False
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == first
    loaded.reclaimed_bytes = 43
    assert save_state(tmp_path, loaded) is True
    assert load_state(tmp_path)[0].reclaimed_bytes == 43


def test_corrupt_state_starts_fresh_with_a_note(tmp_path: Path) -> None:
    state_dir(tmp_path).mkdir()
    (state_dir(tmp_path) / "state.json").write_text("{not json")
    state, note = load_state(tmp_path)
    assert state == WorkDirState() and "starting from a fresh state" in note


def test_state_from_a_newer_ckptd_is_refused(tmp_path: Path) -> None:
    state_dir(tmp_path).mkdir()
    (state_dir(tmp_path) / "state.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(StateError, match="newer ckptd"):
        load_state(tmp_path)


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    first, second = WorkDirLock(tmp_path), WorkDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(LockBusy, match=rf"pid {os.getpid()} on "):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    assert second.held
    second.release()


def test_the_lock_names_its_owner_alone_after_a_longer_one(tmp_path: Path) -> None:
    """The owner is written over the last one without truncating first: what a longer earlier
    owner left beyond it must still go, or `holder()` could not read the file."""
    lock = WorkDirLock(tmp_path)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({"pid": 1, "host": "h" * 300, "since": 0.0}))
    lock.acquire()
    try:
        owner = json.loads(lock.path.read_bytes())
        assert owner["pid"] == os.getpid() and "h" * 300 not in owner["host"]
        assert str(os.getpid()) in lock.holder()
    finally:
        lock.release()


def test_an_unchanged_state_is_not_written_again(tmp_path: Path) -> None:
    """The digest saved in state.json stands for its content: a state loaded and saved
    unchanged is not rewritten; any change is."""
    state, _ = load_state(tmp_path)
    state.checkpointed = {3}
    assert save_state(tmp_path, state)
    again, _ = load_state(tmp_path)
    again.last_pass = {"time": "later"}  # not part of the content
    assert not save_state(tmp_path, again)
    again.checkpointed.add(4)
    assert save_state(tmp_path, again)
