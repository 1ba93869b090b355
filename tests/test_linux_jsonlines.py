"""The shared JSON-lines unix sockets: what the listener replaces, refuses, and reads."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from guestagent.agent.control import ControlServer
from guestagent.errors import GuestagentError
from guestagent.linux.jsonlines import (
    JsonLineClient,
    JsonLineListener,
    LineReader,
    LineTooLong,
    SocketInUse,
    peer_credentials,
)


def test_a_regular_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "guestagent.toml"
    path.write_text("[control]\n")
    with pytest.raises(GuestagentError) as err:
        JsonLineListener(str(path), "control socket")
    assert str(err.value) == (f"refusing to replace {path} with the control socket: it exists "
                              "and is not a socket")
    assert path.read_text() == "[control]\n"


def test_the_control_server_keeps_a_file_it_was_pointed_at(tmp_path):
    path = tmp_path / "precious"
    path.write_bytes(b"data")
    with pytest.raises(GuestagentError, match="not a socket"):
        ControlServer(str(path), "root", lambda r, p: {"ok": True})
    assert path.read_bytes() == b"data"


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(GuestagentError, match=f"refusing to replace {tmp_path}"):
        JsonLineListener(str(tmp_path), "status socket")
    assert tmp_path.is_dir()


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    first = JsonLineListener(path, "status socket")
    with pytest.raises(SocketInUse, match=f"status socket {path}"):
        JsonLineListener(path, "status socket")
    first.sock.close()  # dies without clean-up: the file stays, nobody answers
    assert os.path.exists(path)
    second = JsonLineListener(path, "status socket")
    try:
        with JsonLineClient(path, 5.0):
            assert second.accept() is not None
    finally:
        second.close()
    assert not os.path.exists(path)


def test_bind_errors_name_the_path(tmp_path):
    path = str(tmp_path / "missing" / "ctl.sock")
    with pytest.raises(GuestagentError) as err:
        JsonLineListener(path, "control socket")
    assert str(err.value) == f"cannot bind control socket {path}: No such file or directory"


def test_mode_and_group_and_a_missing_group_said_once(tmp_path):
    path = str(tmp_path / "a.sock")
    srv = JsonLineListener(path, "control socket", mode=0o660, group="root")
    assert (os.stat(path).st_mode & 0o777, os.stat(path).st_gid, srv.notes) == (0o660, 0, ())
    srv.close()
    srv = JsonLineListener(path, "control socket", group="no-such-group-guestagent")
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert srv.notes == (f"group 'no-such-group-guestagent' does not exist: control socket "
                             f"{path} is accessible to its owner only",)
    finally:
        srv.close()


def test_close_leaves_a_successor_socket_alone(tmp_path):
    path = str(tmp_path / "a.sock")
    old = JsonLineListener(path, "control socket")
    os.unlink(path)
    new = JsonLineListener(path, "control socket")
    old.close()
    assert os.path.exists(path)
    new.close()
    assert not os.path.exists(path)


def test_reads_are_bounded_and_credentials_are_the_kernels():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        reader = LineReader(b, max_line=16)
        a.sendall(b'{"x": 1}\n{"y"')
        assert reader.read_line() == b'{"x": 1}'
        def flood() -> None:
            try:
                a.sendall(b"z" * (1 << 20))
            except OSError:
                pass  # the reader gave up and closed: expected

        sender = threading.Thread(target=flood)
        sender.start()
        with pytest.raises(LineTooLong):
            reader.read_line()
        assert len(reader._buf) <= 17  # never buffered the megabyte
        b.close()
        sender.join(30)
    c, d = socket.socketpair()
    with c, d:
        creds = peer_credentials(d)
        assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.geteuid(), os.getegid())
        c.sendall(b"tail")
        c.shutdown(socket.SHUT_WR)
        d.settimeout(5)
        assert LineReader(d).read_line(partial=True) == b"tail"
