"""The findings of the power-cut test (``test_fault_powercut.py``), each pinned in-process on the
disk state the cut left, without FUSE."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.test_fault_crash import Killed, _crash_at
from tests.faults.trainer import POINTER, Replayer, record, replay_now
from tests.helpers import write_config


def _tear_evaluation_records(work_dir: Path, metric: str) -> None:
    """What a cut leaves of a log whose last line (an evaluation) was never fsynced: a prefix
    of that line, which is not a record."""
    key = f'"{metric}"'.encode()
    logs = [p for p in work_dir.glob("2*/**/*.json") if key in p.read_bytes()]
    assert logs, "the recording's first epoch has no evaluation record"
    for log in logs:
        data = log.read_bytes()
        log.write_bytes(data[: data.index(key) + len(key)])


@pytest.mark.parametrize("hash_in_name", [False, True], ids=["plain", "hash_in_name"])
def test_an_orphan_artifact_stays_when_the_cut_took_its_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hash_in_name: bool
) -> None:
    """Seed 5016 of the power-cut test: the cut came between the first best's artifact (durable,
    claimed in state.json) and the manifest, and took the trainer's unsynced checkpoint, pointer
    and evaluation record. The restarted pass then knows no best at all, and the orphan is the
    only copy of those weights left: it must stay until a manifest names a newer artifact."""
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover

    recording = record()
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    config = write_config(
        tmp_path, retention={"keep_last": 2}, artifact={"hash_in_name": hash_in_name}
    )
    (target,) = discover(load_config(config)).targets
    replay_now(recording, work_dir, upto_epoch=1)
    with monkeypatch.context() as patch:
        _crash_at(patch, "manifest")
        with pytest.raises(Killed):
            reconcile(target, PassOptions(settle=0))
    best = work_dir / "best"
    (orphan,) = best.glob("best_*epoch_1*.pth")
    # what the power cut left of the trainer's files (it never fsyncs them)
    os.truncate(work_dir / "epoch_1.pth", 0)
    os.truncate(work_dir / POINTER, 0)
    _tear_evaluation_records(work_dir, recording.metric)
    old = time.time() - 3600  # the empty checkpoint is long settled: nothing to wait for
    os.utime(work_dir / "epoch_1.pth", (old, old))

    report = reconcile(target, PassOptions(settle=0))
    assert not report.artifacts, report.artifacts  # no best is known
    assert orphan.exists(), "the only artifact left was removed with nothing to replace it"

    rounds = [i for i, op in enumerate(recording.ops) if op.kind == "round"]
    rest = recording.ops[rounds[0] + 1 :]  # the trainer goes on after epoch 1: best epoch 6
    Replayer(recording, work_dir, epoch_seconds=0, ops=rest).run()
    reconcile(target, PassOptions(settle=0))
    assert sorted(p.name for p in best.iterdir() if p.name != "manifest.json") == [
        p.name for p in best.glob("best_*epoch_6*.pth")
    ], "once a newer artifact is named by the manifest, the orphan goes"


def test_a_manifest_never_outlives_the_evaluation_that_replaced_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 5034 of the power-cut test (keep_last 1): the best's checkpoint (epoch 4) was
    deleted, its artifact standing in for it; then a new best (epoch 6) was slimmed and the
    manifest named it instead, and the cut came before the pass made anything durable for its
    deletions. A cut that keeps that manifest must keep the evaluation record it was written
    for: otherwise the surviving records' best (epoch 4) has neither checkpoint nor artifact."""
    import ckptd.engine.reconcile
    from ckptd.core.config import load_config
    from ckptd.engine.reconcile import PassOptions, reconcile
    from ckptd.engine.targets import discover
    from tests.faults.powercut import judge_cut
    from tests.faults.test_fault_powercut import CUTS_PER_DELETION, mounted_run

    problems = []
    with mounted_run(tmp_path) as (mount, work_dir, recording, rounds):
        config = write_config(
            tmp_path,
            work_dirs=[str(mount.mountpoint / "work_dirs" / "*")],
            retention={"keep_last": 1},
        )
        (target,) = discover(load_config(config)).targets
        Replayer(recording, work_dir, epoch_seconds=0, ops=recording.ops[: rounds[4]]).run()
        mount.sync()  # epochs 1-5 long on disk
        report = reconcile(target, PassOptions(settle=0))  # best 4: slimmed, then deleted
        assert "epoch_4.pth" in {d.decision.checkpoint.name for d in report.deletions if d.done}
        Replayer(
            recording, work_dir, epoch_seconds=0, ops=recording.ops[rounds[4] : rounds[5]]
        ).run()
        with monkeypatch.context() as patch:  # the cut comes before the deletions' fsyncs
            patch.setattr(ckptd.engine.reconcile, "_made_durable", lambda *args: False)
            report = reconcile(target, PassOptions(settle=0))
        assert [a.entry.index for a in report.artifacts if a.entry] == [6], report.artifacts
        images, unlinked = mount.what_if("reorder", list(range(CUTS_PER_DELETION)))
        deleted = [n for n in ("epoch_4.pth",) if f"/work_dirs/run/{n}" in unlinked]
        assert deleted, unlinked
        for seed, image in enumerate(images):
            mount.reboot(image)
            verdict = judge_cut(work_dir, recording, recording.metric, deleted, {}, True)
            problems += [f"seed {seed}: {p}" for p in verdict.problems]
    assert not problems, "\n".join(problems)
