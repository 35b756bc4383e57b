"""Differential test: ckptd beside the real MMEngine ``CheckpointHook(save_best=...)``, over
settings drawn from a seeded RNG.

Each run trains ``tests/trainers/mmengine_real.py`` with drawn settings (metric sequences that
tie, fall, plateau or hold NaN; ``coco/bbox_mAP`` (greater) or ``val/loss`` (less, logged as a
running mean); one key or two with opposite rules; ``interval`` != ``val_interval``; epoch- or
iteration-based; ``save_last``; EMA; a resume, from the newest or an earlier epoch; ckptd's
``keep_last`` and ``keep_best`` 0..3), with ``ckptd once`` after every launch in the same
work_dir. The oracle is the trainer's own:
the ``best_ckpt`` its hook records in the message hub and the ``best_*.pth`` it wrote. Where that
evaluation never had an ``epoch_N.pth`` (MMEngine saves none before the first regular save of a
launch), the rule is the best among evaluations that had one, computed here from the harness's
metric table and the files seen after each launch, not from ckptd's code. So is the set
``keep_best`` keeps: the k best of those evaluations, the trainers' order (the earlier of equal
values first, NaN never), the best first.

``CKPTD_DIFF_RUNS`` (default 5: about 60 s on an idle 2-core machine), ``CKPTD_DIFF_SEED``.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.differential import assert_second_once_changes_nothing, diff_seeds, draw_values, fold
from tests.helpers import (
    REPO,
    assert_same_state_dict,
    load_full,
    load_weights_only,
    manifest,
    once_ok,
    run_harness,
)

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
HARNESS = REPO / "tests" / "trainers" / "mmengine_real.py"
CHECKPOINT = re.compile(r"(epoch|iter)_(\d+)\.pth")
BEST_FILE = re.compile(r".*_(epoch|iter)_(\d+)\.pth")
# tests/trainers/mmengine_real.py: CkptdTableMetric's keys and how they follow the table.
SECOND_KEY = "coco/bbox_mAP_75"  # round(v - 0.05, 3)


@dataclass
class Settings:
    seed: int
    by_epoch: bool
    length: int  # epochs, or iterations
    val_interval: int
    interval: int
    save_last: bool
    metric: str  # "coco" | "loss"
    save_best: str | list[str]
    rules: list[str] | None
    values: list[float]  # per epoch, or per validation (iteration-based)
    ema: bool
    keep_last: int
    first_length: int | None  # resume: the first launch stops here
    from_earlier: bool
    keep_best: int = 0
    shape: str = ""

    def args(self, length: int) -> list[str]:
        out = ["--val-interval", str(self.val_interval)]
        out += ["--checkpoint-interval", str(self.interval)]
        out += ["--metric", self.metric, "--values", ",".join(map(str, self.values))]
        best = self.save_best if isinstance(self.save_best, str) else ",".join(self.save_best)
        out += ["--save-best", best]
        if self.rules:
            out += ["--rule", ",".join(self.rules)]
        out += ["--epochs", str(length)] if self.by_epoch else ["--iter-based"]
        if not self.by_epoch:
            out += ["--max-iters", str(length)]
        if not self.save_last:
            out.append("--no-save-last")
        if self.ema:
            out.append("--ema")
        return out


def draw(seed: int) -> Settings:
    rng = random.Random(seed)
    by_epoch = rng.random() < 0.75
    metric = rng.choice(["coco", "loss"])
    if by_epoch:
        length, val_interval = rng.randint(4, 8), rng.choice((1, 1, 2))
        interval, evaluations = rng.choice((1, 1, 2, 3)), length
    else:
        val_interval = rng.choice((4, 8))
        evaluations = rng.randint(3, 6)
        length = val_interval * evaluations
        interval = val_interval * rng.choice((1, 1, 2))
    key = "coco/bbox_mAP" if metric == "coco" else "val/loss"
    save_best: str | list[str] = rng.choice(["auto", key])
    rules = None
    if metric == "coco" and rng.random() < 0.3:
        save_best, rules = [key, SECOND_KEY], ["greater", "less"]
    values, shape = draw_values(rng, evaluations, greater=metric == "coco")
    first = rng.randint(2, length - 1) if by_epoch and rng.random() < 0.5 else None
    return Settings(
        seed=seed,
        by_epoch=by_epoch,
        length=length,
        val_interval=val_interval,
        interval=interval,
        save_last=rng.random() < 0.7,
        metric=metric,
        save_best=save_best,
        rules=rules,
        values=values,
        ema=rng.random() < 0.2,
        keep_last=rng.randint(1, 3),
        first_length=first,
        from_earlier=rng.random() < 0.5,
        keep_best=rng.randint(0, 3),
        shape=shape,
    )


@dataclass
class Lineage:
    """What the trainer did, as the test sees it: evaluations (index -> value of the table)
    of the current run, every index that had a checkpoint, and each file's latest weights."""

    evaluated: dict[int, float] = field(default_factory=dict)
    had: set[int] = field(default_factory=set)
    weights: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def launch(self, s: Settings, start: int, stop: int, work_dir: Path) -> None:
        self.evaluated = {i: v for i, v in self.evaluated.items() if i <= start}
        for i in range(start + 1, stop + 1):
            if s.by_epoch and (i % s.val_interval == 0 or i == stop):
                self.evaluated[i] = s.values[(i - 1) % len(s.values)]
            if not s.by_epoch and i % s.val_interval == 0:
                self.evaluated[i] = s.values[(i // s.val_interval - 1) % len(s.values)]
        for path in work_dir.iterdir():
            if match := CHECKPOINT.fullmatch(path.name):
                index = int(match.group(2))
                self.had.add(index)
                mtime = path.stat().st_mtime_ns
                if self.weights.get(index, (None,))[0] != mtime:
                    self.weights[index] = (mtime, load_full(path)["state_dict"])


def values_of(s: Settings, key: str, lineage: Lineage) -> dict[int, float]:
    if key == SECOND_KEY:
        return {i: v if math.isnan(v) else round(v - 0.05, 3) for i, v in lineage.evaluated.items()}
    return lineage.evaluated


def newest_hub(work_dir: Path) -> dict[str, Any]:
    """The message hub of the checkpoint MMEngine wrote last."""
    files = [p for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name)]
    return load_full(max(files, key=lambda p: p.stat().st_mtime_ns))["message_hub"]


def knowable(values: dict[int, float], hub: dict[str, Any], key: str) -> dict[int, float]:
    """What the files say of a smoothed key (val/loss): raw values up to the newest
    checkpoint's hub history, then what its running means give, which is nothing (NaN) for
    an evaluation whose previous 9 values hold a NaN or an unknown."""
    buffer = hub["log_scalars"].get(f"val/{key}")
    saved = [] if buffer is None else list(buffer._log_history)
    seen: list[float] = []
    for n, index in enumerate(sorted(values)):
        poisoned = any(map(math.isnan, seen[max(0, n - 9) : n]))
        seen.append(values[index] if n < len(saved) or not poisoned else math.nan)
    return dict(zip(sorted(values), seen, strict=True))


def best_k(
    values: dict[int, float], greater: bool, among: set[int], k: int, lead: int | None
) -> set[int]:
    """The k best evaluations that had a checkpoint, in the trainers' order: by value, the
    earlier of equal values first, non-finite values never; ``lead`` (the best) first."""
    finite = [i for i, v in values.items() if i in among and math.isfinite(v)]
    ranked = sorted(finite, key=lambda i: (-values[i] if greater else values[i], i))
    if lead is not None:
        ranked = [lead, *(i for i in ranked if i != lead)]
    return set(ranked[:k])


def ckptd_config(s: Settings) -> dict[str, Any]:
    if isinstance(s.save_best, list):
        return {"metric": s.save_best, "rule": s.rules}
    return {"metric": s.save_best}


def listed(work_dir: Path) -> list[int]:
    found = (CHECKPOINT.fullmatch(p.name) for p in work_dir.iterdir())
    return sorted(int(m.group(2)) for m in found if m)


def check(s: Settings, work_dir: Path, lineage: Lineage, present: list[int], why: str) -> None:
    """ckptd's best = the oracle per key, artifacts = the trainer's tensors, the trainer's best
    files all there, and the kept set = keep_last newest + resume target + each key's keep_best
    best (no dispute: with the hub's raw values the logs agree with the hook's record)."""
    unit = "epoch" if s.by_epoch else "iter"
    keys = s.save_best if isinstance(s.save_best, list) else None
    hub = newest_hub(work_dir)
    record = {k: Path(v).name for k, v in hub["runtime_info"].items() if k.startswith("best_ckpt")}
    entries = manifest(work_dir / "best")["artifacts"]
    key_default = "coco/bbox_mAP" if s.metric == "coco" else "val/loss"
    kept = set(sorted(present)[-s.keep_last :])
    kept.add(int(CHECKPOINT.fullmatch(Path((work_dir / "last_checkpoint").read_text()).name)
                 .group(2)))  # fmt: skip
    for i, key in enumerate(keys or [key_default]):
        greater = (s.rules[i] == "greater") if s.rules else s.metric == "coco"
        values = values_of(s, key, lineage)
        name = record[f"best_ckpt_{key}" if keys else "best_ckpt"]
        trainer_index = int(BEST_FILE.fullmatch(name).group(2))  # type: ignore[union-attr]
        assert (work_dir / name).is_file(), f"{why}\nthe trainer's {name} is gone"
        assert fold(values, greater) == trainer_index, f"{why}\nharness table != MMEngine"
        oracle = trainer_index
        # A smoothed key's raw values after a NaN are in no file but the hub (see knowable)
        known = knowable(values, hub, key) if s.metric == "loss" else values
        if trainer_index not in lineage.had:
            oracle = fold(known, greater, lineage.had)  # type: ignore[assignment]
        kept |= best_k(known, greater, lineage.had, s.keep_best, oracle)
        entry = entries.get(key)
        assert (entry and entry["index"]) == oracle, f"{why}\n{key}: ckptd {entry}, oracle {oracle}"
        artifact = load_weights_only(work_dir / "best" / entry["file"])["state_dict"]
        theirs = (
            load_full(work_dir / name)["state_dict"]
            if oracle == trainer_index
            else lineage.weights[oracle][1]
        )
        assert_same_state_dict(artifact, theirs)
    kept &= set(present)
    assert listed(work_dir) == sorted(kept), f"{why}\nkept {listed(work_dir)}, policy {kept}"
    assert entry is not None and entry["unit"] == unit


@pytest.mark.parametrize("seed", diff_seeds(5))
def test_ckptd_follows_mmengine(tmp_path: Path, seed: int) -> None:
    s = draw(seed)
    why = f"CKPTD_DIFF_SEED={seed} CKPTD_DIFF_RUNS=1: {s}"
    work_dir = tmp_path / "work_dirs" / "run"
    retention = {"keep_last": s.keep_last, "keep_best": s.keep_best}
    project = {"best": ckptd_config(s), "retention": retention}
    lineage = Lineage()
    first = s.first_length or s.length
    run_harness(HARNESS, work_dir, *s.args(first))
    lineage.launch(s, 0, first, work_dir)
    present = listed(work_dir)
    out = once_ok(tmp_path, **project)
    if s.first_length:
        left = listed(work_dir)
        start, extra = left[-1], []
        if s.from_earlier and len(left) > 1:
            start = left[-2]
            extra = ["--resume-from", str(work_dir / f"epoch_{start}.pth")]
        time.sleep(1.1)  # MMEngine names launch folders by the second
        run_harness(HARNESS, work_dir, *s.args(s.length), "--resume", *extra)
        lineage.launch(s, start, s.length, work_dir)
        why += f" (resumed from {start})"
        present = listed(work_dir)
        out = once_ok(tmp_path, **project)
    check(s, work_dir, lineage, present, f"{why}\n{out}")
    assert_second_once_changes_nothing(tmp_path, work_dir, why)
