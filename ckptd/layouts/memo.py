"""What was read out of a trainer's pickles, remembered per file version across restarts.

Reading the trainer's own best out of a checkpoint (MMEngine's message hub, mmcv's
``hook_msgs``, Hugging Face's ``training_args.bin``) means parsing a pickle of a few MB: the
largest single cost of a warm pass (~2.5 ms of ~7 ms per work_dir). The in-process cache in
``peek`` spares later passes of a running daemon, but not the start-up pass, where every
work_dir is read for the first time (2,000 work_dirs: ~5 s). So what was read is also kept in
the work_dir's ``state.json``, keyed by the file's stat: a restart reads no checkpoint whose
stat is unchanged.

The engine scopes one work_dir's memo around its pass (``remembering``); layouts do not see
it. A value is remembered only for readers that give a ``Codec`` (to and from JSON), and only
entries used in the pass are saved, so entries of deleted files drop out. Losing or damaging
the memo is safe: an entry that does not decode is read again from the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ckptd.core.model import FileStat

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How one reader's value is kept in JSON (``decode(encode(v)) == v``)."""

    encode: Callable[[T], Any]
    decode: Callable[[Any], T]


# For a value that is None or a tuple of JSON scalars.
TUPLE_CODEC: Codec[Any] = Codec(
    encode=lambda value: None if value is None else list(value),
    decode=lambda data: None if data is None else tuple(data),
)


class PeekMemo:
    """One work_dir's remembered reads: ``"<what> <path relative to the work_dir>"`` ->
    ``[inode, size, mtime_ns, value]``."""

    def __init__(self, work_dir: Path, saved: dict[str, Any] | None = None) -> None:
        self.work_dir = work_dir
        self._saved = saved if isinstance(saved, dict) else {}
        self._used: dict[str, Any] = {}

    def _key(self, path: Path, what: str) -> str:
        return f"{what} {os.path.relpath(path, self.work_dir)}"

    def recall(self, path: Path, stat: FileStat, what: str, codec: Codec[T]) -> tuple[bool, T]:
        """(True, value) when ``path`` was read at this very stat; (False, None) otherwise."""
        key = self._key(path, what)
        entry = self._saved.get(key)
        try:
            if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stat.as_list():
                value = codec.decode(entry[3])
                self._used[key] = entry
                return True, value
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            pass  # damaged: read the file again
        return False, None  # type: ignore[return-value]

    def remember(self, path: Path, stat: FileStat, what: str, codec: Codec[T], value: T) -> None:
        self._used[self._key(path, what)] = [*stat.as_list(), codec.encode(value)]

    def to_json(self) -> dict[str, Any]:
        """The entries this pass used: what the next pass (or process) may recall."""
        return dict(sorted(self._used.items()))


_ACTIVE: ContextVar[PeekMemo | None] = ContextVar("ckptd_peek_memo", default=None)


@contextlib.contextmanager
def remembering(memo: PeekMemo) -> Iterator[PeekMemo]:
    """Make ``memo`` the one that reads in this thread use until the block ends."""
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)


def active_memo() -> PeekMemo | None:
    return _ACTIVE.get()
