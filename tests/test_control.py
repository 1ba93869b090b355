"""The control socket for real: credentials, bounded requests, one-line errors."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading

import pytest

from guestagent.agent.control import MAX_REQUEST, ControlServer, call
from guestagent.errors import GuestagentError


@pytest.fixture
def server(tmp_path):
    seen = []

    def handler(request, peer):
        seen.append((request, peer))
        return {"ok": True, "echo": request["cmd"], "uid": peer.uid}

    srv = ControlServer(str(tmp_path / "ctl.sock"), "root", handler)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if select.select([srv], [], [], 0.05)[0]:
                srv.on_readable()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv, seen
    stop.set()
    t.join()
    srv.close()


def test_root_may_read_and_write(server):
    srv, seen = server
    assert call(srv.path, "status")["echo"] == "status"
    assert call(srv.path, "reload")["echo"] == "reload"
    assert seen[0][1].may_write and seen[0][1].uid == 0


def test_socket_file_is_group_readable_only(server):
    srv, _ = server
    mode = os.stat(srv.path).st_mode & 0o777
    assert mode == 0o660


def test_unknown_command_and_garbage_get_one_line_errors(server):
    srv, _ = server
    with pytest.raises(GuestagentError, match="unknown command 'format-disk'"):
        call(srv.path, "format-disk")
    for payload in (b"not json\n", b"[1,2]\n", b"\n", b"x" * (MAX_REQUEST + 10) + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(srv.path)
            s.sendall(payload)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and reply["error"]


def test_a_client_that_never_sends_does_not_wedge_the_server(server):
    srv, _ = server
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(srv.path)
        assert call(srv.path, "ping")["echo"] == "ping"


def test_other_users_are_refused_by_credentials(server):
    srv, _ = server
    os.chmod(srv.path, 0o666)  # open the file so the credential check is what refuses
    code = ("import sys; from guestagent.agent.control import call\n"
            "try:\n    call(sys.argv[1], 'status')\n"
            "except Exception as e:\n    print(e); sys.exit(3)\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", code, srv.path],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert proc.returncode == 3, proc.stderr
    assert "permission denied" in proc.stdout


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(GuestagentError, match="no agent running"):
        call(str(tmp_path / "none.sock"), "status")


def test_second_server_on_a_live_socket_is_refused(server):
    srv, _ = server
    with pytest.raises(GuestagentError, match="another agent"):
        ControlServer(srv.path, "root", lambda r, p: {"ok": True})
