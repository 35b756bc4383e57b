"""Shared pieces of the ckptd benchmarks: process timing, medians, machine load, tables.

This module (and every harness that imports it) must stay small: it never imports torch or
numpy. A child's ``ru_maxrss`` starts at the RSS its parent had when it forked, so a big
harness would inflate every peak RSS it measures. Everything torch-related (generating
checkpoints, the ``publish_model.py`` way, checking outputs) runs in child processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PYTHON = sys.executable
MiB = 1024 * 1024


def ckptd_cmd() -> list[str]:
    """How a user runs ckptd: the console script next to this interpreter."""
    script = Path(PYTHON).with_name("ckptd")
    return [str(script)] if script.exists() else [PYTHON, "-m", "ckptd"]


@dataclass(frozen=True, slots=True)
class Run:
    """One child process: wall time, CPU time and its own peak RSS (``ru_maxrss``)."""

    cmd: tuple[str, ...]
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024

    def check(self) -> Run:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.cmd)} exited with {self.returncode}:\n{self.stderr[-3000:]}"
            )
        return self


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> Run:
    """Run ``cmd`` to completion; time it from spawn to reap, rusage from ``os.wait4``.

    Output goes to temp files, not pipes, so no reader thread competes with the child.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdin=stdin, stdout=out, stderr=err, env=env, cwd=cwd, close_fds=True
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Run(
            tuple(cmd),
            wall,
            usage.ru_utime,
            usage.ru_stime,
            usage.ru_maxrss,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100), no interpolation: a figure that was measured."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_line() -> str:
    cpus = os.cpu_count()
    mem = "?"
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in x)
        mem = f"{int(line.split()[1]) / MiB:.0f} GiB"
    return f"{cpus} CPUs, {mem} RAM, load average {loadavg()} (1/5/15 min)"


def own_rss_mib() -> float:
    """This process's peak RSS (VmHWM): a child's ``ru_maxrss`` never reads below it, because
    the kernel carries the parent's high-water mark into the child at fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) and context switches of a running process."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                found[key] = int(value.split()[0])
    return found


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of all threads of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_wakeups(pid: int) -> int:
    """Context switches summed over the process's threads (a proxy for wakeups)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                    if "ctxt_switches" in line:
                        total += int(line.split()[1])
    return total


@contextlib.contextmanager
def scratch_dir(prefix: str, need_bytes: int = 0, base: str | None = None) -> Iterator[Path]:
    """A temp folder removed afterwards; refuses to start when the disk is too full."""
    base = base or os.environ.get("CKPTD_BENCH_TMP") or tempfile.gettempdir()
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes * 1.2:
        raise SystemExit(
            f"{base}: {free / 2**30:.1f} GiB free, this benchmark needs about "
            f"{need_bytes * 1.2 / 2**30:.1f} GiB (set CKPTD_BENCH_TMP to another folder)"
        )
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def drop_dirty() -> None:
    """Write back dirty pages so one run's writeback does not land in the next run's time."""
    os.sync()


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(slots=True)
class Verdict:
    what: str
    figure: str
    target: str
    ok: bool | None  # None: informational, no target

    @property
    def mark(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(headers), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in rows:
        print(line(row), file=out)


def print_verdicts(verdicts: Sequence[Verdict], out: TextIO | None = None) -> bool:
    """The target table; returns True when no target was missed."""
    print_table(
        ("target", "measured", "goal", "result"),
        [(v.what, v.figure, v.target, v.mark) for v in verdicts],
        out,
    )
    return all(v.ok is not False for v in verdicts)


def header(title: str, command: Sequence[str]) -> None:
    print(f"# {title}")
    print(f"command: {' '.join(command)}")
    print(f"machine: {machine_line()}")
    print(f"time:    {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    print()


class DaemonProc:
    """``ckptd --log-format json run -c CONFIG`` as a child, its JSON log in a file."""

    def __init__(
        self, config: Path, log: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.config, self.log_path, self.extra, self.env = config, log, extra, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._offset = 0
        self.records: list[dict[str, object]] = []

    def start(self) -> DaemonProc:
        self._log = self.log_path.open("ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*ckptd_cmd(), "--log-format", "json", "run", "-c", str(self.config), *self.extra],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll_log(self) -> list[dict[str, object]]:
        """New JSON records since the last call (also kept in ``records``)."""
        new = []
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        for line in data[:cut].splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:
                new.append({"message": line.decode(errors="replace"), "level": "raw"})
        self.records += new
        return new

    def wait_for(self, message_prefix: str, timeout: float = 120) -> float:
        """Seconds since start when a log line starting with ``message_prefix`` appeared."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.poll_log():
                if str(record.get("message", "")).startswith(message_prefix):
                    return time.monotonic() - self.started
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ckptd exited with {self.proc.returncode}: {self.tail()}")
            time.sleep(0.01)
        raise RuntimeError(f"timed out waiting for {message_prefix!r}: {self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def errors(self) -> list[dict[str, object]]:
        self.poll_log()
        return [r for r in self.records if r.get("level") in ("error", "critical", "raw")]

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def write_config(root: Path, work_dirs: str, **sections: object) -> Path:
    """A one-project ckptd.yaml (JSON is valid YAML: the harness needs no yaml module)."""
    project: dict[str, object] = {"name": "bench", "work_dirs": [work_dirs]}
    watch = sections.pop("watch", {})
    project.update(sections)
    path = root / "ckptd.yaml"
    path.write_text(json.dumps({"projects": [project], "watch": watch}, indent=1))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from ckptd's /metrics, summed over label sets."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out
