"""A best artifact that is a folder: the model files of a Hugging Face ``checkpoint-N/``.

The chosen files are copied (hashed on the way) into a staging folder in the artifact folder,
each fsynced, with a ``SHA256SUMS`` listing (``sha256sum -c`` format); the staging folder is
fsynced and renamed to its final name, and the artifact folder fsynced. The manifest's sha256
is the listing's, so it pins every file. Nothing is ever renamed over an existing folder: a
same-named folder with the same listing is reused (a crash between the rename and the
manifest), any other one makes the new artifact take a ``-<sha256[:8]>`` suffix, and the old
one goes once the manifest no longer names it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import secrets
import stat as statmod
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from ckptd.core.cancel import CancelToken, check
from ckptd.core.reads import read_file
from ckptd.fs.delete import (
    DIR_FLAGS,
    NotPlainTree,
    remove_own_folder,
    remove_stale_temp_dirs,
    tree_stat_fd,
)
from ckptd.fs.durable import TEMP_PREFIX, fsync_dir, write_all
from ckptd.fs.names import plain_name
from ckptd.slim.artifact import ArtifactRequest, WrittenArtifact, split_keep_keys
from ckptd.slim.errors import (
    ArtifactWriteError,
    CheckpointChangedError,
    MissingKeysError,
    SlimError,
)

SUMS = "SHA256SUMS"
_CHUNK = 4 << 20
# A staging folder untouched this long belongs to no running copy (each file copied touches it).
STALE_STAGING_SECONDS = 3600.0


def is_weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or (name.endswith(".bin") and "model" in name)


def _select(names: list[str], keep: Sequence[str], source: Path) -> list[str]:
    required, optional = split_keep_keys(keep)
    chosen: dict[str, None] = {}
    missing = []
    for pattern in (*required, *optional):
        matched = fnmatch.filter(names, pattern)
        if not matched and pattern in required and not any(c in pattern for c in "*?["):
            missing.append(pattern)
        chosen.update(dict.fromkeys(sorted(matched)))
    if missing:
        raise MissingKeysError(source, missing, names)
    if not any(is_weights_file(n) for n in chosen):
        raise SlimError(
            source,
            f"has no model weights among the files to keep ({', '.join(chosen) or 'none'}; "
            f"the folder has {', '.join(names)}).",
            "List the weights files (e.g. model.safetensors) in artifact.keep_keys.",
        )
    return list(chosen)


def _copy(
    src_fd: int, name: str, dest: Path, progress: Callable[[int], None], cancel: CancelToken | None
) -> str:
    in_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        if not statmod.S_ISREG(os.fstat(in_fd).st_mode):
            raise SlimError(dest.parent, f"{name} is not a regular file.")
        out_fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(out_fd, 0o644)  # readable by whoever deploys it, whatever the umask
            digest = hashlib.sha256()
            while chunk := os.read(in_fd, _CHUNK):
                digest.update(chunk)
                write_all(out_fd, chunk)
                check(cancel)
                progress(len(chunk))
            os.fsync(out_fd)
        finally:
            os.close(out_fd)
    finally:
        os.close(in_fd)
    return digest.hexdigest()


def _same_listing(folder: Path, listing: str) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if folder.is_dir() and not folder.is_symlink():
            return read_file(folder / SUMS).decode("utf-8", "replace") == listing
    return False


def copy_folder_artifact(
    source: Path,
    dest_dir: Path,
    final_name: str | Callable[[str], str],
    keep: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> WrittenArtifact:
    """Copy the ``keep`` files (names or globs; '?' suffix: optional) of ``source`` into the
    folder ``dest_dir/final_name``. Raises a ``SlimError`` naming the folder."""
    started = time.perf_counter()
    try:
        src_fd = os.open(source, DIR_FLAGS)
    except FileNotFoundError as exc:
        raise CheckpointChangedError(source, "disappeared before it could be read.") from exc
    except OSError as exc:
        raise SlimError(source, f"cannot be opened: {exc.strerror or exc}.") from exc
    staging = dest_dir / f"{TEMP_PREFIX}{secrets.token_hex(4)}-staging"
    try:
        try:
            before = tree_stat_fd(src_fd, source.name)
        except NotPlainTree as exc:
            raise SlimError(source, f"cannot be copied safely: {exc}.") from exc
        names = sorted(os.listdir(src_fd))
        files = _select(names, keep, source)
        sizes = {n: os.stat(n, dir_fd=src_fd, follow_symlinks=False).st_size for n in files}
        total, done = sum(sizes.values()), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        remove_stale_temp_dirs(dest_dir, older_than=STALE_STAGING_SECONDS)
        try:
            os.mkdir(staging, 0o755)
            os.chmod(staging, 0o755)
            sums = [(_copy(src_fd, name, staging, advance, cancel), name) for name in files]
            listing = "".join(f"{digest}  {name}\n" for digest, name in sums)
            fd = os.open(staging / SUMS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.fchmod(fd, 0o644)
                write_all(fd, listing.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(staging)
        except OSError as exc:
            raise ArtifactWriteError(source, staging, exc) from exc
        if tree_stat_fd(src_fd, source.name) != before:
            raise CheckpointChangedError(
                source, "changed while being copied; it will be copied again once it is stable."
            )
        sha256 = hashlib.sha256(listing.encode()).hexdigest()
        target = _rename_into_place(staging, dest_dir, final_name, sha256, listing, source)
    except BaseException:
        with contextlib.suppress(OSError, NotPlainTree):
            if staging.is_dir():
                remove_own_folder(dest_dir, staging.name)
        raise
    finally:
        os.close(src_fd)
    return WrittenArtifact(
        path=target,
        sha256=sha256,
        size=total + len(listing.encode()),
        kept_keys=tuple(files),
        dropped_keys=tuple(n for n in names if n not in files),
        source_stat=before,
        seconds=time.perf_counter() - started,
    )


def _rename_into_place(
    staging: Path,
    dest_dir: Path,
    final_name: str | Callable[[str], str],
    sha256: str,
    listing: str,
    source: Path,
) -> Path:
    name = final_name if isinstance(final_name, str) else final_name(sha256)
    if not plain_name(name) or name.startswith(TEMP_PREFIX):
        raise ValueError(f"artifact name {name!r} must be a plain folder name")
    for candidate in (name, f"{name}-{sha256[:8]}"):
        target = dest_dir / candidate
        if _same_listing(target, listing):
            remove_own_folder(dest_dir, staging.name)
            return target
        if os.path.lexists(target):
            continue
        try:
            os.rename(staging, target)
            fsync_dir(dest_dir)
        except OSError as exc:
            raise ArtifactWriteError(source, target, exc) from exc
        return target
    raise ArtifactWriteError(
        source, dest_dir / name, FileExistsError(17, "the name and its hashed variant are taken")
    )


class FolderCopy:
    """A checkpoint folder (Hugging Face ``checkpoint-N/``) copied down to its model files."""

    kind: ClassVar[str] = "folder copy"

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        return copy_folder_artifact(
            request.source,
            request.dest_dir,
            request.name,
            request.keep,
            request.progress,
            request.cancel,
        )
