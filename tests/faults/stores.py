"""Object stores that hang, on 127.0.0.1: real TCP servers the publisher connects to.

``HangingServer("silent")`` accepts connections, reads what comes and never answers;
``HangingServer("slow")`` answers, one byte at a time, a response that never ends, so a client
read timeout never fires. ``FreezingProxy`` forwards to a real server (moto) until a request
matches, and from then on holds that connection the way ``silent`` does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class _Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.connections = 0
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> _Server:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Close the port and every connection, so that a real server can take the port."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HangingServer(_Server):
    def __init__(self, port: int, mode: str) -> None:
        assert mode in ("silent", "slow")
        super().__init__(port)
        self.mode = mode

    def serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(0.2)
            if self.mode == "slow":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(65536) and self.mode == "silent":
                        return
                if self.mode == "slow":
                    conn.sendall(b"a")  # a header line that never ends, 5 bytes a second


class FreezingProxy(_Server):
    """Forwards to ``upstream_port``; a client chunk for which ``freeze(chunk)`` is true is not
    forwarded, and nothing more is on that connection (the server never sees the request)."""

    def __init__(self, port: int, upstream_port: int, freeze: Callable[[bytes], bool]) -> None:
        super().__init__(port)
        self.upstream_port = upstream_port
        self.freeze = freeze
        self.frozen = threading.Event()

    def serve(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._open.append(upstream)
        threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                if self.frozen.is_set() or self.freeze(chunk):
                    self.frozen.set()
                    while not self._stop.is_set():
                        time.sleep(0.1)
                    return
                upstream.sendall(chunk)
            upstream.shutdown(socket.SHUT_WR)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
