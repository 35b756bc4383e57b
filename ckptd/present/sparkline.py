"""A metric's history as a one-line chart, for people reading ``ckptd status`` (never JSON).

One column per evaluation (bucketed when the history is wider than the chart), a bar per
value, and a second line under it marking the best and the checkpoints that survive, so one
glance shows where the best was and what is left of the run. Pure: the caller decides the
width and whether its output can take Unicode (``ChartStyle.for_stream``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TextIO

MAX_WIDTH = 60  # wider charts are harder to read than bucketed ones
MIN_WIDTH = 10


@dataclass(frozen=True, slots=True)
class Glyphs:
    levels: str  # lowest bar first
    nan: str  # an evaluation whose value is NaN or infinite: it never ranks
    best: str
    kept: str
    both: str  # the best, and its full checkpoint is kept
    missing: str = " "  # a kept checkpoint without an evaluation (yet)

    def text(self) -> str:
        return self.levels + self.nan + self.best + self.kept + self.both


UNICODE = Glyphs(levels="▁▂▃▄▅▆▇█", nan="×", best="▲", kept="●", both="◆")
ASCII = Glyphs(levels="_.-'^", nan="x", best="*", kept="o", both="@")


@dataclass(frozen=True, slots=True)
class ChartStyle:
    width: int  # columns of the chart itself
    glyphs: Glyphs

    @classmethod
    def for_stream(cls, stream: TextIO, indent: int = 0) -> ChartStyle:
        """Unicode bars when the stream's encoding can write them (a C locale or a pipe to a
        legacy tool cannot), as wide as the terminal allows after ``indent``, at most 60."""
        try:
            UNICODE.text().encode(getattr(stream, "encoding", None) or "ascii")
            glyphs = UNICODE
        except (UnicodeEncodeError, LookupError):
            glyphs = ASCII
        columns = shutil.get_terminal_size().columns - indent
        return cls(max(MIN_WIDTH, min(MAX_WIDTH, columns)), glyphs)


@dataclass(frozen=True, slots=True)
class Chart:
    bars: str
    marks: str  # under the bars: best / kept / both, spaces elsewhere (right-stripped)
    per_column: int  # evaluations (or checkpoints) per column; 1 when not bucketed


def _bucket_value(values: list[float | None], rule: str) -> float | None:
    """The column's value: its best finite one by the rule, so the best stays visible; NaN
    when it holds only non-finite values; None when it holds no evaluation."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite:
        return max(finite) if rule == "greater" else min(finite)
    return math.nan if any(v is not None for v in values) else None


def chart(
    points: Sequence[tuple[int, float | None]],
    rule: str,
    best: int | None,
    kept: Collection[int],
    style: ChartStyle,
) -> Chart:
    """``points``: (index, value) in index order; value None for a checkpoint without an
    evaluation. ``best``: the index of the best; ``kept``: indices whose checkpoint stays."""
    g = style.glyphs
    per = max(1, math.ceil(len(points) / style.width))
    columns = [points[i : i + per] for i in range(0, len(points), per)]
    values = [_bucket_value([v for _, v in col], rule) for col in columns]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    top = len(g.levels) - 1
    bars = []
    for v in values:
        if v is None:
            bars.append(g.missing)
        elif not math.isfinite(v):
            bars.append(g.nan)
        elif high == low:
            bars.append(g.levels[top // 2])  # a flat history: neither floor nor ceiling
        else:
            bars.append(g.levels[round((v - low) / (high - low) * top)])
    kept = set(kept)
    marks = []
    for col in columns:
        indices = {i for i, _ in col}
        is_best, is_kept = best in indices, bool(indices & kept)
        marks.append(
            g.both if is_best and is_kept else g.best if is_best else g.kept if is_kept else " "
        )
    return Chart("".join(bars), "".join(marks).rstrip(), per)
