"""Differential test: ckptd beside the real Hugging Face ``Trainer``, over settings drawn from
a seeded RNG.

Each run trains ``tests/trainers/hf_real.py`` with drawn settings (``eval_strategy`` epoch or
steps, ``eval_steps`` vs ``save_steps``, ``metric_for_best_model`` accuracy or score_loss with
``greater_is_better`` auto, true or false, ``load_best_model_at_end``, the Trainer's own
``save_total_limit``, metric values per step that tie, fall, plateau or hold NaN, a resume),
with ``ckptd once`` (``best.metric: auto``) after every launch in the same output_dir. The
oracle is the Trainer's own: the evaluation it holds best (``best_global_step``) and its
``best_model_checkpoint``. Where that evaluation had no ``checkpoint-N`` (``eval_steps`` below
``save_steps``), the rule is the best among evaluations that had one, computed here from the
harness's per-step table and the folders seen after each launch, not from ckptd's code.

``CKPTD_DIFF_RUNS`` (default 5: about 60 s on an idle 2-core machine), ``CKPTD_DIFF_SEED``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.differential import assert_second_once_changes_nothing, diff_seeds, draw_values, fold
from tests.helpers import REPO, manifest, once_ok, run_harness

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
HARNESS = REPO / "tests" / "trainers" / "hf_real.py"
FOLDER = re.compile(r"checkpoint-(\d+)")
STEPS_PER_EPOCH = 4  # hf_real.py: TRAIN_SIZE 32 at batch 8


@dataclass
class Settings:
    seed: int
    epochs: int
    strategy: str  # "epoch" | "steps"
    eval_steps: int
    save_steps: int
    metric: str  # metric_for_best_model
    greater: str  # "auto" | "true" | "false"
    load_best: bool
    save_total_limit: int | None
    values: list[float]  # the metric's value per step
    keep_last: int
    first_epochs: int | None  # resume: the first launch stops here
    shape: str

    @property
    def greater_is_better(self) -> bool:
        return {"true": True, "false": False}.get(self.greater, not self.metric.endswith("loss"))

    def args(self, epochs: int) -> list[str]:
        out = ["--epochs", str(epochs), "--metric", self.metric]
        out += ["--greater-is-better", self.greater, "--strategy", self.strategy]
        if self.strategy == "steps":
            out += ["--eval-steps", str(self.eval_steps), "--save-steps", str(self.save_steps)]
        if self.load_best:
            out.append("--load-best")
        if self.save_total_limit:
            out += ["--save-total-limit", str(self.save_total_limit)]
        return [*out, "--values", ",".join(map(str, self.values))]


def draw(seed: int) -> Settings:
    rng = random.Random(seed)
    epochs = rng.randint(3, 5)
    strategy = rng.choice(["epoch", "steps", "steps"])
    load_best = rng.random() < 0.5
    eval_steps = save_steps = STEPS_PER_EPOCH
    if strategy == "steps":
        eval_steps = rng.choice((2, 3, 4, 5))
        # load_best_model_at_end requires save_steps to be a multiple of eval_steps
        save_steps = eval_steps * rng.choice((1, 2)) if load_best else rng.choice((2, 3, 4, 6))
    metric = rng.choice(["accuracy", "score_loss"])
    greater = rng.choice(["auto", "auto", "true", "false"])
    settings = Settings(
        seed=seed,
        epochs=epochs,
        strategy=strategy,
        eval_steps=eval_steps,
        save_steps=save_steps,
        metric=metric,
        greater=greater,
        load_best=load_best,
        save_total_limit=rng.choice((None, None, 1, 2, 3)),
        values=[],
        keep_last=rng.randint(1, 3),
        first_epochs=rng.randint(1, epochs - 1) if rng.random() < 0.4 else None,
        shape="",
    )
    n = epochs * STEPS_PER_EPOCH
    settings.values, settings.shape = draw_values(rng, n, settings.greater_is_better)
    return settings


def listed(out: Path) -> list[int]:
    found = (FOLDER.fullmatch(p.name) for p in out.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def snapshot(out: Path, weights: dict[int, dict[str, Any]]) -> None:
    """The model tensors of every folder, as last written (the Trainer rewrites a folder
    when a resumed run saves the same step again)."""
    from safetensors.torch import load_file

    for step in listed(out):
        weights[step] = load_file(out / f"checkpoint-{step}" / "model.safetensors")


def check(s: Settings, out: Path, result: dict[str, Any], seen: set[int], present: list[int],
          weights: dict[int, dict[str, Any]], why: str) -> None:  # fmt: skip
    from safetensors.torch import load_file

    key = f"eval_{s.metric}"
    values = {step: metrics[key] for step, metrics in result["evaluations"]}
    for step, value in values.items():  # the harness's table is what the Trainer evaluated
        table = s.values[(step - 1) % len(s.values)]
        assert value == table or (math.isnan(value) and math.isnan(table)), why
    trainer_index = result["best_global_step"]
    assert fold(values, s.greater_is_better) == trainer_index, f"{why}\ntable != Trainer"
    held = result["best_model_checkpoint"]
    oracle = trainer_index
    if trainer_index not in seen:
        oracle = fold(values, s.greater_is_better, seen)
    else:
        assert held and Path(held).name == f"checkpoint-{trainer_index}", why
    entry = manifest(out / "best")["artifacts"].get(key) if oracle else None
    assert (entry and entry["index"]) == oracle, f"{why}\nckptd {entry}, oracle {oracle}"
    if entry:
        ours = load_file(out / "best" / entry["file"] / "model.safetensors")
        theirs = weights[oracle]
        assert list(ours) == list(theirs), why
        assert all(ours[k].equal(theirs[k]) for k in ours), f"{why}\nartifact != checkpoint"
    kept = set(present[-s.keep_last :]) | set(present[-1:])  # keep_last; resume: the highest
    kept |= {step for step in present if step > max(values, default=-1)}  # pending evaluation
    if held:
        held_step = int(FOLDER.fullmatch(Path(held).name).group(1))  # type: ignore[union-attr]
        assert held_step in listed(out), f"{why}\nckptd deleted the Trainer's {held}"
        kept.add(held_step)
    assert listed(out) == sorted(kept & set(present)), f"{why}\nkept {listed(out)}, want {kept}"


@pytest.mark.parametrize("seed", diff_seeds(5))
def test_ckptd_follows_the_hf_trainer(tmp_path: Path, seed: int) -> None:
    s = draw(seed)
    why = f"CKPTD_DIFF_SEED={seed} CKPTD_DIFF_RUNS=1: {s}"
    out = tmp_path / "work_dirs" / "bert"
    project = {"retention": {"keep_last": s.keep_last}}
    seen: set[int] = set()
    weights: dict[int, dict[str, Any]] = {}
    launches = [s.first_epochs, s.epochs] if s.first_epochs else [s.epochs]
    for n, epochs in enumerate(launches):
        resume = ["--resume"] if n else []
        result = run_harness(HARNESS, out, *s.args(epochs), *resume)
        present = listed(out)
        seen |= set(present)
        snapshot(out, weights)
        text = once_ok(tmp_path, **project)
    check(s, out, result, seen, present, weights, f"{why}\n{text}")
    assert_second_once_changes_nothing(tmp_path, out, why)
