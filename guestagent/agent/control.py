"""The control socket: one JSON request line in, one JSON response line out.

Who may do what is decided from the peer's credentials (SO_PEERCRED), not
from anything the client says: root may change things, members of the
control group may read, everyone else is refused. The socket file itself is
root:group 0660, so others cannot even connect; the credential check is the
second fence.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guestagent.agent.config import RUN_DIR
from guestagent.errors import GuestagentError
from guestagent.linux.jsonlines import (
    JsonLineClient,
    JsonLineListener,
    LineReader,
    LineTooLong,
    SocketInUse,
    encode_line,
    peer_credentials,
)

MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 16 << 20  # a status document of thousands of threads fits
CLIENT_TIMEOUT = 0.5  # a client that does not send its line in time is dropped
READ_COMMANDS = frozenset({"status", "hints", "capacity", "ping"})
WRITE_COMMANDS = frozenset({"reload"})


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    may_read: bool
    may_write: bool


Handler = Callable[[dict, Peer], dict]


def supplementary_groups(pid: int) -> frozenset[int]:
    """The peer's supplementary groups, from /proc/<pid>/status ("Groups:" line)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


def peer_of(conn: socket.socket, read_gid: int | None) -> Peer:
    creds = peer_credentials(conn)
    admin = creds.uid == 0
    member = read_gid is not None and (creds.gid == read_gid
                                       or read_gid in supplementary_groups(creds.pid))
    return Peer(creds.pid, creds.uid, creds.gid, may_read=admin or member, may_write=admin)


class ControlServer:
    """Non-blocking listener driven by the daemon's event loop.

    ``notes`` holds what the daemon should say once (e.g. a missing group).
    """

    def __init__(self, path: str, group: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        if os.path.dirname(path) == RUN_DIR:
            os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        try:
            self.listener = JsonLineListener(path, "control socket", mode=0o660, group=group)
        except SocketInUse:
            raise GuestagentError(f"another agent is listening on {path}") from None
        self.read_gid = self.listener.gid
        self.notes = self.listener.notes

    def fileno(self) -> int:
        return self.listener.fileno()

    def on_readable(self) -> None:
        """Serve every pending connection, each with one bounded request."""
        while True:
            conn = self.listener.accept()
            if conn is None:
                return
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            peer = peer_of(conn, self.read_gid)
            try:
                line = LineReader(conn, MAX_REQUEST).read_line(partial=True) or None
            except LineTooLong:
                line = None
            conn.sendall(encode_line(self.respond(line, peer), compact=True))
        except OSError:
            pass  # client went away or stalled: its problem, not the daemon's

    def respond(self, line: bytes | None, peer: Peer) -> dict:
        if not peer.may_read:
            return {"ok": False, "error": "permission denied: not root and not in the "
                    "control group"}
        if line is None:
            return {"ok": False, "error": f"request missing or over {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "request needs a \"cmd\" string"}
        cmd = request["cmd"]
        if cmd in WRITE_COMMANDS and not peer.may_write:
            return {"ok": False, "error": f"permission denied: {cmd} needs root"}
        if cmd not in READ_COMMANDS | WRITE_COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return self.handler(request, peer)

    def close(self) -> None:
        self.listener.close()


def call(path: str, cmd: str, timeout: float = 3.0, **args: Any) -> dict:
    """Send one request to the agent; raise GuestagentError with a one-line reason."""
    try:
        with JsonLineClient(path, timeout, MAX_RESPONSE) as client:
            client.send({"cmd": cmd, **args})
            data = client.read_line(partial=True) or b""
    except (FileNotFoundError, ConnectionRefusedError):
        raise GuestagentError(f"no agent running (nothing listens on {path})") from None
    except PermissionError:
        raise GuestagentError(f"permission denied on {path}: need root or the "
                              "control group") from None
    except socket.timeout:
        raise GuestagentError(f"the agent did not answer on {path} within {timeout:g} s") \
            from None
    except LineTooLong:
        raise GuestagentError(f"the agent sent a reply over {MAX_RESPONSE} bytes on {path}") \
            from None
    try:
        response = json.loads(data)
    except ValueError:
        raise GuestagentError(f"the agent sent a malformed reply on {path}") from None
    if not isinstance(response, dict):
        raise GuestagentError(f"the agent sent a malformed reply on {path}")
    if not response.get("ok", False):
        raise GuestagentError(str(response.get("error", "request failed")))
    return response
