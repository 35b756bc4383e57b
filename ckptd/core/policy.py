"""Retention as composable keep-rules, then the size budget. Pure: no I/O, no clock.

Each rule is a small class with one job that returns the checkpoints it keeps and why (like
Orbax's preservation policies). ``plan`` unions them, like ``borg prune --list``: every keep
names the rules that keep it, every delete says why nothing kept it. Protecting rules (safety)
can never be overridden; preference rules (keep_last, keep_every, keep_best) yield to
``max_total_size``, oldest first and the best-ranked last. Decisions are values (an ``Action``
and ``Reason``s whose rule ids are the config's own names); ``ckptd.core.explain`` turns them
into text where shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from ckptd.core.config import RetentionConfig
from ckptd.core.model import BestDispute, Checkpoint, Ranked


class Action(StrEnum):
    KEEP = "keep"
    DELETE = "delete"
    # Nothing keeps it, but an error in this pass (bad input, an artifact not written) holds
    # every deletion of the work_dir back: it is not deleted, and says why.
    HOLD = "hold"


class RuleId(StrEnum):
    """Why a checkpoint is kept or deleted; the ids are the config's names where it has one."""

    BEING_WRITTEN = "being_written"
    NEWEST = "newest"
    RESUME_POINTER = "resume_pointer"
    PENDING_EVALUATION = "pending_evaluation"
    BEST_ARTIFACT_PENDING = "best_artifact_pending"
    BEST_DISPUTED = "best_disputed"
    TRAINER_HOLDS = "trainer_holds"
    KEEP_LAST = "keep_last"
    KEEP_EVERY = "keep_every"
    KEEP_BEST = "keep_best"
    # why a checkpoint goes: no rule kept it, or the size budget overrode the rules that did
    NOT_KEPT = "not_kept"
    MAX_TOTAL_SIZE = "max_total_size"
    # disk.min_free: the filesystem is short of space (core/watermark.py, across work_dirs)
    DISK_WATERMARK = "disk_watermark"
    # why a deletion waits: errors of this pass
    HELD_BY_ERRORS = "held_by_errors"


@dataclass(frozen=True, slots=True)
class Reason:
    rule: RuleId
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyInput:
    checkpoints: Sequence[Checkpoint]
    evaluated: frozenset[int]  # checkpoint indices that have an evaluation record
    latest_evaluated: int | None  # highest index with an evaluation record
    best: Mapping[str, int]  # metric key -> index of the best checkpoint
    artifact_ready: frozenset[str]  # metric keys whose artifact matches their best
    resume_target: str | None
    now: float  # wall-clock seconds, compared with checkpoint mtimes
    # The trainer's own best and the logs' best differ: both are kept until they agree.
    disputes: tuple[BestDispute, ...] = ()
    # Checkpoints that older resume pointers name -> the pointer (Layout.older_pointers).
    older_pointers: Mapping[str, str] = field(default_factory=dict)
    # (name, why) of checkpoints the trainer itself will read again (Layout.trainer_holds).
    trainer_holds: tuple[tuple[str, str], ...] = ()
    # metric key -> its best evaluations that have a checkpoint, best first (best.rank_best)
    ranked: Mapping[str, Sequence[Ranked]] = field(default_factory=dict)


class KeepRule(Protocol):
    rule: RuleId
    protects: bool

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        """Map checkpoint name -> why this rule keeps it."""
        ...

    def changes_at(self, given: PolicyInput) -> float | None:
        """The wall-clock moment this rule's answer changes with no new input (None: never).

        The daemon's scheduler passes again at the earliest such moment of all rules, so
        time-based rules need no second clock elsewhere."""
        ...


class Timeless:
    """Rules whose answer changes only when the work_dir does."""

    def changes_at(self, given: PolicyInput) -> float | None:
        return None


def _complete(given: PolicyInput) -> list[Checkpoint]:
    return sorted((c for c in given.checkpoints if c.complete), key=lambda c: c.index)


@dataclass(frozen=True)
class BeingWritten(Timeless):
    rule: ClassVar[RuleId] = RuleId.BEING_WRITTEN
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        return {
            c.name: [Reason(self.rule, {"why": c.incomplete_reason or "still being written"})]
            for c in given.checkpoints
            if not c.complete
        }


@dataclass(frozen=True)
class NewestComplete(Timeless):
    rule: ClassVar[RuleId] = RuleId.NEWEST
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        complete = _complete(given)
        return {complete[-1].name: [Reason(self.rule)]} if complete else {}


@dataclass(frozen=True)
class ResumePointer(Timeless):
    rule: ClassVar[RuleId] = RuleId.RESUME_POINTER
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        target = given.resume_target
        names = {c.name for c in given.checkpoints}
        # An earlier run's pointer (e.g. its last.ckpt link) keeps its target too.
        kept = {
            name: [Reason(self.rule, {"pointer": link})]
            for name, link in given.older_pointers.items()
            if name in names
        }
        if target in names:
            kept[target] = [Reason(self.rule)]
        return kept


