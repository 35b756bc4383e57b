"""A filesystem model that keeps only what was made durable, for simulated power cuts.

The *live* tree is what processes see. Beside it the model keeps the *durable image*: what a
disk would hold after the power went out now. The rules (POSIX's minimum, the way SQLite's test
VFS and LazyFS read it):

* file data becomes durable at ``fsync``/``fdatasync`` of that file: its current bytes are
  copied into the image. Until then each write and truncation is pending, in order;
* a directory entry (create, mkdir, symlink, link, rename, unlink, rmdir) becomes durable at
  ``fsync`` of its directory: the pending entry operations of that directory are applied to the
  image in the order they happened. A rename between two directories is one operation of both
  and is applied, atomically, at the first fsync of either. ``fsync`` of a file does *not* make
  its name durable (ext4 happens to, POSIX does not promise it);
* a file whose name became durable before its data did holds its last fsynced bytes (nothing,
  for a file never fsynced).

At a cut, ``image(model, rng)`` is what survives:

* ``strict``: exactly the durable image;
* ``reorder``: the kernel may also have written some pending work back early, in any order it
  likes across files and directories, but in order within each: every directory has a random
  prefix (all, none or any, a third of the time each) of its pending entry operations applied
  (ext4 and XFS commit metadata through an ordered journal, so a later operation never lands
  without the earlier ones of the same directory; across directories nothing is assumed), and
  every file a random prefix (chosen the same way) of its pending writes, the last of them
  torn at a random byte half the time.

Whatever is unreachable from the root in the image is gone. The model is plain data; the FUSE
server in ``tests.faults.powerfs_fuse`` drives it.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import time
from dataclasses import dataclass, field
from typing import Literal

ROOT = 1
MODELS = ("strict", "reorder")
Model = Literal["strict", "reorder"]


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class Node:
    mode: int  # with the file type bits
    data: bytearray = field(default_factory=bytearray)  # file bytes, or a symlink's target
    children: dict[str, int] = field(default_factory=dict)  # directories: name -> ino
    mtime_ns: int = field(default_factory=time.time_ns)
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class EntryOp:
    """A pending change of directory entries: ``old`` (dir, name) removed, ``new`` (dir, name)
    pointing at ``ino``; either may be None (a create has no ``old``, an unlink no ``new``)."""

    old: tuple[int, str] | None
    new: tuple[int, str] | None
    ino: int
    applied: bool = False

    @property
    def dirs(self) -> set[int]:
        return {end[0] for end in (self.old, self.new) if end is not None}


@dataclass
class DurableNode:
    mode: int
    data: bytes = b""
    children: dict[str, int] = field(default_factory=dict)
    mtime_ns: int = 0


Image = dict[int, DurableNode]  # ino -> node; ROOT is the root folder


class PowerFS:
    """The live tree, the durable image and the pending work between them."""

    def __init__(self, image: Image | None = None) -> None:
        self.nodes: dict[int, Node] = {}
        self.durable: Image = {}
        self.entry_log: list[EntryOp] = []
        self.data_log: dict[int, list[tuple[int, bytes] | int]] = {}  # (offset, bytes) | size
        self.counts: dict[str, int] = {}  # operations by kind, e.g. "fsync"
        # paths unlinked while their name and bytes were durable: what an unlink destroyed
        self.durable_unlinks: list[str] = []
        for ino, d in (image or {ROOT: DurableNode(stat.S_IFDIR | 0o755)}).items():
            self.nodes[ino] = Node(d.mode, bytearray(d.data), dict(d.children), d.mtime_ns)
            self.durable[ino] = DurableNode(d.mode, d.data, dict(d.children), d.mtime_ns)
        for node in self.nodes.values():
            for child in node.children.values():
                if not self.nodes[child].is_dir:
                    self.nodes[child].nlink = 0
        for node in self.nodes.values():
            for child in node.children.values():
                if not self.nodes[child].is_dir:
                    self.nodes[child].nlink += 1
        self.next_ino = max(self.nodes) + 1

    # --- lookups -----------------------------------------------------------------------------

    def lookup(self, path: str) -> int:
        ino = ROOT
        for part in _parts(path):
            node = self.nodes[ino]
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            if part not in node.children:
                raise _err(errno.ENOENT)
            ino = node.children[part]
        return ino

    def parent_of(self, path: str) -> tuple[int, str]:
        parts = _parts(path)
        if not parts:
            raise _err(errno.EBUSY)
        parent = self.lookup("/".join(parts[:-1]))
        if not self.nodes[parent].is_dir:
            raise _err(errno.ENOTDIR)
        return parent, parts[-1]

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    # --- entry operations --------------------------------------------------------------------

    def _new(self, path: str, mode: int, data: bytes = b"") -> int:
        parent, name = self.parent_of(path)
        if name in self.nodes[parent].children:
            raise _err(errno.EEXIST)
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.nodes[ino] = Node(mode, bytearray(data))
        self.durable[ino] = DurableNode(mode, data if stat.S_ISLNK(mode) else b"")
        self.nodes[parent].children[name] = ino
        self._touch(parent)
        self.entry_log.append(EntryOp(None, (parent, name), ino))
        return ino

    def create(self, path: str, mode: int) -> int:
        self._count("create")
        return self._new(path, stat.S_IFREG | (mode & 0o7777))

    def mkdir(self, path: str, mode: int) -> int:
        self._count("mkdir")
        return self._new(path, stat.S_IFDIR | (mode & 0o7777))

    def symlink(self, path: str, target: str) -> int:
        self._count("symlink")
        return self._new(path, stat.S_IFLNK | 0o777, target.encode())

    def link(self, path: str, existing: str) -> None:
        self._count("link")
        ino = self.lookup(existing)
        if self.nodes[ino].is_dir:
            raise _err(errno.EPERM)
        parent, name = self.parent_of(path)
        if name in self.nodes[parent].children:
            raise _err(errno.EEXIST)
        self.nodes[parent].children[name] = ino
        self.nodes[ino].nlink += 1
        self.entry_log.append(EntryOp(None, (parent, name), ino))

    def remove(self, path: str, *, folder: bool) -> None:
        self._count("rmdir" if folder else "unlink")
        parent, name = self.parent_of(path)
        ino = self.lookup(path)
        node = self.nodes[ino]
        if folder and not node.is_dir:
            raise _err(errno.ENOTDIR)
        if not folder and node.is_dir:
            raise _err(errno.EISDIR)
        if folder and node.children:
            raise _err(errno.ENOTEMPTY)
        durable = self.durable[parent].children.get(name) == ino
        if durable and not folder and self.durable[ino].data == node.data:
            self.durable_unlinks.append("/" + "/".join(_parts(path)))
        del self.nodes[parent].children[name]
        node.nlink -= 1
        self._touch(parent)
        self.entry_log.append(EntryOp((parent, name), None, ino))

    def rename(self, old: str, new: str) -> None:
        self._count("rename")
        src, old_name = self.parent_of(old)
        dst, new_name = self.parent_of(new)
        ino = self.lookup(old)
        replaced = self.nodes[dst].children.get(new_name)
        if replaced == ino:
            return
        if replaced is not None:
            target = self.nodes[replaced]
            if target.is_dir != self.nodes[ino].is_dir:
                raise _err(errno.EISDIR if target.is_dir else errno.ENOTDIR)
            if target.children:
                raise _err(errno.ENOTEMPTY)
            target.nlink -= 1
        del self.nodes[src].children[old_name]
        self.nodes[dst].children[new_name] = ino
        self._touch(src)
        self._touch(dst)
        self.entry_log.append(EntryOp((src, old_name), (dst, new_name), ino))

    # --- data --------------------------------------------------------------------------------

    def write(self, ino: int, offset: int, data: bytes) -> int:
        self._count("write")
        buf = self.nodes[ino].data
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        self.data_log.setdefault(ino, []).append((offset, bytes(data)))
        self._touch(ino)
        return len(data)

    def truncate(self, ino: int, size: int) -> None:
        self._count("truncate")
        buf = self.nodes[ino].data
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        self.data_log.setdefault(ino, []).append(size)
        self._touch(ino)

    def _touch(self, ino: int) -> None:
        self.nodes[ino].mtime_ns = time.time_ns()

    # --- durability --------------------------------------------------------------------------

    def fsync(self, ino: int) -> None:
        """fsync/fdatasync of a file: its bytes are durable; of a directory: its entries."""
        self._count("fsyncdir" if self.nodes[ino].is_dir else "fsync")
        self._persist(ino)

    def _persist(self, ino: int) -> None:
        node = self.nodes[ino]
        if node.is_dir:
            self._apply_entries(ino, None)
            return
        self.durable[ino].data = bytes(node.data)
        self.durable[ino].mtime_ns = node.mtime_ns
        self.data_log.pop(ino, None)

    def sync(self) -> None:
        """``sync(2)``, or the kernel's writeback after a long while: everything is durable."""
        for ino in list(self.data_log):
            self._persist(ino)
        for ino, node in self.nodes.items():
            if node.is_dir:
                self._apply_entries(ino, None)
        self.data_log.clear()

    def _apply_entries(self, folder: int, limit: int | None) -> None:
        pending = [op for op in self.entry_log if not op.applied and folder in op.dirs]
        for op in pending[:limit]:
            _apply_entry(self.durable, op)
            op.applied = True
        self.entry_log = [op for op in self.entry_log if not op.applied]

    def image(self, model: Model, rng: random.Random) -> Image:
        """What a disk holds if the power is cut now (see the module docstring)."""
        out = {
            ino: DurableNode(d.mode, d.data, dict(d.children), d.mtime_ns)
            for ino, d in self.durable.items()
        }
        if model == "reorder":
            pending = [op for op in self.entry_log if not op.applied]
            persisted: set[int] = set()  # ops already applied through their other folder
            for folder in sorted({d for op in pending for d in op.dirs}):
                ops = [op for op in pending if folder in op.dirs and id(op) not in persisted]
                for op in ops[: _prefix(len(ops), rng)]:
                    _apply_entry(out, op)
                    persisted.add(id(op))
            for ino, log in self.data_log.items():
                if ino in out and log:
                    out[ino].data = _torn(out[ino].data, log, rng)
        for ino, node in out.items():  # metadata is journaled: the image keeps live mtimes
            if ino in self.nodes:
                node.mtime_ns = self.nodes[ino].mtime_ns
        return _reachable(out)


