"""Links: one event-loop-friendly API for both ends, whatever the transport.

A link never blocks and starts no threads. The owner's loop, each round:
calls fileno() (it changes with the connection state; None means "no fd to
poll, just call tick() by its deadline"), polls that fd for input, calls
on_readable(now) when it is readable, and calls tick(now) before the deadline
tick() last returned. publish()/publish_capacity() coalesce: only the newest
table is kept until it can be sent. Time is always passed in (monotonic
seconds); no link reads a clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from guestagent.protocol import Counters, Feature, LinkState, PeerState, VcpuCapacity, VcpuHint

ALL_FEATURES = Feature.CAPACITY | Feature.COLOCATION | Feature.NICE_HINTS | Feature.DEADLINE_HINTS


def new_epoch() -> int:
    """A random non-zero epoch that every JSON peer can hold exactly (< 2**53)."""
    return secrets.randbelow((1 << 53) - 1) + 1


@dataclass(frozen=True)
class LinkErrors:
    """What went wrong so far, counted, never raised."""

    bad_lines: int = 0  # channel: malformed or invalid lines dropped
    dropped_lines: int = 0  # channel: oversized lines dropped
    unknown: int = 0  # channel: messages of unknown type ignored
    stale: int = 0  # channel: lines discarded while resynchronising
    resets: int = 0  # channel: 0xFF parser resets received
    busy_reads: int = 0  # region: lines still changing after every retry
    bad_region: int = 0  # region: header unusable when looked at
    io_errors: int = 0  # failed opens, connects, reads and writes
    peer_errors: int = 0  # error messages the peer sent us

    @staticmethod
    def of(counters: Counters, **more: int) -> LinkErrors:
        return LinkErrors(counters.bad_lines, counters.dropped_lines, counters.unknown,
                          counters.stale, counters.resets, **more)


@dataclass(frozen=True)
class GuestView:
    """What the guest knows of the host, at one moment."""

    kind: str  # "region" | "channel"
    link: LinkState
    host_state: PeerState
    features: Feature  # in use (AND of both sides) once up
    capacity: tuple[VcpuCapacity, ...] | None  # None: unknown (no host, stale, not offered)
    capacity_age: float | None  # seconds since the capacity was received
    acked_generation: int  # newest hint generation the host acted on
    last_heard: float | None  # when the host's heartbeat last advanced (own clock)
    reason: str  # why refused or down, one line; "" otherwise
    errors: LinkErrors


@dataclass(frozen=True)
class HostView:
    """What the host knows of the guest, at one moment."""

    kind: str
    link: LinkState
    guest_state: PeerState
    features: Feature
    generation: int  # generation of `hints`
    hints: tuple[VcpuHint, ...]  # full table; () before the guest said anything
    last_heard: float | None  # when the guest's heartbeat last advanced (own clock)
    reason: str
    errors: LinkErrors


class GuestLink(Protocol):
    kind: str

    def fileno(self) -> int | None: ...
    def on_readable(self, now: float) -> None: ...
    def publish(self, hints: Sequence[VcpuHint], generation: int, now: float) -> None: ...
    def set_state(self, state: PeerState, now: float) -> None: ...
    def tick(self, now: float) -> float | None: ...
    def view(self) -> GuestView: ...
    def close(self) -> None: ...


class HostLink(Protocol):
    kind: str

    def fileno(self) -> int | None: ...
    def on_readable(self, now: float) -> None: ...
    def publish_capacity(self, caps: Sequence[VcpuCapacity], now: float) -> None: ...
    def tick(self, now: float) -> float | None: ...
    def view(self) -> HostView: ...
    def close(self) -> None: ...


class Backoff:
    """Exponential delays between attempts, capped; reset() after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first
