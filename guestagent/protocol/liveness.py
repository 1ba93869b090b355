"""Link state and peer liveness, shared by the channel and the region.

Neither needs IO: the heartbeat watch is told when the peer's heartbeat
moved and by what clock (time is always passed in).
"""

from __future__ import annotations

import enum

from guestagent.protocol.model import STALE_AFTER

__all__ = ["HeartbeatWatch", "LinkState"]


class LinkState(str, enum.Enum):
    """Where a session stands with its peer; the value is what status shows."""

    DOWN = "down"  # no peer, or the peer went silent
    NEGOTIATING = "negotiating"  # connected, no verdict yet for this epoch
    UP = "up"  # accepted: hints and capacity flow
    REFUSED = "refused"  # the host refused this guest (or the guest the host)

    def __str__(self) -> str:  # "up", not "LinkState.UP", on every Python
        return self.value

    __format__ = str.__format__


class HeartbeatWatch:
    """When a peer's heartbeat last advanced, by our own clock (no shared clock)."""

    def __init__(self, stale_after: float = STALE_AFTER) -> None:
        self.stale_after = stale_after
        self.value: int | None = None
        self.last_change: float | None = None

    def observe(self, value: int, now: float) -> None:
        if value != self.value:
            self.value, self.last_change = value, now

    def heard(self, now: float) -> None:
        self.last_change = now

    def forget(self) -> None:
        self.value = self.last_change = None

    def stale(self, now: float) -> bool:
        return self.last_change is None or now - self.last_change > self.stale_after
