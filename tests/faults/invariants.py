"""Invariant checks shared by the fault tests (docs/DESIGN.md invariants 1, 3 and 5).

Two kinds:

* snapshots of a work_dir: ``artifact_problems`` (invariant 3: every artifact the manifest names
  loads with ``weights_only=True`` and has the recorded sha256), ``temp_files``, ``end_state``
  (what must equal an uninterrupted run's, invariant 5), ``outside_inventory``;
* ``StreamChecker``: every action in a work_dir as the kernel ordered it (inotify), checked as it
  happens. The simulated trainer marks the start and end of each of its actions
  (``tests.faults.trainer``), so the checker knows the trainer's exact state at each of ckptd's
  deletions and judges it with its own model of what is protected (invariant 1: newest complete,
  resume target, pending evaluation, being written, best until its artifact exists), and that
  a complete artifact exists at every instant once one was published (invariant 3).

The model is written independently of ckptd's policy code on purpose: the same bug in both would
prove nothing. It is *weaker* than ckptd's rules where they cannot disagree (e.g. it counts an
artifact as existing once its file is published, before the manifest names it).

Protection in a forward-running training is monotone: once a checkpoint is unprotected it stays
so. A deletion that lands while a trainer action is in flight is therefore a violation only if
the checkpoint is protected both before and after that action; if only before, it is counted as
``ambiguous`` (never seen so far) instead.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.fsutil import TEMP_PREFIX
from tests.faults import inotify
from tests.faults.trainer import CHECKPOINT, Op

MANIFEST = "manifest.json"
STATE_DIR = ".ckptd"
ARTIFACT_INDEX = re.compile(r"_(?:epoch|iter)_([0-9]+)(?:-[0-9a-f]{8})?\.pth")

# --- snapshots ---------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(artifact_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((artifact_dir / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None


def artifact_problems(artifact_dir: Path, *, load: bool = True) -> list[str]:
    """Invariant 3 for what is on disk now: the manifest's artifacts are complete and safe."""
    import torch

    problems = []
    try:
        manifest = read_manifest(artifact_dir)
    except ValueError as exc:
        return [f"{artifact_dir / MANIFEST}: not JSON ({exc})"]
    if manifest is None:
        return []
    for key, entry in manifest.get("artifacts", {}).items():
        path = artifact_dir / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{key}: {path} is named by the manifest but missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{key}: {path} has {size} bytes, the manifest says {entry['bytes']}")
            continue
        if sha256_of(path) != entry["sha256"]:
            problems.append(f"{key}: {path} does not match its manifest sha256")
            continue
        if load:
            try:
                loaded = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as exc:
                problems.append(f"{key}: {path} does not load with weights_only=True: {exc}")
                continue
            if sorted(loaded) != sorted(entry["kept_keys"]):
                problems.append(f"{key}: {path} holds {sorted(loaded)}, not {entry['kept_keys']}")
    return problems


def temp_files(*roots: Path) -> list[Path]:
    """ckptd's temp files (``.ckptd-tmp-*``) anywhere under ``roots``."""
    found = []
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            found += [Path(folder, n) for n in files if n.startswith(TEMP_PREFIX)]
    return sorted(found)


VOLATILE_ENTRY_KEYS = ("time", "source_stat")


def end_state(work_dir: Path, artifact_dir: Path) -> dict[str, Any]:
    """What an interrupted run must end with to equal an uninterrupted one (invariant 5)."""
    manifest = read_manifest(artifact_dir) or {}
    entries = {
        key: {k: v for k, v in entry.items() if k not in VOLATILE_ENTRY_KEYS}
        for key, entry in manifest.get("artifacts", {}).items()
    }
    artifacts = {}
    if artifact_dir.is_dir():
        for path in sorted(artifact_dir.iterdir()):
            artifacts[path.name] = sha256_of(path) if path.suffix == ".pth" else "-"
    return {
        "kept": sorted(p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name)),
        "artifacts": artifacts,
        "manifest": entries,
        "state_dir": sorted(p.name for p in (work_dir / STATE_DIR).iterdir())
        if (work_dir / STATE_DIR).is_dir()
        else [],
    }


