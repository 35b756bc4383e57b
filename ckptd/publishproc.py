"""Each publish attempt runs in a child process that is killed at ``artifact.publish.timeout``.

Why a process and not a thread or the backends' own timeouts: fsspec offers no way to cancel
a call, and a store that accepts connections but never answers holds one for as long as the
backend retries (s3fs 5 times around botocore's 5 attempts, 15 s read timeout each: half an
hour per request). ``storage_options`` may set any of that, so only something outside the
backend can bound it. A thread that is given up on keeps running: it holds its connections,
and when its call returns it goes on with the next step (a move, the manifest) while a newer
attempt runs. A killed process stops at once, the kernel closes its connections, and nothing
of it runs later. What it leaves is what a crash leaves, and ``publishstore`` already makes
that safe: temporary keys that the next attempt removes, never a manifest naming a missing
file (the manifest goes last). The cost is a Python start (about 0.7 s with s3fs) per attempt
that talks to the store; one that the record shows is in sync starts nothing.

Protocol: the parent writes one JSON request line to the child's stdin and keeps stdin open;
end of file means "stop" (ckptd is stopping, or the parent died). The child writes JSON lines
to its stdout: ``{"step": ...}`` before each remote operation, then one ``{"result": ...}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ckptd.publishstore import LocalChanged, PublishCancelled, PublishError, sha256_of
from ckptd.state import PublishState, load_publish_state
from ckptd.units import format_duration

if TYPE_CHECKING:
    from ckptd.artifacts import ArtifactEntry
    from ckptd.outcome import Target

STOP_GRACE = 5.0  # after "stop": time to finish the current chunk before being killed
KILL_WAIT = 5.0  # a process stuck in the kernel (a hung NFS mount) may not die at once
ROOT = str(Path(__file__).resolve().parents[1])  # the child imports this very ckptd
CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from ckptd.publishproc import child_main; sys.exit(child_main())"
)


class PublishTimeout(PublishError):
    """The attempt was killed at ``artifact.publish.timeout``; ``str()`` says where it was."""


class PublishFailure(Exception):
    """Any other error of the child's attempt; ``str()`` is the backend's message."""


def child_command() -> list[str]:
    return [sys.executable, "-c", CHILD_CODE, ROOT]


class AttemptProcess:
    """``StoreAttempt`` in a child process, with the attributes ``publish`` reads from it."""

    def __init__(
        self,
        target: Target,
        url: str,
        state: PublishState,
        stop: Callable[[], bool] | None,
        deadline: float,
    ) -> None:
        self.target, self.url, self.state = target, url, state
        self.stop = stop or (lambda: False)
        self.deadline = deadline  # time.monotonic() at which the child is killed
        self.uploads = 0
        self.uploaded_bytes = 0
        self.removed: list[str] = []
        self.in_place = False
        self.changed_remote = False
        self.step = "starting"
        config = target.project.artifact.publish
        assert config is not None
        self.timeout = config.timeout  # as configured, for the message
        self._result: dict[str, Any] | None = None
        self._stderr: list[str] = []

    def run(self, raw: bytes, data: dict[str, Any], entries: dict[str, ArtifactEntry]) -> None:
        """As ``StoreAttempt.run``; the child parses ``raw`` again (data and entries are its)."""
        request = {
            "work_dir": str(self.target.work_dir),
            "base_dir": str(self.target.base_dir),
            "project": self.target.project.model_dump(mode="json"),
            "url": self.url,
            "state": self.state.to_json(),
            "manifest": raw.decode(),
            "seconds": max(0.0, self.deadline - time.monotonic()),
        }
        before = self.state.manifest_sha256
        proc = subprocess.Popen(
            child_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        readers = [
            threading.Thread(target=self._read_events, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # it died at once: its stderr says why
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
            outcome = self._wait(proc)
        finally:
            if proc.poll() is None:  # KeyboardInterrupt, or a bug here
                _kill(proc)
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            for reader in readers:
                reader.join(KILL_WAIT)
        if outcome == "timeout":
            self._adopt_record(raw, before)
            raise PublishTimeout(self._timeout_message())
        if outcome == "cancelled" and self._result is None:
            self._adopt_record(raw, before)
            raise PublishCancelled
        self._finish(proc.returncode)

    def _wait(self, proc: subprocess.Popen[str]) -> str:
        stop_by: float | None = None
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                _kill(proc)
                return "timeout"
            if stop_by is None and self.stop():
                stop_by = now + STOP_GRACE  # the child stops between two chunks
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # type: ignore[union-attr]
            if stop_by is not None and now >= stop_by:
                _kill(proc)
                return "cancelled"
            try:
                proc.wait(timeout=min(0.1, self.deadline - now))
                return "exited"
            except subprocess.TimeoutExpired:
                continue

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.uploads = int(event.get("uploads", self.uploads))
            self.uploaded_bytes = int(event.get("uploaded_bytes", self.uploaded_bytes))
            if "step" in event:
                self.step = str(event["step"])
            if "result" in event:
                self._result = event["result"]

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr = [*self._stderr[-19:], line.rstrip()]  # the last lines say why

    def _finish(self, returncode: int | None) -> None:
        result = self._result
        if result is None:
            how = (
                f"was killed by signal {-returncode}"
                if returncode and returncode < 0
                else (f"exited with status {returncode}")
            )
            last = next((line for line in reversed(self._stderr) if line.strip()), "")
            raise PublishFailure(
                f"the publishing process {how} while {self.step}" + (f" ({last})" if last else "")
            )
        self.removed = list(result.get("removed", []))
        self.in_place = bool(result.get("in_place"))
        self.changed_remote = bool(result.get("changed_remote"))
        _copy_into(self.state, PublishState.from_json(result["state"]))
        error = result.get("error")
        if not error:
            return
        kind, message = error.get("kind"), str(error.get("message", ""))
        if kind == "cancelled":
            raise PublishCancelled
        if kind == "local_changed":
            raise LocalChanged(message)
        if kind == "publish":
            raise PublishError(message)
        raise PublishFailure(message)

    def _adopt_record(self, raw: bytes, before: str) -> None:
        """The child is gone without a result; it saves the record once the new manifest is
        in place, so a record it changed to name that manifest means it got that far."""
        saved = load_publish_state(self.target.work_dir)
        changed = saved.to_json() != self.state.to_json()
        if changed and saved.url == self.url and saved.manifest_sha256 == sha256_of(raw):
            _copy_into(self.state, saved)
            self.in_place = True
            self.changed_remote = before != saved.manifest_sha256

    def _timeout_message(self) -> str:
        if self.in_place:
            where = (
                "the new manifest is in place; removing replaced objects is left for the "
                "next attempt"
            )
        else:
            where = (
                "remote readers still see the previous manifest (or none), never a partial "
                "one; the next attempt removes its temporary uploads"
            )
        return (
            f"{self.url}: publishing did not finish within artifact.publish.timeout "
            f"({format_duration(self.timeout)}) and was stopped while {self.step}; {where}. "
            "Check that the store answers (endpoint, network, firewall), or raise "
            "artifact.publish.timeout for a slow link; will retry"
        )


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_WAIT)


def _copy_into(state: PublishState, source: PublishState) -> None:
    for f in fields(PublishState):
        setattr(state, f.name, getattr(source, f.name))


# --- the child ----------------------------------------------------------------------------


def child_main() -> int:
    # Our protocol owns the real stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    signal.signal(signal.SIGTERM, lambda *_: _stop_soon(stop))  # systemd stops the whole unit
    request = json.loads(sys.stdin.readline() or "null")
    if not isinstance(request, dict):
        return 2  # the parent died before asking anything
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    # Should the parent be wedged, never outlive its deadline by more than the grace.
    killer = threading.Timer(float(request["seconds"]) + STOP_GRACE, os._exit, (3,))
    killer.daemon = True
    killer.start()
    result = _child_attempt(request, stop, lambda event: _emit(out, event))
    _emit(out, {"result": result})
    return 0


def _emit(out: IO[str], event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def _watch_stdin(stop: threading.Event) -> None:
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.readline():
            pass
    _stop_soon(stop)


def _stop_soon(stop: threading.Event) -> None:
    """Stop between two chunks; a call that hangs is cut short after the grace."""
    stop.set()
    killer = threading.Timer(STOP_GRACE, os._exit, (4,))
    killer.daemon = True
    killer.start()


def _child_attempt(
    request: dict[str, Any], stop: threading.Event, emit: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    from ckptd.config import ProjectConfig
    from ckptd.outcome import Target
    from ckptd.publish import parse_local
    from ckptd.publishstore import StoreAttempt

    target = Target(
        Path(request["work_dir"]),
        ProjectConfig.model_validate(request["project"]),
        Path(request["base_dir"]),
    )
    state = PublishState.from_json(request["state"])
    error: dict[str, str] | None = None
    attempt: StoreAttempt | None = None
    try:
        raw = request["manifest"].encode()
        attempt = StoreAttempt(target, request["url"], state, stop.is_set)
        attempt.on_step = lambda what: emit(
            {"step": what, "uploads": attempt.uploads, "uploaded_bytes": attempt.uploaded_bytes}
        )
        attempt.run(raw, *parse_local(target.artifact_dir, raw))
    except PublishCancelled:
        error = {"kind": "cancelled", "message": ""}
    except LocalChanged as exc:
        error = {"kind": "local_changed", "message": str(exc)}
    except PublishError as exc:
        error = {"kind": "publish", "message": str(exc)}
    except Exception as exc:
        error = {"kind": "other", "message": str(exc) or type(exc).__name__}
    return {
        "uploads": attempt.uploads if attempt else 0,
        "uploaded_bytes": attempt.uploaded_bytes if attempt else 0,
        "removed": attempt.removed if attempt else [],
        "in_place": attempt.in_place if attempt else False,
        "changed_remote": attempt.changed_remote if attempt else False,
        "state": state.to_json(),
        "error": error,
    }
