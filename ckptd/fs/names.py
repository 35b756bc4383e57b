"""The one check for names ckptd writes, deletes or uploads inside a folder.

Such names come from manifests, listings, saved state and config, all of which a user (or a
crash) can leave in any shape; a plain name is one directory entry, so whatever it says cannot
reach outside the folder it is used in.
"""

from __future__ import annotations

from typing import TypeGuard


def plain_name(name: object) -> TypeGuard[str]:
    """Is ``name`` a single directory entry: a non-empty str, not ``.`` or ``..``, no ``/``?

    NUL is refused too: the OS would reject it, and a name that fails here is skipped or
    reported with the caller's own message rather than by an error from deep in an OS call.
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
    )
