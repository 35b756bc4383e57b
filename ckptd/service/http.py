"""The HTTP endpoint of ``ckptd run --metrics-addr``: ``/metrics`` for Prometheus and
``/healthz`` for liveness probes, served from daemon threads of the standard library's server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ckptd import __version__


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); ``[v6]:PORT`` for IPv6; an empty host means every
    interface. Raises ValueError with the allowed forms."""
    allowed = "expected HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9464"
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics address {address!r}: {allowed}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"metrics address {address!r}: {allowed}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"metrics address {address!r}: put an IPv6 host in brackets; {allowed}")
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, family: socket.AddressFamily, sockaddr: Any, handler: type) -> None:
        self.address_family = family
        super().__init__(sockaddr, handler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6 and sockaddr[0] == "::":
                # ":PORT" means every interface: IPv4 as well, where the kernel allows it.
                with contextlib.suppress(OSError):
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise


def _bind(host: str, port: int, handler: type) -> _Server:
    if not host:
        if socket.has_ipv6:
            with contextlib.suppress(OSError):
                return _Server(socket.AF_INET6, ("::", port), handler)
        return _Server(socket.AF_INET, ("0.0.0.0", port), handler)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    error: OSError | None = None
    for family, _type, _proto, _name, sockaddr in infos:
        try:
            return _Server(family, sockaddr, handler)
        except OSError as exc:
            error = exc
    raise error or OSError(f"cannot bind {host}:{port}")


class MetricsServer:
    """The running HTTP listener; ``.port`` is the bound port, ``.stop()`` closes it."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, str]],
    ) -> None:
        host, port = parse_address(address)
        handler = type(
            "Handler", (_Handler,), {"registry": registry, "health": staticmethod(health)}
        )
        self._server = _bind(host, port, handler)
        bound = self._server.socket.getsockname()
        self.host: str = str(bound[0])
        self.port: int = int(bound[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="ckptd-metrics",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    health: Callable[[], tuple[bool, str]]
    server_version = f"ckptd/{__version__}"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.registry)
            except Exception as exc:  # a collector failed: say so rather than drop the line
                self._send(500, f"collecting metrics failed: {exc}\n".encode(), head=head)
                return
            self._send(200, body, content_type, head=head)
        elif path == "/healthz":
            try:
                ok, text = self.health()
            except Exception as exc:
                ok, text = False, f"health check failed: {exc}"
            self._send(200 if ok else 503, (text.rstrip("\n") + "\n").encode(), head=head)
        else:
            self._send(404, b"not found: try /metrics or /healthz\n", head=head)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head: bool,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape on stderr
