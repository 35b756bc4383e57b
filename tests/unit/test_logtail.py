"""Incremental metric reading: complete lines only, restarts on truncation/replacement/rewrite."""

from __future__ import annotations

import os
from pathlib import Path

from ckptd.layouts.logtail import Cursor, read_new_lines


def test_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "scalars.json"
    log.write_bytes(b'{"a": 1}\n{"b": 2')
    first = read_new_lines(log, Cursor())
    assert [n for n, _ in first.lines] == [1]
    assert first.cursor.offset == 9
    with log.open("ab") as f:
        f.write(b'}\n{"c": 3}\n')
    second = read_new_lines(log, first.cursor)
    assert second.lines == [(2, b'{"b": 2}'), (3, b'{"c": 3}')]
    assert not second.restarted
    assert read_new_lines(log, second.cursor).lines == []


def test_append_reads_only_new_bytes(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "scalars.json"
    log.write_bytes(b"x" * 100 + b"\n")
    cursor = read_new_lines(log, Cursor()).cursor
    with log.open("ab") as f:
        f.write(b"new\n")
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def spy(fd: int, n: int, offset: int) -> bytes:
        reads.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    result = read_new_lines(log, cursor)
    assert result.lines == [(2, b"new")]
    # one fingerprint check of <= 256 bytes before the offset, then only the appended bytes
    assert sum(n for n, off in reads if off >= cursor.offset) <= 4 + 256
    assert all(n <= 256 for n, off in reads if off < cursor.offset)


def test_truncation_restarts(tmp_path: Path) -> None:
    log = tmp_path / "scalars.json"
    log.write_bytes(b"1\n2\n3\n")
    cursor = read_new_lines(log, Cursor()).cursor
    log.write_bytes(b"9\n")
    result = read_new_lines(log, cursor)
    assert result.restarted and result.lines == [(1, b"9")]


def test_replacement_by_new_inode_restarts(tmp_path: Path) -> None:
    log = tmp_path / "scalars.json"
    log.write_bytes(b"1\n2\n")
    cursor = read_new_lines(log, Cursor()).cursor
    other = tmp_path / "new"
    other.write_bytes(b"1\n2\n3\n")
    os.replace(other, log)
    result = read_new_lines(log, cursor)
    assert result.restarted and [n for n, _ in result.lines] == [1, 2, 3]


def test_rewrite_in_place_that_grows_restarts(tmp_path: Path) -> None:
    # Lightning's CSVLogger: same inode, truncated and rewritten with a new column, bigger
    log = tmp_path / "metrics.csv"
    log.write_bytes(b"epoch,loss\n0,1.0\n")
    cursor = read_new_lines(log, Cursor()).cursor
    with log.open("r+b") as f:
        f.truncate(0)
        f.write(b"epoch,loss,val_acc\n0,1.0,\n0,,0.5\n")
    result = read_new_lines(log, cursor)
    assert result.restarted
    assert [line for _, line in result.lines] == [b"epoch,loss,val_acc", b"0,1.0,", b"0,,0.5"]


def test_keep_filter_counts_lines_but_stores_few(tmp_path: Path) -> None:
    log = tmp_path / "scalars.json"
    log.write_bytes(b"".join(b"train %d\n" % i for i in range(1000)) + b"val\n")
    result = read_new_lines(log, Cursor(), keep=lambda line: line.startswith(b"val"))
    assert result.lines == [(1001, b"val")]
    assert result.cursor.lines == 1001


def test_crlf_and_chunk_boundaries(tmp_path: Path, monkeypatch) -> None:
    import ckptd.layouts.logtail as logtail

    monkeypatch.setattr(logtail, "_CHUNK", 7)
    log = tmp_path / "x"
    lines = [b"line-%d" % i * (i % 5 + 1) for i in range(50)]
    log.write_bytes(b"\r\n".join(lines) + b"\r\n")
    result = read_new_lines(log, Cursor())
    assert [line for _, line in result.lines] == lines


def test_cursor_json_round_trip(tmp_path: Path) -> None:
    log = tmp_path / "x"
    log.write_bytes(b"a\nb\n")
    cursor = read_new_lines(log, Cursor()).cursor
    assert Cursor.from_json(cursor.to_json()) == cursor
