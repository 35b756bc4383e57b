"""The act step for best artifacts: slim each new best, name it in the manifest, and only
then remove the artifact it replaces, so a complete best artifact exists at every instant."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ckptd.core.model import Best, Checkpoint
from ckptd.core.reads import call_failed
from ckptd.core.units import format_duration, format_size
from ckptd.engine import artifacts
from ckptd.engine.artifacts import ArtifactEntry
from ckptd.engine.observe import Observation
from ckptd.engine.outcome import (
    ArtifactOutcome,
    ArtifactStatus,
    ErrorKind,
    PassOptions,
    WorkDirReport,
)
from ckptd.engine.state import WorkDirState, save_state
from ckptd.engine.targets import Target
from ckptd.fs.delete import NotPlainTree, remove_own_folder
from ckptd.fs.durable import remove_stale_temp_files
from ckptd.fs.flush import make_durable, make_folders
from ckptd.fs.names import plain_name
from ckptd.layouts.base import Layout
from ckptd.slim.artifact import ArtifactRequest
from ckptd.slim.errors import ArtifactWriteError

log = logging.getLogger("ckptd.artifact")


def keep_keys_for(target: Target, layout: Layout) -> tuple[str, ...]:
    artifact = target.project.artifact
    return (
        layout.auto_keep_keys(artifact.format)
        if artifact.keep_keys == "auto"
        else tuple(artifact.keep_keys)
    )


def _final_name(
    target: Target, name: str, claim: Callable[[str], None]
) -> str | Callable[[str], str]:
    """The artifact's name, or how to make it from its sha256; ``claim`` gets it before the
    file can appear under it."""
    if not target.project.artifact.hash_in_name:
        claim(name)
        return name
    # best_..._epoch_N.pth -> best_..._epoch_N-<sha8>.pth; folder artifacts have no suffix
    suffix = next((s for s in (".pth", ".ckpt", ".safetensors") if name.endswith(s)), "")
    stem = name.removesuffix(suffix) if suffix else name

    def hashed(sha256: str) -> str:
        final = f"{stem}-{sha256[:8]}{suffix}"
        claim(final)
        return final

    return hashed


def make_artifact(
    target: Target,
    layout: Layout,
    best: Best,
    checkpoint: Checkpoint,
    options: PassOptions,
    claim: Callable[[str], None] = lambda name: None,
) -> tuple[ArtifactEntry, float]:
    """Slim ``checkpoint`` into the artifact folder; the manifest entry and the seconds taken.

    ``claim(name)`` is called with the artifact's file name before it appears in the folder.
    """
    log.info(
        f"slimming {checkpoint.name} for {best.key}={best.value:g}",
        extra={
            "fields": {
                "work_dir": str(target.work_dir),
                "action": "slim-start",
                "checkpoint": checkpoint.name,
                "bytes": checkpoint.stat.size,
            }
        },
    )
    fmt = target.project.artifact.format
    writer = layout.artifact_output(fmt)[0]
    result = writer.write(
        ArtifactRequest(
            source=target.work_dir / checkpoint.name,
            dest_dir=target.artifact_dir,
            name=_final_name(target, layout.artifact_name(best.key, checkpoint, fmt), claim),
            keep=keep_keys_for(target, layout),
            progress=options.progress,
            cancel=options.cancel,
        )
    )
    meta = result.meta
    entry = ArtifactEntry(
        key=best.key,
        file=result.path.name,
        rule=best.rule,
        value=best.value,
        unit=checkpoint.unit,
        index=checkpoint.index,
        epoch=meta.get("epoch", checkpoint.index if checkpoint.unit == "epoch" else None),
        step=meta.get("iter", checkpoint.index if checkpoint.unit != "epoch" else None),
        sha256=result.sha256,
        bytes=result.size,
        source_checkpoint=checkpoint.name,
        source_stat=tuple(result.source_stat.as_list()),  # type: ignore[arg-type]
        kept_keys=tuple(result.kept_keys),
        time=artifacts.now_iso(),
        format=fmt,
    )
    return entry, result.seconds


def _shown_path(
    folder: Path,
    layout: Layout,
    best: Best,
    checkpoint: Checkpoint | None,
    entry: ArtifactEntry | None,
    fmt: str,
) -> Path:
    if entry is not None and entry.index == best.index and entry.format == fmt:
        return folder / entry.file
    if checkpoint is not None:
        return folder / layout.artifact_name(best.key, checkpoint, fmt)
    return folder / (entry.file if entry else "(none)")


def ensure_artifacts(
    target: Target,
    layout: Layout,
    observation: Observation,
    state: WorkDirState,
    options: PassOptions,
    report: WorkDirReport,
) -> bool:
    """Slim every best that is not yet an artifact. False when one failed (then: no deletions)."""
    from ckptd.slim.errors import SlimError

    folder = target.artifact_dir
    entries = dict(observation.manifest)
    ok = True
    dry_run = options.dry_run or target.project.dry_run  # the config's dry_run writes nothing
    for key, best in observation.bests.items():
        checkpoint = observation.scan.checkpoint_at(best.index)
        entry = entries.get(key)
        path = _shown_path(folder, layout, best, checkpoint, entry, target.project.artifact.format)
        if key in observation.ready:
            report.artifacts.append(
                ArtifactOutcome(key, best, path, ArtifactStatus.UNCHANGED, entry=entry)
            )
            continue
        if checkpoint is None:
            detail = _missing_detail(best, entry, observation.unit)
            report.artifacts.append(
                ArtifactOutcome(key, best, path, ArtifactStatus.MISSING, detail, entry)
            )
            continue
        if not checkpoint.complete:
            detail = _deferred_detail(checkpoint, options)
            report.artifacts.append(
                ArtifactOutcome(key, best, path, ArtifactStatus.DEFERRED, detail, entry)
            )
            continue
        if dry_run:
            report.artifacts.append(
                ArtifactOutcome(key, best, path, ArtifactStatus.WOULD_WRITE, entry=entry)
            )
            continue
        try:
            make_folders(folder)  # its name durable before a deletion relies on it
            remove_stale_temp_files(folder)
            if key in entries:
                # The manifest will stop naming an artifact that may stand in for a deleted
                # checkpoint: the evaluation records that make this one the best must be on
                # disk first, or a power cut keeps the manifest, loses them, and leaves the
                # surviving records' best with neither checkpoint nor artifact (found by the
                # power-cut test, seed 5034).
                make_durable(target.work_dir, observation.sources)
            new, seconds = make_artifact(
                target, layout, best, checkpoint, options, lambda name: _claim(target, state, name)
            )
            # Named in memory only once the manifest on disk names it: otherwise a failed
            # manifest write (found by injecting write EIO) let remove_replaced_artifacts below
            # delete the artifact the manifest on disk still names.
            artifacts.write_manifest(
                folder, {**entries, key: new}, target.work_dir, target.project.name, layout.name
            )
            entries[key] = new
        except (SlimError, OSError) as exc:
            ok = False
            message = _artifact_error(exc, folder, checkpoint)
            report.error(ErrorKind.SLIM, message)
            report.artifacts.append(
                ArtifactOutcome(key, best, path, ArtifactStatus.FAILED, message, entry)
            )
            continue
        report.artifacts.append(
            ArtifactOutcome(
                key, best, folder / new.file, ArtifactStatus.WRITTEN, entry=new, seconds=seconds
            )
        )
    if not dry_run and folder.is_dir() and _replaced(folder, entries, observation.bests):
        remove_replaced_artifacts(folder, entries, state)
    return ok


def _replaced(folder: Path, entries: Mapping[str, ArtifactEntry], bests: Iterable[str]) -> bool:
    """May the artifacts the manifest does not name go? A file a crash kept out of it may be
    the only complete artifact there is: only once every best has an artifact in the manifest
    and one the manifest names is there to take its place. A power cut can take every
    evaluation record (the trainer never fsyncs its log), and then "every best" holds for
    none: the claimed orphan was the only copy of the best's weights left (found by the
    power-cut test, seed 5016)."""
    if not all(key in entries for key in bests):
        return False
    return any(artifacts.is_in_place(e, folder) for e in entries.values() if plain_name(e.file))


def _missing_detail(best: Best, previous: ArtifactEntry | None, unit: str | None) -> str:
    at = f"{unit} {best.index}" if unit else str(best.index)
    gone = f"the best {best.key}={best.value:g} is at {at}, whose checkpoint is gone from "
    gone += "the work_dir"
    later = (
        f"until a later evaluation beats {best.value:g} with its checkpoint still there, or that "
        "checkpoint is put back into the work_dir (ckptd then slims it)"
    )
    if previous is None:
        return f"{gone}, and no earlier best has an artifact either: {best.key} has none {later}"
    return (
        f"{gone}; the artifact stays at the previous best, {previous.file} "
        f"({previous.key}={previous.value:g} at {previous.unit} {previous.index}), {later}"
    )


def _deferred_detail(checkpoint: Checkpoint, options: PassOptions) -> str:
    waiting = f"{checkpoint.name} is {checkpoint.incomplete_reason}"
    if not options.one_shot:
        return f"{waiting}; will slim it then"  # the daemon passes again by itself
    # ckptd once exits: say when running it again finds the checkpoint old enough to trust
    settled_in = checkpoint.stat.mtime_ns / 1e9 + options.settle - options.now()
    when = (
        f"run `ckptd once` again in {format_duration(max(1, math.ceil(settled_in)))}"
        if settled_in > 0
        else "run `ckptd once` again once it is complete"
    )
    return f"{waiting}; {when} to slim it, or use `ckptd run`, which slims it by itself"


def _claim(target: Target, state: WorkDirState, name: str) -> None:
    """Write-ahead: record (durably) that ckptd owns ``name`` before the file can appear.

    Otherwise a crash after the artifact is renamed into place but before the manifest names
    it (or before the pass saves its state) leaves a file no later pass knows it may remove.
    """
    if name in state.own_artifacts:
        return
    state.own_artifacts.append(name)
    try:
        save_state(target.work_dir, state)
    except OSError as exc:
        # A full training disk is when the artifact and the deletions after it matter most: go
        # on; the claim is saved with the pass's state (a crash before that orphans the file).
        log.warning(
            f"{exc.filename or target.work_dir}: cannot record the artifact {name} ahead of "
            f"writing it ({exc.strerror}); going on",
            extra={"fields": {"work_dir": str(target.work_dir), "action": "note"}},
        )


def _artifact_error(exc: BaseException, folder: Path, checkpoint: Checkpoint) -> str:
    # slim reports the OSError of writing the artifact as an ArtifactWriteError (same errno)
    code = exc.errno if isinstance(exc, OSError | ArtifactWriteError) else None
    if code == errno.ENOSPC:
        return (
            f"{folder}: no space left while writing the artifact of {checkpoint.name} "
            f"({format_size(checkpoint.stat.size)} checkpoint); free space there; the "
            "previous best artifact is untouched and nothing was deleted"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{folder}: cannot write the artifact ({os.strerror(code)}); give ckptd's user write "
            "access to artifact.dir; nothing was deleted"
        )
    if isinstance(exc, OSError):
        where = exc.filename or folder
        return f"{where}: {exc.strerror or exc}; nothing was deleted"
    return str(exc)


def remove_replaced_artifacts(
    folder: Path, entries: Mapping[str, ArtifactEntry], state: WorkDirState
) -> None:
    """Remove artifacts ckptd made that the manifest no longer names.

    Runs only after the manifest names the new ones. Files the manifest names are ckptd's own
    even if a crash kept them out of the saved state; anything else in the folder is never
    touched.
    """
    current = {e.file for e in entries.values() if plain_name(e.file)}
    survivors = []
    for name in dict.fromkeys([*state.own_artifacts, *current]):
        if name in current:
            survivors.append(name)
        elif plain_name(name):
            with contextlib.suppress(FileNotFoundError, NotPlainTree):
                if (folder / name).is_dir() and not (folder / name).is_symlink():
                    remove_own_folder(folder, name)  # a folder artifact (Hugging Face)
                else:
                    try:
                        os.unlink(folder / name)
                    except OSError as exc:
                        raise call_failed("remove the replaced artifact", exc) from exc
    state.own_artifacts = survivors
