"""A recorded simulated MMEngine trainer, replayed byte for byte into any work_dir.

``record`` runs ``ckptd.demo.simulate.SimulatedTrainer`` once and keeps every filesystem action it
made, in order (checkpoint writes, in-place rewrites after a new best, ``last_checkpoint``, the
JSON lines appended to ``scalars.json``). ``Replayer`` plays them back in a thread at a chosen
pace. Replays are identical to the byte, so runs with and without faults must end in the same
state, down to the artifact's sha256; and they cost no torch work per run.

Each action can be bracketed by markers: a file ``b<i>`` is created in a marks folder (outside
the work_dir) before action ``i`` and ``e<i>`` after it. An inotify watch on the marks folder
and the work_dir then sees the trainer's actions and ckptd's in one kernel-ordered stream (see
``tests.faults.invariants.StreamChecker``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = re.compile(r"(epoch|iter)_([0-9]+)\.pth")
POINTER = "last_checkpoint"
_TRAIN_MARKERS = (b'"epoch": ', b'"iter": ')
_NOT_METRICS = {"step", "data_time", "time"}


@dataclass(frozen=True, slots=True)
class Op:
    """One filesystem action of the trainer; paths are relative to the work_dir."""

    kind: str  # "mkdir" | "write" | "append" | "pointer" | "unlink" | "round"
    path: str = ""
    data: bytes = b""  # "pointer": the checkpoint's file name (the path is made absolute)
    val: tuple[int, dict[str, float]] | None = None  # an appended evaluation record

    @property
    def checkpoint(self) -> int | None:
        match = CHECKPOINT.fullmatch(self.path)
        return int(match.group(2)) if match and self.kind in ("write", "unlink") else None


@dataclass(frozen=True)
class Recording:
    ops: tuple[Op, ...]
    epochs: int
    metric: str  # the first val key: what save_best='auto' and ckptd's metric 'auto' pick

    @property
    def checkpoint_bytes(self) -> int:
        return sum(len(op.data) for op in self.ops if op.checkpoint is not None)


def _val_records(appended: bytes) -> list[tuple[int, dict[str, float]]]:
    out = []
    for line in appended.splitlines():
        if any(marker in line for marker in _TRAIN_MARKERS):
            continue
        data = json.loads(line)
        metrics = {k: float(v) for k, v in data.items() if k not in _NOT_METRICS}
        out.append((int(data["step"]), metrics))
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            size = -1 if name in dirs else st.st_size
            found[os.path.relpath(path, root)] = (size, st.st_mtime_ns)
    return found


@functools.cache
def record(
    epochs: int = 8,
    values: tuple[float, ...] = (0.3, 0.5, 0.4, 0.6, 0.55, 0.7, 0.65, 0.62),
    param_count: int = 50_000,
) -> Recording:
    """The actions of a simulated MMEngine run that rewrites each new best in place."""
    from ckptd.demo.simulate import SimConfig, SimulatedTrainer

    tmp = Path(tempfile.mkdtemp(prefix="ckptd-recording-"))
    try:
        work_dir = tmp / "work_dir"
        config = SimConfig(
            epochs=epochs,
            metric_values=list(values),
            param_count=param_count,
            rewrite_after_best=True,
            timestamp="20240101_000000",
        )
        trainer = SimulatedTrainer(work_dir, config)
        ops: list[Op] = []
        before: dict[str, tuple[int, int]] = {}
        contents: dict[str, bytes] = {}
        for event in trainer.events():
            if event.kind == "round_end":
                ops.append(Op("round"))
                continue
            after = _snapshot(work_dir)
            changed = [p for p in after if after[p] != before.get(p)]
            dirs = sorted((p for p in changed if after[p][0] < 0), key=lambda p: p.count("/"))
            ops += [Op("mkdir", p) for p in dirs if p not in before]
            # <ts>.json before scalars.json, like the trainer; the text log is not needed
            files = sorted(
                (p for p in changed if after[p][0] >= 0 and not p.endswith(".log")),
                key=lambda p: p.endswith("scalars.json"),
            )
            for rel in files:
                data = (work_dir / rel).read_bytes()
                old = contents.get(rel, b"")
                if rel == POINTER:
                    ops.append(Op("pointer", rel, os.path.basename(data)))
                elif old and data.startswith(old) and not rel.endswith(".pth"):
                    new = data[len(old) :]
                    val = _val_records(new) if rel.endswith("scalars.json") else []
                    ops.append(Op("append", rel, new, val[0] if val else None))
                else:
                    ops.append(Op("write", rel, data))
                contents[rel] = data
            for rel in sorted(set(before) - set(after)):
                ops.append(Op("unlink", rel))
            before = after
        metric = next(op.val[1] for op in ops if op.val is not None)
        return Recording(tuple(ops), epochs, next(iter(metric)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Replayer(threading.Thread):
    """Plays a recording into ``work_dir``; ``epoch_seconds`` of pause after each epoch.

    ``chunks`` > 1 writes each checkpoint in that many flushed pieces spread over
    ``write_seconds``, so readers see it being written. ``gate`` (a lock) is held during each
    action, so a test can freeze the trainer between actions.
    """

    def __init__(
        self,
        recording: Recording,
        work_dir: Path,
        *,
        epoch_seconds: float = 0.2,
        marks: Path | None = None,
        chunks: int = 1,
        write_seconds: float = 0.0,
        gate: threading.Lock | None = None,
        on_op: Callable[[int, Op], None] | None = None,
        ops: Sequence[Op] | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"replay-{work_dir.name}")
        self.ops = tuple(ops if ops is not None else recording.ops)
        self.work_dir = work_dir
        self.epoch_seconds = epoch_seconds
        self.marks = marks
        self.chunks = chunks
        self.write_seconds = write_seconds
        self.gate = gate or threading.Lock()
        self.on_op = on_op
        self.done_ops = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def _mark(self, kind: str, index: int) -> None:
        if self.marks is not None:
            path = self.marks / f"{kind}{index}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.unlink(path)

    def _apply(self, op: Op) -> None:
        path = self.work_dir / op.path
        if op.kind == "mkdir":
            path.mkdir(exist_ok=True)
        elif op.kind == "append":
            with open(path, "a+b") as f:
                f.write(op.data)
        elif op.kind == "pointer":
            path.write_text(str(self.work_dir / op.data.decode()))
        elif op.kind == "unlink":
            path.unlink(missing_ok=True)
        elif op.kind == "write":
            self._write(path, op.data)

    def _write(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:  # in place and not atomic, as MMEngine does
            if self.chunks <= 1 or op_is_small(data):
                f.write(data)
                return
            size = -(-len(data) // self.chunks)
            for i in range(self.chunks):
                f.write(data[i * size : (i + 1) * size])
                f.flush()
                time.sleep(self.write_seconds / self.chunks)

    def run(self) -> None:
        try:
            for index, op in enumerate(self.ops):
                if self._stop_event.is_set():
                    return
                if op.kind == "round":
                    self._stop_event.wait(self.epoch_seconds)
                    self.done_ops = index + 1
                    continue
                with self.gate:
                    self._mark("b", index)
                    self._apply(op)
                    self._mark("e", index)
                    self.done_ops = index + 1
                if self.on_op is not None:
                    self.on_op(index, op)
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
            raise

    @property
    def finished(self) -> bool:
        return self.done_ops == len(self.ops)


def op_is_small(data: bytes) -> bool:
    return len(data) < 4096


def replay_now(recording: Recording, work_dir: Path, upto_epoch: int | None = None) -> None:
    """Play the recording into ``work_dir`` at once (optionally only its first epochs)."""
    replayer = Replayer(recording, work_dir, epoch_seconds=0)
    if upto_epoch is not None:
        rounds = [i for i, op in enumerate(recording.ops) if op.kind == "round"]
        replayer.ops = recording.ops[: rounds[upto_epoch - 1] + 1]
    replayer.run()
    if replayer.error is not None:
        raise replayer.error
