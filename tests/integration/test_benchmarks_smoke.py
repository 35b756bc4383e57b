"""The benchmarks' ``--quick`` modes run end to end, so the harnesses cannot rot.

Timings from a smoke run mean nothing (tiny files, a shared CI machine); what is checked is
that each harness completes, prints its target table, and that the slim output it verified is
bit-identical. The four run side by side to stay within a CI budget.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import REPO

QUICK = {
    "bench_slim": ["1d output state_dict bit-identical", "1e start-up"],
    "bench_daemon": ["4a start-up reconcile", "3a idle CPU", "4b first read", "5a"],
    "bench_latency": ["2 inotify", "2 poll"],
    "bench_trainer_cost": ["1a trainer throughput loss", "1b trainer step-time p99", "1d ckptd"],
}


def test_quick_modes_run() -> None:
    started = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for name in QUICK
    }
    outputs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=240)
        outputs[name] = out
        assert proc.returncode == 0, f"{name} --quick failed:\n{out[-4000:]}"
    for name, rows in QUICK.items():
        table = outputs[name].split("| target", 1)
        assert len(table) == 2, f"{name}: no target table:\n{outputs[name][-3000:]}"
        for row in rows:
            assert row in table[1], f"{name}: no row {row!r}:\n{table[1]}"
    slim_rows = outputs["bench_slim"].split("1d output state_dict bit-identical", 1)[1]
    assert "PASS" in slim_rows.split("\n", 1)[0], outputs["bench_slim"][-2000:]
    assert time.monotonic() - started < 120  # ~25 s on an idle 2-core machine
