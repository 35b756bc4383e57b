"""The floors of a slim and the page cache, for ``bench_slim.py`` (no torch, no numpy).

A durable slim must write its output's bytes and fsync them, and the manifest needs their
sha256, so its floor is the larger of two whole processes run on a file of the output's size:
``sha256 in-process`` (Python's ``hashlib.file_digest``, SHA-NI where the CPU has it) and
``cp + fsync``. ``cp`` alone (into the page cache, not durable) is printed for reference.

The page cache: ``drop_caches`` empties it between cold runs (root only: the harness says when
it cannot), and ``resident_bytes`` counts a file's pages still cached (``mincore``), which is
the residue a slim leaves behind.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from pathlib import Path

from common import PYTHON, Verdict, fmt_s

SHA256_FLOOR = "sha256 in-process (floor)"
DURABLE_FLOOR = "cp + fsync (floor)"
CP = "cp"
PUBLISH_SHIPPED = "publish_model.py as shipped"
LOAD_SAVE = "torch.load + torch.save alone"
FLOOR_RATIO = 1.10
SHIPPED_SPEEDUP = 10.0
RSS_TARGET_MIB = 32

_SHA256_SCRIPT = (
    "import hashlib, sys\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    print(hashlib.file_digest(f, 'sha256').hexdigest())\n"
)


def floor_ways(copy_source: Path, copy_out: Path) -> dict[str, list[str]]:
    """The whole-process floors, on ``copy_source`` (a file of the output's size)."""
    return {
        SHA256_FLOOR: [PYTHON, "-S", "-c", _SHA256_SCRIPT, str(copy_source)],
        DURABLE_FLOOR: ["sh", "-c", f"cp '{copy_source}' '{copy_out}' && sync '{copy_out}'"],
        CP: ["cp", str(copy_source), str(copy_out)],
    }


def drop_caches() -> str | None:
    """Write back and drop the page cache; None when done, else why it cannot be done."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror}; needs root outside a container)"
    return None


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int)
    libc.mmap.argtypes += (ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
            return sum(b & 1 for b in vec.raw) * page
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def floor_verdicts(
    label: str, wall: Callable[[str], float], way: str, rss_mib: float, suffix: str = ""
) -> list[Verdict]:
    """Item 3 on the big case: ``way``'s wall against each floor and ``cp``, and its RSS; the
    floors' runs are the ones named with ``suffix`` (the cold runs for a cold ``way``)."""
    slim = wall(way)
    floor = max(wall(SHA256_FLOOR + suffix), wall(DURABLE_FLOOR + suffix))
    ratios = ", ".join(
        f"{slim / wall(w + suffix):.2f}x {w.split(' (')[0]} ({fmt_s(wall(w + suffix))})"
        for w in (SHA256_FLOOR, DURABLE_FLOOR, CP)
    )
    return [
        Verdict(
            f"3a {label}: {way} / max(floors)",
            f"{slim / floor:.2f}x ({fmt_s(slim)}; {ratios})",
            f"<= {FLOOR_RATIO:.2f}x",
            slim / floor <= FLOOR_RATIO,
        ),
        Verdict(
            f"3b {label}: {way} peak RSS",
            f"{rss_mib:.0f} MiB",
            f"<= {RSS_TARGET_MIB} MiB",
            rss_mib <= RSS_TARGET_MIB,
        ),
    ]


def shipped_verdicts(label: str, wall: Callable[[str], float], way: str) -> list[Verdict]:
    """Item 3 on the mid case: ``publish_model.py`` as shipped, and load+save alone."""
    slim = wall(way)
    shipped, load_save = wall(PUBLISH_SHIPPED), wall(LOAD_SAVE)
    return [
        Verdict(
            f"3c {label}: {PUBLISH_SHIPPED} / {way}",
            f"{shipped / slim:.1f}x ({fmt_s(shipped)} vs {fmt_s(slim)})",
            f">= {SHIPPED_SPEEDUP:.0f}x",
            shipped / slim >= SHIPPED_SPEEDUP,
        ),
        Verdict(
            f"3c' same: {LOAD_SAVE} / {way}",
            f"{load_save / slim:.1f}x ({fmt_s(load_save)})",
            "(info)",
            None,
        ),
    ]
