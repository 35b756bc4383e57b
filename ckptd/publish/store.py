"""Publish the best artifacts to object storage (``artifact.publish``) through fsspec.

The remote prefix mirrors the local artifact folder: the artifact files and ``manifest.json``.
One publish goes in this order, so that a reader that trusts the remote manifest never finds a
file it names missing, partial or unverified:

1. every artifact the remote manifest does not already hold goes to a temporary key
   ``<url>/.ckptd-upload-<random>-<file>``; the bytes sent are hashed on the way and must match
   the local manifest's sha256 (else the local artifact was replaced meanwhile: start over);
2. the stored object is verified: its size from the store, its sha256 by reading it back,
   which works the same on every fsspec backend (S3's own checksums of multipart uploads are
   checksums of part checksums, not the sha256 the manifest records);
3. it is moved to its final key (a server-side copy on object stores, a rename on file://);
4. the manifest goes last, through a temporary key and a move as well, and is read back;
5. only then objects of replaced bests are removed (unless ``keep_history``).

Leftover temporary keys of crashed attempts are removed at the start of the next one. The
record of what is in place (``state.PublishState``) is saved after steps 4 and 5, and every
step is idempotent, so a failure or a restart anywhere ends in "publish again".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ckptd.core.reads import read_file
from ckptd.engine.artifacts import MANIFEST, ArtifactEntry, now_iso
from ckptd.engine.state import PublishState, save_publish_state
from ckptd.fs.names import plain_name
from ckptd.slim.folder import SUMS

if TYPE_CHECKING:
    from ckptd.engine.targets import Target

TEMP_PREFIX = ".ckptd-upload-"
CHUNK = 8 * 2**20
RETRIES = 3  # per remote operation, on top of the backend's own (botocore retries too)
RETRY_DELAYS = (0.5, 2.0)
# makedirs on these would create a bucket or container; their "folders" need no creating.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "tos"}

T = TypeVar("T")


class PublishError(Exception):
    """A publish that cannot succeed as things are; ``str()`` names the URL and the reason."""


class LocalChanged(PublishError):
    """A local artifact was replaced while it was uploaded; publishing again takes the new one."""


class PublishCancelled(Exception):
    """ckptd is stopping; the attempt is left for the next start."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreAttempt:
    """One publish against the store; raises on the first step that fails."""

    def __init__(
        self,
        target: Target,
        url: str,
        state: PublishState,
        stop: Callable[[], bool] | None,
    ) -> None:
        config = target.project.artifact.publish
        assert config is not None
        self.folder = target.artifact_dir
        self.work_dir = target.work_dir
        self.url = url
        self.config = config
        self.state = state
        self.uploads = 0  # objects uploaded (artifact files and the manifest)
        self.uploaded_bytes = 0
        self.removed: list[str] = []
        self.in_place = False  # the remote manifest equals the local one, and it is recorded
        self.changed_remote = False  # this attempt put it there
        self.stop = stop or (lambda: False)
        # told before each remote operation: the publishing process reports where it is
        self.on_step: Callable[[str], None] = lambda what: None
        self.fs, root = _open_fs(url, dict(config.storage_options))
        self.root = root.rstrip("/")
        self.local_fs = bool({"file", "local"} & set(_protocols(self.fs)))

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(RETRIES):
            self.check_stop()
            self.on_step(what if not attempt else f"{what} (try {attempt + 1} of {RETRIES})")
            try:
                return fn()
            except (PublishError, PublishCancelled, PermissionError, FileNotFoundError):
                raise
            except Exception as exc:
                if attempt == RETRIES - 1:
                    raise PublishError(f"{self.url}: {what} failed: {exc}; will retry") from exc
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                deadline = time.monotonic() + delay * random.uniform(0.8, 1.2)
                while time.monotonic() < deadline:
                    self.check_stop()
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise AssertionError("unreachable")

    def check_stop(self) -> None:
        if self.stop():
            raise PublishCancelled

    def run(self, raw: bytes, data: dict[str, Any], entries: dict[str, ArtifactEntry]) -> None:
        if not _is_object_store(self.fs):
            with contextlib.suppress(FileExistsError):
                self.fs.makedirs(self.root, exist_ok=True)
        remote_raw = self.retry("reading the manifest", self.read_remote_manifest)
        remote = self.check_owner(remote_raw, data)
        named_before = set(remote)
        self.clean_temp()
        if remote_raw != raw:
            for entry in entries.values():
                self.put_artifact(entry, remote)
            self.put_manifest(raw)
        new_files = {e.file: e.sha256 for e in entries.values()}
        if not self.config.keep_history:
            old = named_before | set(self.state.files) | set(self.state.stale)
            self.state.stale = sorted(old - set(new_files))
        else:
            self.state.stale = []
        self.state.manifest_sha256 = sha256_of(raw)
        self.state.files = new_files
        self.state.time = now_iso() if remote_raw != raw or not self.state.time else self.state.time
        self.state.failures, self.state.timeouts, self.state.last_error = 0, 0, ""
        self.changed_remote = remote_raw != raw
        save_publish_state(self.work_dir, self.state)
        self.in_place = True
        self.remove_stale()

    def read_remote_manifest(self) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self.key(MANIFEST)))
        except FileNotFoundError:
            return None

    def check_owner(self, remote_raw: bytes | None, local: dict[str, Any]) -> dict[str, str]:
        """The remote manifest's files; refuses a prefix that holds another run's best, whose
        objects this publish would otherwise replace and remove."""
        if remote_raw is None:
            return {}
        try:
            remote = json.loads(remote_raw)
            files = {v["file"]: v["sha256"] for v in remote["artifacts"].values()}
        except (ValueError, TypeError, KeyError, AttributeError):
            return {}  # not a manifest ckptd can read: it is replaced, nothing is removed
        theirs = (remote.get("project"), remote.get("work_dir"))
        if theirs != (local.get("project"), local.get("work_dir")):
            raise PublishError(
                f"{self.url}: already holds the best of project {theirs[0]!r}, work_dir "
                f"{theirs[1]!r}; give each run its own artifact.publish.url (use {{run}}), or "
                "remove that manifest.json if it is this run's from an old path"
            )
        return {str(k): str(v) for k, v in files.items()}

    def clean_temp(self) -> None:
        try:
            names = self.retry("listing", lambda: self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            names = []
        self.fs.invalidate_cache()
        for name in names:
            if str(name).rstrip("/").rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    self.retry("removing a leftover upload", lambda n=name: self.fs.rm(n))
        self.abort_temp_multiparts()

    def abort_temp_multiparts(self) -> None:
        """S3: an upload killed mid-way (a crash, artifact.publish.timeout) leaves the parts of
        a multipart upload, invisible but billed. Abort those of ckptd's temporary keys, best
        effort: a store without the call, or a policy without the permission, changes nothing."""
        call = getattr(self.fs, "call_s3", None)
        if call is None or not _is_object_store(self.fs):
            return
        try:
            bucket, prefix, _ = self.fs.split_path(self.key(TEMP_PREFIX))
            listing = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            for upload in listing.get("Uploads", []):
                self.on_step("aborting a leftover multipart upload")
                call(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
        except Exception:  # the lifecycle rule in docs/publish.md is the backstop
            pass

    def objects_of(self, entry: ArtifactEntry) -> list[tuple[str, str, int]]:
        """(name under the prefix, sha256, bytes) of each object the artifact becomes.

        A folder artifact (Hugging Face) is its files plus its ``SHA256SUMS`` listing, whose
        sha256 the manifest records: the listing goes last and pins every file.
        """
        path = self.folder / entry.file
        if not path.is_dir():
            return [(entry.file, entry.sha256, entry.bytes)]
        try:
            listing = read_file(path / SUMS)
            if sha256_of(listing) != entry.sha256:
                raise FileNotFoundError(path / SUMS)
            objects = []
            for line in listing.decode().splitlines():
                digest, _, name = line.partition("  ")
                if not plain_name(name) or name == SUMS:
                    raise PublishError(f"{path / SUMS}: lists {name!r}; not published")
                objects.append((f"{entry.file}/{name}", digest, (path / name).stat().st_size))
        except (FileNotFoundError, UnicodeDecodeError):
            raise LocalChanged(f"{path}: replaced while publishing; publishing again") from None
        return [*objects, (f"{entry.file}/{SUMS}", entry.sha256, len(listing))]

    def put_artifact(self, entry: ArtifactEntry, remote: dict[str, str]) -> None:
        objects = self.objects_of(entry)
        if remote.get(entry.file) == entry.sha256 and all(
            self.stored_size(self.key(name)) == size for name, _, size in objects
        ):
            return  # this best did not change; its objects are in place, verified before
        token = secrets.token_hex(4)
        temps: dict[str, str] = {}
        try:
            for name, sha, size in objects:  # all verified before any is moved in place
                temp = temps[name] = self.key(f"{TEMP_PREFIX}{token}-{name.replace('/', '--')}")
                self.retry(
                    f"upload of {name}", lambda n=name, t=temp, h=sha, b=size: self.send(n, t, h, b)
                )
                self.retry(f"verifying {name}", lambda t=temp, h=sha, b=size: self.verify(t, h, b))
            if entry.file in remote:
                # Same name, other content (a resumed run rewrote the epoch): no manifest may
                # name the artifact while it is being replaced.
                self.retry("withdrawing the manifest", lambda: self.remove(self.key(MANIFEST)))
                remote.clear()
            for name, _sha, size in objects:
                final = self.key(name)
                if "/" in name and not _is_object_store(self.fs):
                    self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                temp = temps[name]
                self.retry(f"moving {name} in place", lambda t=temp, f=final: self.fs.mv(t, f))
                del temps[name]
                if self.stored_size(final) != size:
                    raise PublishError(f"{final}: wrong size after the move; will retry")
                self.sync_local(final)
        except BaseException:
            for temp in temps.values():
                with contextlib.suppress(Exception):
                    self.remove(temp)
            raise

    def send(self, name: str, temp: str, sha256: str, size: int) -> None:
        digest, sent = hashlib.sha256(), 0
        local = self.folder / name
        try:
            source = open(local, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise LocalChanged(f"{local}: replaced while publishing; publishing again") from None
        with source:
            sink = self.fs.open(temp, "wb")
            try:
                while chunk := source.read(CHUNK):
                    self.check_stop()
                    sink.write(chunk)
                    digest.update(chunk)
                    sent += len(chunk)
            except BaseException:
                for step in ("discard", "close"):  # abort a multipart upload if there is one
                    with contextlib.suppress(Exception):
                        getattr(sink, step)()
                raise
            sink.close()
        self.uploads += 1
        self.uploaded_bytes += sent
        if sent != size or digest.hexdigest() != sha256:
            raise LocalChanged(f"{local}: changed while publishing; publishing again")

    def verify(self, temp: str, sha256: str, size: int) -> None:
        stored = self.stored_size(temp)
        if stored != size:
            raise PublishError(f"{temp}: the store holds {stored} bytes, expected {size}")
        digest = hashlib.sha256()
        with self.fs.open(temp, "rb", block_size=CHUNK) as readback:
            while chunk := readback.read(CHUNK):
                self.check_stop()
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise PublishError(f"{temp}: sha256 read back differs from the manifest's")

    def put_manifest(self, raw: bytes) -> None:
        final, temp = (
            self.key(MANIFEST),
            self.key(f"{TEMP_PREFIX}{secrets.token_hex(4)}-{MANIFEST}"),
        )
        try:
            self.retry("upload of the manifest", lambda: self.fs.pipe_file(temp, raw))
            self.uploads += 1
            self.uploaded_bytes += len(raw)
            self.sync_local(temp)
            self.retry("moving the manifest in place", lambda: self.fs.mv(temp, final))
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(temp)
            raise
        self.sync_local(final)
        if self.retry("reading the manifest back", self.read_remote_manifest) != raw:
            raise PublishError(f"{final}: reads back different from what was written; will retry")

    def remove_stale(self) -> None:
        for name in list(self.state.stale):
            if not plain_name(name) or name == MANIFEST:
                self.state.stale.remove(name)
                continue
            self.retry(f"removing the replaced {name}", lambda n=name: self.remove_tree(n))
            self.state.stale.remove(name)
            self.removed.append(name)
        if self.removed:
            save_publish_state(self.work_dir, self.state)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(key)

    def remove_tree(self, name: str) -> None:
        """An artifact ckptd published: one object, or a folder artifact's objects."""
        key = self.key(name)
        try:
            if self.fs.isdir(key):
                self.fs.rm(key, recursive=True)
                return
        except FileNotFoundError:
            return
        self.remove(key)

    def stored_size(self, key: str) -> int | None:
        try:
            return int(self.retry(f"stat of {key}", lambda: self.fs.info(key))["size"])
        except FileNotFoundError:
            return None

    def sync_local(self, key: str) -> None:
        """file:// targets: make the ordering survive a power cut too, as local artifacts do."""
        if not self.local_fs:
            return
        from ckptd.fs.durable import fsync_dir

        fd = os.open(key, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(key))


def _protocols(fs: Any) -> Iterable[str]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_object_store(fs: Any) -> bool:
    return bool(OBJECT_STORES & set(_protocols(fs)))


def _open_fs(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise PublishError(
            f"{url}: publishing needs fsspec: pip install 'ckptd[publish]'"
        ) from None
    try:
        # A fresh client per attempt: a cached one may hold connections to a restarted server.
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise PublishError(f"{url}: {exc} (e.g. pip install 'ckptd[publish]')") from None
    except (TypeError, ValueError) as exc:
        raise PublishError(f"{url}: artifact.publish.storage_options: {exc}") from None