@dataclass(frozen=True)
class PendingEvaluation:
    """Kept until its evaluation arrives, a later epoch is evaluated, or the grace period ends."""

    grace_seconds: float
    rule: ClassVar[RuleId] = RuleId.PENDING_EVALUATION
    protects: ClassVar[bool] = True

    def _waiting(self, given: PolicyInput) -> dict[str, float]:
        """Checkpoint name -> the wall-clock end of its grace, for those still waiting."""
        waiting = {}
        for c in given.checkpoints:
            if c.index in given.evaluated:
                continue
            if given.latest_evaluated is not None and given.latest_evaluated > c.index:
                continue  # with val_interval > 1 some epochs are never evaluated
            ends = c.stat.mtime_ns / 1e9 + self.grace_seconds
            if ends > given.now:
                waiting[c.name] = ends
        return waiting

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        return {
            name: [Reason(self.rule, {"seconds_left": round(ends - given.now)})]
            for name, ends in self._waiting(given).items()
        }

    def changes_at(self, given: PolicyInput) -> float | None:
        return min(self._waiting(given).values(), default=None)


@dataclass(frozen=True)
class BestArtifactPending(Timeless):
    """The best checkpoint stays until its slim artifact is durable."""

    rule: ClassVar[RuleId] = RuleId.BEST_ARTIFACT_PENDING
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        kept: dict[str, list[Reason]] = {}
        for key, index in given.best.items():
            if key in given.artifact_ready:
                continue
            for c in given.checkpoints:
                if c.index == index:
                    kept.setdefault(c.name, []).append(Reason(self.rule, {"metric": key}))
        return kept


@dataclass(frozen=True)
class DisputedBest(Timeless):
    """When the trainer's recorded best and the logs' best differ, neither is deleted."""

    rule: ClassVar[RuleId] = RuleId.BEST_DISPUTED
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        kept: dict[str, list[Reason]] = {}
        for d in given.disputes:
            for c in given.checkpoints:
                if c.index in (d.trainer_index, d.log_index):
                    detail = {
                        "metric": d.key,
                        "holder": "trainer" if c.index == d.trainer_index else "log",
                        "trainer_index": d.trainer_index,
                        "log_index": d.log_index,
                        "source": d.source,
                    }
                    kept.setdefault(c.name, []).append(Reason(self.rule, detail))
        return kept


@dataclass(frozen=True)
class TrainerHolds(Timeless):
    """What the trainer will read again (``Layout.trainer_holds``), e.g. the folder the HF
    Trainer loads when training ends: never deleted, whichever best ckptd chooses."""

    rule: ClassVar[RuleId] = RuleId.TRAINER_HOLDS
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        names = {c.name for c in given.checkpoints}
        return {
            n: [Reason(self.rule, {"why": why})] for n, why in given.trainer_holds if n in names
        }


@dataclass(frozen=True)
class LatestN(Timeless):
    n: int
    rule: ClassVar[RuleId] = RuleId.KEEP_LAST
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        newest = list(reversed(_complete(given)))[: self.n]
        return {c.name: [Reason(self.rule, {"rank": i})] for i, c in enumerate(newest, 1)}


@dataclass(frozen=True)
class EveryNth(Timeless):
    k: int
    rule: ClassVar[RuleId] = RuleId.KEEP_EVERY
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        return {
            c.name: [Reason(self.rule, {"every": self.k, "unit": c.unit, "index": c.index})]
            for c in given.checkpoints
            if c.index % self.k == 0
        }


@dataclass(frozen=True)
class BestK(Timeless):
    """The full checkpoints of each metric's k best evaluations (``keep_best: k``)."""

    k: int
    rule: ClassVar[RuleId] = RuleId.KEEP_BEST
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, list[Reason]]:
        kept: dict[str, list[Reason]] = {}
        for key, ranking in given.ranked.items():
            for r in ranking[: self.k]:
                detail = {"metric": key, "rank": r.rank, "value": r.value}
                for c in given.checkpoints:
                    if c.index == r.index:
                        kept.setdefault(c.name, []).append(Reason(self.rule, detail))
        return kept


def rules_for(retention: RetentionConfig) -> list[KeepRule]:
    rules: list[KeepRule] = [
        BeingWritten(),
        NewestComplete(),
        ResumePointer(),
        PendingEvaluation(retention.pending_eval_grace),
        BestArtifactPending(),
        DisputedBest(),
        TrainerHolds(),
        LatestN(retention.keep_last),
    ]
    if retention.keep_every:
        rules.append(EveryNth(retention.keep_every))
    if retention.keep_best:
        rules.append(BestK(retention.keep_best))
    return rules


