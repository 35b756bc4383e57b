"""Best-checkpoint selection, identical to MMEngine's ``CheckpointHook(save_best=...)``.

Pure functions over evaluation records; no I/O. The one deliberate difference: MMEngine would
accept ``inf`` as a best score, ckptd never lets a non-finite value become best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from ckptd.core.config import BestConfig
from ckptd.core.model import Best, BestDispute, EvalRecord, Problem, Ranked, TrainerBest

# mmengine/hooks/checkpoint_hook.py: CheckpointHook._default_greater_keys / _default_less_keys
GREATER_KEYS = ("acc", "top", "AR@", "auc", "precision", "mAP", "mDice", "mIoU", "mAcc", "aAcc")
LESS_KEYS = ("loss",)


class BestMetricError(ValueError):
    pass


def infer_rule(key: str) -> str:
    """MMEngine's order: exact greater, exact less, substring greater, substring less, error."""
    lowered = key.lower()
    greater = [k.lower() for k in GREATER_KEYS]
    less = [k.lower() for k in LESS_KEYS]
    if lowered in greater:
        return "greater"
    if lowered in less:
        return "less"
    if any(k in lowered for k in greater):
        return "greater"
    if any(k in lowered for k in less):
        return "less"
    raise BestMetricError(
        f"cannot tell whether a higher or lower {key!r} is better (it contains none of "
        f"{', '.join(GREATER_KEYS)} or {', '.join(LESS_KEYS)}); set best.rule: greater or less"
    )


def supersede_resumed(records: Sequence[EvalRecord]) -> list[EvalRecord]:
    """Records in trainer order, where a step that goes backwards replaces what came after it.

    A run resumed from an earlier checkpoint repeats epochs; the repeated epochs overwrite the
    checkpoint files, so the earlier records of those epochs no longer describe anything on disk.
    """
    kept: list[EvalRecord] = []
    for record in records:
        while kept and kept[-1].index >= record.index:
            kept.pop()
        kept.append(record)
    return kept


@dataclass(frozen=True, slots=True)
class MetricChoice:
    key: str
    rule: str


def resolve_metrics(
    config: BestConfig,
    records: Sequence[EvalRecord],
    auto: Sequence[tuple[str, str | None]] = (),
    infer: Callable[[str], str] = infer_rule,
) -> tuple[list[MetricChoice], list[Problem]]:
    """Which keys decide 'best', and by which rule. Empty until the first evaluation for 'auto'.

    ``auto``: the trainer's own (key, rule or None) choices, which 'auto' follows when given;
    ``infer``: the trainer's rule for a key given without one.
    """
    trainer_rules: dict[str, str | None] = {}
    if config.metric == "auto":
        if not records:
            return [], []
        if auto:
            trainer_rules = dict(auto)
            keys = list(trainer_rules)
        else:
            first = records[0]
            if not first.metrics:
                where = f"{first.source}:{first.line}"
                return [], [Problem(where, "the first evaluation record has no numeric metric")]
            keys = [next(iter(first.metrics))]
    else:
        keys = list(config.metric)
    choices: list[MetricChoice] = []
    problems: list[Problem] = []
    for i, key in enumerate(keys):
        rule = config.rule_for(i)
        if rule == "auto":
            rule = trainer_rules.get(key) or "auto"
        if rule == "auto":
            try:
                rule = infer(key)
            except BestMetricError as exc:
                problems.append(Problem(f"best.metric {key!r}", str(exc)))
                continue
        choices.append(MetricChoice(key, rule))
    return choices, problems


def _better(rule: str, value: float, than: float | None) -> bool:
    if not math.isfinite(value):
        return False
    if than is None:
        return True
    return value > than if rule == "greater" else value < than


