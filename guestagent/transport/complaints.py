"""One warning per kind of bad input per minute, with the count since the last.

A hostile or broken peer can send thousands of bad lines a second; the log
gets the first of each kind at once, then at most one a minute that says how
many more there were. Time is passed in, so this is testable without a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

INTERVAL = 60.0  # seconds between two lines of one kind

log = logging.getLogger("guestagent.transport")


def printable(text: str) -> str:
    """Peer text made safe for a terminal or journal: control characters escaped."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 0x100
                   else f"\\u{ord(ch):04x}" for ch in text)


class Complaints:
    """Rate-limited warnings about what a peer sent, prefixed with the transport."""

    def __init__(self, transport: str, interval: float = INTERVAL,
                 emit: Callable[[str], None] | None = None) -> None:
        self.transport = transport
        self.interval = interval
        self._emit = emit or (lambda line: log.warning("%s", line))
        self._last: dict[str, float] = {}  # kind -> when its last line was logged
        self._since: dict[str, int] = {}  # kind -> problems not logged since then

    def __call__(self, kind: str, what: str, now: float) -> None:
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._since[kind] = self._since.get(kind, 0) + 1
            return
        more = self._since.pop(kind, 0)
        tail = f" ({more} more since the last report)" if more else ""
        self._last[kind] = now
        self._emit(f"{self.transport}: {kind}: {printable(what)}{tail}")
