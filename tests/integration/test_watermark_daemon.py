"""``ckptd run``'s side of disk.min_free (service/diskwatch.py) on a real work_dir: the
evictions it asks for, the pass that carries them out, the blocked warning once per change,
and the two metrics. (The filling filesystem itself: tests/faults/test_fault_watermark.py.)"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ckptd.core.config import DiskConfig, load_config
from ckptd.core.model import FileStat
from ckptd.engine.reconcile import PassOptions, reconcile
from ckptd.engine.targets import discover
from ckptd.fs.space import mountpoint_of
from ckptd.service.diskwatch import DiskWatch
from ckptd.service.metrics import DaemonMetrics
from tests.helpers import simulate, write_config


def test_diskwatch_evicts_through_a_pass_warns_once_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work_dir = simulate(tmp_path / "work_dirs" / "run", epochs=4)
    loaded = load_config(write_config(tmp_path))
    (target,) = discover(loaded).targets
    options = PassOptions(settle=0)
    first = reconcile(target, options)
    assert not first.failed
    registry = CollectorRegistry()
    watch = DiskWatch(DaemonMetrics(registry))
    mount = str(mountpoint_of(work_dir))

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"mountpoint": mount})

    never_enough = DiskConfig(min_free="1000TiB")
    with caplog.at_level(logging.INFO, "ckptd.daemon"):
        evictions = watch.after_pass(first, [first], never_enough)
        # keep_last 2 kept epoch_3 unprotected; epoch_4 is the newest (and resume target)
        assert {k: sorted(v) for k, v in evictions.items()} == {work_dir: ["epoch_3.pth"]}
        assert sample("ckptd_disk_watermark_blocked") == 1
        again = reconcile(target, replace(options, evict=evictions[work_dir]))
        (done,) = again.deletions
        assert done.done and [str(r) for r in done.decision.rules] == ["disk_watermark"]
        assert not (work_dir / "epoch_3.pth").exists() and (work_dir / "epoch_4.pth").exists()
        assert watch.after_pass(again, [again], never_enough) == {}  # only protected left
        assert sample("ckptd_disk_watermark_deletions_total") == 1
        watch.after_pass(again, [again], DiskConfig(min_free="1B"))
        assert sample("ckptd_disk_watermark_blocked") == 0
    warnings = [r for r in caplog.records if "only protected checkpoints" in r.getMessage()]
    assert len(warnings) == 1  # once per change, not once per pass
    assert any("no longer blocked" in r.getMessage() for r in caplog.records)


def test_evictions_never_touch_what_the_fresh_plan_protects(tmp_path: Path) -> None:
    work_dir = simulate(tmp_path / "work_dirs" / "run", epochs=4)
    (target,) = discover(load_config(write_config(tmp_path))).targets
    first = reconcile(target, PassOptions(settle=0))
    evictions = DiskWatch(None).after_pass(first, [first], DiskConfig(min_free="1000TiB"))
    newest = (work_dir / "epoch_4.pth").stat()
    stale = dict(evictions[work_dir])
    # Offer the newest with its real stat, and epoch_3 with a stat it no longer has.
    (stat3, reason) = stale["epoch_3.pth"]
    stale["epoch_4.pth"] = (FileStat.of(newest), reason)
    stale["epoch_3.pth"] = (replace(stat3, mtime_ns=stat3.mtime_ns + 1), reason)
    again = reconcile(target, PassOptions(settle=0, evict=stale))
    assert again.deletions == []
    assert (work_dir / "epoch_3.pth").exists() and (work_dir / "epoch_4.pth").exists()
