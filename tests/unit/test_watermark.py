"""The disk.min_free planner (core/watermark.py): pure, over the plans of several work_dirs."""

from __future__ import annotations

import pytest

from ckptd.core.config import DiskConfig, RetentionConfig
from ckptd.core.explain import describe
from ckptd.core.model import Checkpoint, FileStat
from ckptd.core.policy import Action, PolicyInput, RuleId, plan
from ckptd.core.watermark import (
    RUNNING_FLOOR_SECONDS,
    DiskSpace,
    apply_evictions,
    candidates,
    is_running,
    plan_watermark,
)

NOW = 1_000_000.0
MB = 1_000_000


def ckpt(i: int, age: float, size: int = 10 * MB) -> Checkpoint:
    return Checkpoint(f"epoch_{i}.pth", "epoch", i, FileStat(i, size, int((NOW - age) * 1e9)), True)


def a_plan(checkpoints: list[Checkpoint], keep_last: int = 5, resume: str | None = None):
    given = PolicyInput(
        checkpoints=checkpoints,
        evaluated=frozenset(c.index for c in checkpoints),
        latest_evaluated=max(c.index for c in checkpoints),
        best={},
        artifact_ready=frozenset(),
        resume_target=resume,
        now=NOW,
    )
    return plan(given, RetentionConfig(keep_last=keep_last))


def space(free: int, total: int = 100 * MB, min_free: str = "30%") -> DiskSpace:
    return DiskSpace(free, total, DiskConfig(min_free=min_free).threshold(total), min_free)


def test_nothing_when_above_the_watermark() -> None:
    offers = candidates("a", a_plan([ckpt(1, 900), ckpt(2, 800), ckpt(3, 700)]), False)
    assert plan_watermark(offers, space(40 * MB)).evict == {}


def test_ended_runs_first_then_oldest_first_and_stops_when_enough() -> None:
    ended = a_plan([ckpt(i, 9000 - i * 100) for i in range(1, 5)])  # epoch_4 newest: protected
    running = a_plan([ckpt(i, 500 - i * 10) for i in range(1, 5)])
    offers = candidates("/ended", ended, False) + candidates("/running", running, True)
    # 5 MB free, 30 MB wanted: three 10 MB checkpoints, all of the ended run
    wplan = plan_watermark(offers, space(5 * MB))
    assert {k: sorted(v) for k, v in wplan.evict.items()} == {
        "/ended": ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    }
    assert wplan.freed_bytes == 30 * MB and not wplan.blocked
    # more wanted: the running run's oldest follow
    wplan = plan_watermark(offers, space(5 * MB, min_free="46MB"))
    assert sorted(wplan.evict["/running"]) == ["epoch_1.pth", "epoch_2.pth"]


def test_protected_never_offered_and_blocked_when_they_alone_hold_the_space() -> None:
    p = a_plan([ckpt(1, 900), ckpt(2, 800), ckpt(3, 700)], resume="epoch_1.pth")
    offers = candidates("/a", p, False)
    assert [c.decision.checkpoint.name for c in offers] == ["epoch_2.pth"]
    wplan = plan_watermark(offers, space(1 * MB))
    assert list(wplan.evict["/a"]) == ["epoch_2.pth"]
    assert wplan.blocked  # 11 MB free at best, 30 MB wanted
    assert plan_watermark([], space(1 * MB)).blocked


def test_the_reason_reads_like_the_config() -> None:
    wplan = plan_watermark(
        candidates("/a", a_plan([ckpt(1, 9), ckpt(2, 8)]), False), space(12_400_000, min_free="15%")
    )
    ((_stat, reason),) = wplan.evict["/a"].values()
    assert reason.rule is RuleId.DISK_WATERMARK
    assert describe(reason) == "disk watermark: 12.4% free < 15%"
    sized = plan_watermark(
        candidates("/a", a_plan([ckpt(1, 9), ckpt(2, 8)]), False), space(MB, min_free="20MiB")
    )
    assert (
        describe(next(iter(sized.evict["/a"].values()))[1])
        == "disk watermark: 976.6 KiB free < 20MiB"
    )


def test_apply_evictions_only_deletes_what_the_fresh_plan_still_keeps_unprotected() -> None:
    old = a_plan([ckpt(1, 900), ckpt(2, 800), ckpt(3, 700)])
    wplan = plan_watermark(candidates("/a", old, False), space(0, min_free="90%"))
    evict = wplan.evict["/a"]
    assert sorted(evict) == ["epoch_1.pth", "epoch_2.pth"]
    # Meanwhile the trainer resumed from epoch_1 and epoch_2 was rewritten (another stat).
    rewritten = Checkpoint("epoch_2.pth", "epoch", 2, FileStat(99, 10 * MB, 5), True)
    fresh = a_plan([ckpt(1, 900), rewritten, ckpt(3, 700)], resume="epoch_1.pth")
    after = apply_evictions(fresh, evict)
    assert [d.checkpoint.name for d in after.deletions] == []
    untouched = apply_evictions(old, evict)
    assert sorted(d.checkpoint.name for d in untouched.deletions) == ["epoch_1.pth", "epoch_2.pth"]
    assert all(d.action is Action.KEEP for d in untouched.decisions if d.protected)


@pytest.mark.parametrize(
    ("mtimes", "log", "running"),
    [
        ([NOW - 7200, NOW - 3600], None, True),  # 1 h apart, last 1 h ago: within 2 h
        ([NOW - 7200, NOW - 3600], NOW - 3 * 3600, True),
        ([NOW - 9 * 3600, NOW - 8 * 3600], None, False),  # 8 h quiet after 1 h epochs
        ([NOW - 9 * 3600, NOW - 8 * 3600], NOW - 60, True),  # but its log just moved
        ([NOW - RUNNING_FLOOR_SECONDS / 2], None, True),  # one checkpoint: the floor
        ([NOW - 2 * RUNNING_FLOOR_SECONDS], None, False),
        ([], None, False),
    ],
)
def test_is_running(mtimes: list[float], log: float | None, running: bool) -> None:
    assert is_running(mtimes, log, NOW) is running


@pytest.mark.parametrize("bad", ["0%", "100%", "abc%", "lots", "0", "-5GiB"])
def test_min_free_is_a_share_or_a_size(bad: str) -> None:
    with pytest.raises(ValueError):
        DiskConfig(min_free=bad)


def test_min_free_threshold() -> None:
    assert DiskConfig(min_free="15%").threshold(1000) == 150
    assert DiskConfig(min_free="200GiB").threshold(1) == 200 * 2**30
