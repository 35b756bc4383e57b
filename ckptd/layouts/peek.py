"""Read a trainer's own settings out of a torch zip file without running any of it.

Lightning's ``ModelCheckpoint`` monitor/mode live in a checkpoint's ``callbacks`` state and the
Hugging Face Trainer's ``metric_for_best_model`` in ``training_args.bin``; both are pickles. The
restricted unpickler (``ckptd.slim.safepickle``) turns every object into an inert record, so reading
them never imports or calls anything from the file. Results are cached by (path, stat): a file
is parsed once, not on every pass; with a ``Codec`` also in the work_dir's state
(``ckptd.layouts.memo``), so that a restart does not parse it again.
"""

from __future__ import annotations

import os
import stat as statmod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ckptd.core.model import FileStat
from ckptd.layouts.memo import Codec, active_memo
from ckptd.slim.errors import SlimError
from ckptd.slim.legacy import LegacyArchive, is_legacy
from ckptd.slim.safepickle import (
    MAX_PICKLE_BYTES,
    Inert,
    PickleRejected,
    compact_pickle,
    load_compacted,
    load_inert,
    top_level,
)
from ckptd.slim.torchzip import SourceArchive

T = TypeVar("T")
_CACHE: OrderedDict[tuple[str, FileStat, str], Any] = OrderedDict()
_CACHE_SIZE = 64


def _load(archive: SourceArchive, max_pickle: int, stream: bool) -> Any:
    if not stream:
        return load_inert(archive.read("data.pkl", max_pickle))
    entry = archive.entries.get("data.pkl")
    if entry is None:
        raise ValueError("no data.pkl record")
    start = archive.data_offset(entry)

    def read(offset: int, size: int) -> bytes:
        return archive.pread(size, start + offset)

    compacted = compact_pickle(read, entry.size, max_pickle)
    if compacted.crc32 != entry.crc32:
        raise ValueError("CRC mismatch in data.pkl")
    return load_compacted(compacted, read)


def open_inert(
    path: Path,
    extract: Callable[[Any, SourceArchive | LegacyArchive], T],
    *,
    max_pickle: int = MAX_PICKLE_BYTES,
    stream: bool = False,
) -> T:
    """``extract(inert data.pkl tree, archive)`` of a torch file (zip or legacy), the archive still
    open so that small records (e.g. a scalar tensor's bytes) can be read too.

    ``stream``: leave long str/bytes payloads in the file (``Blob`` nodes), so that a pickle
    whose bulk is such payloads (MMEngine's message hub: numpy arrays of every iteration's
    scalars) costs ``max_pickle`` of memory at most, whatever its size on disk.
    Raises OSError, SlimError or PickleRejected when the file cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if is_legacy(fd, path):  # read like a zip (always streamed: its pickles have no length)
            legacy = LegacyArchive(path, fd, size, with_crcs=False, max_pickle=max_pickle)
            return extract(legacy.root, legacy)
        archive = SourceArchive(path, fd, size)
        return extract(_load(archive, max_pickle, stream), archive)
    finally:
        os.close(fd)


def read_inert_root(path: Path, *, max_pickle: int = MAX_PICKLE_BYTES, stream: bool = False) -> Any:
    """The inert ``data.pkl`` tree of a torch zip file (OSError, SlimError, PickleRejected)."""
    return open_inert(path, lambda root, _archive: root, max_pickle=max_pickle, stream=stream)


def peek(
    path: Path,
    what: str,
    extract: Callable[[Any], T],
    *,
    max_pickle: int = MAX_PICKLE_BYTES,
    stream: bool = False,
    codec: Codec[T | None] | None = None,
) -> T | None:
    """``extract(inert root)`` for the file at ``path``, cached by its stat; None if unreadable.

    ``extract`` must not keep ``Blob`` nodes of a ``stream`` read: the file is closed after.
    ``codec``: how the value is kept in the work_dir's memo, when the engine gave one.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not statmod.S_ISREG(st.st_mode):
        # A folder checkpoint (DeepSpeed, DCP) has no torch file to peek into; its layout reads
        # the trainer's state from the shard that holds it. Not an I/O error.
        return None
    stat = FileStat.of(st)
    memo = active_memo() if codec is not None else None
    key = (str(path), stat, what)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        value = _CACHE[key]
    else:
        found, value = memo.recall(path, stat, what, codec) if memo and codec else (False, None)
        if not found:
            value = _read(path, extract, max_pickle, stream)
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    if memo is not None and codec is not None:
        memo.remember(path, stat, what, codec, value)
    return value


def _read(path: Path, extract: Callable[[Any], T], max_pickle: int, stream: bool) -> T | None:
    try:
        return extract(read_inert_root(path, max_pickle=max_pickle, stream=stream))
    except (OSError, SlimError, PickleRejected, ValueError, TypeError, KeyError) as exc:
        _raise_io_error(exc, path)
        return None


def _raise_io_error(exc: BaseException, path: Path) -> None:
    """An I/O error is not "nothing to read here": it would be cached for the file's stat, and
    the pass would go on without the trainer's own best (found by injecting pread EIO). The pass
    fails instead, naming the file; a missing file (deleted meanwhile) reads as nothing."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        raise OSError(cause.errno, f"cannot read it: {cause.strerror}", str(path)) from exc


def top_mapping(root: Any) -> dict[Any, Any]:
    mapping = top_level(root)
    if mapping is None:
        raise ValueError("not a mapping at the top level")
    return mapping[0]


def object_state(obj: Any) -> dict[Any, Any]:
    """The attribute dict a pickled object was built with (its BUILD state), or {}."""
    if not isinstance(obj, Inert):
        return {}
    for op in obj.ops or ():
        if op[0] == "build" and isinstance(op[1], dict):
            return op[1]
        if op[0] == "build" and isinstance(op[1], tuple) and op[1] and isinstance(op[1][0], dict):
            return op[1][0]  # (state, slotstate)
    return {}
