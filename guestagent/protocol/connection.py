"""Channel connections, one per role: bytes in -> events, events -> bytes out.

In the manner of h11: no IO and no clock. The link feeds received bytes to
receive_data(), acts on the events, and writes data_to_send(). Replies the
protocol requires without a decision (sync-ack, welcome/refusal, the error
for an oversized line) are queued by the connection itself. What the owner
sends goes through send() (or encode(), for bytes the link coalesces), which
raises LocalProtocolError for a message the state does not allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar, Union

from guestagent.protocol.channel import (
    MAX_LINE,
    RESET,
    LineDropped,
    LineFramer,
    decode_line,
    encode_message,
)
from guestagent.protocol.errors import LocalProtocolError, RemoteProtocolError
from guestagent.protocol.liveness import LinkState
from guestagent.protocol.messages import (
    Ack,
    Capacity,
    CapacityPart,
    Error,
    Heartbeat,
    Hello,
    Hints,
    HintsPart,
    Sync,
    SyncAck,
    Unknown,
    Welcome,
)
from guestagent.protocol.model import (
    PROTOCOL_NAME,
    VERSION_MAJOR,
    Feature,
    VcpuCapacity,
    VcpuHint,
)
from guestagent.protocol.negotiation import negotiate

__all__ = [
    "BadLine", "Connection", "Counters", "GuestConnection", "GuestEvent", "HostConnection",
    "HostEvent", "Refused", "Resync",
]

T = TypeVar("T")


@dataclass(frozen=True)
class BadLine:
    """A line was dropped (malformed, invalid or oversized); the stream goes on."""

    reason: str
    kind: str = "invalid"  # "invalid" | "too-long" | "wrong-size": what to log it as


@dataclass(frozen=True)
class Refused:
    """The guest refused the host's welcome (another protocol or major, or an
    acceptance from the host epoch that had refused it)."""

    reason: str


@dataclass(frozen=True)
class Resync:
    """The peer (re)connected and asked to sync: re-send the full current state."""


GuestEvent = Union[Welcome, Capacity, Ack, Heartbeat, Error, Resync, BadLine, Refused]
HostEvent = Union[Hello, Hints, Heartbeat, Error, Resync, BadLine]


@dataclass
class Counters:
    """Per-connection error counters, shown by the links' views."""

    bad_lines: int = 0  # malformed or invalid lines
    dropped_lines: int = 0  # oversized lines
    unknown: int = 0  # well-formed lines of unknown type, ignored
    stale: int = 0  # lines discarded while waiting for our sync-ack
    resets: int = 0  # 0xFF bytes received


class _Assembler(Generic[T]):
    """Joins the parts of one table; a part of another table discards the rest."""

    def __init__(self, default: Callable[..., T]) -> None:
        self._default = default  # the entry of a vCPU no part lists, given vcpu=
        self._key: tuple[int, int, int] | None = None
        self._got: dict[int, tuple[T, ...]] = {}

    def add(self, key: int, nr: int, part: int, parts: int,
            items: tuple[T, ...]) -> tuple[T, ...] | None:
        """The full per-vCPU table once every part is in, else None."""
        if self._key != (key, nr, parts):
            self._key, self._got = (key, nr, parts), {}
        self._got[part] = items
        if len(self._got) < parts:
            return None
        table = [self._default(vcpu=i) for i in range(nr)]
        for entry in (item for p in sorted(self._got) for item in self._got[p]):
            table[entry.vcpu] = entry  # type: ignore[attr-defined]
        self._key, self._got = None, {}
        return tuple(table)


_DOWN, _NEGOTIATING, _UP, _REFUSED = (LinkState.DOWN, LinkState.NEGOTIATING, LinkState.UP,
                                      LinkState.REFUSED)


