"""Best selection and rule inference, checked against MMEngine's CheckpointHook rules."""

from __future__ import annotations

import math

import pytest

from ckptd.core.best import (
    GREATER_KEYS,
    LESS_KEYS,
    BestMetricError,
    MetricChoice,
    agree_with_trainer,
    infer_rule,
    rank_best,
    resolve_metrics,
    select_best,
    supersede_resumed,
)
from ckptd.core.config import BestConfig
from ckptd.core.model import Best, BestDispute, EvalRecord, TrainerBest


def records(values: list[float], key: str = "coco/bbox_mAP", start: int = 1) -> list[EvalRecord]:
    return [EvalRecord(i, {key: v, "other": 0.0}, "s.json", i) for i, v in enumerate(values, start)]


@pytest.mark.parametrize("key", GREATER_KEYS)
def test_every_greater_key_exact_and_any_case(key: str) -> None:
    assert infer_rule(key) == "greater"
    assert infer_rule(key.upper()) == "greater"


@pytest.mark.parametrize("key", LESS_KEYS)
def test_every_less_key_exact(key: str) -> None:
    assert infer_rule(key) == "less"
    assert infer_rule(key.title()) == "less"


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("coco/bbox_mAP", "greater"),
        ("accuracy/top1", "greater"),
        ("pascal_voc/mAP", "greater"),
        ("mIoU", "greater"),
        ("val/loss", "less"),
        ("loss_cls", "less"),
        ("AR@100", "greater"),
        ("val_auc", "greater"),
        # substring of a greater key wins over substring of a less key, like MMEngine
        ("acc_loss", "greater"),
        ("precision_loss", "greater"),
    ],
)
def test_substring_cases(key: str, rule: str) -> None:
    assert infer_rule(key) == rule


@pytest.mark.parametrize("key", ["psnr", "f1", "bleu", "step"])
def test_unknown_key_is_an_error_that_says_what_to_set(key: str) -> None:
    with pytest.raises(BestMetricError, match=r"set best\.rule: greater or less"):
        infer_rule(key)


def test_auto_is_first_key_of_first_record() -> None:
    recs = [EvalRecord(1, {"pascal_voc/mAP": 0.1, "pascal_voc/AP50": 0.2}, "s", 3)]
    choices, problems = resolve_metrics(BestConfig(), recs)
    assert choices == [MetricChoice("pascal_voc/mAP", "greater")] and not problems
    assert resolve_metrics(BestConfig(), []) == ([], [])


def test_named_metrics_with_explicit_and_inferred_rules() -> None:
    cfg = BestConfig(metric=["coco/bbox_mAP", "val/loss", "psnr"], rule=["auto", "auto", "greater"])
    choices, problems = resolve_metrics(cfg, [])
    assert choices == [
        MetricChoice("coco/bbox_mAP", "greater"),
        MetricChoice("val/loss", "less"),
        MetricChoice("psnr", "greater"),
    ]
    assert not problems


def test_uninferable_metric_is_reported_not_guessed() -> None:
    choices, problems = resolve_metrics(BestConfig(metric="psnr"), [])
    assert choices == [] and "psnr" in str(problems[0])


def test_strict_improvement_earliest_tie_wins() -> None:
    best, _ = select_best(records([0.3, 0.5, 0.5, 0.4]), MetricChoice("coco/bbox_mAP", "greater"))
    assert best is not None and best.index == 2 and best.value == 0.5


def test_less_rule() -> None:
    best, _ = select_best(records([0.9, 0.4, 0.4, 0.7], "loss"), MetricChoice("loss", "less"))
    assert best is not None and best.index == 2


def test_nan_and_inf_never_become_best() -> None:
    nan, inf = math.nan, math.inf
    choice = MetricChoice("coco/bbox_mAP", "greater")
    best, _ = select_best(records([nan, 0.2, inf, nan, 0.1]), choice)
    assert best is not None and best.index == 2
    best, _ = select_best(records([nan, -inf, inf]), choice)
    assert best is None
    best, _ = select_best(records([-inf, 0.5], "loss"), MetricChoice("loss", "less"))
    assert best is not None and best.index == 2


