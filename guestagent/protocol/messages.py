"""Typed channel messages (docs/protocol.md, "Channel messages").

One frozen class per message type. Hints and capacity are full tables; on
the wire they may be split into parts (HintsPart, CapacityPart) so that no
line exceeds the line limit; protocol.connection reassembles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from guestagent.protocol.model import (
    PROTOCOL_NAME,
    VERSION_MAJOR,
    VERSION_MINOR,
    Feature,
    PeerState,
    VcpuCapacity,
    VcpuHint,
)

__all__ = [
    "Ack", "Capacity", "CapacityPart", "Error", "Heartbeat", "Hello", "Hints", "HintsPart",
    "Message", "Sync", "SyncAck", "Unknown", "Welcome",
]


@dataclass(frozen=True)
class Hello:
    """Guest to host: what the guest speaks. Sent after every (re)connect."""

    features: Feature
    epoch: int
    nr_vcpus: int
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    protocol: str = PROTOCOL_NAME


@dataclass(frozen=True)
class Welcome:
    """Host to guest: the answer to Hello. accepted=False is a refusal."""

    accepted: bool
    features: Feature  # what the host supports; in use: AND with the guest's
    epoch: int
    reason: str = ""
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    protocol: str = PROTOCOL_NAME


@dataclass(frozen=True)
class Hints:
    """Guest to host: the full hint table at one generation (one entry per vCPU)."""

    generation: int
    hints: tuple[VcpuHint, ...]


@dataclass(frozen=True)
class Capacity:
    """Host to guest: the full capacity table (one entry per vCPU)."""

    seq: int
    capacities: tuple[VcpuCapacity, ...]


@dataclass(frozen=True)
class HintsPart:
    """One line of a Hints message: the entries that differ from neutral."""

    generation: int
    nr_vcpus: int
    part: int
    parts: int
    hints: tuple[VcpuHint, ...]


@dataclass(frozen=True)
class CapacityPart:
    """One line of a Capacity message: the entries that differ from the default."""

    seq: int
    nr_vcpus: int
    part: int
    parts: int
    capacities: tuple[VcpuCapacity, ...]


@dataclass(frozen=True)
class Ack:
    """Host to guest: the newest hint generation the host has acted on."""

    generation: int


@dataclass(frozen=True)
class Heartbeat:
    """Either way: alive, with the sender's lifecycle state."""

    seq: int
    state: PeerState
    epoch: int = 0  # the sender's epoch (1.1); 0: not sent (a 1.0 peer)


@dataclass(frozen=True)
class Error:
    """Either way: something the receiver should log; the stream continues."""

    code: str
    message: str = ""


@dataclass(frozen=True)
class Sync:
    """Either way, after 0xFF: 'I (re)connected; reply SyncAck with this id'."""

    id: int


@dataclass(frozen=True)
class SyncAck:
    id: int


@dataclass(frozen=True)
class Unknown:
    """A well-formed line of a type this version does not know (ignored, counted)."""

    type: str


Message = Union[Hello, Welcome, HintsPart, CapacityPart, Ack, Heartbeat, Error, Sync, SyncAck,
                Unknown]
