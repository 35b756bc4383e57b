"""The errors of the slim package, raised while reading or slimming a checkpoint.

Every reader and writer in ckptd/slim raises them, and so does ``ckptd.layouts.peek``; callers
catch ``SlimError``. They are a module of their own, below the others, so the low-level readers
(``ckptd.slim.torchzip``) can raise them without an import cycle. ``str(error)`` always starts
with the checkpoint's path, says what is wrong and, where the user can do something about it,
what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class SlimError(Exception):
    """Base class: the checkpoint at ``path`` could not be read or slimmed."""

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str = "") -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message = f"{message} {hint}"
        super().__init__(message)


class CorruptCheckpointError(SlimError):
    """The file is not a readable torch checkpoint (truncated, bad CRC, missing record, ...).

    Retrying is pointless until the file's ``stat`` changes.
    """


class UnsupportedFormatError(SlimError):
    """A valid file that ckptd deliberately does not slim (legacy format, TorchScript, ...)."""


class UnsafeCheckpointError(SlimError):
    """A kept key references a global that ``torch.load(weights_only=True)`` would reject."""

    def __init__(self, path: str | os.PathLike[str], key: str, global_name: str) -> None:
        self.key = key
        self.global_name = global_name
        super().__init__(
            path,
            f"key {key!r} references {global_name}, which a safe load (weights_only=True) "
            "would reject; ckptd does not copy code references into an artifact.",
            "Remove the key from artifact.keep_keys or re-save the checkpoint without it.",
        )


class UnsafeMetadataError(SlimError):
    """A sharded checkpoint's index (DCP's ``.metadata``) names a global its library never
    writes there: the file is refused, unread beyond the inert parse, nothing of it run."""

    def __init__(self, path: str | os.PathLike[str], global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            path,
            f"references {global_name}, which a torch distributed checkpoint's .metadata never "
            "does (it may be a code-running payload); ckptd refuses the checkpoint and runs "
            "none of it.",
            "Check where this folder came from; ckptd will not consolidate or delete it.",
        )


class CheckpointChangedError(SlimError):
    """The file changed (or vanished) while it was being read; read it again later."""


class MissingKeysError(SlimError):
    """A key to keep is not in the checkpoint."""

    def __init__(
        self, path: str | os.PathLike[str], missing: Sequence[str], present: Sequence[str]
    ) -> None:
        self.missing = tuple(missing)
        self.present = tuple(present)
        shown = list(self.present[:20])
        more = f" and {len(self.present) - 20} more" if len(self.present) > 20 else ""
        super().__init__(
            path,
            f"keys to keep {list(self.missing)} are not in the checkpoint, "
            f"which has the top-level keys {shown}{more}.",
            "Fix artifact.keep_keys.",
        )


class ArtifactWriteError(SlimError):
    """Writing the artifact failed (disk full, permission denied, ...); the checkpoint is fine."""

    def __init__(
        self, path: str | os.PathLike[str], destination: str | os.PathLike[str], exc: OSError
    ) -> None:
        self.destination = os.fspath(destination)
        self.errno = exc.errno
        detail = exc.strerror or str(exc)
        super().__init__(path, f"writing the artifact {self.destination} failed: {detail}.")


class UnsafeShardError(UnsafeCheckpointError):
    """A shard of a folder checkpoint names a global its format never needs (maybe code)."""

    def __init__(self, path: str | os.PathLike[str], key: str, global_name: str) -> None:
        self.key = key
        self.global_name = global_name
        SlimError.__init__(
            self,
            path,
            f"key {key!r} references {global_name}, which no checkpoint of this format holds; "
            "ckptd reads no shard that names code it does not know (torch.load with "
            "weights_only=False, as zero_to_fp32.py does, would run it).",
            "Nothing was read further or deleted; find out where this file came from.",
        )