def test_missing_metric_is_a_problem_naming_file_line_and_keys() -> None:
    recs = records([0.1, 0.2])
    recs.append(EvalRecord(3, {"coco/segm_mAP": 0.9}, "20240101/vis_data/scalars.json", 17))
    best, problems = select_best(recs, MetricChoice("coco/bbox_mAP", "greater"))
    assert best is not None and best.index == 2
    assert len(problems) == 1
    text = str(problems[0])
    assert "20240101/vis_data/scalars.json:17" in text and "coco/segm_mAP" in text


def test_resume_from_earlier_epoch_supersedes_later_records() -> None:
    first = records([0.1, 0.2, 0.9, 0.3])  # epochs 1..4; epoch 3 looked best
    resumed = records([0.25, 0.26], start=3)  # resumed from epoch 2: epochs 3, 4 again
    merged = supersede_resumed(first + resumed)
    assert [r.index for r in merged] == [1, 2, 3, 4]
    best, _ = select_best(merged, MetricChoice("coco/bbox_mAP", "greater"))
    assert best is not None and best.index == 4 and best.value == 0.26


def test_duplicated_step_latest_wins() -> None:
    merged = supersede_resumed(records([0.1, 0.2]) + records([0.05], start=2))
    assert [(r.index, r.metrics["coco/bbox_mAP"]) for r in merged] == [(1, 0.1), (2, 0.05)]


@pytest.mark.parametrize("score", [math.inf, -math.inf, math.nan, None])
def test_a_trainer_record_of_a_non_finite_best_is_not_followed(score: float | None) -> None:
    # Lightning stores a NaN score as -inf (mode max) when it is all it has ranked
    values = records([math.nan, math.nan])
    trainer = TrainerBest("coco/bbox_mAP", 2, score, as_of=2, source="x.ckpt")
    choice = MetricChoice("coco/bbox_mAP", "greater")
    assert agree_with_trainer(values, choice, {1, 2}, trainer) == (None, None)


GREATER = MetricChoice("coco/bbox_mAP", "greater")


def test_only_checkpointed_evaluations_compete() -> None:
    # every_n_epochs=2: the peak at epoch 3 has no checkpoint, so epoch 4 is the best
    recs = records([0.1, 0.3, 0.9, 0.5, 0.2])
    best, _ = select_best(recs, GREATER, eligible={2, 4})
    assert best is not None and best.index == 4
    unrestricted, _ = select_best(recs, GREATER)
    assert unrestricted is not None and unrestricted.index == 3


def test_no_checkpointed_evaluation_means_no_best_yet() -> None:
    best, problems = select_best(records([0.1, 0.3]), GREATER, eligible=set())
    assert best is None and problems == []


def test_trainer_that_agrees_changes_nothing() -> None:
    recs = records([0.1, 0.5, 0.3])
    trainer = TrainerBest("coco/bbox_mAP", 2, 0.5, 3, "epoch_3.pth: meta.hook_msgs")
    assert agree_with_trainer(recs, GREATER, {1, 2, 3}, trainer) == (None, None)


def test_rounded_log_ties_follow_the_trainer_and_report_the_dispute() -> None:
    # the log rounded 0.412341 and 0.412344 to one value: the fold keeps epoch 2, the trainer
    # compared raw values and holds epoch 3
    recs = records([0.3, 0.41234, 0.41234, 0.2])
    trainer = TrainerBest("coco/bbox_mAP", 3, 0.412344, 3, "epoch_4.pth: meta.hook_msgs")
    best, dispute = agree_with_trainer(recs, GREATER, {1, 2, 3, 4}, trainer)
    assert best is not None and best.index == 3 and best.value == 0.412344
    assert dispute == BestDispute("coco/bbox_mAP", 3, 2, "epoch_4.pth: meta.hook_msgs")


