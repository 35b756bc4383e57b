"""Time the phases of one slim separately (run as a child process; no torch).

``python benchmarks/slim_phases.py SOURCE OUT_DIR [--runs N]`` prints one JSON line with the
median seconds of: ``parse`` (open the source, read the central directory and ``data.pkl``
inertly, write the new pickle, lay out the archive), ``copy`` (the literal bytes plus the
in-kernel copies, nothing else), ``fsync`` (of that freshly written, still dirty output),
``sha256`` and ``crc32`` (reading the output back from the page cache: what the verifier
threads do; the CRC through ``ckptd.slim.crc``, whose implementation is printed), and
``slim`` (``slim_checkpoint`` end to end, in this process). The sum of the parts is what a
fully serial slim would cost; ``slim`` shows how much of it overlaps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.fs.durable import pwrite_all
from ckptd.slim import slimmer as slim_module
from ckptd.slim.copyhash import copy_range
from ckptd.slim.crc import CRC32_IMPLEMENTATION, crc32
from ckptd.slim.source import CheckpointSource
from ckptd.slim.torchzip import Copy

BUF = 8 * 1024 * 1024


def _parse(source: Path) -> tuple[CheckpointSource, list[bytes | Copy], int]:
    src = CheckpointSource(source)
    kept = tuple(k for k in src.mapping if k in slim_module.DEFAULT_KEEP_KEYS)
    pieces, total = slim_module._zip_output(src, kept)
    src.release_tree()
    return src, pieces, total


def _copy(src_fd: int, fd: int, pieces: list[bytes | Copy]) -> None:
    pos = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            pwrite_all(fd, piece, pos)
            pos += len(piece)
        else:
            copy_range(src_fd, piece.source_offset, fd, pos, piece.size, lambda done: None)
            pos += piece.size


def _read_back(
    path: Path, ranges: list[tuple[int, int]], fold: Callable[[memoryview], None]
) -> None:
    buffer = memoryview(bytearray(BUF))
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, size in ranges:
            pos, end = start, start + size
            while pos < end:
                n = os.preadv(fd, [buffer[: min(BUF, end - pos)]], pos)
                fold(buffer[:n])
                pos += n
    finally:
        os.close(fd)


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - started)
        return result


class _Crc:
    def __init__(self) -> None:
        self.value = 0

    def update(self, view: memoryview) -> None:
        self.value = crc32(view, self.value)


def one_run(source: Path, out_dir: Path, timed: _Timer) -> int:
    out = out_dir / "phases.pth"
    os.sync()
    src, pieces, total = timed("parse", lambda: _parse(source))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        timed("copy", lambda: _copy(src.fd, fd, pieces))
        timed("fsync", lambda: os.fsync(fd))
    finally:
        os.close(fd)
        src.close()
    sha = hashlib.sha256()
    timed("sha256", lambda: _read_back(out, [(0, total)], sha.update))
    copies = [(p.dest_offset, p.size) for p in pieces if isinstance(p, Copy)]
    timed("crc32", lambda: _read_back(out, copies, _Crc().update))
    out.unlink()
    os.sync()
    timed("slim", lambda: slim_module.slim_checkpoint(source, out_dir, "slim.pth"))
    (out_dir / "slim.pth").unlink()
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    timed = _Timer()
    total = 0
    for _ in range(args.runs):
        total = one_run(args.source, args.out_dir, timed)
    medians: dict[str, float] = {k: statistics.median(v) for k, v in timed.times.items()}
    medians["output_bytes"] = total
    medians["crc32_implementation"] = CRC32_IMPLEMENTATION  # type: ignore[assignment]
    print(json.dumps(medians))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
