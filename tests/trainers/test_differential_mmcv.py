"""Differential test: ckptd against a real mmcv 1.7 runner over randomly drawn configurations.

Each run draws its settings from its own seeded RNG: metric tables that rise, fall, tie exactly,
tie at the log's precision (values differing below mmcv's 5 logged decimals), plateau and hold
NaN; a greater (``bbox_mAP``) or a less (``val_loss``) metric, one to three metrics, EvalHook's
``save_best='auto'`` or a named key; checkpoint interval and eval interval; the val-loss
workflow on or off; a resume from the latest or an earlier checkpoint ckptd kept. ckptd runs
after each launch.

Oracle: the trainer's own best, EvalHook's ``hook_msgs['best_ckpt']`` at the end of the run, as
long as that epoch has (or had) an ``epoch_N.pth`` and EvalHook still has its best file. Else
(its best epoch was never checkpointed because of the intervals, or mmcv lost track of it
after a resume from the best epoch's own checkpoint) the rule is "best among checkpointed
evaluations", computed here from the harness's tables: the latest evaluation of each
checkpointed epoch, at the 5 decimals mmcv logs (nothing records more of them), strict
improvement, NaN never best.

``CKPTD_DIFF_RUNS`` sets the number of runs, ``CKPTD_DIFF_SEED`` the base seed (run i uses seed
base + i; a failure names its seed: replay it with that seed and ``CKPTD_DIFF_RUNS=1``).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    REPO,
    assert_same_state_dict,
    checkpoints,
    cli,
    inventory,
    write_config,
)

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
HARNESS = REPO / "tests" / "trainers" / "mmcv_real.py"
# 40 runs take about 65 s on a 2-core machine shared with other jobs.
RUNS = int(os.environ.get("CKPTD_DIFF_RUNS", "40"))
# A fixed default keeps CI reproducible; long runs pick their own seed (see the README).
BASE_SEED = int(os.environ.get("CKPTD_DIFF_SEED", "5000"))
LAUNCH_STAMPS = ("20240101_000000", "20240102_000000")


@dataclass
class Settings:
    seed: int
    epochs: int
    tables: dict[str, list[float]]
    save_best: str  # 'auto' or a key
    checkpoint_interval: int
    eval_interval: int
    val_workflow: bool
    keep_last: int
    keep_every: int | None
    keep_best_full: bool
    resume: str | None  # None, 'latest' or 'earlier'
    resume_epochs: int  # the total after the resume
    resumed_from: int | None = None
    patterns: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return next(iter(self.tables)) if self.save_best == "auto" else self.save_best


def _table(rng: random.Random, length: int, less: bool) -> tuple[list[float], str]:
    pattern = rng.choice(("random", "tie", "near-tie", "plateau", "fall", "nan"))
    values = [round(rng.uniform(0.2, 0.8), 3) for _ in range(length)]
    if pattern == "tie":  # an exact repeat of an earlier value
        i, j = sorted(rng.sample(range(length), 2))
        values[j] = values[i]
    elif pattern == "near-tie":  # equal at 5 decimals, different in the 7th
        i, j = sorted(rng.sample(range(length), 2))
        top = max(values) if not less else min(values)
        values[i] = top + rng.randint(1, 4) * 1e-7
        values[j] = top + rng.randint(1, 4) * 1e-7
    elif pattern == "plateau":
        start = rng.randrange(length)
        values[start:] = [values[start]] * (length - start)
    elif pattern == "fall":
        values.sort(reverse=not less)  # best first, then worse and worse
    elif pattern == "nan":
        for i in rng.sample(range(length), rng.randint(1, max(1, length // 2))):
            values[i] = math.nan
    return values, pattern


def draw(seed: int) -> Settings:
    rng = random.Random(seed)
    epochs = rng.randint(3, 7)
    resume = rng.choice((None, None, "latest", "earlier"))
    total = epochs + rng.randint(1, 3) if resume else epochs
    names = ["bbox_mAP", "val_loss", "bbox_mAP_50"]
    rng.shuffle(names)
    tables: dict[str, list[float]] = {}
    patterns = []
    for name in names[: rng.randint(1, 3)]:
        tables[name], pattern = _table(rng, total, less="loss" in name)
        patterns.append(f"{name}:{pattern}")
    save_best = "auto" if len(tables) == 1 or rng.random() < 0.6 else rng.choice(list(tables)[1:])
    return Settings(
        seed=seed,
        epochs=epochs,
        tables=tables,
        save_best=save_best,
        checkpoint_interval=rng.choice((1, 1, 2, 3)),
        eval_interval=rng.choice((1, 1, 2)),
        val_workflow=rng.random() < 0.5,
        keep_last=rng.randint(1, 3),
        keep_every=rng.choice((None, None, 2, 3)),
        keep_best_full=rng.random() < 0.25,
        resume=resume,
        resume_epochs=total,
        patterns=patterns,
    )


def harness_args(s: Settings, work_dir: Path, launch: int) -> list[str]:
    tables = ";".join(f"{k}={','.join(str(v) for v in vs)}" for k, vs in s.tables.items())
    args = [str(work_dir), "--result", str(work_dir.parents[1] / f"result-{launch}.json")]
    args += ["--tables", tables, "--save-best", s.save_best, "--timestamp", LAUNCH_STAMPS[launch]]
    args += ["--checkpoint-interval", str(s.checkpoint_interval)]
    args += ["--eval-interval", str(s.eval_interval), "--seed", str(s.seed)]
    if s.val_workflow:
        args.append("--val-workflow")
    if launch == 0:
        return [*args, "--epochs", str(s.epochs)]
    return [*args, "--epochs", str(s.resume_epochs), "--resume-from", f"epoch_{s.resumed_from}.pth"]


def run_batch(launches: list[list[str]], where: Path) -> None:
    spec = where / f"batch-{len(list(where.glob('batch-*')))}.json"
    spec.write_text(json.dumps(launches))
    result = subprocess.run(
        [sys.executable, str(HARNESS), "--batch", str(spec)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def epoch_files(work_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {
        n: torch.load(work_dir / f"epoch_{n}.pth", weights_only=True)["state_dict"]
        for n in epoch_numbers(work_dir)
    }


def epoch_numbers(work_dir: Path) -> list[int]:
    return [int(name[len("epoch_") : -len(".pth")]) for name in checkpoints(work_dir)]


def trainer_files(work_dir: Path) -> dict[str, tuple[int, int]]:
    """Everything but ckptd's own state folder (which records each pass)."""
    return {k: v for k, v in inventory(work_dir).items() if not k.startswith(".ckptd/")}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def logged_evaluations(s: Settings) -> dict[int, float]:
    """Epoch -> the value of the best key as logged (5 decimals) at its latest evaluation.

    A resumed launch re-evaluates the epochs after its checkpoint; the tables are indexed by
    the epoch, so every evaluation of an epoch has the same value."""
    values = s.tables[s.key]
    last = s.resume_epochs if s.resume else s.epochs
    return {
        epoch: round(values[(epoch - 1) % len(values)], 5)
        for epoch in range(1, last + 1)
        if epoch % s.eval_interval == 0
    }


