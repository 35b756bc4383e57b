"""Retention as composable keep-rules, then the size budget. Pure: no I/O, no clock.

Each rule is a small class with one job that returns the checkpoints it keeps and why (like
Orbax's preservation policies). ``plan`` unions them, like ``borg prune --list``: every keep
names the rules that keep it, every delete says why nothing kept it. Protecting rules (safety)
can never be overridden; preference rules (keep_last, keep_every, keep_best_full) yield to
``max_total_size``, oldest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ckptd.config import RetentionConfig
from ckptd.model import BestDispute, Checkpoint
from ckptd.units import format_duration, format_size


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
    # (name, why) of checkpoints the trainer itself will read again (Layout.trainer_holds).
    held: tuple[tuple[str, str], ...] = ()


class KeepRule(Protocol):
    name: str
    protects: bool

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        """Map checkpoint name -> why this rule keeps it."""
        ...


def _complete(given: PolicyInput) -> list[Checkpoint]:
    return sorted((c for c in given.checkpoints if c.complete), key=lambda c: c.index)


@dataclass(frozen=True)
class BeingWritten:
    name: ClassVar[str] = "being-written"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        return {
            c.name: f"not complete ({c.incomplete_reason or 'still being written'})"
            for c in given.checkpoints
            if not c.complete
        }


@dataclass(frozen=True)
class NewestComplete:
    name: ClassVar[str] = "newest"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        complete = _complete(given)
        return {complete[-1].name: "newest complete checkpoint"} if complete else {}


@dataclass(frozen=True)
class ResumePointer:
    name: ClassVar[str] = "resume"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        target = given.resume_target
        names = {c.name for c in given.checkpoints}
        return {target: "resume pointer of the trainer"} if target in names else {}


@dataclass(frozen=True)
class PendingEvaluation:
    """Kept until its evaluation arrives, a later epoch is evaluated, or the grace period ends."""

    grace_seconds: float
    name: ClassVar[str] = "pending-eval"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        kept = {}
        for c in given.checkpoints:
            if c.index in given.evaluated:
                continue
            if given.latest_evaluated is not None and given.latest_evaluated > c.index:
                continue  # with val_interval > 1 some epochs are never evaluated
            age = given.now - c.stat.mtime_ns / 1e9
            left = self.grace_seconds - age
            if left > 0:
                kept[c.name] = f"waiting for its evaluation ({format_duration(round(left))} left)"
        return kept


@dataclass(frozen=True)
class BestArtifactPending:
    """The best checkpoint stays until its slim artifact is durable."""

    name: ClassVar[str] = "best-pending"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        kept: dict[str, str] = {}
        for key, index in given.best.items():
            if key in given.artifact_ready:
                continue
            for c in given.checkpoints:
                if c.index == index:
                    kept[c.name] = _join(kept.get(c.name), f"best {key}, artifact not written yet")
        return kept


@dataclass(frozen=True)
class DisputedBest:
    """When the trainer's recorded best and the logs' best differ, neither is deleted."""

    name: ClassVar[str] = "best-disputed"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        kept: dict[str, str] = {}
        for d in given.disputes:
            for c in given.checkpoints:
                if c.index in (d.trainer_index, d.log_index):
                    who = "the trainer's" if c.index == d.trainer_index else "the logs'"
                    kept[c.name] = _join(
                        kept.get(c.name),
                        f"{who} best {d.key} while the trainer ({d.trainer_index}) and its "
                        f"logs ({d.log_index}) disagree",
                    )
        return kept


@dataclass(frozen=True)
class TrainerHeld:
    """What the trainer will read again, e.g. the best folder it loads when training ends."""

    name: ClassVar[str] = "trainer-held"
    protects: ClassVar[bool] = True

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        names = {c.name for c in given.checkpoints}
        return {name: why for name, why in given.held if name in names}


@dataclass(frozen=True)
class LatestN:
    n: int
    name: ClassVar[str] = "keep_last"
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        newest = list(reversed(_complete(given)))[: self.n]
        return {c.name: f"keep_last #{i}" for i, c in enumerate(newest, 1)}


@dataclass(frozen=True)
class EveryNth:
    k: int
    name: ClassVar[str] = "keep_every"
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        return {
            c.name: f"keep_every {self.k} ({c.unit} {c.index})"
            for c in given.checkpoints
            if c.index % self.k == 0
        }


@dataclass(frozen=True)
class BestFull:
    name: ClassVar[str] = "keep_best_full"
    protects: ClassVar[bool] = False

    def keeps(self, given: PolicyInput) -> dict[str, str]:
        kept: dict[str, str] = {}
        for key, index in given.best.items():
            for c in given.checkpoints:
                if c.index == index:
                    kept[c.name] = _join(kept.get(c.name), f"keep_best_full ({key})")
        return kept


def _join(existing: str | None, reason: str) -> str:
    return f"{existing}; {reason}" if existing else reason


def rules_for(retention: RetentionConfig) -> list[KeepRule]:
    rules: list[KeepRule] = [
        BeingWritten(),
        NewestComplete(),
        ResumePointer(),
        PendingEvaluation(retention.pending_eval_grace),
        BestArtifactPending(),
        DisputedBest(),
        TrainerHeld(),
        LatestN(retention.keep_last),
    ]
    if retention.keep_every:
        rules.append(EveryNth(retention.keep_every))
    if retention.keep_best_full:
        rules.append(BestFull())
    return rules


@dataclass(frozen=True, slots=True)
class Decision:
    checkpoint: Checkpoint
    keep: bool
    reasons: tuple[str, ...]  # why kept (one per rule), or why deleted
    protected: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    decisions: tuple[Decision, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def deletions(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]


def _apply_budget(
    decisions: list[Decision], budget: int, best_indices: set[int]
) -> tuple[list[Decision], list[str]]:
    held = sum(d.checkpoint.stat.size for d in decisions if d.keep)
    if held <= budget:
        return decisions, []
    # Oldest first; a best epoch's full checkpoint goes last because the user asked to keep it.
    candidates = sorted(
        (i for i, d in enumerate(decisions) if d.keep and not d.protected),
        key=lambda i: (
            decisions[i].checkpoint.index in best_indices,
            decisions[i].checkpoint.index,
        ),
    )
    for i in candidates:
        if held <= budget:
            break
        d = decisions[i]
        reason = (
            f"over max_total_size {format_size(budget)} ({format_size(held)} held); "
            f"would otherwise be kept by {', '.join(d.reasons)}"
        )
        decisions[i] = Decision(d.checkpoint, False, (reason,))
        held -= d.checkpoint.stat.size
    notes = []
    if held > budget:
        notes.append(
            f"protected checkpoints alone hold {format_size(held)}, more than max_total_size "
            f"{format_size(budget)}; nothing more can be deleted safely (raise the budget or "
            "free space elsewhere)"
        )
    return decisions, notes


def _delete_reason(c: Checkpoint, given: PolicyInput, retention: RetentionConfig) -> str:
    parts = [f"older than the {retention.keep_last} newest"]
    if retention.keep_every:
        parts.append(f"{c.index} is not a multiple of keep_every {retention.keep_every}")
    if c.index in given.evaluated:
        parts.append("evaluated")
    elif given.latest_evaluated is not None and given.latest_evaluated > c.index:
        parts.append(f"not evaluated, a later {c.unit} was")
    else:
        parts.append("no evaluation within pending_eval_grace")
    return "; ".join(parts)


def plan(given: PolicyInput, retention: RetentionConfig) -> Plan:
    reasons: dict[str, list[str]] = {c.name: [] for c in given.checkpoints}
    protected: set[str] = set()
    for rule in rules_for(retention):
        for name, why in rule.keeps(given).items():
            reasons[name].append(why)
            if rule.protects:
                protected.add(name)
    decisions = []
    for c in sorted(given.checkpoints, key=lambda c: c.index, reverse=True):
        why = reasons[c.name]
        if why:
            decisions.append(Decision(c, True, tuple(why), c.name in protected))
        else:
            decisions.append(Decision(c, False, (_delete_reason(c, given, retention),)))
    notes: list[str] = []
    if retention.max_total_size is not None:
        decisions, notes = _apply_budget(
            decisions, retention.max_total_size, set(given.best.values())
        )
    return Plan(tuple(decisions), tuple(notes))
