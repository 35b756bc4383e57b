"""Per-work_dir state in ``<work_dir>/.ckptd/`` and the lock that makes one ckptd act at a time.

The state is a cache of what can be re-derived from disk (metric log cursors and the records
read so far, checkpoints already verified complete) plus history (what was deleted and why,
artifacts ckptd created). Losing it is safe: logs are re-read and artifacts re-checked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.core.model import FileStat
from ckptd.core.reads import call_failed, read_file
from ckptd.fs.durable import atomic_write_bytes, pwrite_all, remove_stale_temp_files
from ckptd.layouts.base import SourceState

STATE_DIR = ".ckptd"
STATE_FILE = "state.json"
PUBLISH_FILE = "publish.json"  # written only by the publisher, see PublishState
LOCK_FILE = "lock"
SCHEMA_VERSION = 1
# Deletions remembered for `ckptd status`; the running total is kept separately.
HISTORY_LIMIT = 200
# The digest of the rest of the file but last_pass (WorkDirState.saved_fingerprint).
CONTENT_DIGEST = "content_digest"


class StateError(Exception):
    pass


@dataclass(slots=True)
class WorkDirState:
    layout: str | None = None
    sources: dict[str, SourceState] = field(default_factory=dict)
    verified: dict[str, FileStat] = field(default_factory=dict)  # checkpoint -> stat seen complete
    deleted: list[dict[str, Any]] = field(default_factory=list)
    reclaimed_bytes: int = 0
    # Artifact files ckptd created (or is about to create): the only ones it may ever remove.
    own_artifacts: list[str] = field(default_factory=list)
    last_pass: dict[str, Any] = field(default_factory=dict)
    # Indices that had a complete checkpoint in an earlier pass: their evaluations stay
    # candidates for best after the checkpoint is gone (see observe._checkpointed).
    checkpointed: set[int] = field(default_factory=set)
    # What was read out of the trainer's pickles, per file version (ckptd.layouts.memo).
    peeked: dict[str, Any] = field(default_factory=dict)
    # The digest of what was on disk when loaded, minus last_pass: an unchanged state is not
    # rewritten, so an idle resync of hundreds of work_dirs costs no writes and no fsyncs. It
    # is saved in the file, so that loading does not serialize the state again to compute it
    # (two sorted dumps were ~10 % of a warm start-up pass).
    saved_fingerprint: str = field(default="", compare=False, repr=False)

    def content(self) -> tuple[dict[str, Any], str]:
        """(to_json() without last_pass, its digest)."""
        data = self.to_json()
        data.pop("last_pass")
        body = json.dumps(data, separators=(",", ":")).encode()
        return data, hashlib.blake2b(body, digest_size=16).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "layout": self.layout,
            "sources": {k: v.to_json() for k, v in self.sources.items()},
            # sorted: the order a directory lists in must not make an unchanged state differ
            "verified": {k: self.verified[k].as_list() for k in sorted(self.verified)},
            "deleted": self.deleted[-HISTORY_LIMIT:],
            "reclaimed_bytes": self.reclaimed_bytes,
            "own_artifacts": sorted(set(self.own_artifacts)),
            "last_pass": self.last_pass,
            "checkpointed": sorted(self.checkpointed),
            "peeked": self.peeked,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkDirState:
        return cls(
            layout=data.get("layout"),
            sources={k: SourceState.from_json(k, v) for k, v in data.get("sources", {}).items()},
            verified={k: FileStat.from_list(v) for k, v in data.get("verified", {}).items()},
            deleted=list(data.get("deleted", [])),
            reclaimed_bytes=int(data.get("reclaimed_bytes", 0)),
            own_artifacts=list(data.get("own_artifacts", [])),
            last_pass=dict(data.get("last_pass", {})),
            checkpointed={int(i) for i in data.get("checkpointed", [])},
            peeked=peeked if isinstance(peeked := data.get("peeked"), dict) else {},
        )


def state_dir(work_dir: Path) -> Path:
    return work_dir / STATE_DIR


def load_state(work_dir: Path) -> tuple[WorkDirState, str]:
    """The saved state, or a fresh one; the note says why a saved state was not used."""
    path = state_dir(work_dir) / STATE_FILE
    try:
        raw = read_file(path)
    except FileNotFoundError:
        return WorkDirState(), ""
    except OSError as exc:
        raise StateError(f"{path}: cannot read ckptd's state: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
        schema = data.get("schema")
        if isinstance(schema, int) and schema > SCHEMA_VERSION:
            raise StateError(
                f"{path}: written by a newer ckptd (state schema {schema}, this one reads "
                f"{SCHEMA_VERSION}); upgrade ckptd or remove the .ckptd folder"
            )
        state = WorkDirState.from_json(data)
        digest = data.get(CONTENT_DIGEST)
        state.saved_fingerprint = digest if isinstance(digest, str) else ""
        return state, ""
    except StateError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # Everything in it can be re-derived from disk, so starting over is safe.
        return WorkDirState(), f"{path}: unreadable ({exc}); starting from a fresh state"


def save_state(work_dir: Path, state: WorkDirState) -> bool:
    """Write the state if it changed since it was loaded; True when it was written."""
    data, fingerprint = state.content()
    if fingerprint == state.saved_fingerprint:
        return False
    folder = state_dir(work_dir)
    folder.mkdir(exist_ok=True)
    data["last_pass"] = state.last_pass
    data[CONTENT_DIGEST] = fingerprint
    atomic_write_bytes(folder / STATE_FILE, json.dumps(data, separators=(",", ":")).encode())
    state.saved_fingerprint = fingerprint
    return True


@dataclass(slots=True)
class PublishState:
    """What ckptd last published to object storage for this work_dir (``artifact.publish``).

    Kept in its own file rather than in ``state.json`` because uploads run beside reconcile
    passes (``ckptd run``): a pass saves the state it loaded at its start, and would overwrite
    a publish record written meanwhile. No file means nothing was published yet.
    """

    url: str = ""  # the expanded artifact.publish.url the manifest below went to
    manifest_sha256: str = ""  # sha256 of the manifest bytes in place there
    files: dict[str, str] = field(default_factory=dict)  # artifact file -> sha256, as published
    time: str = ""  # when that manifest was put in place
    stale: list[str] = field(default_factory=list)  # replaced objects under url, not yet removed
    failures: int = 0  # failed attempts since the last success
    timeouts: int = 0  # of those, attempts stopped at artifact.publish.timeout
    last_error: str = ""
    last_attempt: str = ""
    uploads: int = 0  # objects uploaded to url, in total
    uploaded_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "url": self.url,
            "manifest_sha256": self.manifest_sha256,
            "files": dict(sorted(self.files.items())),
            "time": self.time,
            "stale": sorted(set(self.stale)),
            "failures": self.failures,
            "timeouts": self.timeouts,
            "last_error": self.last_error,
            "last_attempt": self.last_attempt,
            "uploads": self.uploads,
            "uploaded_bytes": self.uploaded_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishState:
        return cls(
            url=str(data.get("url", "")),
            manifest_sha256=str(data.get("manifest_sha256", "")),
            files={str(k): str(v) for k, v in dict(data.get("files", {})).items()},
            time=str(data.get("time", "")),
            stale=[str(name) for name in data.get("stale", [])],
            failures=int(data.get("failures", 0)),
            timeouts=int(data.get("timeouts", 0)),
            last_error=str(data.get("last_error", "")),
            last_attempt=str(data.get("last_attempt", "")),
            uploads=int(data.get("uploads", 0)),
            uploaded_bytes=int(data.get("uploaded_bytes", 0)),
        )


def load_publish_state(work_dir: Path) -> PublishState:
    """The saved publish record; missing or unreadable reads as "nothing published yet", which
    is safe: the publisher then compares with the remote manifest before uploading."""
    try:
        data = json.loads(read_file(state_dir(work_dir) / PUBLISH_FILE))
        return PublishState.from_json(data)
    except (OSError, ValueError, TypeError, AttributeError):
        return PublishState()


def save_publish_state(work_dir: Path, state: PublishState) -> None:
    folder = state_dir(work_dir)
    folder.mkdir(exist_ok=True)
    data = json.dumps(state.to_json(), separators=(",", ":")).encode()
    atomic_write_bytes(folder / PUBLISH_FILE, data)


class LockBusy(Exception):
    """Another ckptd holds the work_dir; ``str()`` says who."""


class WorkDirLock:
    """An exclusive ``flock`` on ``.ckptd/lock``, held while acting on the work_dir.

    flock is per open file, so nothing else in this process can release it by accident; on
    NFS, Linux turns it into a POSIX byte-range lock that the server arbitrates.
    """

    def __init__(self, work_dir: Path) -> None:
        self.path = state_dir(work_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise call_failed("create the folder", exc) from exc
        remove_stale_temp_files(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
        except OSError as exc:
            raise call_failed("open the lock file", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise LockBusy(f"locked by another ckptd ({self.holder()})") from None
            raise call_failed("lock (flock)", exc, self.path) from exc
        # Held from here on: a failure below must let go of it, or this process would find
        # its own lock busy on every later pass (flock is per open file, not per process).
        self._fd = fd
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        data = json.dumps(owner).encode()
        try:
            pwrite_all(fd, data, 0)
            # Truncating only what is left of a longer owner: an ftruncate to 0 on every pass
            # was a journal update per work_dir (~3 % of a `ckptd once` over 2,000).
            if os.fstat(fd).st_size > len(data):
                os.ftruncate(fd, len(data))
        except OSError as exc:
            self.release()
            raise call_failed("write the lock's owner into", exc, self.path) from exc

    def holder(self) -> str:
        try:
            owner = json.loads(read_file(self.path))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
            return f"pid {owner['pid']} on {owner['host']} since {since}; see {self.path}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown; see {self.path}"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