def select_best(
    records: Sequence[EvalRecord],
    choice: MetricChoice,
    eligible: Container[int] | None = None,
) -> tuple[Best | None, list[Problem]]:
    """Fold over records in order with strict improvement: the earliest of equal scores wins.

    ``eligible``: the indices that have (or had) a checkpoint. The trainers rank only what they
    save (Lightning's ``every_n_epochs``, an MMEngine ``interval`` above ``val_interval``), and
    an evaluation without a checkpoint has no model to keep, so only eligible records compete.
    """
    best: Best | None = None
    problems: list[Problem] = []
    for record in records:
        if choice.key not in record.metrics:
            present = ", ".join(record.metrics) or "none"
            problems.append(
                Problem(
                    f"{record.source}:{record.line}",
                    f"evaluation of {record.index} has no metric {choice.key!r} "
                    f"(numeric keys present: {present}); fix best.metric in the config",
                )
            )
            continue
        if eligible is not None and record.index not in eligible:
            continue
        value = record.metrics[choice.key]
        if _better(choice.rule, value, best.value if best else None):
            best = Best(choice.key, choice.rule, value, record.index, record.source, record.line)
    return best, problems


def rank_best(
    records: Sequence[EvalRecord],
    choice: MetricChoice,
    eligible: Container[int] | None,
    k: int,
    lead: Best | None = None,
) -> list[Ranked]:
    """The ``k`` best evaluations of ``choice.key``, best first, by ``select_best``'s rules.

    Only eligible indices compete, a non-finite value never ranks, and of equal values the
    earlier ranks higher (the trainers' strict improvement keeps the first); a resumed run's
    superseded records do not count. ``lead``: the best as chosen with the trainer's own record
    (``agree_with_trainer``), ranked first whatever the logs say, so that rank 1 is always the
    best that ckptd slims.
    """
    if k <= 0:
        return []
    values: dict[int, float] = {}
    for record in supersede_resumed(records):
        value = record.metrics.get(choice.key)
        if value is None or not math.isfinite(value):
            continue
        if eligible is None or record.index in eligible:
            values[record.index] = value
    sign = -1.0 if choice.rule == "greater" else 1.0
    order = sorted(values, key=lambda index: (sign * values[index], index))
    if lead is not None:
        values[lead.index] = lead.value
        order = [lead.index, *(i for i in order if i != lead.index)]
    return [Ranked(choice.key, n, i, values[i]) for n, i in enumerate(order[:k], 1)]


def _continue_fold(
    start: Best, records: Sequence[EvalRecord], choice: MetricChoice, eligible: Container[int]
) -> Best:
    best = start
    for record in records:
        value = record.metrics.get(choice.key)
        if value is None or record.index not in eligible:
            continue
        if _better(choice.rule, value, best.value):
            best = Best(choice.key, choice.rule, value, record.index, record.source, record.line)
    return best


def agree_with_trainer(
    records: Sequence[EvalRecord],
    choice: MetricChoice,
    eligible: Container[int],
    trainer: TrainerBest,
) -> tuple[Best | None, BestDispute | None]:
    """The best once the trainer's own record of it is taken into account.

    The trainer's record covers evaluations up to ``trainer.as_of``; the log-derived best over
    the same evaluations is compared with it. When they agree, nothing changes. When they do
    not (a log that rounds values, e.g. mmcv's 5 decimals), the trainer's choice wins, since it
    compared raw values, the fold continues from its raw score over later evaluations, and the
    dispute is returned so that both checkpoints are kept until the two agree again.
    Returns (None, None) when the record cannot be used (its index has no checkpoint here).
    """
    if trainer.index not in eligible:
        return None, None
    earlier = [r for r in records if r.index <= trainer.as_of]
    log_best, _ = select_best(earlier, choice, eligible)
    if log_best is not None and log_best.index == trainer.index:
        return None, None
    score = trainer.score
    at = next((r for r in records if r.index == trainer.index), None)
    if score is None or not math.isfinite(score):
        if at is None or choice.key not in at.metrics:
            return None, None
        score = at.metrics[choice.key]
    if not math.isfinite(score):
        # e.g. Lightning's NaN stored as -inf/inf when nothing finite was ranked yet
        return None, None
    start = Best(
        choice.key,
        choice.rule,
        score,
        trainer.index,
        at.source if at else trainer.source,
        at.line if at else 0,
    )
    later = [r for r in records if r.index > trainer.as_of]
    best = _continue_fold(start, later, choice, eligible)
    dispute = None
    if log_best is not None:
        dispute = BestDispute(choice.key, trainer.index, log_best.index, trainer.source)
    return best, dispute
