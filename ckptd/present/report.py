"""How a pass is shown: a ``borg prune --list``-style listing for people, and JSON for tools."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ckptd.core.explain import describe, describe_all
from ckptd.core.policy import Action, Decision
from ckptd.core.units import format_size
from ckptd.engine.outcome import ArtifactStatus
from ckptd.engine.reconcile import WorkDirReport
from ckptd.present.sparkline import ChartStyle, chart

if TYPE_CHECKING:
    from ckptd.engine.outcome import PublishOutcome

INDENT = 16  # where the text after the verb column starts: "  keep          "


def outcome_of(report: WorkDirReport, decision: Decision) -> str:
    """What happened to a checkpoint in this pass: the ``action`` of ``--json``.

    keep | hold (an error of the pass held the deletion back) | delete (planned: a dry run, or
    not reached) | deleted | delete_failed (changed meanwhile, or the unlink failed).
    """
    if decision.action is not Action.DELETE:
        return str(decision.action)
    done = next(
        (d for d in report.deletions if d.decision.checkpoint.name == decision.checkpoint.name),
        None,
    )
    if done is None:
        return "delete"
    return "deleted" if done.done else "delete_failed"


VERBS = {
    "keep": "keep",
    "hold": "hold",
    "delete": "would delete",
    "deleted": "deleted",
    "delete_failed": "kept*",
}


def _value(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def _history(report: WorkDirReport, style: ChartStyle) -> list[str]:
    """Each metric's evaluations as a chart, the best and the surviving checkpoints marked."""
    observation = report.observation
    if observation is None or report.plan is None or not observation.records:
        return []
    g = style.glyphs
    kept = {
        d.checkpoint.index
        for d in report.plan.decisions
        if outcome_of(report, d) not in ("delete", "deleted")
    }
    unit = observation.unit or "index"
    lines = []
    for choice in observation.metrics:
        values: dict[int, float | None] = {
            r.index: r.metrics[choice.key] for r in observation.records if choice.key in r.metrics
        }
        if not values:
            continue
        for index in kept - values.keys():
            values[index] = None  # a checkpoint not evaluated (yet): a blank column
        best = observation.bests.get(choice.key)
        drawn = chart(
            sorted(values.items()), choice.rule, best.index if best else None, kept, style
        )
        first, last = min(values), max(values)
        span = f"{unit} {first}-{last}" if first != last else f"{unit} {first}"
        bucketed = f", {drawn.per_column} per column" if drawn.per_column > 1 else ""
        legend = f"{g.best} best, {g.kept} kept, {g.both} both, {g.nan} NaN"
        pad = " " * INDENT
        lines.append(f"  {'history':<13} {choice.key}  {span}{bucketed}  ({legend})")
        lines += [f"{pad}{drawn.bars}", f"{pad}{drawn.marks}".rstrip()]
    return lines


def format_report(report: WorkDirReport, charts: ChartStyle | None = None) -> str:
    """The listing; ``charts``: also draw each metric's history (``ckptd status``) this way."""
    target = report.target
    head = f"== {target.project.name}: {target.work_dir}"
    if report.layout:
        head += f"  [{report.layout}]"
    head += f"  {report.seconds:.2f} s" + ("  (dry run)" if report.dry_run else "")
    lines = [head]
    if report.skipped:
        lines.append(f"  skipped  {report.skipped}")
    width = 0
    if report.plan:
        width = max((len(d.checkpoint.name) for d in report.plan.decisions), default=0)
        for d in report.plan.decisions:
            verb = VERBS[outcome_of(report, d)]
            size = format_size(d.checkpoint.stat.size)
            lines.append(
                f"  {verb:<13} {d.checkpoint.name:<{width}}  {size:>10}  {describe_all(d.reasons)}"
            )
    if report.observation:
        for s in report.observation.scan.skipped:
            lines.append(f"  {'skip':<13} {s.name:<{width}}  {'':>10}  {s.reason}")
    unit = f"{report.observation.unit} " if report.observation and report.observation.unit else ""
    for a in report.artifacts:
        b = a.best
        size = (
            f"  {format_size(a.entry.bytes)}"
            if a.entry and a.status is not ArtifactStatus.FAILED
            else ""
        )
        lines.append(
            f"  best          {b.key} = {_value(b.value)} ({b.rule}) at {unit}{b.index} -> "
            f"{a.path}{size}  [{a.status}]" + (f": {a.detail}" if a.detail else "")
        )
    if report.observation and not report.artifacts and not report.observation.records:
        lines.append("  best          no evaluation records yet")
    if charts is not None:
        lines += _history(report, charts)
    if report.publish is not None:
        lines.append(f"  publish       {_publish_text(report.publish)}")
    for note in report.notes:
        lines.append(f"  note          {note}")
    for error in report.errors:
        lines.append(f"  error         {error}")
    if report.plan:
        gone = {d.decision.checkpoint.name for d in report.deletions if d.done}
        remaining = [d for d in report.plan.decisions if d.checkpoint.name not in gone]
        held = sum(d.checkpoint.stat.size for d in remaining)
        lines.append(
            f"  held {format_size(held)} in {len(remaining)} checkpoint(s); reclaimed "
            f"{format_size(report.reclaimed_bytes)} this pass "
            f"({format_size(report.reclaimed_total)} in total)"
        )
    return "\n".join(lines)


