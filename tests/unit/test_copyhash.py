"""``ckptd.slim.copyhash.ReadBackVerifier``: one read-back pass shared by the sha256 and CRC
threads."""

from __future__ import annotations

import hashlib
import random
import zlib
from pathlib import Path

import pytest

from ckptd.slim import copyhash
from ckptd.slim.copyhash import CrcMismatch, ReadBackVerifier
from ckptd.slim.torchzip import Copy


def _ranges(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Disjoint ranges with gaps (literal bytes between copied storages), some empty."""
    out, pos = [], 0
    while pos < size:
        pos += rng.randrange(0, 40)
        length = min(rng.choice([0, 1, 5, 64, 300, 2000]), size - pos)
        if pos >= size:
            break
        out.append((pos, length))
        pos += length
    return out


def _verify(path: Path, checks: list[Copy], steps: list[int]) -> str:
    verifier = ReadBackVerifier(path, checks)
    try:
        for written in steps:
            verifier.advance(written)
        return verifier.finish(path.stat().st_size)
    except BaseException:
        verifier.abort()
        raise


@pytest.mark.parametrize("chunk", [7, 64, 4096, 1 << 20])
def test_sha_and_every_crc_across_buffer_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(copyhash, "READ_CHUNK", chunk)
    rng = random.Random(chunk)
    data = rng.randbytes(20_000)
    path = tmp_path / "out.bin"
    path.write_bytes(data)
    checks = [
        Copy(0, start, size, zlib.crc32(data[start : start + size]), f"r{i}")
        for i, (start, size) in enumerate(_ranges(len(data), rng))
    ]
    steps = sorted(rng.sample(range(len(data)), 30))
    assert _verify(path, checks, steps) == hashlib.sha256(data).hexdigest()
    for victim in (checks[0], checks[len(checks) // 2], checks[-1]):
        if not victim.size:
            continue
        bad = bytearray(data)
        bad[victim.dest_offset + victim.size - 1] ^= 0x01  # last byte: spans buffers
        path.write_bytes(bad)
        with pytest.raises(CrcMismatch) as caught:
            _verify(path, checks, steps)
        assert caught.value.copy is victim


def test_short_output_and_abort(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"x" * 100)
    check = Copy(0, 90, 20, zlib.crc32(b"x" * 20), "tail")
    verifier = ReadBackVerifier(path, [check])
    with pytest.raises(EOFError):
        verifier.finish(110)
    verifier = ReadBackVerifier(path, [check])
    verifier.advance(50)
    verifier.abort()  # returns: no thread is left waiting
