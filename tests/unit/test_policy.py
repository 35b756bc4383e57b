"""Every retention rule, alone and combined, with the explanation it gives."""

from __future__ import annotations

import dataclasses

import pytest

from ckptd.core.config import RetentionConfig
from ckptd.core.explain import describe, describe_all, plan_notes
from ckptd.core.model import BestDispute, Checkpoint, FileStat, Ranked
from ckptd.core.policy import Action, PolicyInput, Reason, RuleId, plan

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
    ranked: dict[str, list[tuple[int, float]]] | None = None,
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
        ranked={
            key: tuple(Ranked(key, n, i, v) for n, (i, v) in enumerate(ranking, 1))
            for key, ranking in (ranked or {}).items()
        },
    )


def kept(p) -> dict[str, tuple[RuleId, ...]]:
    """Which rules keep each kept checkpoint (values, not text)."""
    return {d.checkpoint.name: d.rules for d in p.decisions if d.keep}


def reasons_of(p, name: str) -> tuple[Reason, ...]:
    return next(d for d in p.decisions if d.checkpoint.name == name).reasons


def text_of(p, name: str) -> str:
    return describe_all(reasons_of(p, name))


def deleted(p) -> list[str]:
    return sorted(d.checkpoint.name for d in p.deletions)


def test_keep_last_like_max_keep_ckpts() -> None:
    p = plan(given([ckpt(i) for i in range(1, 7)]), RetentionConfig(keep_last=2))
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_4.pth"]
    k = kept(p)
    assert k["epoch_6.pth"] == (RuleId.NEWEST, RuleId.KEEP_LAST)
    assert reasons_of(p, "epoch_5.pth") == (Reason(RuleId.KEEP_LAST, {"rank": 2}),)
    (reason,) = reasons_of(p, "epoch_1.pth")
    assert reason.rule is RuleId.NOT_KEPT and reason.detail["evaluation"] == "evaluated"
    # the text is made where it is shown, borg-style
    assert text_of(p, "epoch_6.pth") == "newest complete checkpoint; keep_last #1"
    assert text_of(p, "epoch_1.pth") == "older than the 2 newest; evaluated"


def test_keep_every() -> None:
    p = plan(given([ckpt(i) for i in range(1, 11)]), RetentionConfig(keep_last=1, keep_every=4))
    assert set(kept(p)) == {"epoch_4.pth", "epoch_8.pth", "epoch_10.pth"}
    assert kept(p)["epoch_4.pth"] == (RuleId.KEEP_EVERY,)
    assert text_of(p, "epoch_4.pth") == "keep_every 4 (epoch 4)"
    assert "5 is not a multiple of keep_every 4" in text_of(p, "epoch_5.pth")


def test_resume_pointer_protected_even_when_old() -> None:
    p = plan(
        given([ckpt(i) for i in range(1, 6)], resume="epoch_2.pth"), RetentionConfig(keep_last=1)
    )
    assert kept(p)["epoch_2.pth"] == (RuleId.RESUME_POINTER,)
    assert text_of(p, "epoch_2.pth") == "resume pointer of the trainer"
    assert "epoch_2.pth" not in deleted(p)


def test_newest_complete_protected_when_newest_is_being_written() -> None:
    cps = [ckpt(1), ckpt(2), ckpt(3, complete=False, age=0)]
    p = plan(given(cps, evaluated={1, 2}), RetentionConfig(keep_last=1))
    k = kept(p)
    assert k["epoch_3.pth"] == (RuleId.BEING_WRITTEN, RuleId.PENDING_EVALUATION)
    assert text_of(p, "epoch_3.pth") == (
        "not complete (writing); waiting for its evaluation (1h left)"
    )
    assert RuleId.NEWEST in k["epoch_2.pth"]
    assert deleted(p) == ["epoch_1.pth"]


