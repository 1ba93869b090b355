"""The control socket: one JSON request line in, one JSON response line out.

Who may do what is decided from the peer's credentials (SO_PEERCRED), not
from anything the client says: root may change things, members of the
control group may read, everyone else is refused. The socket file itself is
root:group 0660, so others cannot even connect; the credential check is the
second fence.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guestagent.errors import GuestagentError

MAX_REQUEST = 64 * 1024
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


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


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
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    admin = uid == 0
    member = read_gid is not None and (gid == read_gid or read_gid in supplementary_groups(pid))
    return Peer(pid, uid, gid, may_read=admin or member, may_write=admin)


class ControlServer:
    """Non-blocking listener driven by the daemon's event loop."""

    def __init__(self, path: str, group: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.read_gid = group_id(group)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.exists(path) and _is_live(path):
            raise GuestagentError(f"another agent is listening on {path}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        if self.read_gid is not None:
            os.chown(path, 0 if os.geteuid() == 0 else -1, self.read_gid)
            os.chmod(path, 0o660)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.refused = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        """Serve every pending connection, each with one bounded request."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            peer = peer_of(conn, self.read_gid)
            line = _read_line(conn)
            response = self.respond(line, peer)
            conn.sendall(json.dumps(response, separators=(",", ":")).encode() + b"\n")
        except OSError:
            pass  # client went away or stalled: its problem, not the daemon's

    def respond(self, line: bytes | None, peer: Peer) -> dict:
        if not peer.may_read:
            self.refused += 1
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
            self.refused += 1
            return {"ok": False, "error": f"permission denied: {cmd} needs root"}
        if cmd not in READ_COMMANDS | WRITE_COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return self.handler(request, peer)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _read_line(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    line = data.split(b"\n", 1)[0]
    return line or None


def _is_live(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(path)
        return True
    except OSError:
        return False


def call(path: str, cmd: str, timeout: float = 3.0, **args: Any) -> dict:
    """Send one request to the agent; raise GuestagentError with a one-line reason."""
    payload = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(payload)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise GuestagentError(f"no agent running (nothing listens on {path})") from None
    except PermissionError:
        raise GuestagentError(f"permission denied on {path}: need root or the "
                              "control group") from None
    except socket.timeout:
        raise GuestagentError(f"the agent did not answer on {path} within {timeout:g} s") \
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
