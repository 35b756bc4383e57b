"""Text for decision values, made only where a decision is shown (listing, JSON, log, state).

Policy decisions carry rule ids and details (``ckptd.core.policy.Reason``); people read the
borg-style phrases made here, and tools read the ids beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckptd.core.policy import Plan, Reason, RuleId
from ckptd.core.units import format_duration, format_size

EVALUATION = {
    "evaluated": "evaluated",
    "later_evaluated": "not evaluated, a later {unit} was",
    "grace_over": "no evaluation within pending_eval_grace",
}


def _not_kept(d: Mapping[str, Any]) -> str:
    parts = [f"older than the {d['keep_last']} newest"]
    if d.get("keep_every"):
        parts.append(f"{d['index']} is not a multiple of keep_every {d['keep_every']}")
    if d.get("keep_best"):
        parts.append(f"not among the {d['keep_best']} best")
    parts.append(EVALUATION[d["evaluation"]].format(unit=d.get("unit", "index")))
    return "; ".join(parts)


def _disputed(d: Mapping[str, Any]) -> str:
    who = "the trainer's" if d["holder"] == "trainer" else "the logs'"
    return (
        f"{who} best {d['metric']} while the trainer ({d['trainer_index']}) and its logs "
        f"({d['log_index']}) disagree"
    )


def _over_budget(d: Mapping[str, Any]) -> str:
    overridden = ", ".join(describe(r) for r in d["overrides"])
    return (
        f"over max_total_size {format_size(d['budget'])} ({format_size(d['held'])} held); "
        f"would otherwise be kept by {overridden}"
    )


def _watermark(d: Mapping[str, Any]) -> str:
    if str(d["min_free"]).endswith("%"):
        free = f"{100 * d['free_bytes'] / max(1, d['total_bytes']):.1f}%"
    else:
        free = format_size(d["free_bytes"])
    return f"disk watermark: {free} free < {d['min_free']}"


_TEXT: dict[RuleId, Callable[[Mapping[str, Any]], str]] = {
    RuleId.BEING_WRITTEN: lambda d: f"not complete ({d['why']})",
    RuleId.NEWEST: lambda d: "newest complete checkpoint",
    RuleId.RESUME_POINTER: lambda d: (
        f"target of {d['pointer']}, the resume pointer of an earlier run"
        if d.get("pointer")
        else "resume pointer of the trainer"
    ),
    RuleId.PENDING_EVALUATION: lambda d: (
        f"waiting for its evaluation ({format_duration(d['seconds_left'])} left)"
    ),
    RuleId.BEST_ARTIFACT_PENDING: lambda d: f"best {d['metric']}, artifact not written yet",
    RuleId.BEST_DISPUTED: _disputed,
    RuleId.TRAINER_HOLDS: lambda d: str(d["why"]),
    RuleId.KEEP_LAST: lambda d: f"keep_last #{d['rank']}",
    RuleId.KEEP_EVERY: lambda d: f"keep_every {d['every']} ({d['unit']} {d['index']})",
    RuleId.KEEP_BEST: lambda d: f"keep_best #{d['rank']} ({d['metric']} = {d['value']:.6g})",
    RuleId.NOT_KEPT: _not_kept,
    RuleId.MAX_TOTAL_SIZE: _over_budget,
    RuleId.DISK_WATERMARK: _watermark,
    RuleId.HELD_BY_ERRORS: lambda d: (
        f"would be deleted, held back by this pass's {', '.join(d['errors'])} error(s)"
    ),
}


def describe(reason: Reason) -> str:
    return _TEXT[reason.rule](reason.detail)


def describe_all(reasons: tuple[Reason, ...]) -> str:
    return "; ".join(describe(r) for r in reasons)


def plan_notes(plan: Plan) -> list[str]:
    if plan.over_budget is None:
        return []
    held, budget = plan.over_budget
    return [
        f"protected checkpoints alone hold {format_size(held)}, more than max_total_size "
        f"{format_size(budget)}; nothing more can be deleted safely (raise the budget or "
        "free space elsewhere)"
    ]