def test_pending_evaluation_within_grace() -> None:
    cps = [ckpt(i, age=60) for i in range(1, 5)]
    p = plan(given(cps, evaluated={1, 2}), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    assert reasons_of(p, "epoch_3.pth") == (
        Reason(RuleId.PENDING_EVALUATION, {"seconds_left": 3540}),
    )
    assert text_of(p, "epoch_3.pth") == "waiting for its evaluation (59m left)"
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth"]


def test_pending_evaluation_ends_with_later_evaluation_or_grace() -> None:
    # val_interval=2: epoch 3 is never evaluated, and epoch 4 was -> epoch 3 stops waiting
    cps = [ckpt(i, age=60) for i in range(1, 6)]
    p = plan(given(cps, evaluated={2, 4}), RetentionConfig(keep_last=1))
    assert "epoch_3.pth" in deleted(p)
    assert reasons_of(p, "epoch_3.pth")[0].detail["evaluation"] == "later_evaluated"
    assert "not evaluated, a later epoch was" in text_of(p, "epoch_3.pth")
    # epoch 5 has no evaluation yet and nothing later: kept while young
    assert kept(p)["epoch_5.pth"][0] is RuleId.NEWEST
    # old enough: the grace period is over
    old = [ckpt(1, age=7200), ckpt(2, age=7200), ckpt(3, age=10)]
    p = plan(given(old, evaluated=set()), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth"]
    assert "no evaluation within pending_eval_grace" in text_of(p, "epoch_1.pth")


def test_best_kept_until_its_artifact_is_ready() -> None:
    cps = [ckpt(i) for i in range(1, 6)]
    p = plan(given(cps, best={"mAP": 2}, ready=set()), RetentionConfig(keep_last=1))
    assert reasons_of(p, "epoch_2.pth") == (
        Reason(RuleId.BEST_ARTIFACT_PENDING, {"metric": "mAP"}),
    )
    assert text_of(p, "epoch_2.pth") == "best mAP, artifact not written yet"
    p = plan(given(cps, best={"mAP": 2}, ready={"mAP"}), RetentionConfig(keep_last=1))
    assert "epoch_2.pth" in deleted(p)


def test_keep_best_1_for_every_metric() -> None:
    cps = [ckpt(i) for i in range(1, 7)]
    ranked = {"a": [(2, 0.5)], "b": [(4, 0.25)]}
    p = plan(
        given(cps, best={"a": 2, "b": 4}, ranked=ranked), RetentionConfig(keep_last=1, keep_best=1)
    )
    assert reasons_of(p, "epoch_2.pth") == (
        Reason(RuleId.KEEP_BEST, {"metric": "a", "rank": 1, "value": 0.5}),
    )
    assert kept(p)["epoch_4.pth"] == (RuleId.KEEP_BEST,)
    assert text_of(p, "epoch_4.pth") == "keep_best #1 (b = 0.25)"
    assert deleted(p) == ["epoch_1.pth", "epoch_3.pth", "epoch_5.pth"]


def test_keep_best_k_per_metric_and_only_the_first_k() -> None:
    cps = [ckpt(i) for i in range(1, 9)]
    ranked = {
        "coco/bbox_mAP": [(3, 0.41), (5, 0.4), (1, 0.38)],
        "val/loss": [(5, 0.2), (2, 0.3), (6, 0.31)],
    }
    p = plan(
        given(cps, best={"coco/bbox_mAP": 3, "val/loss": 5}, ranked=ranked),
        RetentionConfig(keep_last=1, keep_best=2),
    )
    assert set(kept(p)) == {"epoch_8.pth", "epoch_3.pth", "epoch_5.pth", "epoch_2.pth"}
    assert text_of(p, "epoch_5.pth") == (
        "keep_best #2 (coco/bbox_mAP = 0.4); keep_best #1 (val/loss = 0.2)"
    )
    assert text_of(p, "epoch_2.pth") == "keep_best #2 (val/loss = 0.3)"
    assert text_of(p, "epoch_1.pth") == "older than the 1 newest; not among the 2 best; evaluated"
    # a ranked evaluation whose checkpoint is gone keeps nothing (and is no error)
    p = plan(given([c for c in cps if c.index != 3], ranked=ranked), RetentionConfig(keep_best=2))
    assert "epoch_3.pth" not in {d.checkpoint.name for d in p.decisions}
    assert "epoch_1.pth" in deleted(p)


def test_keep_best_0_keeps_no_best_in_full() -> None:
    cps = [ckpt(i) for i in range(1, 5)]
    p = plan(given(cps, best={"m": 1}, ranked={"m": [(1, 0.9)]}), RetentionConfig(keep_last=1))
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]


def test_budget_deletes_oldest_unprotected_first() -> None:
    cps = [ckpt(i, size=100 * MB) for i in range(1, 9)]
    retention = RetentionConfig(keep_last=5, keep_every=2, max_total_size=350 * MB)
    p = plan(given(cps, resume="epoch_8.pth"), retention)
    # kept by rules: 2,4,6 (every), 4..8 (last) = {2,4,5,6,7,8} = 600 MB > 350 MB
    assert set(kept(p)) == {"epoch_6.pth", "epoch_7.pth", "epoch_8.pth"}
    (r,) = reasons_of(p, "epoch_2.pth")
    assert r.rule is RuleId.MAX_TOTAL_SIZE
    assert [o.rule for o in r.detail["overrides"]] == [RuleId.KEEP_EVERY]
    assert describe(r).startswith("over max_total_size 333.8 MiB (572.2 MiB held)")
    assert "keep_every 2" in describe(r)
    assert p.over_budget is None and not plan_notes(p)


def test_budget_never_overrides_protection_and_says_so() -> None:
    cps = [ckpt(1, size=300 * MB), ckpt(2, size=300 * MB, age=10)]
    retention = RetentionConfig(keep_last=1, max_total_size=100 * MB)
    p = plan(given(cps, evaluated={1}, resume="epoch_1.pth"), retention)
    assert deleted(p) == []
    assert p.over_budget == (600 * MB, 100 * MB)
    assert "protected checkpoints alone hold 572.2 MiB" in plan_notes(p)[0]


def test_budget_deletes_best_full_last() -> None:
    cps = [ckpt(i) for i in range(1, 5)]
    retention = RetentionConfig(keep_last=3, keep_best=1, max_total_size=250 * MB)
    p = plan(given(cps, best={"m": 1}, ranked={"m": [(1, 0.5)]}), retention)
    # keep: 1 (best full), 2,3,4 (last) -> budget removes 2 then 3 before 1
    assert deleted(p) == ["epoch_2.pth", "epoch_3.pth"]


def test_budget_deletes_the_worst_ranked_best_first() -> None:
    cps = [ckpt(i) for i in range(1, 8)]
    # ranks: 2 is #3, 4 is #1, 1 is #2; another metric ranks 1 first, so 1 counts as #1
    ranked = {"a": [(4, 0.9), (1, 0.8), (2, 0.7)], "b": [(1, 0.1)]}
    retention = RetentionConfig(keep_last=1, keep_best=3, max_total_size=250 * MB)
    p = plan(given(cps, best={"a": 4, "b": 1}, ranked=ranked), retention)
    # kept by rules: 7 (newest, protected), 4, 1, 2 = 400 MB; the budget takes 2 (#3) first,
    # then of the two #1s the older
    assert deleted(p) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_5.pth", "epoch_6.pth"]
    (r,) = reasons_of(p, "epoch_2.pth")
    assert r.rule is RuleId.MAX_TOTAL_SIZE and "keep_best #3 (a = 0.7)" in describe(r)
    assert set(kept(p)) == {"epoch_7.pth", "epoch_4.pth"}
    # with room for one more: the #3 goes, both #1s stay
    p = plan(
        given(cps, best={"a": 4, "b": 1}, ranked=ranked),
        retention.model_copy(update={"max_total_size": 350 * MB}),
    )
    assert set(kept(p)) == {"epoch_7.pth", "epoch_4.pth", "epoch_1.pth"}


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
    assert all(d.reasons and all(describe(r) for r in d.reasons) for d in p.decisions)


def test_every_rule_id_has_text() -> None:
    from ckptd.core.explain import _TEXT

    assert set(_TEXT) == set(RuleId)


def test_errors_turn_deletions_into_holds_naming_them() -> None:
    cps = [ckpt(i) for i in range(1, 5)]
    p = plan(given(cps), RetentionConfig(keep_last=2), held_by=["input"])
    assert p.deletions == []
    assert [d.checkpoint.name for d in p.held] == ["epoch_2.pth", "epoch_1.pth"]
    held = reasons_of(p, "epoch_1.pth")
    assert held[0] == Reason(RuleId.HELD_BY_ERRORS, {"errors": ("input",)})
    assert held[1].rule is RuleId.NOT_KEPT  # what would have deleted it, still said
    assert all(d.action is Action.KEEP for d in p.kept)


def test_disputed_best_keeps_both_checkpoints() -> None:
    cps = [ckpt(i) for i in range(1, 7)]
    g = given(cps, best={"mAP": 3})
    g = dataclasses.replace(g, disputes=(BestDispute("mAP", 3, 2, "epoch_6.pth"),))
    p = plan(g, RetentionConfig(keep_last=1))
    assert kept(p)["epoch_3.pth"] == (RuleId.BEST_DISPUTED,)
    assert kept(p)["epoch_2.pth"] == (RuleId.BEST_DISPUTED,)
    assert text_of(p, "epoch_2.pth") == (
        "the logs' best mAP while the trainer (3) and its logs (2) disagree"
    )
    assert all(d.protected for d in p.kept if d.checkpoint.index in (2, 3))


def test_the_plan_says_when_time_alone_changes_it() -> None:
    # epoch 3 waits for its evaluation (grace 1 h, written 60 s ago): the plan changes then
    cps = [ckpt(i, age=60) for i in range(1, 4)]
    p = plan(given(cps, evaluated={1, 2}), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    assert p.changes_at == pytest.approx(NOW - 60 + 3600)
    # a later epoch was evaluated (val_interval > 1): epoch 2 waits for nothing, so there is
    # no moment to come back for (the old second clock in the scheduler still waited)
    p = plan(given(cps, evaluated={1, 3}), RetentionConfig(keep_last=1, pending_eval_grace=3600))
    assert p.changes_at is None
    assert plan(given(cps), RetentionConfig(keep_last=1)).changes_at is None
