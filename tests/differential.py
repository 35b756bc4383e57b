"""What the differential tests (tests/trainers/test_differential_*.py) share: seeds, drawn metric
sequences, the trainers' strict-improvement fold, and the idempotence check."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from tests.helpers import cli, inventory


def diff_seeds(default_runs: int) -> list[int]:
    """Seeds of the differential tests' runs: ``CKPTD_DIFF_RUNS`` of them (default
    ``default_runs``) from ``CKPTD_DIFF_SEED`` on (default 0). Replay a failure with
    ``CKPTD_DIFF_SEED=<its seed> CKPTD_DIFF_RUNS=1``."""
    runs = int(os.environ.get("CKPTD_DIFF_RUNS", str(default_runs)))
    base = int(os.environ.get("CKPTD_DIFF_SEED", "0"))
    return [base + i for i in range(runs)]


def assert_second_once_changes_nothing(root: Path, work_dir: Path, why: str) -> None:
    """Another ``ckptd once`` deletes and writes nothing (only ckptd's own state may change)."""
    before = {k: v for k, v in inventory(work_dir).items() if ".ckptd" not in k}
    code, out, err = cli("once", "-c", str(root / "ckptd.yaml"))
    assert code == 0, f"{why}\n{out}{err}"
    after = {k: v for k, v in inventory(work_dir).items() if ".ckptd" not in k}
    assert after == before, f"{why}: a second ckptd once changed {set(before) ^ set(after)}"


def draw_values(rng: random.Random, n: int, greater: bool) -> tuple[list[float], str]:
    """``n`` metric values that tie, fall (best first), plateau or are random, maybe with NaN;
    and the name of that shape, for the failure message."""
    shape = rng.choice(["random", "ties", "falling", "plateau"])
    values = [round(rng.uniform(0.2, 0.8), 2) for _ in range(n)]
    if shape == "ties":
        values = [rng.choice((0.4, 0.5, 0.6)) for _ in range(n)]
    elif shape == "falling":  # the first evaluation is the best, every later one worse
        values.sort(reverse=greater)
    elif shape == "plateau":
        start = rng.randrange(n)
        values[start:] = [values[start]] * (n - start)
    if rng.random() < 0.35:
        for i in rng.sample(range(n), k=min(n, rng.choice((1, 2)))):
            values[i] = math.nan
        shape += "+nan"
    return values, shape


def fold(values: dict[int, float], greater: bool, among: set[int] | None = None) -> int | None:
    """The index both trainers pick (MMEngine's is_better_than, the HF Trainer's np.greater /
    np.less): the first strict improvement wins ties, NaN is never better; ``among``: only
    those indices compete. Non-finite values are skipped (ckptd never picks inf either)."""
    best, at = None, None
    for index in sorted(values):
        v = values[index]
        if (among is not None and index not in among) or not math.isfinite(v):
            continue
        if best is None or (v > best if greater else v < best):
            best, at = v, index
    return at