def outside_inventory(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[Any, ...]]:
    """Everything under ``root`` except ``exclude`` (not following symlinks): kind, size,
    inode, mtime and a content hash (a link's target), to compare before/after."""
    skip = {os.path.abspath(p) for p in exclude}
    found: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if path in skip:
                continue
            st = os.lstat(path)
            if os.path.islink(path):
                what: Any = ("link", os.readlink(path))
            elif name in files:
                what = ("file", sha256_of(Path(path)))
            else:
                what = ("dir",)
            found[os.path.relpath(path, root)] = (*what, st.st_size, st.st_ino, st.st_mtime_ns)
    return found


# --- the protection model ------------------------------------------------------------------


@dataclass
class TrainerView:
    """The work_dir as the trainer made it after some of its actions (ckptd's deletions out)."""

    present: dict[str, int] = field(default_factory=dict)  # checkpoint name -> index
    resume: str | None = None
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def copy(self) -> TrainerView:
        return TrainerView(dict(self.present), self.resume, list(self.evals))

    def apply(self, op: Op) -> None:
        index = op.checkpoint
        if op.kind == "write" and index is not None:
            self.present[op.path] = index
        elif op.kind == "unlink":
            self.present.pop(op.path, None)
        elif op.kind == "pointer":
            self.resume = op.data.decode()
        elif op.kind == "append" and op.val is not None:
            step = op.val[0]
            while self.evals and self.evals[-1][0] >= step:  # a resumed run repeats epochs
                self.evals.pop()
            self.evals.append(op.val)


def best_index(evals: Sequence[tuple[int, dict[str, float]]], metric: str, rule: str) -> int | None:
    best: tuple[int, float] | None = None
    for step, metrics in evals:
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value > best[1] if rule == "greater" else value < best[1]):
            best = (step, value)
    return best[0] if best else None


def protected(
    view: TrainerView,
    metric: str,
    rule: str,
    artifacts: Iterable[int],
    writing: Iterable[str] = (),
) -> dict[str, str]:
    """Checkpoint name -> why invariant 1 forbids deleting it now (grace never expires here).

    ``writing``: checkpoints the trainer has open for writing (an in-place rewrite truncates
    the file first, so the one before it is the newest *complete* one meanwhile).
    """
    out = dict.fromkeys(writing, "being written")
    by_index = {i: n for n, i in view.present.items() if n not in out}
    if by_index:
        out[by_index[max(by_index)]] = "newest complete"
    if view.resume in view.present:
        out.setdefault(view.resume, "resume pointer target")
    evaluated = {step for step, _ in view.evals}
    latest = max(evaluated, default=None)
    for name, index in view.present.items():
        if index not in evaluated and (latest is None or latest < index):
            out.setdefault(name, "evaluation pending")
    best = best_index(view.evals, metric, rule)
    if best is not None and best in by_index and best not in set(artifacts):
        out.setdefault(by_index[best], "best without an artifact")
    return out


# --- the stream checker -------------------------------------------------------------------

WINDOWS = (
    "during slim",
    "between slim and delete",
    "during deletes",
    "during state save",
    "other (reading, planning, idle)",
)