class Connection:
    """What both ends share: framing, sync and its acknowledgement, counters."""

    epoch: int  # our own, sent in heartbeats (1.1)

    # message types the owner may send, by state (replies the connection
    # queues itself are not limited by this)
    ALLOWED: dict[LinkState, tuple[type, ...]] = {}

    def __init__(self) -> None:
        self._framer = LineFramer()
        self._out = bytearray()
        self._awaiting: int | None = None  # id of our sync not yet acknowledged
        self._next_sync = 1
        self.counters = Counters()
        self.state = LinkState.DOWN

    def connect(self) -> None:
        """The byte stream was (re)opened: reset parsing and ask the peer to sync."""
        self._framer.reset()
        self._out.clear()
        self.resync()

    def resync(self) -> None:
        """Ask the peer to sync (again, with a new id): after connect(), or when the
        sync-ack of the last one never came."""
        self._awaiting = self._next_sync
        self._next_sync += 1
        self._out += RESET + encode_message(Sync(self._awaiting))
        self.state = _NEGOTIATING

    @property
    def awaiting_sync_ack(self) -> bool:
        return self._awaiting is not None

    def disconnect(self) -> None:
        self._framer.reset()
        self._out.clear()
        self._awaiting = None
        self.state = _DOWN

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def allows(self, kind: type) -> bool:
        """Whether the owner may send a message of this type in the current state."""
        return kind in self.ALLOWED.get(self.state, ())

    def check_send(self, kind: type) -> None:
        if not self.allows(kind):
            raise LocalProtocolError(f"cannot send {kind.__name__} while the link is "
                                     f"{self.state}")

    def encode(self, msg: object) -> bytes:
        """The bytes of msg, for a link that sends them later (coalescing)."""
        self.check_send(type(msg))
        return encode_message(msg)  # type: ignore[arg-type]

    def send(self, msg: object) -> None:
        self._out += self.encode(msg)

    def _reply(self, msg: object) -> None:
        self._out += encode_message(msg)  # type: ignore[arg-type]

    def _wrong_size(self, reason: str) -> list:
        """A table for another number of vCPUs than the hello said: dropped, counted."""
        self.counters.bad_lines += 1
        return [BadLine(reason, "wrong-size")]

    def receive_data(self, data: bytes) -> list:
        events: list = []
        resets = self._framer.resets
        for item in self._framer.feed(data):
            if isinstance(item, LineDropped):
                self.counters.dropped_lines += 1
                events.append(BadLine(f"line of {item.size}+ bytes dropped (limit {MAX_LINE})",
                                      "too-long"))
                self._reply(Error("line-too-long", f"dropped a line of {item.size}+ bytes"))
                continue
            try:
                msg = decode_line(item)
            except RemoteProtocolError as err:
                self.counters.bad_lines += 1
                events.append(BadLine(str(err)))
                continue
            if isinstance(msg, Sync):
                self._reply(SyncAck(msg.id))
                # The peer reset its session: what follows is of its new one, so the
                # wait for our own sync-ack ends too (syncs that cross, or a peer
                # that connected before us, leave nothing stale behind its sync).
                self._awaiting = None
                self._on_peer_sync()
                events.append(Resync())
            elif isinstance(msg, SyncAck):
                if msg.id == self._awaiting:
                    self._awaiting = None
            elif self._awaiting is not None:
                self.counters.stale += 1
            elif isinstance(msg, Unknown):
                self.counters.unknown += 1
            else:
                events.extend(self._handle(msg))
        self.counters.resets += self._framer.resets - resets
        return events

    def _on_peer_sync(self) -> None:
        pass

    def _handle(self, msg: object) -> list:
        raise NotImplementedError


