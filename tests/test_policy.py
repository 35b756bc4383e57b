"""Every retention rule, alone and combined, with the explanation it gives."""

from __future__ import annotations

import pytest

from ckptd.core.config import RetentionConfig
from ckptd.core.model import Checkpoint, FileStat
from ckptd.core.policy import PolicyInput, plan

NOW = 1_000_000.0
MB = 1_000_000


def ckpt(i: int, *, age: float = 600, size: int = 100 * MB, complete: bool = True) -> Checkpoint:
    stat = FileStat(i, size, int((NOW - age) * 1e9))
    return Checkpoint(f"epoch_{i}.pth", "epoch", i, stat, complete, "" if complete else "writing")


def given(
    checkpoints: list[Checkpoint],
    *,
    evaluated: set[int] | None = None,
    best: dict[str, int] | None = None,
    ready: set[str] | None = None,
    resume: str | None = None,
) -> PolicyInput:
    ev = evaluated if evaluated is not None else {c.index for c in checkpoints}
    best = best or {}
    return PolicyInput(
        checkpoints=checkpoints,
        evaluated=frozenset(ev),
        latest_evaluated=max(ev, default=None),
        best=best,
        artifact_ready=frozenset(ready if ready is not None else best),
        resume_target=resume,
        now=NOW,
    )


def kept(p, **kw) -> dict[str, tuple[str, ...]]:
    return {d.checkpoint.name: d.reasons for d in p.decisions if d.keep}


def deleted(p) -> list[str]:
    return sorted(d.checkpoint.name for d in p.deletions)


def test_keep_last_like_max_keep_ckpts() -> None:
    p = plan(given([ckpt(i) for i in range(1, 7)]), RetentionConfig(keep_last=2))
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_4.pth"]
    k = kept(p)
    assert k["epoch_6.pth"] == ("newest complete checkpoint", "keep_last #1")
    assert k["epoch_5.pth"] == ("keep_last #2",)
    reason = next(d for d in p.decisions if d.checkpoint.name == "epoch_1.pth").reasons[0]
    assert reason == "older than the 2 newest; evaluated"


def test_keep_every() -> None:
    p = plan(given([ckpt(i) for i in range(1, 11)]), RetentionConfig(keep_last=1, keep_every=4))
    assert set(kept(p)) == {"epoch_4.pth", "epoch_8.pth", "epoch_10.pth"}
    assert kept(p)["epoch_4.pth"] == ("keep_every 4 (epoch 4)",)
    r = next(d for d in p.decisions if d.checkpoint.name == "epoch_5.pth").reasons[0]
    assert "5 is not a multiple of keep_every 4" in r


def test_resume_pointer_protected_even_when_old() -> None:
    p = plan(
        given([ckpt(i) for i in range(1, 6)], resume="epoch_2.pth"), RetentionConfig(keep_last=1)
    )
    assert kept(p)["epoch_2.pth"] == ("resume pointer of the trainer",)
    assert "epoch_2.pth" not in deleted(p)


def test_newest_complete_protected_when_newest_is_being_written() -> None:
    cps = [ckpt(1), ckpt(2), ckpt(3, complete=False, age=0)]
    p = plan(given(cps, evaluated={1, 2}), RetentionConfig(keep_last=1))
    k = kept(p)
    assert k["epoch_3.pth"] == ("not complete (writing)", "waiting for its evaluation (1h left)")
    assert "newest complete checkpoint" in k["epoch_2.pth"]
    assert deleted(p) == ["epoch_1.pth"]


