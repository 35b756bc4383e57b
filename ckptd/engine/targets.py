"""What a pass works on: ``Target`` (a work_dir and its project), and which folders are work_dirs
(project globs expanded, symlinks and duplicates refused)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.core.config import LoadedConfig, ProjectConfig
from ckptd.engine.artifacts import expand_artifact_dir


@dataclass(frozen=True, slots=True)
class Target:
    """A work_dir and the project that manages it."""

    work_dir: Path
    project: ProjectConfig
    base_dir: Path  # the config file's folder: relative paths resolve against it

    @property
    def artifact_dir(self) -> Path:
        return expand_artifact_dir(
            self.project.artifact.dir, self.work_dir, self.project.name, self.base_dir
        )


@dataclass(slots=True)
class Discovery:
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def expand_pattern(pattern: str, base_dir: Path) -> str:
    expanded = os.path.expanduser(os.path.expandvars(pattern))
    return expanded if os.path.isabs(expanded) else str(base_dir / expanded)


def discover(loaded: LoadedConfig) -> Discovery:
    """Every folder matched by a project's globs, once, in a stable order.

    A match that is a symlink is refused: ckptd deletes inside work_dirs and must know that
    what it deletes is really inside the folder the config names.
    """
    found = Discovery()
    owner: dict[Path, str] = {}
    for project in loaded.config.projects:
        matched_any = False
        for pattern in project.work_dirs:
            full = expand_pattern(pattern, loaded.base_dir)
            for match in sorted(glob.glob(full, recursive=True)):
                path = Path(os.path.normpath(os.path.abspath(match)))
                if os.path.islink(path):
                    found.notes.append(
                        f"{path}: is a symlink, not managed; list its real path in work_dirs"
                    )
                    continue
                if not path.is_dir() or path.name == ".ckptd":
                    continue
                matched_any = True
                if path in owner:
                    if owner[path] != project.name:
                        found.notes.append(
                            f"{path}: matched by projects {owner[path]!r} and {project.name!r}; "
                            f"managed by {owner[path]!r} only"
                        )
                    continue
                owner[path] = project.name
                found.targets.append(Target(path, project, loaded.base_dir))
        if not matched_any:
            found.notes.append(
                f"project {project.name!r}: no folder matches "
                + ", ".join(expand_pattern(p, loaded.base_dir) for p in project.work_dirs)
            )
    _refuse_shared_artifact_dirs(found)
    return found


def _refuse_shared_artifact_dirs(found: Discovery) -> None:
    """Work_dirs whose artifact.dir is one folder would overwrite each other's manifest and,
    for a best at the same epoch, each other's artifact: manage none of them."""
    by_folder: dict[str, list[Target]] = {}
    for target in found.targets:
        by_folder.setdefault(os.path.realpath(target.artifact_dir), []).append(target)
    for folder, targets in by_folder.items():
        if len(targets) > 1:
            names = " and ".join(str(t.work_dir) for t in targets)
            found.notes.append(
                f"{folder}: artifact.dir of {names}; their artifacts and manifests would "
                "overwrite each other, so none of them is managed: put {run} or {work_dir} "
                "in artifact.dir"
            )
            found.targets = [t for t in found.targets if t not in targets]


def _static_prefix(pattern: str) -> Path:
    """The deepest folder of a glob that has no wildcard in it."""
    parts = Path(pattern).parts
    static = []
    for part in parts:
        if glob.has_magic(part):
            break
        static.append(part)
    return Path(*static) if static else Path("/")


def discovery_folders(loaded: LoadedConfig) -> list[Path]:
    """Folders to watch so new work_dirs are noticed: each glob's static prefix and the parents
    of what it matches now (a new run usually appears next to the previous ones)."""
    folders: dict[Path, None] = {}
    for project in loaded.config.projects:
        for pattern in project.work_dirs:
            full = expand_pattern(pattern, loaded.base_dir)
            prefix = _static_prefix(full)
            if glob.has_magic(full):
                folders[prefix] = None
                for match in glob.glob(full, recursive=True):
                    folders[Path(os.path.abspath(match)).parent] = None
            else:
                folders[prefix.parent] = None
    # A folder that does not exist yet cannot be watched; its nearest existing ancestor can,
    # and its creation there triggers a rediscovery.
    existing: dict[Path, None] = {}
    for folder in folders:
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        existing[folder] = None
    return list(existing)
