"""The power-cut filesystem itself, tested before anything is judged with it.

Through a real FUSE mount: a writer that fsyncs correctly (temp file, fsync, rename, fsync of
the folder; ckptd's own ``atomic_write_bytes``) keeps its data under both models and every seed;
one that skips the file's fsync or the folder's loses what it skipped - always under ``strict``,
sometimes under ``reorder``, whose outcomes must also cover every order the model allows and
never show bytes that were not written.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.fs.durable import atomic_write_bytes, fsync_dir
from tests.faults.powerfs_fuse import PowerMount, unavailable

SEEDS = range(12)


@pytest.fixture
def power(tmp_path: Path) -> Iterator[PowerMount]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with PowerMount(tmp_path / "mnt", tmp_path / "scratch") as mount:
        yield mount


def _write(path: Path, data: bytes, *, fsync: bool, pieces: int = 1) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = -(-len(data) // pieces)
        for i in range(pieces):
            os.write(fd, data[i * size : (i + 1) * size])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _outcomes(
    power: PowerMount, model: str, act: Callable[[Path], None], look: Callable[[Path], object]
) -> collections.Counter[object]:
    """Cut the power right after ``act`` (on a synced, empty folder) once per seed."""
    seen: collections.Counter[object] = collections.Counter()
    root = power.mountpoint
    for seed in SEEDS:
        folder = root / f"d{seed}"
        folder.mkdir()
        power.sync()
        act(folder)
        power.cut(model, seed)  # type: ignore[arg-type]
        power.reboot()
        seen[look(folder)] += 1
    return seen


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("model", ["strict", "reorder"])
def test_a_correct_writer_keeps_its_data(power: PowerMount, model: str) -> None:
    def act(folder: Path) -> None:
        _write(folder / "old", b"old", fsync=True)
        fsync_dir(folder)
        _write(folder / "tmp", b"new" * 1000, fsync=True)
        os.rename(folder / "tmp", folder / "final")
        fsync_dir(folder)
        atomic_write_bytes(folder / "ckptd.json", b"{}")  # ckptd's own helper

    def look(folder: Path) -> object:
        return (_content(folder / "final"), _content(folder / "ckptd.json"))

    assert _outcomes(power, model, act, look) == {(b"new" * 1000, b"{}"): len(SEEDS)}


@pytest.mark.parametrize("model", ["strict", "reorder"])
def test_a_rename_without_fsync_of_the_file_loses_its_content(
    power: PowerMount, model: str
) -> None:
    new = b"n" * 5000

    def act(folder: Path) -> None:
        _write(folder / "final", b"old", fsync=True)
        fsync_dir(folder)
        _write(folder / "tmp", new, fsync=False, pieces=2)
        os.rename(folder / "tmp", folder / "final")
        fsync_dir(folder)

    def look(folder: Path) -> object:
        data = _content(folder / "final")
        assert data is not None and new.startswith(data), data  # only bytes that were written
        return "complete" if data == new else "empty" if not data else "torn"

    seen = _outcomes(power, model, act, look)
    if model == "strict":
        assert seen == {"empty": len(SEEDS)}
    else:
        assert {"empty", "complete", "torn"} <= set(seen), seen


@pytest.mark.parametrize("model", ["strict", "reorder"])
def test_a_rename_without_fsync_of_the_folder_can_be_lost(power: PowerMount, model: str) -> None:
    def act(folder: Path) -> None:
        _write(folder / "final", b"old", fsync=True)
        fsync_dir(folder)
        _write(folder / "tmp", b"new", fsync=True)
        os.rename(folder / "tmp", folder / "final")  # no fsync of the folder after it

    def look(folder: Path) -> object:
        names = sorted(os.listdir(folder))
        data = _content(folder / "final")
        allowed = ((["final"], b"old"), (["final", "tmp"], b"old"), (["final"], b"new"))
        assert (names, data) in allowed, (names, data)
        return data

    seen = _outcomes(power, model, act, look)
    if model == "strict":
        assert seen == {b"old": len(SEEDS)}
    else:
        assert set(seen) == {b"old", b"new"}, seen


@pytest.mark.parametrize("model", ["strict", "reorder"])
def test_entry_operations_of_one_folder_persist_in_order(power: PowerMount, model: str) -> None:
    """create a, create b, unlink a: the folder shows a prefix of these (nothing, a, a and b,
    b), never a later operation without the earlier ones (e.g. a gone while b was never made)."""

    def act(folder: Path) -> None:
        _write(folder / "a", b"a", fsync=True)
        _write(folder / "b", b"b", fsync=True)
        os.unlink(folder / "a")

    def look(folder: Path) -> object:
        return tuple(sorted(os.listdir(folder)))

    seen = _outcomes(power, model, act, look)
    prefixes = {(), ("a",), ("a", "b"), ("b",)}
    assert set(seen) <= prefixes, seen
    if model == "strict":
        assert seen == {(): len(SEEDS)}
    else:
        assert {(), ("b",)} <= set(seen), seen  # none of it, all of it


def test_an_unsynced_new_folder_vanishes_with_what_is_in_it(power: PowerMount) -> None:
    """Everything in a folder is durable, but the folder's own name is not: all of it is gone."""

    def act(folder: Path) -> None:
        (folder / "sub").mkdir()
        atomic_write_bytes(folder / "sub" / "f", b"data")

    seen = _outcomes(power, "strict", act, lambda f: tuple(os.listdir(f)))
    assert seen == {(): len(SEEDS)}


def test_after_the_cut_nothing_more_happens(power: PowerMount) -> None:
    folder = power.mountpoint / "x"
    folder.mkdir()
    power.sync()
    power.cut("strict", 0)
    with pytest.raises(OSError):
        _write(folder / "late", b"late", fsync=True)
    power.reboot()
    assert os.listdir(folder) == []


def test_mmengine_never_fsyncs_its_checkpoint(power: PowerMount) -> None:
    """The measurement behind counting a lost recent checkpoint as the trainer's: MMEngine's
    own ``save_checkpoint`` (``torch.save`` to bytes, ``LocalBackend.put``: open, write, close)
    issues no fsync, so a cut even right after it returns leaves nothing of the file."""
    import torch
    from mmengine.runner.checkpoint import save_checkpoint

    folder = power.mountpoint / "work_dir"
    folder.mkdir()
    power.sync()
    before = power.counts().get("fsync", 0)
    save_checkpoint(
        {"state_dict": {"w": torch.zeros(4)}, "meta": {"epoch": 1}}, str(folder / "epoch_1.pth")
    )
    assert (folder / "epoch_1.pth").stat().st_size > 0
    assert power.counts().get("fsync", 0) == before, "MMEngine fsyncs now: update the docs"
    power.cut("strict", 0)
    power.reboot()
    assert not (folder / "epoch_1.pth").exists()
