"""Failing system calls: EIO, ENOSPC, EDQUOT, EINTR, EAGAIN and short reads and writes injected
into ckptd's own ``open``, ``read``, ``pread``, ``write``, ``pwrite``, ``copy_file_range``,
``fsync``, ``rename``, ``unlink``, ``rmdir``, ``flock`` and ``inotify_add_watch`` calls, at random
points, through libfiu's POSIX preload library and in-process wrappers
(``tests/faults/syscalls.py`` says which covers which call).

``ckptd once``: passes between the epochs of replayed trainings; after each pass, from outside
ckptd's code: nothing protected gone, no checkpoint deleted after a failure reached ckptd in that
pass, the manifest's artifacts intact, a message names the failure (file, call and error), no
traceback; each run ends exactly like the same run without failures (``fiu_driver.py``).
``ckptd run``: beside a trainer, every deletion judged as it happens (``StreamChecker``), then
failures off: the daemon's retries must reach the uninterrupted end state.

``CKPTD_FIU_RUNS`` (default 4 trainings, 26 passes each), ``CKPTD_FIU_PROBABILITY`` (per
eligible call, default 0.03), ``CKPTD_FIU_SEED`` scale the ``once`` test;
``CKPTD_FIU_DAEMON_RUNS`` (default 1 training) the ``run`` one. Needs libfiu (``fiu-utils``,
``libfiu0``); skips without it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess
from tests.faults.figures import env_number, report
from tests.faults.invariants import Stream, StreamChecker, artifact_problems, end_state, temp_files
from tests.faults.syscalls import PRELOAD
from tests.faults.trainer import Replayer, record
from tests.helpers import REPO, write_config

pytestmark = pytest.mark.skipif(not PRELOAD.exists(), reason=f"libfiu missing: no {PRELOAD}")


def _env() -> dict[str, str]:
    return {**os.environ, "LD_PRELOAD": str(PRELOAD), "PYTHONPATH": str(REPO)}


def _table(faults: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    table: dict[str, collections.Counter[str]] = {}
    for fault in faults:
        table.setdefault(fault["call"], collections.Counter())[fault["kind"]] += 1
    return {call: dict(kinds) for call, kinds in sorted(table.items())}


ONCE_RUNS = int(env_number("CKPTD_FIU_RUNS", 4))
DAEMON_RUNS = int(env_number("CKPTD_FIU_DAEMON_RUNS", 1))


@pytest.mark.timeout(300 + 20 * ONCE_RUNS)  # a long run outlasts the default 600 s
def test_ckptd_once_with_failing_system_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = ONCE_RUNS
    probability = env_number("CKPTD_FIU_PROBABILITY", 0.03)
    seed = int(env_number("CKPTD_FIU_SEED", 1))
    started = time.monotonic()
    command = [sys.executable, "-m", "tests.faults.fiu_driver", "once", "--root", str(tmp_path)]
    command += ["--runs", str(runs), "--seed", str(seed), "--probability", str(probability)]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=280 + 20 * runs
    )
    assert done.returncode == 0, done.stderr[-5000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == runs, done.stderr[-3000:]
    faults = [f for line in lines for f in line["faults"]]
    reached = sum(line["reached"] for line in lines)
    failed = [line for line in lines if line["problems"]]
    report(
        capsys,
        "failing system calls (ckptd once)",
        runs=runs,
        passes=sum(line["passes"] for line in lines),
        injected=len(faults),
        reached_ckptd=reached,
        named_by_a_message=sum(line["named"] for line in lines),
        absorbed=len(faults) - reached,
        by_call=_table(faults),
        failed_runs=len(failed),
        seconds=round(time.monotonic() - started, 1),
        lost="nothing" if not failed else "SEE FAILURES",
    )
    assert not failed, "\n".join(
        f"run {line['run']} ({line['scenario']}), seed {seed}:\n  " + "\n  ".join(line["problems"])
        for line in failed
    )
    calls = {f["call"] for f in faults}
    assert {"open", "read", "pread", "write", "pwrite", "fsync", "rename"} <= calls, calls
    assert {"copy_file_range", "flock", "unlinkat"} & calls, calls
    assert reached >= runs * 10, "too few failures reached ckptd to mean anything"


WATCH = {"mode": "inotify", "settle": "0.3s", "resync_interval": "5m"}
SCENARIO = {"retention": {"keep_last": 2, "pending_eval_grace": "1h"}}


def _daemon_run(root: Path, seed: int, probability: float) -> dict[str, Any]:
    """A training beside ``ckptd run`` with failures until it ends, then without."""
    work_dir = root / "work_dirs" / "run"
    marks = root / "marks"
    for folder in (work_dir, marks):
        folder.mkdir(parents=True)
    config = write_config(root, watch=WATCH, **SCENARIO)
    out = root / "faults.json"
    recording = record()

    def driver(argv: list[str]) -> list[str]:
        return [
            *(sys.executable, "-m", "tests.faults.fiu_driver", "run", "--config", str(config)),
            *("--out", str(out), "--seed", str(seed), "--probability", str(probability)),
        ]

    with Stream() as stream:
        checker = stream.add(
            StreamChecker(work_dir, recording.ops, metric=recording.metric, marks=marks)
        )
        daemon = DaemonProcess(config, env=_env(), wrap=driver).start()
        daemon.wait_ready(60)
        replayer = Replayer(recording, work_dir, epoch_seconds=0.3, marks=marks)
        replayer.start()
        replayer.join(timeout=120)
        assert replayer.error is None and replayer.finished
        os.kill(daemon.pid, signal.SIGUSR1)  # failures off: the retries must catch up
        caught_up = time.monotonic()
        # A trainer goes on writing; this one has ended, so rewrite its pointer as it would,
        # rather than wait out a backoff that grew to minutes while every pass failed.
        pointer = work_dir / "last_checkpoint"
        pointer.write_text(pointer.read_text())
        expected = {
            "kept": ["epoch_7.pth", "epoch_8.pth"],
            "artifact": "best_coco_bbox_mAP_epoch_6.pth",
        }
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            end = end_state(work_dir, checker.artifact_dir)
            if end["kept"] == expected["kept"] and expected["artifact"] in end["artifacts"]:
                break
            time.sleep(0.2)
        caught_up = time.monotonic() - caught_up
        assert daemon.stop() == 0, daemon.text()[-5000:]
        stream.drain()
    text = daemon.text()
    problems = list(checker.violations)
    if "Traceback" in text:
        problems.append("a traceback in the log:\n" + text[text.index("Traceback") :][:3000])
    problems += artifact_problems(checker.artifact_dir)
    problems += [f"left behind: {p}" for p in temp_files(work_dir)]
    end = end_state(work_dir, checker.artifact_dir)
    pth = sorted(n for n in end["artifacts"] if n.endswith(".pth"))
    if end["kept"] != expected["kept"] or pth != [expected["artifact"]]:
        problems.append(f"did not catch up: kept {end['kept']}, artifacts {pth}")
    errors = [r for r in daemon.records() if r.get("level") == "error"]
    return {
        "faults": json.loads(out.read_text())["faults"],
        "errors_logged": len(errors),
        "deleted": len(checker.deleted),
        "caught_up_s": caught_up,
        "problems": problems,
    }


@pytest.mark.timeout(300 + 120 * DAEMON_RUNS)
def test_ckptd_run_beside_a_trainer_with_failing_system_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = DAEMON_RUNS
    seed = int(env_number("CKPTD_FIU_SEED", 1))
    started = time.monotonic()
    results = [_daemon_run(tmp_path / f"run{i}", seed + i, 0.05) for i in range(runs)]
    faults = [f for r in results for f in r["faults"]]
    failed = [r for r in results if r["problems"]]
    report(
        capsys,
        "failing system calls (ckptd run beside a trainer)",
        runs=runs,
        injected=len(faults),
        by_call=_table(faults),
        errors_logged=sum(r["errors_logged"] for r in results),
        deletions_judged=sum(r["deleted"] for r in results),
        caught_up_after_s=max(round(r["caught_up_s"], 1) for r in results),
        failed_runs=len(failed),
        seconds=round(time.monotonic() - started, 1),
        lost="nothing" if not failed else "SEE FAILURES",
    )
    assert not failed, "\n".join("\n  ".join(r["problems"]) for r in failed)
    assert len(faults) >= 20 * runs, "too few failures injected to mean anything"
