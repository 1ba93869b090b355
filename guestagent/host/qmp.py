"""A minimal QMP client: enough to ask QEMU for its vCPU threads."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from guestagent.errors import GuestagentError
from guestagent.linux.jsonlines import JsonLineClient, LineTooLong

MAX_REPLY = 1 << 20  # a query-cpus-fast reply for hundreds of vCPUs fits easily


class QmpClient:
    """Blocking QMP over a unix socket; every failure is a one-line GuestagentError."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        try:
            self._conn = JsonLineClient(path, timeout, MAX_REPLY)
        except OSError as err:
            raise GuestagentError(f"{path}: cannot talk QMP: {err.strerror or err}") from None
        try:
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise GuestagentError(f"{path}: not a QMP socket (no greeting)")
            self.execute("qmp_capabilities")
        except OSError as err:
            self._conn.close()
            raise GuestagentError(f"{path}: cannot talk QMP: {err.strerror or err}") from None
        except GuestagentError:
            self._conn.close()
            raise

    def peer_pid(self) -> int:
        """The pid of the process serving the socket (QEMU), from SO_PEERCRED."""
        return self._conn.peer().pid

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._conn.send(request)
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
        try:
            line = self._conn.read_line()
        except LineTooLong:
            raise GuestagentError(f"{self.path}: QMP reply too large") from None
        if line is None:
            raise GuestagentError(f"{self.path}: QMP connection closed")
        try:
            msg = json.loads(line)
        except ValueError:
            raise GuestagentError(f"{self.path}: QMP sent malformed JSON") from None
        if not isinstance(msg, dict):
            raise GuestagentError(f"{self.path}: QMP sent a non-object message")
        return msg

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