def oracle(
    s: Settings, work_dir: Path, result: dict[str, Any], had: set[int]
) -> tuple[int | None, str]:
    """The best epoch, and which rule gave it (for the summary)."""
    best_ckpt = result["best_ckpt"]
    how = "mmcv recorded no best"
    if best_ckpt and not (work_dir / best_ckpt).is_file():
        how = "mmcv lost its best file"
    elif best_ckpt:
        epoch = int(best_ckpt.rsplit("_", 1)[1].split(".")[0])
        if epoch in had:
            return epoch, "mmcv's best"
        how = "mmcv's best has no epoch_N.pth"
    less = "loss" in s.key
    best: tuple[int, float] | None = None
    for epoch, value in sorted(logged_evaluations(s).items()):
        if epoch not in had or math.isnan(value):
            continue
        if best is None or (value < best[1] if less else value > best[1]):
            best = (epoch, value)
    return (best[0] if best else None), how


def expected_kept(
    s: Settings, on_disk: list[int], best: int | None, latest: int, disputed: set[int]
) -> set[int]:
    evaluated = set(logged_evaluations(s))
    last_evaluated = max(evaluated, default=0)
    kept = set(sorted(on_disk)[-s.keep_last :]) | {max(on_disk), latest} | disputed
    kept |= {e for e in on_disk if e not in evaluated and e > last_evaluated}  # pending
    if s.keep_every:
        kept |= {e for e in on_disk if e % s.keep_every == 0}
    if s.keep_best_full and best is not None:
        kept.add(best)
    return kept & set(on_disk)


def once(root: Path) -> str:
    code, out, err = cli("once", "-c", str(root / "ckptd.yaml"))
    assert code == 0, out + err
    return out


def disputes_in(out: str) -> set[int]:
    """Indices of 'the trainer holds X as best ... make it Y' notes."""
    found: set[int] = set()
    for line in out.splitlines():
        if "the trainer holds" in line and "make it" in line:
            words = line.split()
            found.add(int(words[words.index("holds") + 1]))
            found.add(int(words[words.index("it") + 1]))
    return found