@dataclass(frozen=True, slots=True)
class Decision:
    checkpoint: Checkpoint
    action: Action
    reasons: tuple[Reason, ...]  # why kept (one per rule), or why deleted / held
    protected: bool = False

    @property
    def keep(self) -> bool:
        return self.action is Action.KEEP

    @property
    def rules(self) -> tuple[RuleId, ...]:
        return tuple(r.rule for r in self.reasons)


@dataclass(frozen=True, slots=True)
class Plan:
    decisions: tuple[Decision, ...]
    # Protected checkpoints alone hold more than max_total_size: (held bytes, budget).
    over_budget: tuple[int, int] | None = None
    # The earliest wall-clock moment a rule's answer changes by time alone (None: never).
    changes_at: float | None = None

    def with_action(self, action: Action) -> list[Decision]:
        return [d for d in self.decisions if d.action is action]

    @property
    def deletions(self) -> list[Decision]:
        return self.with_action(Action.DELETE)

    @property
    def held(self) -> list[Decision]:
        return self.with_action(Action.HOLD)

    @property
    def kept(self) -> list[Decision]:
        return self.with_action(Action.KEEP)


def _best_ranks(given: PolicyInput) -> dict[int, int]:
    """Checkpoint index -> its best rank over every metric; each current best ranks 1."""
    ranks = {index: 1 for index in given.best.values()}
    for ranking in given.ranked.values():
        for r in ranking:
            ranks[r.index] = min(ranks.get(r.index, r.rank), r.rank)
    return ranks


def _apply_budget(
    decisions: list[Decision], budget: int, ranks: Mapping[int, int]
) -> tuple[list[Decision], tuple[int, int] | None]:
    held = sum(d.checkpoint.stat.size for d in decisions if d.keep)
    if held <= budget:
        return decisions, None

    # Oldest first; the best-ranked full checkpoints go last, worst rank first, because the
    # user asked to keep them.
    def order(i: int) -> tuple[bool, int, int]:
        index = decisions[i].checkpoint.index
        return index in ranks, -ranks.get(index, 0), index

    candidates = sorted(
        (i for i, d in enumerate(decisions) if d.keep and not d.protected), key=order
    )
    for i in candidates:
        if held <= budget:
            break
        d = decisions[i]
        detail = {"budget": budget, "held": held, "overrides": d.reasons}
        decisions[i] = Decision(
            d.checkpoint, Action.DELETE, (Reason(RuleId.MAX_TOTAL_SIZE, detail),)
        )
        held -= d.checkpoint.stat.size
    return decisions, ((held, budget) if held > budget else None)


def _delete_reason(c: Checkpoint, given: PolicyInput, retention: RetentionConfig) -> Reason:
    if c.index in given.evaluated:
        evaluation = "evaluated"
    elif given.latest_evaluated is not None and given.latest_evaluated > c.index:
        evaluation = "later_evaluated"
    else:
        evaluation = "grace_over"
    detail = {
        "keep_last": retention.keep_last,
        "keep_every": retention.keep_every,
        "keep_best": retention.keep_best,
        "unit": c.unit,
        "index": c.index,
        "evaluation": evaluation,
    }
    return Reason(RuleId.NOT_KEPT, detail)


def plan(given: PolicyInput, retention: RetentionConfig, held_by: Sequence[str] = ()) -> Plan:
    """Keep, delete or hold each checkpoint. ``held_by``: the error kinds of this pass that
    forbid deleting anything in the work_dir; every deletion becomes a hold naming them."""
    reasons: dict[str, list[Reason]] = {c.name: [] for c in given.checkpoints}
    protected: set[str] = set()
    rules = rules_for(retention)
    moments = [t for t in (rule.changes_at(given) for rule in rules) if t is not None]
    for rule in rules:
        for name, why in rule.keeps(given).items():
            reasons[name].extend(why)
            if rule.protects:
                protected.add(name)
    decisions = []
    for c in sorted(given.checkpoints, key=lambda c: c.index, reverse=True):
        why = reasons[c.name]
        if why:
            decisions.append(Decision(c, Action.KEEP, tuple(why), c.name in protected))
        else:
            decisions.append(Decision(c, Action.DELETE, (_delete_reason(c, given, retention),)))
    over_budget = None
    if retention.max_total_size is not None:
        decisions, over_budget = _apply_budget(
            decisions, retention.max_total_size, _best_ranks(given)
        )
    if held_by:
        hold = Reason(RuleId.HELD_BY_ERRORS, {"errors": tuple(held_by)})
        decisions = [
            Decision(d.checkpoint, Action.HOLD, (hold, *d.reasons))
            if d.action is Action.DELETE
            else d
            for d in decisions
        ]
    return Plan(tuple(decisions), over_budget, min(moments, default=None))
