"""``ckptd.slim.crc``: python-isal's SIMD CRC32 where it imports, the stdlib's otherwise; both
must give the zip format's CRC-32, and a bad copied storage must be caught with either."""

from __future__ import annotations

import binascii
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from isal import isal_zlib

from ckptd.slim import copyhash, crc
from ckptd.slim.copyhash import CrcMismatch, ReadBackVerifier
from ckptd.slim.torchzip import Copy

REPO = Path(__file__).resolve().parents[2]
IMPLEMENTATIONS = {"isal": isal_zlib.crc32, "zlib": zlib.crc32}


def test_isal_is_the_one_used_where_it_imports() -> None:
    assert crc.CRC32_IMPLEMENTATION == "isal"
    assert crc.crc32 is isal_zlib.crc32


@pytest.mark.parametrize("size", [0, 1, 7, 63, 64, 4096 + 3, (1 << 20) + 17])
def test_same_crc_as_binascii_whole_and_chained(size: int) -> None:
    data = random.Random(size).randbytes(size)
    expected = binascii.crc32(data)  # the oracle: neither implementation under test
    for name, fn in IMPLEMENTATIONS.items():
        assert fn(data) == expected, name
        cut = size // 3
        view = memoryview(bytearray(data))
        assert fn(view[cut:], fn(view[:cut])) == expected, name


def test_falls_back_to_zlib_without_isal() -> None:
    code = (
        "import sys, zlib\n"
        "sys.modules['isal'] = None  # import isal now raises ImportError\n"
        "from ckptd.slim.crc import CRC32_IMPLEMENTATION, crc32\n"
        "assert crc32 is zlib.crc32, crc32\n"
        "print(CRC32_IMPLEMENTATION, crc32(b'123456789'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["zlib", str(0xCBF43926)]  # the CRC-32 check value


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_bad_copied_range_is_caught_with_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(copyhash, "crc32", IMPLEMENTATIONS[name])
    data = random.Random(1).randbytes(4 << 20)
    checks = [
        Copy(0, start, size, binascii.crc32(data[start : start + size]), f"s{i}")
        for i, (start, size) in enumerate([(100, 1 << 20), ((1 << 20) + 500, 2 << 20)])
    ]
    path = tmp_path / "out.bin"
    for corrupt, expected in ((None, None), ((1 << 20) + 999, checks[1])):
        blob = bytearray(data)
        if corrupt is not None:
            blob[corrupt] ^= 0x40
        path.write_bytes(blob)
        verifier = ReadBackVerifier(path, checks)
        if expected is None:
            assert verifier.finish(len(blob))
            continue
        with pytest.raises(CrcMismatch) as caught:
            verifier.finish(len(blob))
        assert caught.value.copy is expected
