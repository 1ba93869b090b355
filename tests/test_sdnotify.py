"""sd_notify over a real datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket

from guestagent.linux.sdnotify import Notifier


def test_messages_reach_the_notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval == 5.0
        assert n.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_names_are_supported():
    name = f"guestagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("busy")
        assert sock.recv(4096) == b"STATUS=busy"


def test_outside_systemd_nothing_is_sent():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None and not n.ready("x")


def test_watchdog_meant_for_another_process_is_ignored():
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "100",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
    assert not n.ready("x"), "a vanished socket is not an error"


def test_a_notify_socket_nobody_reads_never_blocks_the_sender(tmp_path):
    # A supervisor that stops reading fills the socket's queue; a blocking send
    # would then hang the daemon's loop (and with it the watchdog it feeds).
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        results = [n.status("x" * 200) for _ in range(5000)]
        assert results[0] and not results[-1]