def _apply_entry(image: Image, op: EntryOp) -> None:
    if op.old is not None and op.old[0] in image:
        children = image[op.old[0]].children
        if children.get(op.old[1]) == op.ino:
            del children[op.old[1]]
    if op.new is not None and op.new[0] in image:
        image[op.new[0]].children[op.new[1]] = op.ino


def _torn(durable: bytes, log: list[tuple[int, bytes] | int], rng: random.Random) -> bytes:
    """A random prefix of the pending writes applied, the last one (half the time) cut at a
    random byte."""
    buf = bytearray(durable)
    count = _prefix(len(log), rng)
    for i, change in enumerate(log[:count]):
        if isinstance(change, int):
            del buf[change:]
            buf.extend(bytes(max(0, change - len(buf))))
            continue
        offset, data = change
        if i == count - 1 and data and rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
    return bytes(buf)


def _prefix(pending: int, rng: random.Random) -> int:
    """How many of ``pending`` operations reached the disk: all of them a third of the time
    (the journal committed, as ext4 does every 5 s, or writeback ran), none a third of the
    time, else any number."""
    draw = rng.random()
    if draw < 1 / 3:
        return pending
    if draw < 2 / 3:
        return 0
    return rng.randint(0, pending)


def _reachable(image: Image) -> Image:
    seen: set[int] = set()
    todo = [ROOT]
    while todo:
        ino = todo.pop()
        if ino in seen or ino not in image:
            continue
        seen.add(ino)
        todo += image[ino].children.values()
    out = {ino: image[ino] for ino in seen}
    for node in out.values():
        node.children = {n: i for n, i in node.children.items() if i in out}
    return out


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]
