"""The one interface for writing a best artifact, whatever the checkpoint's format.

A layout names its ``ArtifactWriter``: a torch zip checkpoint is slimmed to its model keys
(``slim/slimmer.py`` ``TorchZipSlim``), a Hugging Face folder is copied down to its model files
(``slim/folder.py`` ``FolderCopy``). Both take an ``ArtifactRequest`` and return a
``WrittenArtifact``; both write atomically and durably and leave no partial output on error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from ckptd.core.cancel import CancelToken
from ckptd.core.model import FileStat

Scalar = int | float | str | bool | None


def split_keep_keys(keys: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) keys; optional ones are written with a trailing '?'."""
    required = tuple(k for k in keys if not k.endswith("?"))
    optional = tuple(k[:-1] for k in keys if k.endswith("?") and k[:-1])
    return required, optional


@dataclass(frozen=True, slots=True)
class ArtifactRequest:
    source: Path  # the checkpoint (file or folder)
    dest_dir: Path
    # the artifact's name, or how to make it from the output's sha256 (hash_in_name)
    name: str | Callable[[str], str]
    keep: tuple[str, ...]  # keys (or file names/globs) to keep; a trailing '?' marks optional
    progress: Callable[[int, int], None] | None = None  # (bytes done, total), for people
    cancel: CancelToken | None = None  # checked between chunks: stop cleanly when set


@dataclass(frozen=True, slots=True)
class WrittenArtifact:
    path: Path
    sha256: str  # of the file; of its SHA256SUMS listing for a folder artifact
    size: int
    kept_keys: tuple[str, ...]  # keys kept (file names, for a folder artifact)
    dropped_keys: tuple[str, ...]
    source_stat: FileStat  # the checkpoint as read: an artifact is current while it matches
    seconds: float
    # Scalar entries of the kept ``meta`` dict (epoch, iter, ...), for the manifest; empty
    # when the format has none.
    meta: Mapping[str, Scalar] = field(default_factory=dict)


class ArtifactWriter(Protocol):
    kind: ClassVar[str]  # recorded nowhere yet; names the writer in messages

    def write(self, request: ArtifactRequest) -> WrittenArtifact: ...