def test_pending_evaluation_within_grace() -> None:
    cps = [ckpt(i, age=60) for i in range(1, 5)]
    p = plan(given(cps, evaluated={1, 2}), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    k = kept(p)
    assert k["epoch_3.pth"] == ("waiting for its evaluation (59m left)",)
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth"]


def test_pending_evaluation_ends_with_later_evaluation_or_grace() -> None:
    # val_interval=2: epoch 3 is never evaluated, and epoch 4 was -> epoch 3 stops waiting
    cps = [ckpt(i, age=60) for i in range(1, 6)]
    p = plan(given(cps, evaluated={2, 4}), RetentionConfig(keep_last=1))
    assert "epoch_3.pth" in deleted(p)
    r = next(d for d in p.decisions if d.checkpoint.name == "epoch_3.pth").reasons[0]
    assert "not evaluated, a later epoch was" in r
    # epoch 5 has no evaluation yet and nothing later: kept while young
    assert kept(p)["epoch_5.pth"][0] == "newest complete checkpoint"
    # old enough: the grace period is over
    old = [ckpt(1, age=7200), ckpt(2, age=7200), ckpt(3, age=10)]
    p = plan(given(old, evaluated=set()), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth"]
    r = next(d for d in p.decisions if d.checkpoint.name == "epoch_1.pth").reasons[0]
    assert "no evaluation within pending_eval_grace" in r


def test_best_kept_until_its_artifact_is_ready() -> None:
    cps = [ckpt(i) for i in range(1, 6)]
    p = plan(given(cps, best={"mAP": 2}, ready=set()), RetentionConfig(keep_last=1))
    assert kept(p)["epoch_2.pth"] == ("best mAP, artifact not written yet",)
    p = plan(given(cps, best={"mAP": 2}, ready={"mAP"}), RetentionConfig(keep_last=1))
    assert "epoch_2.pth" in deleted(p)


def test_keep_best_full_for_every_metric() -> None:
    cps = [ckpt(i) for i in range(1, 7)]
    p = plan(given(cps, best={"a": 2, "b": 4}), RetentionConfig(keep_last=1, keep_best_full=True))
    assert kept(p)["epoch_2.pth"] == ("keep_best_full (a)",)
    assert kept(p)["epoch_4.pth"] == ("keep_best_full (b)",)
    assert deleted(p) == ["epoch_1.pth", "epoch_3.pth", "epoch_5.pth"]


def test_budget_deletes_oldest_unprotected_first() -> None:
    cps = [ckpt(i, size=100 * MB) for i in range(1, 9)]
    retention = RetentionConfig(keep_last=5, keep_every=2, max_total_size=350 * MB)
    p = plan(given(cps, resume="epoch_8.pth"), retention)
    # kept by rules: 2,4,6 (every), 4..8 (last) = {2,4,5,6,7,8} = 600 MB > 350 MB
    assert set(kept(p)) == {"epoch_6.pth", "epoch_7.pth", "epoch_8.pth"}
    r = next(d for d in p.decisions if d.checkpoint.name == "epoch_2.pth").reasons[0]
    assert r.startswith("over max_total_size 333.8 MiB (572.2 MiB held)")
    assert "keep_every 2" in r
    assert not p.notes


def test_budget_never_overrides_protection_and_says_so() -> None:
    cps = [ckpt(1, size=300 * MB), ckpt(2, size=300 * MB, age=10)]
    retention = RetentionConfig(keep_last=1, max_total_size=100 * MB)
    p = plan(given(cps, evaluated={1}, resume="epoch_1.pth"), retention)
    assert deleted(p) == []
    assert "protected checkpoints alone hold 572.2 MiB" in p.notes[0]


def test_budget_deletes_best_full_last() -> None:
    cps = [ckpt(i) for i in range(1, 5)]
    retention = RetentionConfig(keep_last=3, keep_best_full=True, max_total_size=250 * MB)
    p = plan(given(cps, best={"m": 1}), retention)
    # keep: 1 (best full), 2,3,4 (last) -> budget removes 2 then 3 before 1
    assert deleted(p) == ["epoch_2.pth", "epoch_3.pth"]


@pytest.mark.parametrize("keep_last", [1, 2, 5])
def test_idempotent(keep_last: int) -> None:
    cps = [ckpt(i) for i in range(1, 9)]
    retention = RetentionConfig(keep_last=keep_last)
    first = plan(given(cps), retention)
    survivors = [d.checkpoint for d in first.decisions if d.keep]
    second = plan(given(survivors), retention)
    assert second.deletions == []


def test_every_decision_is_explained() -> None:
    cps = [ckpt(i) for i in range(1, 10)]
    p = plan(
        given(cps, evaluated={1, 2, 3, 5}, resume="epoch_3.pth"), RetentionConfig(keep_every=3)
    )
    assert all(d.reasons and all(d.reasons) for d in p.decisions)
