"""Lightning CSVLogger's ``metrics.csv``, read incrementally although it is rewritten.

CSVLogger writes sparse rows under a header of every column seen so far, sorted by name, and
rewrites the whole file (truncate, then header and all rows) when a new column appears. The
reader keeps the header it parsed with in the source state and starts over when the file's first
line differs; the cursor's fingerprint catches any other rewrite. A pass that catches a rewrite
half done still counts the rows not rewritten yet, from the previous read, without storing them
twice.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ckptd.core.model import EvalRecord, Problem
from ckptd.core.reads import read_file
from ckptd.layouts.base import SourceState
from ckptd.layouts.logtail import read_new_lines

METRICS_FILE = "metrics.csv"

NOT_METRICS = frozenset({"epoch", "step"})
# Columns that hold validation results; a row with a value in one is an evaluation. Per-batch
# *_step columns (on_step=True in validation_step) are not: their step counts val batches.
EVAL_COLUMN = re.compile(
    r"(?:^|[/_.\-])(?:val|valid|validation|eval|evaluation)(?:[/_.\-]|$)", re.I
)
MAX_HEADER = 64 * 1024


def _first_line(path: Path) -> str | None:
    try:
        head = read_file(path, MAX_HEADER)
    except OSError:
        return None
    cut = head.find(b"\n")
    return head[:cut].rstrip(b"\r").decode("utf-8", "replace") if cut >= 0 else None


def read_metrics_csv(
    path: Path, rel: str, old: SourceState | None, keys: set[str], signature: str
) -> tuple[SourceState | None, list[EvalRecord]]:
    state = old or SourceState()
    if state.info.get("keys", "") != signature or (
        # a new column since the last pass: CSVLogger rewrote the file from scratch
        state.cursor.offset and state.info.get("header") != _first_line(path)
    ):
        state = SourceState()
    try:
        tail = read_new_lines(path, state.cursor)
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        problem = Problem(rel, f"cannot read: {exc.strerror}")
        return SourceState(state.cursor, state.records, [problem], state.info), []
    if tail.restarted:
        state = SourceState()
    carried: list[EvalRecord] = []
    if old is not None and tail.cursor.offset < old.cursor.offset:
        # Caught mid-rewrite: rows not rewritten yet still count, for this pass only.
        carried = list(old.records)
    header = state.info.get("header", "")
    columns = next(csv.reader([header]), [])
    records, found = list(state.records), list(state.problems)
    for lineno, raw in tail.lines:
        text = raw.decode("utf-8", "replace")
        if lineno == 1:
            header = text
            columns = next(csv.reader([header]), [])
            continue
        where = f"{rel}:{lineno}"
        try:
            record = _parse_row(columns, text, keys, rel, lineno)
        except ValueError as exc:
            found.append(Problem(where, f"{exc}; fix or remove the line"))
            continue
        if record is None:
            continue
        if records and records[-1].index == record.index:
            merged = {**records[-1].metrics, **record.metrics}
            record = EvalRecord(record.index, merged, rel, records[-1].line)
            records.pop()
        records.append(record)
    if records and carried:
        carried = [r for r in carried if r.index > records[-1].index]
    info = {"header": header, "keys": signature}
    return SourceState(tail.cursor, records, found, info), carried


def _parse_row(
    columns: list[str], text: str, keys: set[str], rel: str, lineno: int
) -> EvalRecord | None:
    values = next(csv.reader([text]), [])
    if len(values) != len(columns):
        raise ValueError(f"row has {len(values)} fields, the header {len(columns)}")
    row = {c: v for c, v in zip(columns, values, strict=True) if v != ""}
    if not any(c in keys or (EVAL_COLUMN.search(c) and not c.endswith("_step")) for c in row):
        return None
    step = row.get("step", "")
    if not step.isdigit():
        raise ValueError(f"evaluation row without an integer step (got {step!r})")
    metrics: dict[str, float] = {}
    for column, value in row.items():
        if column in NOT_METRICS:
            continue
        try:
            metrics[column] = float(value)
        except ValueError:
            continue  # text is not a metric
    # The val row is logged one step before the checkpoint saved after it (S-1).
    return EvalRecord(int(step) + 1, metrics, rel, lineno)