class StreamChecker:
    """Judges every action in one work_dir as it happens; see the module docstring."""

    def __init__(
        self,
        work_dir: Path,
        ops: Sequence[Op],
        *,
        metric: str,
        rule: str = "greater",
        artifact_dir: Path | None = None,
        marks: Path | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.artifact_dir = artifact_dir or work_dir / "best"
        self.state_dir = work_dir / STATE_DIR
        self.marks = marks
        self.ops = tuple(ops)
        self.metric, self.rule = metric, rule
        self.view = TrainerView()
        self.writing: set[str] = set()  # checkpoints open for writing (kernel events)
        self.done = -1
        self.inflight: int | None = None
        self.published: dict[str, int] = {}  # artifact file -> checkpoint index
        self.ever_published = False
        self.temps: dict[str, str] = {}  # open temp file -> its kind
        self.pass_events: list[str] = []  # ckptd's actions since its last state save
        self.deleted: list[str] = []
        self.violations: list[str] = []
        self.ambiguous = 0
        self.events = 0
        self.trace: collections.deque[str] = collections.deque(maxlen=30)  # for diagnosis
        for folder in (self.artifact_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def folders(self) -> list[tuple[Path, int]]:
        changes = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_FROM
        changes |= inotify.IN_MOVED_TO
        writes = inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE  # only the trainer writes there
        found = [(self.work_dir, changes | writes), (self.artifact_dir, changes)]
        found.append((self.state_dir, changes))
        if self.marks is not None:
            found.append((self.marks, inotify.IN_CREATE))
        return found

    # the model

    def _view_after_inflight(self) -> TrainerView:
        view = self.view.copy()
        if self.inflight is not None:
            view.apply(self.ops[self.inflight])
        return view

    def protected_now(self) -> dict[str, str]:
        return protected(self.view, self.metric, self.rule, self.published.values(), self.writing)

    def _violation(self, text: str) -> None:
        op = f"; trainer after action {self.done}"
        if self.inflight is not None:
            op += f", action {self.inflight} ({self.ops[self.inflight].kind} "
            op += f"{self.ops[self.inflight].path}) in flight"
        trace = "\n      ".join(self.trace)
        self.violations.append(f"{self.work_dir.name}: {text}{op}; last events:\n      {trace}")

    # events

    def feed(self, event: inotify.Event) -> None:
        self.events += 1
        if event.folder != self.marks:
            self.trace.append(f"{event} (trainer at {self.done}, in flight {self.inflight})")
        if event.folder == self.marks:
            self._mark(event.name)
        elif event.folder == self.work_dir:
            self._work_dir_event(event)
        elif event.folder == self.artifact_dir:
            self._artifact_event(event)
        elif event.folder == self.state_dir:
            self._state_event(event)

    def _mark(self, name: str) -> None:
        index = int(name[1:])
        if name[0] == "b":
            self.inflight = index
        else:
            self.view.apply(self.ops[index])
            self.done, self.inflight = index, None

    def _work_dir_event(self, event: inotify.Event) -> None:
        name = event.name
        match = CHECKPOINT.fullmatch(name)
        if match and event.is_(inotify.IN_CREATE | inotify.IN_MODIFY):
            self.writing.add(name)
        if match and event.is_(inotify.IN_CLOSE_WRITE):
            self.writing.discard(name)
            self.view.present[name] = int(match.group(2))
        if not event.is_(inotify.IN_DELETE | inotify.IN_MOVED_FROM) or name == STATE_DIR:
            return
        op = self.ops[self.inflight] if self.inflight is not None else None
        if op is not None and op.kind == "unlink" and op.path == name:
            return  # the trainer's own delete (CheckpointHook max_keep_ckpts, old best files)
        if event.is_(inotify.IN_MOVED_FROM):
            self._violation(f"{name} was renamed away; ckptd never renames in a work_dir")
            return
        if not match or event.is_(inotify.IN_ISDIR):
            self._violation(f"{name} was deleted; it is not a checkpoint")
            return
        self.deleted.append(name)
        self.pass_events.append("delete checkpoint")
        why = self.protected_now().get(name)
        if why is not None:
            after = protected(
                self._view_after_inflight(),
                self.metric,
                self.rule,
                self.published.values(),
                self.writing,
            )
            if self.inflight is None or name in after or name in self.writing:
                self._violation(f"{name} was deleted while protected ({why})")
            else:
                self.ambiguous += 1
        self.view.present.pop(name, None)
        self.writing.discard(name)

    def _artifact_event(self, event: inotify.Event) -> None:
        name = event.name
        if name.startswith(TEMP_PREFIX):
            if event.is_(inotify.IN_CREATE):
                kind = "manifest" if name.endswith(MANIFEST) else "artifact"
                self.temps[name] = kind
                self.pass_events.append(f"temp {kind}")
            else:
                self.temps.pop(name, None)
            return
        if event.is_(inotify.IN_MOVED_TO):
            if name == MANIFEST:
                self.pass_events.append("publish manifest")
                return
            match = ARTIFACT_INDEX.search(name)
            if match:
                self.published[name] = int(match.group(1))
                self.ever_published = True
                self.pass_events.append("publish artifact")
            return
        if event.is_(inotify.IN_DELETE | inotify.IN_MOVED_FROM):
            if name not in self.published:
                self._violation(f"artifact folder: {name} was removed; ckptd never made it")
                return
            del self.published[name]
            self.pass_events.append("remove artifact")
            if self.ever_published and not self.published:
                self._violation(f"{name} was removed and no complete artifact was left")

    def _state_event(self, event: inotify.Event) -> None:
        name = event.name
        if name.startswith(TEMP_PREFIX):
            if event.is_(inotify.IN_CREATE):
                self.temps[name] = "state"
            else:
                self.temps.pop(name, None)
        elif name == "state.json" and event.is_(inotify.IN_MOVED_TO):
            self.pass_events.clear()

    def window(self) -> str:
        """Where ckptd is in its pass, judged by what it did since its last state save."""
        kinds = set(self.temps.values())
        if "artifact" in kinds:
            return "during slim"
        if "state" in kinds:
            return "during state save"
        if "manifest" in kinds:
            return "between slim and delete"
        last = self.pass_events[-1] if self.pass_events else ""
        if last in ("publish artifact", "publish manifest", "remove artifact"):
            return "between slim and delete"
        if last == "delete checkpoint":
            return "during deletes"
        return "other (reading, planning, idle)"


Hook = Callable[[StreamChecker, inotify.Event], None]


class Stream:
    """One inotify queue and a reader thread feeding any number of ``StreamChecker``s.

    ``hook(checker, event)`` runs in the reader thread right after each event is judged, so a
    test can react within microseconds (e.g. stop ckptd the moment it creates a temp file).
    """

    def __init__(self) -> None:
        self.inotify = inotify.Inotify()
        self.lock = threading.RLock()
        self.hooks: list[Hook] = []
        self._by_folder: dict[Path, StreamChecker] = {}
        self._stop = threading.Event()
        self._seq = 0
        self._drained = 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="inotify-stream")

    def add(self, checker: StreamChecker) -> StreamChecker:
        for folder, mask in checker.folders():
            self.inotify.watch(folder, mask)
            self._by_folder[folder] = checker
        return checker

    def start(self) -> Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    asked = self._seq
                seen = False
                for event in self.inotify.read(0.05):
                    seen = True
                    checker = self._by_folder.get(event.folder)
                    if checker is None:
                        continue
                    with self.lock:
                        checker.feed(event)
                        for hook in self.hooks:
                            hook(checker, event)
                if not seen:
                    with self._cond:
                        self._drained = asked
                        self._cond.notify_all()
        except BaseException as exc:
            self.error = exc
            with self._cond:
                self._drained = 1 << 62
                self._cond.notify_all()

    def drain(self, timeout: float = 10) -> None:
        """Return once every event queued before this call has been fed to its checker."""
        with self._cond:
            self._seq += 1
            wanted = self._seq
            if not self._cond.wait_for(lambda: self._drained >= wanted, timeout):
                raise AssertionError("the inotify reader did not catch up")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.inotify.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()


# --- processes -----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return states
