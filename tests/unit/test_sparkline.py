"""The history chart of ``ckptd status``: bars, NaN, bucketing, marks, and the ASCII fallback."""

from __future__ import annotations

import io
import math

from ckptd.present.sparkline import ASCII, MAX_WIDTH, UNICODE, ChartStyle, chart

WIDE = ChartStyle(60, UNICODE)


def points(values: list[float | None], start: int = 1) -> list[tuple[int, float | None]]:
    return list(enumerate(values, start))


def test_bars_span_the_levels_and_marks_sit_under_their_columns() -> None:
    drawn = chart(points([0.1, 0.5, 0.3, 0.8, 0.2]), "greater", 4, {4, 5}, WIDE)
    assert drawn.bars == "▁▅▃█▂"
    assert drawn.marks == "   ◆●"  # 4 is the best and kept, 5 kept
    assert drawn.per_column == 1
    drawn = chart(points([0.1, 0.5, 0.3, 0.8, 0.2]), "greater", 4, {1}, WIDE)
    assert drawn.marks == "●  ▲"  # the best's checkpoint is gone: only its mark


def test_nan_is_its_own_glyph_and_does_not_stretch_the_scale() -> None:
    drawn = chart(points([0.2, math.nan, 0.4, math.inf]), "greater", 3, set(), WIDE)
    assert drawn.bars == "▁×█×"
    assert chart(points([math.nan, math.nan]), "less", None, set(), WIDE).bars == "××"


def test_a_flat_history_and_an_unevaluated_checkpoint() -> None:
    drawn = chart(points([0.5, 0.5, None]), "greater", 1, {3}, WIDE)
    assert drawn.bars == "▄▄ " and drawn.marks == "▲ ●"


def test_long_histories_are_bucketed_keeping_the_best_visible() -> None:
    values: list[float | None] = [0.1] * 100
    values[41] = 0.9  # index 42
    values[70] = math.nan
    drawn = chart(points(values), "greater", 42, {100}, ChartStyle(20, UNICODE))
    assert drawn.per_column == 5 and len(drawn.bars) == 20
    assert drawn.bars[8] == "█" and drawn.bars.count("█") == 1  # 41..45 holds the best
    assert "×" not in drawn.bars  # a column with one finite value shows that value
    assert drawn.marks == " " * 8 + "▲" + " " * 10 + "●"
    # by the rule: a loss column shows its lowest value
    losses: list[float | None] = [0.5, 0.1, 0.5, 0.5, 0.9, 0.9]
    assert chart(points(losses), "less", 2, set(), ChartStyle(3, UNICODE)).bars == "▁▅█"


def test_ascii_when_the_stream_cannot_encode_the_bars() -> None:
    latin1 = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    assert ChartStyle.for_stream(latin1).glyphs is ASCII
    assert ChartStyle.for_stream(io.StringIO()).glyphs is ASCII  # no encoding: assume ASCII
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert ChartStyle.for_stream(utf8).glyphs is UNICODE
    drawn = chart(points([0.1, math.nan, 0.9, 0.5]), "greater", 3, {3, 4}, ChartStyle(60, ASCII))
    assert drawn.bars == "_x^-" and drawn.marks == "  @o"
    assert (drawn.bars + drawn.marks).isascii()


def test_width_follows_the_terminal_up_to_the_maximum(monkeypatch) -> None:
    import os

    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((200, 50)))
    assert ChartStyle.for_stream(io.StringIO(), 16).width == MAX_WIDTH
    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((56, 50)))
    assert ChartStyle.for_stream(io.StringIO(), 16).width == 40
