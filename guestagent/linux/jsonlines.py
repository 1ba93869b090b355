"""JSON lines over unix stream sockets: one listener and one client for every such socket.

The listener only ever replaces a *stale* socket: a path that is a socket and
on which nobody answers. A regular file, a directory, anything else, or a
socket someone serves is refused with one line naming the path, so a typo in
a configured path can never delete a file. Reads are bounded: a line longer
than the limit is an error, never unbounded memory. Peers are identified by
the kernel (SO_PEERCRED), not by anything they say.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from guestagent.errors import GuestagentError

MAX_LINE = 64 * 1024
_CREDS = struct.Struct("3i")


class SocketInUse(GuestagentError):
    """Someone answers on the path: another instance is running."""


class LineTooLong(GuestagentError):
    """The peer sent more than the limit without a newline."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who is at the other end, as the kernel recorded it at connect time."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    return PeerCredentials(*_CREDS.unpack(raw))


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _answers(path: str) -> bool:
    """Whether a listener accepts on path; ECONNREFUSED is the one sign of a stale socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError as err:
            if err.errno == errno.EAGAIN:  # backlog full: someone listens, and is busy
                return True
            raise
    return True


def clear_stale_socket(path: str, what: str) -> None:
    """Make way for a new listener at path, or raise a one-line GuestagentError.

    Nothing there: fine. A socket nobody answers on: unlinked. A live socket:
    SocketInUse. Anything else is left alone and refused.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise GuestagentError(f"cannot use {what} {path}: {_reason(err)}") from None
    if not stat.S_ISSOCK(mode):
        raise GuestagentError(f"refusing to replace {path} with the {what}: it exists and is "
                              "not a socket")
    try:
        live = _answers(path)
    except OSError as err:
        raise GuestagentError(f"cannot probe {what} {path}: {_reason(err)}") from None
    if live:
        raise SocketInUse(f"another process is listening on {what} {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # a peer cleaning up its own stale socket got there first
    except OSError as err:
        raise GuestagentError(f"cannot remove stale {what} {path}: {_reason(err)}") from None


class JsonLineListener:
    """A non-blocking unix listener with the file's mode and group set before anyone connects.

    ``group`` (a name) gets read access through the file; when it does not exist
    the socket stays owner-only and ``notes`` says so, once, for the caller to log.
    """

    def __init__(self, path: str, what: str, *, mode: int = 0o660, group: str | None = None,
                 backlog: int = 16) -> None:
        self.path = path
        self.notes: tuple[str, ...] = ()
        gid = None
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                self.notes = (f"group {group!r} does not exist: {what} {path} is "
                              f"accessible to its owner only",)
        self.gid = gid
        clear_stale_socket(path, what)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # no window in which others may connect
        try:
            self.sock.bind(path)
            if gid is not None:
                os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
            if gid is not None or group is None:
                os.chmod(path, mode)
            self.sock.listen(backlog)
            made = os.stat(path)
        except OSError as err:
            self.sock.close()
            raise GuestagentError(f"cannot bind {what} {path}: {_reason(err)}") from None
        finally:
            os.umask(old)
        self.sock.setblocking(False)
        self._identity = (made.st_dev, made.st_ino)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        """One pending connection (blocking, without timeout), or None when none waits."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(True)
        return conn

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        try:
            found = os.lstat(self.path)
            ours = (found.st_dev, found.st_ino) == self._identity
        except OSError:
            ours = False
        self.sock.close()
        if ours:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class LineReader:
    """Newline-framed reads from a blocking socket, never buffering more than max_line."""

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE) -> None:
        self.sock = sock
        self.max_line = max_line
        self._buf = b""

    def read_line(self, partial: bool = False) -> bytes | None:
        """The next line without its newline; None at end of stream.

        With ``partial``, bytes the peer sent before closing without a newline
        count as a last line. LineTooLong when over max_line bytes arrive
        without a newline; socket errors and timeouts propagate as OSError.
        """
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 1:]
                return line
            if len(self._buf) > self.max_line:
                raise LineTooLong(f"line over {self.max_line} bytes")
            chunk = self.sock.recv(min(65536, self.max_line + 1 - len(self._buf)))
            if not chunk:
                rest, self._buf = self._buf, b""
                return rest if partial and rest else None
            self._buf += chunk


def encode_line(doc: Any, compact: bool = False) -> bytes:
    if compact:
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    return json.dumps(doc).encode() + b"\n"


class JsonLineClient:
    """A blocking connection that sends JSON lines and reads bounded ones; OSError on IO."""

    def __init__(self, path: str, timeout: float, max_line: int = MAX_LINE) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.reader = LineReader(self.sock, max_line)

    def send(self, doc: Any) -> None:
        self.sock.sendall(encode_line(doc))

    def read_line(self, partial: bool = False) -> bytes | None:
        return self.reader.read_line(partial)

    def peer(self) -> PeerCredentials:
        return peer_credentials(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> JsonLineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