class GuestConnection(Connection):
    """The guest's end: says hello after every sync, sends hints once welcomed."""

    ALLOWED = {_NEGOTIATING: (Heartbeat, Error), _UP: (Hints, Heartbeat, Error),
               _REFUSED: (Error,)}

    def __init__(self, features: Feature, epoch: int, nr_vcpus: int) -> None:
        super().__init__()
        self.hello = Hello(features=features, epoch=epoch, nr_vcpus=nr_vcpus)
        self.epoch = epoch
        self.features = Feature.NONE  # in use, once welcomed
        self.host_epoch = 0
        self.refusal = ""
        self.refused_by: int | None = None  # epoch of the host that refused us
        self._capacity: _Assembler[VcpuCapacity] = _Assembler(VcpuCapacity)

    def resync(self) -> None:
        super().resync()
        self._reply(self.hello)

    def _on_peer_sync(self) -> None:
        self._say_hello()

    def _say_hello(self) -> None:
        self.state = _NEGOTIATING
        self._reply(self.hello)

    def _refuse(self, reason: str, host_epoch: int) -> list:
        self.state, self.refusal, self.refused_by = _REFUSED, reason, host_epoch
        self.features = Feature.NONE
        return [Refused(reason)]

    def _on_welcome(self, msg: Welcome) -> list:
        if msg.protocol != PROTOCOL_NAME or msg.major != VERSION_MAJOR:
            return self._refuse(f"host speaks {msg.protocol[:64]!r} {msg.major}.{msg.minor}, "
                                f"not {PROTOCOL_NAME} {VERSION_MAJOR}.x", msg.epoch)
        if not msg.accepted:
            self.state, self.refusal, self.refused_by = _REFUSED, msg.reason, msg.epoch
            return [msg]
        if self.refused_by is not None and msg.epoch == self.refused_by:
            return self._refuse(f"host epoch {msg.epoch} refused this guest: its welcome "
                                "counts only once its epoch changes", msg.epoch)
        self.state = _UP
        self.features = Feature(msg.features & self.hello.features)
        self.host_epoch = msg.epoch
        self.refusal, self.refused_by = "", None
        return [msg]

    def _handle(self, msg: object) -> list:
        if isinstance(msg, Welcome):
            return self._on_welcome(msg)
        if isinstance(msg, Heartbeat) and self.state == _REFUSED and msg.epoch and \
                msg.epoch != self.refused_by:
            self._say_hello()  # a 1.1 host restarted behind the same stream: ask again
            return [msg]
        if isinstance(msg, CapacityPart):
            if msg.nr_vcpus != self.hello.nr_vcpus:
                return self._wrong_size(f"capacity table for {msg.nr_vcpus} vCPUs; this guest "
                                        f"has {self.hello.nr_vcpus}")
            capacities = self._capacity.add(msg.seq, msg.nr_vcpus, msg.part, msg.parts,
                                            msg.capacities)
            return [] if capacities is None else [Capacity(msg.seq, capacities)]
        if isinstance(msg, (Ack, Heartbeat, Error)):
            return [msg]
        self.counters.unknown += 1  # a host-only message sent to us
        return []


class HostConnection(Connection):
    """The host's end: answers hello, delivers assembled hint tables once accepted."""

    ALLOWED = {_NEGOTIATING: (Heartbeat, Error), _UP: (Capacity, Ack, Heartbeat, Error),
               _REFUSED: (Error,)}

    def __init__(self, features: Feature, epoch: int) -> None:
        super().__init__()
        self.host_features = features
        self.epoch = epoch
        self.features = Feature.NONE
        self.hello: Hello | None = None
        self._hints: _Assembler[VcpuHint] = _Assembler(VcpuHint)

    def _on_peer_sync(self) -> None:
        self.state = _NEGOTIATING  # the guest will say hello again

    def _handle(self, msg: object) -> list:
        if isinstance(msg, Hello):
            verdict = negotiate(msg.protocol, msg.major, msg.minor, msg.features,
                                self.host_features)
            self._reply(Welcome(accepted=verdict.accepted, features=self.host_features,
                                epoch=self.epoch, reason=verdict.reason))
            self.hello = msg
            self.features = verdict.features
            self.state = _UP if verdict.accepted else _REFUSED
            return [msg]
        if isinstance(msg, HintsPart):
            if self.state != _UP or self.hello is None:
                self.counters.stale += 1
                return []
            if msg.nr_vcpus != self.hello.nr_vcpus:
                return self._wrong_size(f"hint table for {msg.nr_vcpus} vCPUs; the guest said "
                                        f"{self.hello.nr_vcpus}")
            hints = self._hints.add(msg.generation, msg.nr_vcpus, msg.part, msg.parts, msg.hints)
            return [] if hints is None else [Hints(msg.generation, hints)]
        if isinstance(msg, (Heartbeat, Error)):
            return [msg]
        self.counters.unknown += 1
        return []
