"""A minimal QMP client: enough to ask QEMU for its vCPU threads."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

from guestagent.errors import GuestagentError

MAX_REPLY = 1 << 20  # a query-cpus-fast reply for hundreds of vCPUs fits easily


class QmpClient:
    """Blocking QMP over a unix socket; every failure is a one-line GuestagentError."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(path)
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise GuestagentError(f"{path}: not a QMP socket (no greeting)")
            self.execute("qmp_capabilities")
        except OSError as err:
            self._sock.close()
            raise GuestagentError(f"{path}: cannot talk QMP: {err.strerror or err}") from None
        except GuestagentError:
            self._sock.close()
            raise

    def peer_pid(self) -> int:
        """The pid of the process serving the socket (QEMU), from SO_PEERCRED."""
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._read_message()
            if "event" in msg:
                continue  # asynchronous events may arrive before the reply
            if "error" in msg:
                desc = msg["error"].get("desc", "error") if isinstance(msg["error"], dict) else ""
                raise GuestagentError(f"{self.path}: {command}: {desc}")
            if "return" in msg:
                return msg["return"]
            raise GuestagentError(f"{self.path}: {command}: unexpected reply")

    def _read_message(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise GuestagentError(f"{self.path}: QMP connection closed")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise GuestagentError(f"{self.path}: QMP reply too large")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise GuestagentError(f"{self.path}: QMP sent malformed JSON") from None
        if not isinstance(msg, dict):
            raise GuestagentError(f"{self.path}: QMP sent a non-object message")
        return msg

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
