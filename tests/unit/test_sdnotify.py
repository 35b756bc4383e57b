"""The systemd notify protocol against a real Unix datagram socket (path and abstract)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ckptd.service.sdnotify import Notifier, watchdog_interval


def receive(sock: socket.socket) -> str:
    sock.settimeout(2)
    return sock.recv(4096).decode()


def test_path_socket(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        notifier = Notifier(address)
        assert notifier.ready("watching 3 work_dir(s)")
        assert receive(server) == "READY=1\nSTATUS=watching 3 work_dir(s)"
        assert notifier.watchdog()
        assert receive(server) == "WATCHDOG=1"
        assert notifier.status("busy")
        assert receive(server) == "STATUS=busy"
        assert notifier.reloading()
        message = receive(server)
        assert message.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert notifier.stopping()
        assert receive(server) == "STOPPING=1"
        notifier.close()


def test_abstract_socket() -> None:
    name = f"ckptd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier("@" + name)
        assert notifier.enabled and notifier.watchdog()
        assert receive(server) == "WATCHDOG=1"


def test_without_systemd_everything_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False


def test_gone_socket_does_not_raise(tmp_path: Path) -> None:
    assert Notifier(str(tmp_path / "missing")).ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