def _publish_text(p: PublishOutcome) -> str:
    text = f"{p.url}  [{p.status}]"
    if p.manifest_sha256:
        files = ", ".join(sorted(p.files)) or "no files"
        text += f" manifest {p.manifest_sha256[:12]} ({files}) in place since {p.time}"
    else:
        text += " nothing published there yet"
    if p.uploads:
        text += f"; uploaded {p.uploads} object(s), {format_size(p.uploaded_bytes)}"
    if p.removed:
        text += f"; removed replaced {', '.join(p.removed)}"
    if p.error:
        stopped = f", {p.timeouts} stopped at the deadline" if p.timeouts else ""
        text += f"; error: {p.error}" + (
            f" ({p.failures} failed attempt(s){stopped})" if p.failures else ""
        )
    if p.detail:
        text += f"; {p.detail}"
    return text


def report_json(report: WorkDirReport) -> dict[str, Any]:
    target = report.target
    data: dict[str, Any] = {
        "project": target.project.name,
        "work_dir": str(target.work_dir),
        "layout": report.layout,
        "dry_run": report.dry_run,
        "skip": str(report.skip) if report.skip else None,
        "skipped": report.skipped or None,
        "seconds": round(report.seconds, 4),
        "errors": report.errors,
        "error_kinds": [str(k) for k in report.error_kinds],
        "notes": report.notes,
        "reclaimed_bytes": report.reclaimed_bytes,
        "reclaimed_total_bytes": report.reclaimed_total,
        "checkpoints": [],
        "best": [],
    }
    if report.plan:
        for d in report.plan.decisions:
            data["checkpoints"].append(
                {
                    "name": d.checkpoint.name,
                    "unit": d.checkpoint.unit,
                    "index": d.checkpoint.index,
                    "bytes": d.checkpoint.stat.size,
                    "complete": d.checkpoint.complete,
                    "action": outcome_of(report, d),
                    "protected": d.protected,
                    "rules": [str(r.rule) for r in d.reasons],
                    "reasons": [describe(r) for r in d.reasons],
                }
            )
        data["held_bytes"] = sum(
            c["bytes"] for c in data["checkpoints"] if c["action"] != "deleted"
        )
    for a in report.artifacts:
        data["best"].append(
            {
                "metric": a.key,
                "rule": a.best.rule,
                "value": a.best.value if math.isfinite(a.best.value) else str(a.best.value),
                "index": a.best.index,
                "artifact": str(a.path),
                "status": a.status,
                "detail": a.detail or None,
                "sha256": a.entry.sha256 if a.entry else None,
                "bytes": a.entry.bytes if a.entry else None,
            }
        )
    if report.publish is not None:
        data["publish"] = report.publish.to_json()
    if report.observation:
        data["resume_target"] = report.observation.scan.resume_target
        data["skipped_entries"] = [
            {"name": s.name, "reason": s.reason} for s in report.observation.scan.skipped
        ]
    return data


def log_actions(report: WorkDirReport, logger, previous: WorkDirReport | None = None) -> None:
    """One log line per action (slim, delete, skip, error) with its work_dir, file and reason.

    Notes that repeat from the previous pass are not logged again, so a steady state is quiet.
    """
    base = {"work_dir": str(report.target.work_dir), "project": report.target.project.name}

    def emit(level: int, message: str, **fields: object) -> None:
        logger.log(level, message, extra={"fields": {**base, **fields}})

    for a in report.artifacts:
        if a.status is ArtifactStatus.WRITTEN and a.entry is not None:
            emit(
                20,
                f"slim: new best {a.key}={_value(a.best.value)} -> {a.path.name}",
                action="slim",
                checkpoint=a.entry.source_checkpoint,
                rule=a.best.rule,
                artifact=str(a.path),
                bytes=a.entry.bytes,
            )
        elif a.status in (ArtifactStatus.DEFERRED, ArtifactStatus.MISSING):
            emit(20, f"skip: artifact for {a.key} {a.status}: {a.detail}", action="skip")
    for d in report.deletions:
        reason = describe_all(d.decision.reasons)
        fields = {
            "checkpoint": d.decision.checkpoint.name,
            "bytes": d.decision.checkpoint.stat.size,
        }
        if d.done:
            emit(
                20,
                f"delete: {d.decision.checkpoint.name}",
                action="delete",
                reason=reason,
                **fields,
            )
        else:
            emit(30, f"skip delete: {d.detail}", action="skip", reason=d.detail, **fields)
    old_notes = set(previous.notes) if previous else set()
    for note in report.notes:
        if note not in old_notes:
            emit(20, note, action="note")
    for error in report.errors:
        emit(40, error, action="error")


def metrics_of(report: WorkDirReport) -> dict[str, object]:
    """The numbers of one pass, as DaemonMetrics.record_pass takes them."""
    decisions = report.plan.decisions if report.plan else ()
    gone = {d.decision.checkpoint.name for d in report.deletions if d.done}
    remaining = [d.checkpoint for d in decisions if d.checkpoint.name not in gone]
    return {
        "work_dir": str(report.target.work_dir),
        "project": report.target.project.name,
        "seconds": report.seconds,
        "ok": not report.failed,
        "checkpoints_kept": len(remaining),
        "bytes_held": sum(c.stat.size for c in remaining),
        "reclaimed_bytes": report.reclaimed_bytes,
        "slims": [
            (a.key, a.seconds, a.entry.bytes if a.entry else 0)
            for a in report.artifacts
            if a.status is ArtifactStatus.WRITTEN
        ],
        "deletions": len(gone),
        "errors": list(report.error_kinds),
        "best": {a.key: a.best.value for a in report.artifacts},
        "deletions_held": len(report.plan.held) if report.plan else 0,
        "over_budget": bool(report.plan and report.plan.over_budget),
        "artifact_failed": {a.key: a.status is ArtifactStatus.FAILED for a in report.artifacts},
    }
