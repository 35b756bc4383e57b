"""``tests.faults.powerfs`` mounted with FUSE (mfusepy over libfuse 3), and its client.

The server is its own process (``python -m tests.faults.powerfs_fuse MOUNTPOINT CONTROL
[IMAGE]``), single-threaded, so every operation reaches the model in the order the kernel sent
it. Without FUSE's writeback cache every ``write(2)`` is a request, so the live tree is exactly
what processes see. A control socket (``multiprocessing.connection``) lets the test ``sync``
everything, read operation counts, and ``cut`` the power: from then on every operation fails
with EIO (the machine is dead; nothing later can become durable) and the image that survives is
pickled to a file. ``PowerMount.reboot`` unmounts and mounts a fresh server on that image.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, TypeVar

from tests.faults.powerfs import Image, Model, PowerFS

AUTHKEY = b"powerfs"
F = TypeVar("F", bound=Callable[..., Any])


def unavailable() -> str:
    """Why FUSE cannot be used here ("" when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy or libfuse is missing ({exc}); pip install mfusepy, apt-get install fuse3"
    return ""


def _op(method: F) -> F:
    @functools.wraps(method)
    def run(self: PowerOps, *args: Any) -> Any:
        with self.mutex:
            if self.cut:
                raise OSError(errno.EIO, "the power is cut")
            return method(self, *args)

    return run  # type: ignore[return-value]


class PowerOps:
    """The FUSE operations over one ``PowerFS`` (paths, or open handles when a file is gone)."""

    use_ns = True

    def __init__(self, fs: PowerFS) -> None:
        self.fs = fs
        self.mutex = threading.Lock()  # not .lock: FUSE's lock() op
        self.cut = False
        self.handles: dict[int, int] = {}  # fh -> ino
        self.next_fh = 1

    def _ino(self, path: str | None, fh: int | None = None) -> int:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        assert path is not None
        return self.fs.lookup(path)

    def _handle(self, ino: int) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = ino
        return fh

    @_op
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        ino = self._ino(path, fh)
        node = self.fs.nodes[ino]
        size = len(node.data)
        return {
            "st_ino": ino,
            "st_mode": node.mode,
            "st_nlink": 2 if node.is_dir else node.nlink,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_atime": node.mtime_ns,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
        }

    @_op
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # with use_ino, an entry without its inode number would read as deleted (d_ino 0)
        ino = self._ino(path)
        entries = [(".", ino), ("..", ino), *self.fs.nodes[ino].children.items()]
        return [(n, {"st_ino": i, "st_mode": self.fs.nodes[i].mode}, 0) for n, i in entries]

    @_op
    def opendir(self, path: str) -> int:
        return self._handle(self._ino(path))

    @_op
    def releasedir(self, path: str | None, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    @_op
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync(self._ino(path, fh))
        return 0

    @_op
    def mkdir(self, path: str, mode: int) -> int:
        self.fs.mkdir(path, mode)
        return 0

    @_op
    def rmdir(self, path: str) -> int:
        self.fs.remove(path, folder=True)
        return 0

    @_op
    def unlink(self, path: str) -> int:
        self.fs.remove(path, folder=False)
        return 0

    @_op
    def rename(self, old: str, new: str) -> int:
        self.fs.rename(old, new)
        return 0

    @_op
    def symlink(self, path: str, target: str) -> int:
        self.fs.symlink(path, target)
        return 0

    @_op
    def readlink(self, path: str) -> str:
        node = self.fs.nodes[self._ino(path)]
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return node.data.decode()

    @_op
    def link(self, path: str, existing: str) -> int:
        self.fs.link(path, existing)
        return 0

    @_op
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        return self._handle(self.fs.create(path, mode))

    @_op
    def open(self, path: str, flags: int) -> int:
        ino = self._ino(path)
        if flags & os.O_TRUNC:
            self.fs.truncate(ino, 0)
        return self._handle(ino)

    @_op
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return bytes(self.fs.nodes[self._ino(path, fh)].data[offset : offset + size])

    @_op
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(self._ino(path, fh), offset, data)

    @_op
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self.fs.truncate(self._ino(path, fh), length)
        return 0

    @_op
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync(self._ino(path, fh))
        return 0

    @_op
    def flush(self, path: str | None, fh: int) -> int:
        return 0

    @_op
    def release(self, path: str | None, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    @_op
    def chmod(self, path: str | None, mode: int) -> int:
        node = self.fs.nodes[self._ino(path)]
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        self.fs.durable[self._ino(path)].mode = node.mode  # metadata is not what is tested
        return 0

    @_op
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        return 0

    @_op
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        node = self.fs.nodes[self._ino(path)]
        node.mtime_ns = times[1] if times else time.time_ns()
        return 0

    @_op
    def access(self, path: str, amode: int) -> int:
        self._ino(path)
        return 0

    @_op
    def statfs(self, path: str) -> dict[str, int]:
        blocks = 1 << 24  # 64 GiB of 4 KiB blocks, nearly all free: no watermark fires
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": blocks - 1024,
                "f_bavail": blocks - 1024, "f_files": 1 << 20, "f_ffree": 1 << 20,
                "f_namemax": 255}  # fmt: skip

    # --- control -----------------------------------------------------------------------------

    def serve(self, conn: Connection) -> None:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            with self.mutex:
                conn.send(self._control(*request))

    def _control(self, command: str, *args: Any) -> Any:
        if command == "sync":
            self.fs.sync()
            return None
        if command == "counts":
            return dict(self.fs.counts)
        if command == "pending":  # for diagnosis: the entry operations not yet durable
            return [(op.old, op.new, op.ino) for op in self.fs.entry_log if not op.applied]
        if command == "cut":
            model, seed, path = args
            self.cut = True
            image = self.fs.image(model, random.Random(seed))
            Path(path).write_bytes(pickle.dumps(image))
            return dict(self.fs.counts), list(self.fs.durable_unlinks)
        if command == "what_if":  # the images cuts with these seeds would leave, no cut
            model, seeds, paths = args
            for seed, path in zip(seeds, paths, strict=True):
                Path(path).write_bytes(pickle.dumps(self.fs.image(model, random.Random(seed))))
            return list(self.fs.durable_unlinks)
        raise ValueError(command)


def serve(mountpoint: str, control: str, image_path: str | None) -> None:
    import mfusepy

    image: Image | None = None
    if image_path:
        image = pickle.loads(Path(image_path).read_bytes())
    ops = PowerOps(PowerFS(image))
    listener = Listener(control, authkey=AUTHKEY)

    def accept() -> None:
        while True:
            conn = listener.accept()
            threading.Thread(target=ops.serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    mfusepy.FUSE(
        ops, mountpoint, foreground=True, nothreads=True, use_ino=True, hard_remove=True,
        fsname="powerfs", subtype="powerfs",
    )  # fmt: skip


class PowerMount:
    """A mounted ``PowerFS``: ``sync``, ``cut`` the power, ``reboot`` on what survived."""

    def __init__(self, mountpoint: Path, scratch: Path) -> None:
        self.mountpoint = mountpoint
        self.scratch = scratch  # outside the mount: control socket, images, server log
        self.lives = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.image: Path | None = None
        mountpoint.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)

    def mount(self) -> PowerMount:
        self.lives += 1
        control = str(self.scratch / f"control-{self.lives}")
        argv = [sys.executable, "-m", "tests.faults.powerfs_fuse", str(self.mountpoint), control]
        if self.image is not None:
            argv.append(str(self.image))
        log = open(self.scratch / "server.log", "ab")  # noqa: SIM115 - the server's lifetime
        repo = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=repo)
        log.close()
        deadline = time.monotonic() + 20
        while not (os.path.ismount(self.mountpoint) and os.path.exists(control)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"powerfs did not mount: {self.server_log()}")
            time.sleep(0.01)
        self.conn = Client(control, authkey=AUTHKEY)
        return self

    def server_log(self) -> str:
        return (self.scratch / "server.log").read_text(errors="replace")[-4000:]

    def _ask(self, *request: Any) -> Any:
        assert self.conn is not None
        self.conn.send(request)
        return self.conn.recv()

    def sync(self) -> None:
        self._ask("sync")

    def counts(self) -> dict[str, int]:
        return self._ask("counts")

    def cut(self, model: Model, seed: int) -> tuple[dict[str, int], list[str]]:
        """The power goes out now: the operation counts of this life, and the paths (from the
        mountpoint, '/'-rooted) an unlink removed while their name and bytes were durable."""
        self.image = self.scratch / f"image-{self.lives}.pickle"
        return self._ask("cut", model, seed, str(self.image))

    def what_if(self, model: Model, seeds: list[int]) -> tuple[list[Path], list[str]]:
        """The images cuts with ``seeds`` would leave now (for ``reboot(image)``), without
        cutting; and the durable unlinks so far (see ``cut``)."""
        paths = [self.scratch / f"what-if-{self.lives}-{seed}.pickle" for seed in seeds]
        unlinked = self._ask("what_if", model, seeds, [str(p) for p in paths])
        return paths, unlinked

    def unmount(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None
        if self.proc is None:
            return
        tool = shutil.which("fusermount3") or "fusermount"
        done = subprocess.run([tool, "-u", str(self.mountpoint)], capture_output=True)
        if done.returncode != 0:  # a killed process's open file: detach it lazily
            subprocess.run([tool, "-uz", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reboot(self, image: Path | None = None) -> None:
        """Unmount the dead filesystem and mount what survived the cut (or ``image``)."""
        self.unmount()
        self.image = image or self.image
        self.mount()

    def __enter__(self) -> PowerMount:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
