"""Hostile filesystems (invariant 1: never delete anything that is not a checkpoint of the
layout, is outside the work_dir, or is a symlink).

Each test builds a tree where a work_dir sits next to an ``outside`` folder full of decoys
(checkpoint-named files, a complete work_dir, files the symlinks and the resume pointer name),
runs ckptd, and proves that nothing outside the work_dir was deleted, changed or even opened:
an inotify watch on every outside folder sees no open, read, write or delete during the run, and
a full inventory (content hash, inode, size, mtime) is the same before and after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.config import load_config
from ckptd.engine.reconcile import PassOptions, reconcile
from ckptd.engine.targets import discover
from tests.daemon_proc import DaemonProcess
from tests.faults import inotify
from tests.faults.figures import report
from tests.faults.invariants import artifact_problems, outside_inventory
from tests.faults.trainer import CHECKPOINT, record, replay_now
from tests.helpers import REPO, write_config

LOOKS = inotify.IN_OPEN | inotify.IN_ACCESS | inotify.IN_MODIFY | inotify.IN_ATTRIB
CHANGES = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO
# Copies of a real checkpoint under names MMEngine never writes: never deleted, never read.
NOT_CHECKPOINTS = (
    "epoch_\u0661.pth",  # ARABIC-INDIC DIGIT ONE
    "epoch_\uff11.pth",  # FULLWIDTH DIGIT ONE
    "epoch_1 .pth",
    "epoch_1.pth\n",
    "EPOCH_1.pth",
    "epoch_1.PTH",
    "epoch_1.pth.bak",
    ".epoch_1.pth",
    "epoch_-1.pth",
    "epoch 1.pth",
)


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name))


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ckptd", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


class Outside:
    """Decoys outside the work_dirs, watched and inventoried."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "outside"
        victim = self.path / "victim"
        victim.mkdir(parents=True)
        replay_now(record(), victim, upto_epoch=6)  # a complete work_dir, same names
        (self.path / "secret.pth").write_bytes((victim / "epoch_6.pth").read_bytes())
        (self.path / "notes.txt").write_text("not ckptd's")
        self.before: dict[str, tuple[Any, ...]] = {}
        self.events: list[str] = []

    @contextlib.contextmanager
    def untouched(self) -> Iterator[None]:
        """Inside: ckptd runs. After: nothing outside was opened, changed or deleted."""
        self.before = outside_inventory(self.path)
        folders = [Path(folder) for folder, _dirs, _files in os.walk(self.path)]
        with inotify.Inotify() as watch:
            for folder in folders:  # listed first: the walk itself must not be seen
                watch.watch(folder, LOOKS | CHANGES)
            yield
            self.events = [str(e) for e in watch.read(0.2)]
        assert not self.events, f"ckptd touched files outside the work_dir: {self.events}"
        assert outside_inventory(self.path) == self.before


def _hostile_arena(root: Path, outside: Outside) -> tuple[Path, Path]:
    """A work_dir with every trap at once, and a normal one with an unfriendly name."""
    run = root / "work_dirs" / "run"
    run.mkdir(parents=True)
    replay_now(record(), run, upto_epoch=6)  # best: epoch 6
    victim = outside.path / "victim"
    (run / "epoch_2.pth").unlink()
    (run / "epoch_2.pth").symlink_to(victim / "epoch_2.pth")  # a checkpoint that is a link
    (run / "epoch_9.pth").symlink_to(outside.path / "secret.pth")  # the "newest" is a link
    (run / "epoch_3.pth").unlink()
    (run / "epoch_3.pth").mkdir()  # a checkpoint replaced by a folder
    (run / "epoch_3.pth" / "data.pkl").write_bytes(b"\x80\x02}q\x00.")
    for name in NOT_CHECKPOINTS:
        shutil.copy(run / "epoch_1.pth", run / name)
    (run / "last_checkpoint").write_text(str(victim / "epoch_5.pth"))  # a path outside
    odd = root / "work_dirs" / "spaces, ラン and a\nnewline"
    odd.mkdir()
    replay_now(record(), odd, upto_epoch=4)
    return run, odd


