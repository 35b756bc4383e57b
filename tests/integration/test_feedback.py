"""Feedback on long work: ``ckptd slim``'s progress bar on a terminal, ``ckptd once``'s timings.

The bar is checked on a real pseudo-terminal. Writing a > 1 GB checkpoint here would make the
test slow and disk-hungry, so the child lowers ``PROGRESS_MIN_BYTES``; the real threshold (and a
3.7 GB file) is exercised by ``benchmarks/bench_slim.py --large``.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, simulate, write_config

# Runs `ckptd slim` with the bar threshold at argv[1] bytes.
CHILD = (
    "import sys, ckptd.present.progress as p; p.PROGRESS_MIN_BYTES = int(sys.argv[1]);"
    "from ckptd.cli.commands import main; sys.exit(main(sys.argv[2:]))"
)


def run_on_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a 100-column pseudo-terminal."""
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            os.chdir(REPO)
            os.execv(args[0], args)
        finally:
            os._exit(127)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError(f"no output for {timeout} s: {b''.join(chunks)!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work_dir = simulate(
        tmp_path_factory.mktemp("feedback") / "run",
        epochs=1,
        param_count=300_000,
        optimizer="adamw",
    )
    return work_dir / "epoch_1.pth"


def test_slim_shows_a_bar_on_a_terminal(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "slim.pth"
    code, text = run_on_pty(
        [sys.executable, "-c", CHILD, "1", "slim", str(checkpoint), "-o", str(out)]
    )
    assert code == 0, text
    size = out.stat().st_size
    frames = [f for f in re.split(r"[\r\n]+", text) if f.startswith(f"slim {checkpoint.name}")]
    assert frames, text
    final = frames[-1]
    # Bytes copied against the OUTPUT size (what the callback counts), rate and ETA.
    assert "100%" in final, frames
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, *[\d.]+\s?[kMG]?B/s\]", final), final
    shown_total = re.search(r"\| *[\d.]+[kMG]?/([\d.]+)([kMG]?) ", final)
    assert shown_total is not None, final
    scale = {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3}[shown_total.group(2)]
    assert abs(float(shown_total.group(1)) * scale - size) <= 0.06 * size, (final, size)
    assert str(out) in text  # the result line still comes


def test_slim_is_quiet_below_the_threshold_and_when_piped(checkpoint: Path, tmp_path: Path) -> None:
    from ckptd.present.progress import PROGRESS_MIN_BYTES

    assert PROGRESS_MIN_BYTES == 1 << 30  # "files over 1 GB"
    assert checkpoint.stat().st_size < PROGRESS_MIN_BYTES
    code, text = run_on_pty(
        [sys.executable, "-m", "ckptd", "slim", str(checkpoint), "-o", str(tmp_path / "a.pth")]
    )
    assert code == 0 and "%|" not in text, text
    piped = subprocess.run(
        [sys.executable, "-c", CHILD, "1", "slim", str(checkpoint), "-o", str(tmp_path / "b.pth")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert piped.stdout.count("\n") == 1 and str(tmp_path / "b.pth") in piped.stdout


def test_once_reports_time_and_reclaimed_bytes_per_work_dir(tmp_path: Path) -> None:
    for name in ("a", "b"):
        simulate(tmp_path / "work_dirs" / name, epochs=4)
    config = write_config(tmp_path, retention={"keep_last": 1})
    code, out, err = cli("once", "-c", str(config))
    assert code == 0, err
    heads = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(heads) == 2
    assert all(re.search(r"  \d+\.\d\d s$", h) for h in heads), heads
    totals = re.findall(r"reclaimed ([\d.]+ \w+) this pass", out)
    assert len(totals) == 2 and all(t != "0 B" for t in totals), out