def test_later_evaluations_continue_from_the_trainers_raw_score() -> None:
    recs = records([0.3, 0.41234, 0.41234, 0.41234, 0.6])
    trainer = TrainerBest("coco/bbox_mAP", 3, 0.412344, 3, "epoch_4.pth")
    best, _ = agree_with_trainer(recs, GREATER, {1, 2, 3, 4, 5}, trainer)
    assert best is not None and best.index == 5  # a real improvement after as_of wins
    best, _ = agree_with_trainer(recs[:4], GREATER, {1, 2, 3, 4}, trainer)
    assert best is not None and best.index == 3  # epoch 4's rounded tie is not an improvement


def test_trainer_best_without_a_checkpoint_here_is_not_used() -> None:
    recs = records([0.3, 0.5])
    trainer = TrainerBest(None, 7, 0.9, 7, "elsewhere")
    assert agree_with_trainer(recs, GREATER, {1, 2}, trainer) == (None, None)


MAP = MetricChoice("coco/bbox_mAP", "greater")


def ranks(ranking) -> list[tuple[int, float]]:
    return [(r.index, r.value) for r in ranking]


def test_rank_best_orders_by_rule_and_ties_rank_the_earlier_first() -> None:
    rs = records([0.3, 0.5, 0.4, 0.5, 0.1])
    assert ranks(rank_best(rs, MAP, None, 3)) == [(2, 0.5), (4, 0.5), (3, 0.4)]
    assert [r.rank for r in rank_best(rs, MAP, None, 3)] == [1, 2, 3]
    loss = MetricChoice("coco/bbox_mAP", "less")
    assert ranks(rank_best(rs, loss, None, 2)) == [(5, 0.1), (1, 0.3)]
    # rank 1 is select_best's pick, on every rule
    for choice in (MAP, loss):
        best, _ = select_best(rs, choice)
        assert best is not None and rank_best(rs, choice, None, 1)[0].index == best.index


def test_rank_best_k_above_the_evaluations_and_k_0() -> None:
    rs = records([0.3, 0.5])
    assert ranks(rank_best(rs, MAP, None, 5)) == [(2, 0.5), (1, 0.3)]
    assert rank_best(rs, MAP, None, 0) == []


def test_nan_and_inf_never_rank() -> None:
    rs = records([math.nan, 0.2, math.inf, -math.inf, 0.1])
    assert ranks(rank_best(rs, MAP, None, 5)) == [(2, 0.2), (5, 0.1)]
    assert rank_best(records([math.nan]), MAP, None, 2) == []


def test_only_evaluations_with_a_checkpoint_rank() -> None:
    rs = records([0.9, 0.5, 0.8, 0.7])
    assert ranks(rank_best(rs, MAP, {2, 4}, 3)) == [(4, 0.7), (2, 0.5)]
    # a record without the key is select_best's problem to report; it just does not rank
    rs.append(EvalRecord(5, {"other": 1.0}, "s.json", 5))
    assert ranks(rank_best(rs, MAP, None, 2)) == [(1, 0.9), (3, 0.8)]


def test_a_resumed_runs_superseded_records_do_not_rank() -> None:
    # epochs 1..4, then resumed from epoch 2: the old 3 and 4 no longer describe a file
    rs = records([0.1, 0.2, 0.9, 0.8]) + records([0.3, 0.4], start=3)
    assert ranks(rank_best(rs, MAP, None, 3)) == [(4, 0.4), (3, 0.3), (2, 0.2)]


def test_the_trainers_best_leads_the_ranking() -> None:
    # mmcv rounds its log: the trainer's raw comparison made 3 best, the log ties it with 1
    rs = records([0.5, 0.4, 0.5])
    lead = Best(MAP.key, MAP.rule, 0.500004, 3, "epoch_4.pth", 0)
    assert ranks(rank_best(rs, MAP, None, 2, lead)) == [(3, 0.500004), (1, 0.5)]
    assert ranks(rank_best(rs, MAP, None, 1, lead)) == [(3, 0.500004)]
