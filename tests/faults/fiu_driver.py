"""Runs real ``ckptd once`` / ``ckptd run`` invocations in-process with system calls failing.

Started by ``tests/faults/test_fault_syscalls.py`` as
``LD_PRELOAD=fiu_posix_preload.so python -m tests.faults.fiu_driver {once,run} ...``: libfiu
must be preloaded at start, but failures are enabled only after the interpreter and ckptd are
loaded, and only around ckptd's own calls (``tests.faults.syscalls``).

``once``: training runs replayed epoch by epoch; after each epoch some passes of
``ckptd once --json`` (the CLI's ``main``, one invocation each) with failures injected, then
passes without until nothing changes. After every pass, checked from outside ckptd's code:
nothing protected is gone (``invariants.protected``, the trainer's own state), no checkpoint
was deleted after a failure reached ckptd in that pass, the manifest's artifacts are intact,
each failure that reached ckptd is named in the pass's errors, no traceback. Each run ends
like the same run without failures. One JSON line per run on stdout.

``run``: ``ckptd run`` with failures injected until SIGUSR1, then without; on SIGTERM it
stops and writes what it injected to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from ckptd.cli.commands import main
from tests.faults.invariants import (
    TrainerView,
    artifact_problems,
    end_state,
    protected,
    read_manifest,
    temp_files,
)
from tests.faults.syscalls import Fault, Injector
from tests.faults.trainer import CHECKPOINT, Recording, Replayer, record
from tests.helpers import write_config

SCENARIOS: dict[str, dict[str, Any]] = {
    "keep_last 2": {"retention": {"keep_last": 2, "pending_eval_grace": "1h"}},
    "keep_last 1, hash_in_name": {
        "retention": {"keep_last": 1, "pending_eval_grace": "1h"},
        "artifact": {"hash_in_name": True},
    },
}
# what a message about a failed call must say it was doing: the call's own name ("cannot
# fsync: ...") or the operation it belongs to ("no space left while writing the artifact")
READING, WRITING, DELETING = ("read", "open"), ("writ", "creat"), ("delet", "remov")
CALL_WORDS = {
    "open": ("open", *READING, *WRITING, *DELETING, "lock"),
    "openat": ("open", *READING, *DELETING),
    "read": READING,
    "pread": READING,
    "write": WRITING,
    "pwrite": WRITING,
    "fsync": ("fsync", *WRITING),
    "rename": ("renam", *WRITING, *DELETING),
    "renameat": ("renam", *DELETING),
    "unlink": DELETING,
    "unlinkat": DELETING,
    "rmdir": DELETING,
    "copy_file_range": ("copy", *WRITING),
    "flock": ("lock",),
    "inotify_add_watch": ("watch",),
}
PATH = re.compile(r"/[^\s:'\"]+")
GOES_ON = "bestartifact:_claim"
CLEAN_PASSES = 4  # passes without failures at the end of a run: the retries


def once(config: Path) -> tuple[int, str, str]:
    """One ``ckptd once --json`` invocation: (exit code or -1 if it raised, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--log-format", "json", "once", "-c", str(config), "--json"])
        except BaseException:
            code = -1
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def log_messages(err: str) -> list[str]:
    """The warning and error messages of a ``--log-format json`` stderr."""
    found = []
    for line in err.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("level") in ("warning", "error"):
                found.append(str(record.get("message", "")))
    return found


def names(message: str, fault: Fault) -> bool:
    """Does ``message`` name the failed call, a file and the error?"""
    text = message.lower()
    error = os.strerror(fault.code).lower()
    return (
        (error in text or (fault.code == errno.ENOSPC and "no space left" in text))
        and any(word in text for word in CALL_WORDS[fault.call])
        and PATH.search(message) is not None
    )


def epochs_of(recording: Recording) -> list[tuple[int, int]]:
    """(first op, end op) of each epoch of the recording."""
    bounds, start = [], 0
    for i, op in enumerate(recording.ops):
        if op.kind == "round":
            bounds.append((start, i + 1))
            start = i + 1
    return bounds


class Run:
    """One training replayed into a fresh work_dir with passes between its epochs."""

    def __init__(self, root: Path, scenario: str, injector: Injector | None) -> None:
        self.work_dir = root / "work_dirs" / "run"
        self.work_dir.mkdir(parents=True)
        self.artifact_dir = self.work_dir / "best"
        self.config = write_config(root, **SCENARIOS[scenario])
        self.injector = injector
        self.recording = record()
        self.view = TrainerView()
        self.problems: list[str] = []
        self.passes = 0
        self.first_fault = len(injector.faults) if injector else 0
        self.last_output = ""
        self.unnamed: list[tuple[Fault, list[str], bool]] = []  # failures no message names
        self.named = 0

    def one_pass(self, armed: bool) -> None:
        injector = self.injector
        faults_before = len(injector.faults) if injector else 0
        events_before = len(injector.events) if injector else 0
        if injector:
            injector.armed = armed
        try:
            code, out, err = once(self.config)
        finally:
            if injector:
                injector.armed = False
        self.passes += 1
        faults = injector.faults[faults_before:] if injector else []
        events = injector.events[events_before:] if injector else []
        self.last_output = out + err
        self.check(code, out, err, faults, events, armed)

    def check(
        self,
        code: int,
        out: str,
        err: str,
        faults: list[Fault],
        events: list[tuple[int, str]],
        armed: bool,
    ) -> None:
        where = f"pass {self.passes} ({', '.join(f'{f.call} {f.kind}' for f in faults)})"
        if "Traceback" in out + err or code == -1:
            self.problems.append(f"{where}: traceback (exit {code}):\n{(out + err)[-3000:]}")
            return
        if code == 2 and not out and " cannot read the config: " in err:
            return  # the config could not be read: nothing was done, the message says why
        try:
            (report,) = json.loads(out)["work_dirs"]
        except (ValueError, KeyError) as exc:
            self.problems.append(f"{where}: no JSON report ({exc}): {out[-500:]!r} {err[-500:]}")
            return
        reached = [f for f in faults if not f.absorbed]
        messages = report["errors"] + report["notes"] + log_messages(err)
        # By design a failed write-ahead claim of an artifact is a warning and the pass goes on
        # (bestartifact._claim: the claim is saved again with the pass's state)
        warned = [f for f in reached if GOES_ON in f.site]
        reached = [f for f in reached if GOES_ON not in f.site]
        for fault in warned:
            if not any(names(message, fault) for message in log_messages(err)):
                self.unnamed.append((fault, messages, True))
        if reached and reached[0].busy:  # flock said "held": the pass is skipped, retried
            if report["skip"] != "locked":
                self.problems.append(f"{where}: flock EAGAIN did not skip the work_dir")
            reached = []
        if reached and not report["errors"]:
            self.problems.append(f"{where}: reached ckptd, no error reported: {messages}")
        named = [f for f in reached if any(names(message, f) for message in messages)]
        if reached and not named:  # the failure that stopped the pass must be named
            self.problems.append(f"{where}: no message names the failure: {messages}")
        self.unnamed += [(f, messages, False) for f in reached if f not in named]
        self.named += len(named)
        if reached and code != 1:
            self.problems.append(f"{where}: exit code {code} after a failure")
        if reached:
            first = reached[0].seq
            late = [w for s, w in events if s > first and CHECKPOINT.fullmatch(w.split()[-1])]
            if late:
                self.problems.append(f"{where}: deleted after the failure: {late}")
        deleted = {c["name"] for c in report["checkpoints"] if c["action"] == "deleted"}
        unlinked = {w.split()[-1] for _, w in events if CHECKPOINT.fullmatch(w.split()[-1])}
        if armed and deleted != unlinked:
            self.problems.append(f"{where}: reported deleted {deleted}, removed {unlinked}")
        self.check_disk(where)

    def check_disk(self, where: str) -> None:
        manifest = read_manifest(self.artifact_dir) or {}
        artifacts = [
            entry["index"]
            for entry in manifest.get("artifacts", {}).values()
            if (self.artifact_dir / entry["file"]).exists()
        ]
        present = {p.name for p in self.work_dir.iterdir()}
        guarded = protected(self.view, self.recording.metric, "greater", artifacts)
        for name, why in guarded.items():
            if name not in present:
                self.problems.append(f"{where}: LOST {name} ({why})")
        self.problems += [f"{where}: {p}" for p in artifact_problems(self.artifact_dir, load=False)]

    def train(self, passes_per_epoch: int) -> dict[str, Any]:
        for start, end in epochs_of(self.recording):
            ops = self.recording.ops[start:end]
            Replayer(self.recording, self.work_dir, epoch_seconds=0, ops=ops).run()
            for op in ops:
                self.view.apply(op)
            for _ in range(passes_per_epoch):
                self.one_pass(armed=True)
        last = None
        for _ in range(CLEAN_PASSES):
            self.one_pass(armed=False)
            state = end_state(self.work_dir, self.artifact_dir)
            if state == last:
                break
            last = state
        self.problems += [f"end: {p}" for p in artifact_problems(self.artifact_dir)]
        self.problems += [f"end: left behind {p}" for p in temp_files(self.work_dir)]
        return end_state(self.work_dir, self.artifact_dir)


def run_once(args: argparse.Namespace) -> None:
    injector = Injector(args.seed, args.probability, args.short_probability)
    injector.install()
    names = list(SCENARIOS)
    references = {}
    for scenario in names:  # the same runs without failures, same passes
        root = args.root / f"reference-{names.index(scenario)}"
        references[scenario] = Run(root, scenario, None).train(args.passes_per_epoch)
    for i in range(args.runs):
        scenario = names[i % len(names)]
        run = Run(args.root / f"run{i}", scenario, injector)
        end = run.train(args.passes_per_epoch)
        if end != references[scenario]:
            run.problems.append(
                f"end state {end} != without failures {references[scenario]}; "
                f"last pass: {run.last_output[-3000:]}"
            )
        faults = injector.faults[run.first_fault :]
        line = {
            "run": i,
            "scenario": scenario,
            "passes": run.passes,
            "faults": [f.to_json() for f in faults],
            "reached": sum(not f.absorbed for f in faults),
            "named": run.named,
            "problems": run.problems,
            "unnamed": [{**f.to_json(), "messages": m, "first": k} for f, m, k in run.unnamed],
        }
        print(json.dumps(line), flush=True)


def run_daemon(args: argparse.Namespace) -> None:
    injector = Injector(args.seed, args.probability, args.short_probability)
    injector.install()

    def disarm(signum: int, frame: object) -> None:
        injector.probability = injector.short_probability = 0.0

    signal.signal(signal.SIGUSR1, disarm)
    injector.armed = True
    try:
        code = main(["--log-format", "json", "run", "-c", str(args.config), *args.extra])
    except BaseException:
        injector.armed = False
        traceback.print_exc()  # the test fails on a traceback in the log
        code = -1
    injector.armed = False
    data = {"code": code, "faults": [f.to_json() for f in injector.faults]}
    args.out.write_text(json.dumps(data))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("once", "run"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probability", type=float, default=0.02)
    parser.add_argument("--short-probability", type=float, default=0.1)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--passes-per-epoch", type=int, default=3)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("extra", nargs="*")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse(sys.argv[1:])
    threading.current_thread().name = "driver"
    os.environ.pop("LD_PRELOAD", None)  # children (hooks, publish) run without libfiu
    (run_once if parsed.mode == "once" else run_daemon)(parsed)