def check(
    s: Settings, root: Path, snapshots: dict[int, dict[str, torch.Tensor]], tally: Counter[str]
) -> list[str]:
    """What ckptd did wrong in this run (empty: nothing); counts what the run covered."""
    work_dir = root / "work_dirs" / "run"
    result = json.loads((root / f"result-{1 if s.resume else 0}.json").read_text())
    had = set(snapshots)
    before = epoch_numbers(work_dir)
    best_stat = _stat(work_dir / result["best_ckpt"]) if result["best_ckpt"] else None
    out = once(root)
    problems = []
    want, how = oracle(s, work_dir, result, had)
    disputed = disputes_in(out)
    tally.update([how] + (["disputed"] if disputed else []))
    manifest_file = work_dir / "best" / "manifest.json"
    artifacts = json.loads(manifest_file.read_text())["artifacts"] if manifest_file.exists() else {}
    got = artifacts.get(s.key, {}).get("epoch")
    if got != want:
        problems.append(f"best {s.key}: ckptd {got}, oracle {want} (mmcv: {result['best_ckpt']})")
    if got is not None and got == want:
        slim = torch.load(work_dir / "best" / artifacts[s.key]["file"], weights_only=True)
        try:
            assert_same_state_dict(slim["state_dict"], snapshots[got])
        except AssertionError as exc:
            problems.append(f"artifact of epoch {got} is not its checkpoint's weights: {exc}")
    # mmcv's best file is never touched; its epoch_N.pth goes only into ckptd's artifact. A
    # best whose file mmcv itself removed (it lost track after a resume) is not its best.
    if best_stat is not None:
        trainer_best = int(result["best_ckpt"].rsplit("_", 1)[1][:-4])
        gone = trainer_best in before and trainer_best not in set(epoch_numbers(work_dir))
        if gone and got != trainer_best:
            problems.append(f"deleted epoch_{trainer_best}.pth, mmcv's best, keeping no artifact")
        if _stat(work_dir / result["best_ckpt"]) != best_stat:
            problems.append(f"{result['best_ckpt']}, mmcv's own best file, was changed")
    latest = int(os.readlink(work_dir / "latest.pth")[6:-4])
    kept = set(epoch_numbers(work_dir))
    wanted = expected_kept(s, before, want, latest, disputed)
    if kept != wanted:
        problems.append(f"kept epochs {sorted(kept)}, policy says {sorted(wanted)}")
    stable = trainer_files(work_dir)
    again = once(root)
    if stable != trainer_files(work_dir):
        problems.append(f"a second once changed files:\n{again}")
    return problems


def configure(s: Settings, root: Path) -> None:
    retention: dict[str, Any] = {"keep_last": s.keep_last, "keep_best": int(s.keep_best_full)}
    if s.keep_every:
        retention["keep_every"] = s.keep_every
    best = {"metric": "auto"} if s.save_best == "auto" else {"metric": [s.save_best]}
    write_config(root, retention=retention, best=best)


def test_ckptd_matches_mmcv_over_drawn_configurations(tmp_path: Path) -> None:
    runs = [draw(BASE_SEED + i) for i in range(RUNS)]
    roots = [tmp_path / f"run{i}" for i in range(RUNS)]
    snapshots: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in runs]
    run_batch(
        [harness_args(s, r / "work_dirs" / "run", 0) for s, r in zip(runs, roots, strict=True)],
        tmp_path,
    )
    failures: list[str] = []
    resumed = []
    tally: Counter[str] = Counter()
    for i, (s, root) in enumerate(zip(runs, roots, strict=True)):
        configure(s, root)
        work_dir = root / "work_dirs" / "run"
        snapshots[i].update(epoch_files(work_dir))
        if not s.resume:
            continue
        try:
            once(root)
        except AssertionError as exc:
            failures.append(f"seed {s.seed} {json.dumps(asdict(s))}:\n  first once: {exc}")
        left = epoch_numbers(work_dir)
        s.resumed_from = max(left) if s.resume == "latest" else random.Random(s.seed).choice(left)
        resumed.append(harness_args(s, work_dir, 1))
    if resumed:
        run_batch(resumed, tmp_path)
    for i, (s, root) in enumerate(zip(runs, roots, strict=True)):
        snapshots[i].update(epoch_files(root / "work_dirs" / "run"))
        try:
            problems = check(s, root, snapshots[i], tally)
        except AssertionError as exc:
            problems = [f"once failed: {exc}"]
        if problems:
            failures.append(f"seed {s.seed} {json.dumps(asdict(s))}:\n  " + "\n  ".join(problems))
    tally.update(p.split(":")[1] for s in runs for p in s.patterns)
    tally.update(f"resume {s.resume}" for s in runs if s.resume)
    tally.update("val workflow" for s in runs if s.val_workflow)
    tally.update("intervals differ" for s in runs if s.checkpoint_interval != s.eval_interval)
    tally.update("less" for s in runs if "loss" in s.key)
    summary = (
        f"{RUNS} runs from seed {BASE_SEED}, {len(failures)} with disagreements; {dict(tally)}"
    )
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)