def _check_arena(run: Path, odd: Path) -> None:
    # epoch_1 and epoch_4: deleted (older than the 2 newest, not best, not the resume target)
    kept = ["epoch_2.pth", "epoch_3.pth", "epoch_5.pth", "epoch_6.pth", "epoch_9.pth"]
    assert checkpoints(run) == kept
    assert (run / "epoch_2.pth").is_symlink() and (run / "epoch_9.pth").is_symlink()
    assert (run / "epoch_3.pth" / "data.pkl").read_bytes() == b"\x80\x02}q\x00."
    for name in NOT_CHECKPOINTS:
        assert (run / name).exists(), f"{name!r} is not a checkpoint and was deleted"
    assert [p.name for p in (run / "best").glob("*.pth")] == ["best_coco_bbox_mAP_epoch_6.pth"]
    assert not artifact_problems(run / "best")
    assert checkpoints(odd) == ["epoch_3.pth", "epoch_4.pth"]
    assert not artifact_problems(odd / "best")


@pytest.mark.parametrize("how", ["once", "run"])
def test_hostile_work_dir(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    outside = Outside(tmp_path)
    run, odd = _hostile_arena(tmp_path, outside)
    config = write_config(tmp_path)
    with outside.untouched():
        if how == "once":
            result = ckptd("once", "-c", str(config))
            out = result.stdout
            assert result.returncode == 0, out + result.stderr
            assert "epoch_9.pth" in out and "a symlink; ckptd never deletes or follows it" in out
            assert "epoch_3.pth" in out and "not a regular file" in out
            assert "matched epoch_5.pth by file name in this work_dir" in out
        else:
            with DaemonProcess(config) as daemon:
                daemon.wait_ready()
                assert daemon.stop(signal.SIGTERM) == 0
    _check_arena(run, odd)
    report(
        capsys,
        f"hostile work_dir (ckptd {how})",
        traps=5 + len(NOT_CHECKPOINTS),
        outside_files_watched=len(outside.before),
        touched_outside=0,
    )


def test_globs_matching_root_and_a_symlinked_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = Outside(tmp_path)
    (tmp_path / "work_dirs").mkdir()
    link = tmp_path / "work_dirs" / "linked"
    link.symlink_to(outside.path / "victim", target_is_directory=True)
    config = tmp_path / "ckptd.yaml"
    config.write_text(
        "projects:\n"
        "  - {name: slash, work_dirs: ['/']}\n"
        f"  - {{name: links, work_dirs: ['{tmp_path}/work_dirs/*']}}\n"
        "watch: {settle: 0s}\n"
    )
    with outside.untouched():
        result = ckptd("once", "-c", str(config))
        # every top-level folder of this machine, read-only: never act outside the tree
        everything = tmp_path / "everything.yaml"
        everything.write_text("projects: [{name: all, work_dirs: ['/*']}]\n")
        dry = ckptd("once", "--dry-run", "--json", "-c", str(everything))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"{link}: is a symlink, not managed" in out
    assert "== slash: /  " in out and "does not look like a work_dir" in out
    assert not os.path.exists("/.ckptd") and not os.path.exists("/best")
    import json

    for work_dir in json.loads(dry.stdout)["work_dirs"]:
        acts = [c for c in work_dir["checkpoints"] if c["action"] != "keep"] + work_dir["best"]
        assert not acts, f"ckptd would act on {work_dir['work_dir']}: {acts}"
    report(capsys, "globs matching / and a symlinked folder", touched_outside=0)


# --- races between the plan and the deletes --------------------------------------------------
# Each race: (prepare, before the run, may write outside; swap, at the race, only inside
# work_dirs/), so that any event the outside watch sees is ckptd's.


def _none(run: Path, outside: Outside) -> None:
    pass


def _swap_work_dir(run: Path, outside: Outside) -> None:
    run.rename(run.with_name("run.moved"))
    run.symlink_to(outside.path / "victim", target_is_directory=True)


def _prepare_parent(run: Path, outside: Outside) -> None:
    (outside.path / "run").symlink_to(outside.path / "victim")


def _swap_parent(run: Path, outside: Outside) -> None:
    parent = run.parent
    parent.rename(parent.with_name("work_dirs.moved"))
    parent.symlink_to(outside.path, target_is_directory=True)


def _prepare_lookalike(run: Path, outside: Outside) -> None:
    """Files with the same names, sizes and mtimes as the work_dir's (other inodes)."""
    copy = outside.path / "lookalike" / "run"
    shutil.copytree(run, copy, symlinks=True)
    for src in run.iterdir():
        if src.is_file() and not src.is_symlink():
            st = src.stat()
            os.utime(copy / src.name, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swap_parent_for_lookalike(run: Path, outside: Outside) -> None:
    parent = run.parent
    parent.rename(parent.with_name("work_dirs.moved"))
    parent.symlink_to(outside.path / "lookalike", target_is_directory=True)


def _checkpoint_to_symlink(run: Path, outside: Outside) -> None:
    (run / "epoch_1.pth").unlink()
    (run / "epoch_1.pth").symlink_to(outside.path / "victim" / "epoch_1.pth")


def _checkpoint_to_folder(run: Path, outside: Outside) -> None:
    (run / "epoch_1.pth").unlink()
    (run / "epoch_1.pth").mkdir()
    (run / "epoch_1.pth" / "keep.txt").write_text("someone's folder")


Race = tuple[Callable[[Path, Outside], None], Callable[[Path, Outside], None]]
RACES: dict[str, Race] = {
    "work_dir swapped for a symlink": (_none, _swap_work_dir),
    "parent folder swapped for a symlink": (_prepare_parent, _swap_parent),
    "parent swapped for a look-alike copy": (_prepare_lookalike, _swap_parent_for_lookalike),
    "checkpoint swapped for a symlink": (_none, _checkpoint_to_symlink),
    "checkpoint replaced by a folder": (_none, _checkpoint_to_folder),
}


@pytest.mark.parametrize("race", list(RACES))
def test_swap_between_plan_and_delete(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    race: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The swap happens at the exact moment after ckptd planned its deletions and before it
    deletes (a hook after the artifact step, which runs between the two)."""
    import ckptd.engine.reconcile

    outside = Outside(tmp_path)
    run = tmp_path / "work_dirs" / "run"
    run.mkdir(parents=True)
    replay_now(record(), run, upto_epoch=4)  # plan: delete epoch_1 and epoch_2
    (target,) = discover(load_config(write_config(tmp_path))).targets
    prepare, swap = RACES[race]
    prepare(run, outside)
    original = ckptd.engine.reconcile.ensure_artifacts

    def then_swap(*args: Any, **kwargs: Any) -> bool:
        ok = original(*args, **kwargs)
        swap(run, outside)
        return ok

    monkeypatch.setattr(ckptd.engine.reconcile, "ensure_artifacts", then_swap)
    with outside.untouched():
        result = reconcile(target, PassOptions(settle=0))
    done = {d.decision.checkpoint.name for d in result.deletions if d.done}
    moved = [run.with_name("run.moved"), run.parent.with_name("work_dirs.moved") / "run"]
    for real in (m for m in moved if m.exists()):  # the swapped-away work_dir: all there
        assert checkpoints(real) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_4.pth"]
        assert not done, result.deletions
    if race.startswith("checkpoint"):
        assert done == {"epoch_2.pth"}, result.deletions
        assert (run / "epoch_1.pth").is_symlink() or (run / "epoch_1.pth" / "keep.txt").exists()
    left = [d.detail for d in result.deletions if not d.done] + result.errors
    report(capsys, f"race: {race}", touched_outside=0, ckptd_said=left[0][:90] if left else "")
