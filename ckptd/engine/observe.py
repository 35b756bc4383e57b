"""The read side of a reconcile pass: what is on disk, what was evaluated, which epoch is best.

Nothing here writes; ``observe`` turns a work_dir plus the persisted state into an
``Observation`` that the pure policy plans on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.best import (
    MetricChoice,
    agree_with_trainer,
    rank_best,
    resolve_metrics,
    select_best,
    supersede_resumed,
)
from ckptd.core.config import ProjectConfig
from ckptd.core.model import (
    Best,
    BestDispute,
    EvalRecord,
    FileStat,
    Problem,
    Ranked,
    TrainerBest,
    WorkDirScan,
)
from ckptd.core.timings import TIMINGS
from ckptd.core.units import format_duration
from ckptd.engine.artifacts import ArtifactEntry, is_current, read_manifest
from ckptd.engine.state import WorkDirState
from ckptd.layouts.base import Layout, PointerUnreadable, SourceState


@dataclass(slots=True)
class Observation:
    scan: WorkDirScan
    records: list[EvalRecord]  # after resumed runs superseded repeated epochs
    sources: dict[str, SourceState]
    bests: dict[str, Best]
    manifest: dict[str, ArtifactEntry]
    ready: set[str]  # metric keys whose artifact already holds the best
    verified: dict[str, FileStat]
    unit: str | None
    notes: list[str] = field(default_factory=list)
    # Indices that have or had a checkpoint here: the only evaluations that can be best.
    checkpointed: frozenset[int] = frozenset()
    disputes: list[BestDispute] = field(default_factory=list)
    metrics: list[MetricChoice] = field(default_factory=list)  # the keys 'best' is chosen by
    # metric key -> its retention.keep_best best evaluations with a checkpoint, best first
    ranked: dict[str, list[Ranked]] = field(default_factory=dict)
    trainer_holds: dict[str, str] = field(default_factory=dict)  # Layout.trainer_holds
    # When a checkpoint judged incomplete here should be judged again (wall clock): the
    # moment a young file is `settle` old, or soon for one still being written.
    changes_at: float | None = None

    @property
    def problems(self) -> list[Problem]:
        return self.scan.problems

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.scan.problems if p.blocking]

    @property
    def evaluated(self) -> frozenset[int]:
        return frozenset(r.index for r in self.records)

    @property
    def latest_evaluated(self) -> int | None:
        return max((r.index for r in self.records), default=None)


def _judge_completeness(
    layout: Layout,
    work_dir: Path,
    scan: WorkDirScan,
    candidates: list,
    verified: Mapping[str, FileStat],
    settle: float,
    now: float,
    closed: Mapping[str, FileStat],
    moments: list[float],
) -> dict[str, FileStat]:
    still_verified: dict[str, FileStat] = {}
    for candidate in candidates:
        if verified.get(candidate.name) == candidate.stat:
            scan.checkpoints.append(candidate.as_checkpoint(True))
            still_verified[candidate.name] = candidate.stat
            continue
        age = now - candidate.stat.mtime_ns / 1e9
        if age < settle and closed.get(candidate.name) != candidate.stat:
            reason = f"modified {format_duration(max(age, 0))} ago, waiting for writes to settle"
            scan.checkpoints.append(candidate.as_checkpoint(False, reason))
            moments.append(candidate.stat.mtime_ns / 1e9 + settle)
            continue
        try:
            verdict, reason = layout.format_check(work_dir / candidate.name)
        except OSError as exc:
            verdict, reason = False, f"cannot read: {exc.strerror}"
            if not isinstance(exc, FileNotFoundError):
                # An I/O error is not "still being written": nothing is deleted while the
                # work_dir cannot be read (found by injecting EIO into the completeness check).
                where = str(work_dir / candidate.name)
                scan.problems.append(Problem(where, f"cannot open or read it: {exc.strerror}"))
        if verdict is False:
            scan.checkpoints.append(candidate.as_checkpoint(False, reason))
            moments.append(now + max(settle, 0.5))  # still being written: look again soon
            if age > TIMINGS.stale_incomplete_after:
                scan.problems.append(
                    Problem(
                        candidate.name,
                        f"{reason}, and unchanged for {format_duration(round(age))}: it looks "
                        "truncated or corrupt and will never be readable. ckptd neither reads "
                        "nor deletes it, and holds back deletions here until it is removed or "
                        "re-saved",
                    )
                )
            continue
        scan.checkpoints.append(candidate.as_checkpoint(True))
        still_verified[candidate.name] = candidate.stat
    return still_verified


def _unit_of(scan: WorkDirScan) -> str | None:
    by_index: dict[int, list[str]] = {}
    for c in scan.checkpoints:
        by_index.setdefault(c.index, []).append(c.name)
    for index, names in sorted(by_index.items()):
        if len(names) > 1:
            # e.g. epoch_1.pth and epoch_01.pth: which one an evaluation belongs to is a guess
            scan.problems.append(
                Problem(
                    str(scan.work_dir),
                    f"{' and '.join(sorted(names))} both count {index}; ckptd cannot tell which "
                    "one the evaluations describe. Remove or rename one of them",
                )
            )
    units = sorted({c.unit for c in scan.checkpoints})
    if len(units) > 1:
        scan.problems.append(
            Problem(
                str(scan.work_dir),
                f"holds checkpoints counted in {' and '.join(units)}; ckptd cannot tell which "
                "the evaluation steps count. Keep one kind per work_dir",
            )
        )
        return None
    return units[0] if units else None


def _checkpointed(
    scan: WorkDirScan, state: WorkDirState, manifest: Mapping[str, ArtifactEntry], unit: str | None
) -> frozenset[int]:
    """Indices with a checkpoint now, seen with one by an earlier pass, or slimmed before.

    The manifest counts too, so that losing state.json never turns a best whose checkpoint
    was deleted after its artifact was written into a non-candidate (which would let a worse
    epoch replace that artifact).
    """
    found = {c.index for c in scan.checkpoints} | set(state.checkpointed)
    found |= {e.index for e in manifest.values() if unit is None or e.unit == unit}
    return frozenset(found)


def _unsaved_best_note(
    records: list[EvalRecord], choice: MetricChoice, chosen: Best | None, scan: WorkDirScan
) -> str | None:
    """Say so when the best-scoring evaluation has no checkpoint and will never get one."""
    overall, _ = select_best(records, choice)
    newest = max((c.index for c in scan.checkpoints), default=None)
    if overall is None or (chosen is not None and chosen.index == overall.index):
        return None
    if newest is None or overall.index >= newest:
        return None  # its checkpoint may still be on its way
    unit = scan.checkpoints[0].unit if scan.checkpoints else "index"
    instead = f"{unit} {chosen.index}" if chosen else "none yet"
    return (
        f"best {choice.key}: the top score ({overall.value:g}) was at {unit} {overall.index}, "
        f"which the trainer saved no checkpoint of; best among saved checkpoints: {instead}"
    )


def _choose_bests(
    records: list[EvalRecord],
    choices: list[MetricChoice],
    checkpointed: frozenset[int],
    trainer: list[TrainerBest],
    scan: WorkDirScan,
    notes: list[str],
) -> tuple[dict[str, Best], list[BestDispute]]:
    bests: dict[str, Best] = {}
    disputes: list[BestDispute] = []
    for choice in choices:
        best, problems = select_best(records, choice, checkpointed)
        scan.problems.extend(problems)
        own = [t for t in trainer if t.key == choice.key or (t.key is None and len(choices) == 1)]
        for record in own[-1:]:  # the newest record the trainer wrote
            agreed, dispute = agree_with_trainer(records, choice, checkpointed, record)
            if dispute is not None:
                disputes.append(dispute)
                notes.append(
                    f"best {choice.key}: the trainer holds {dispute.trainer_index} as best "
                    f"({record.source}) while its logged values make it {dispute.log_index} "
                    "(the log rounds or smooths what the trainer compared); ckptd follows the "
                    "trainer and keeps both checkpoints until the two agree"
                )
            if agreed is not None:
                best = agreed
        # after the trainer's record is taken into account: "instead" names what ckptd keeps
        note = _unsaved_best_note(records, choice, best, scan)
        if note:
            notes.append(note)
        if best is not None:
            bests[choice.key] = best
    return bests, disputes


def observe(
    work_dir: Path,
    layout: Layout,
    project: ProjectConfig,
    state: WorkDirState,
    artifact_dir: Path,
    *,
    settle: float,
    now: float,
    closed: Mapping[str, FileStat] | None = None,
) -> Observation:
    scan = WorkDirScan(work_dir=work_dir, layout=layout.name)
    candidates, scan.skipped = layout.list_checkpoints(work_dir)
    moments: list[float] = []
    verified = _judge_completeness(
        layout, work_dir, scan, candidates, state.verified, settle, now, closed or {}, moments
    )
    scan.checkpoints.sort(key=lambda c: c.index)
    names = {c.name for c in scan.checkpoints}
    try:
        scan.resume_target, scan.resume_note = layout.resume_target(work_dir, names)
        scan.older_pointers = layout.older_pointers(work_dir, names)
    except PointerUnreadable as exc:
        scan.problems.append(Problem(str(work_dir), str(exc)))
    unit = _unit_of(scan)

    read = layout.read_evals(work_dir, state.sources, unit)
    scan.problems.extend(read.problems)
    records = layout.as_evaluated(supersede_resumed(read.records))
    found = (
        layout.auto_metrics(work_dir, scan, records)
        if project.best.metric == "auto" and records
        else []
    )
    notes = [f"best.metric auto follows the trainer: {a.key} ({a.why})" for a in found]
    choices, choice_problems = resolve_metrics(
        project.best, records, [(a.key, a.rule) for a in found], layout.infer_rule
    )
    scan.problems.extend(choice_problems)

    manifest = read_manifest(artifact_dir)
    checkpointed = _checkpointed(scan, state, manifest, unit)
    trainer = layout.trainer_bests(work_dir, scan, records) if choices else []
    bests, disputes = _choose_bests(records, choices, checkpointed, trainer, scan, notes)
    k = project.retention.keep_best
    ranked = {c.key: rank_best(records, c, checkpointed, k, bests.get(c.key)) for c in choices}
    ready = {
        key
        for key, best in bests.items()
        if is_current(
            manifest.get(key),
            best,
            scan.checkpoint_at(best.index),
            artifact_dir,
            project.artifact.format,
        )
    }
    return Observation(
        scan=scan,
        records=records,
        sources=read.sources,
        bests=bests,
        manifest=manifest,
        ready=ready,
        verified=verified,
        unit=unit,
        notes=notes,
        checkpointed=checkpointed,
        disputes=disputes,
        metrics=choices,
        ranked=ranked,
        trainer_holds=layout.trainer_holds(work_dir, scan),
        changes_at=min(moments, default=None),
    )
