"""Guest and host connections driven against each other, bytes only."""

from __future__ import annotations

import pytest

from guestagent.protocol.channel import MAX_LINE, decode_line, encode_message
from guestagent.protocol.connection import (
    BadLine,
    GuestConnection,
    HostConnection,
    Resync,
)
from guestagent.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from guestagent.protocol.messages import (
    Ack,
    Capacity,
    Error,
    Heartbeat,
    Hello,
    Hints,
    Welcome,
)
from guestagent.protocol.model import (
    Feature,
    PeerState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
)

HINTS = Hints(5, tuple(VcpuHint(i, Request.BOOST, SchedClass.FIFO, 10 + i) for i in range(3)))


def pair() -> tuple[GuestConnection, HostConnection]:
    guest = GuestConnection(Feature.CAPACITY | Feature.COLOCATION, epoch=11, nr_vcpus=3)
    host = HostConnection(Feature.CAPACITY | Feature.NICE_HINTS, epoch=22)
    return guest, host


def pump(src, dst) -> list:
    return dst.receive_data(src.data_to_send())


def test_negotiation_hints_capacity_ack():
    guest, host = pair()
    guest.connect()
    events = pump(guest, host)
    assert isinstance(events[0], Resync) and isinstance(events[1], Hello)
    assert host.state == "up" and host.features == Feature.CAPACITY
    events = pump(host, guest)
    assert events == [Welcome(True, Feature.CAPACITY | Feature.NICE_HINTS, 22)]
    assert guest.state == "up" and guest.features == Feature.CAPACITY
    guest.send(HINTS)
    assert pump(guest, host) == [HINTS]
    caps = Capacity(1, tuple(VcpuCapacity(i, 100 * i, acked_generation=5) for i in range(3)))
    host.send(caps)
    host.send(Ack(5))
    host.send(Heartbeat(1, PeerState.RUNNING))
    assert pump(host, guest) == [caps, Ack(5), Heartbeat(1, PeerState.RUNNING)]


def test_unknown_major_refused_cleanly():
    guest, host = pair()
    guest.hello = Hello(Feature.CAPACITY, 11, 3, major=2, minor=0)
    guest.connect()
    pump(guest, host)
    assert host.state == "refused"
    (welcome,) = pump(host, guest)
    assert not welcome.accepted and "2.0 not supported" in welcome.reason
    assert guest.state == "refused" and guest.refusal == welcome.reason
    with pytest.raises(LocalProtocolError, match="cannot send Hints while the link is refused"):
        guest.send(HINTS)  # a refused guest may not send hints
    # and a host does not deliver those of a guest that sends them anyway
    assert host.receive_data(encode_message(HINTS)) == [] and host.counters.stale == 1


def test_host_ignores_hints_before_hello_and_lines_before_sync_ack():
    guest, host = pair()
    host.connect()  # host (re)connected: it waits for the ack of its sync
    host.data_to_send()
    stale = encode_message(HINTS)
    assert host.receive_data(stale) == [] and host.counters.stale == 1


def test_peer_restart_resyncs_both_ends():
    guest, host = pair()
    guest.connect()
    pump(guest, host)
    pump(host, guest)
    # the host restarts: a new connection object, which syncs first
    host = HostConnection(Feature.CAPACITY, epoch=33)
    host.connect()
    events = pump(host, guest)  # 0xFF + sync: the guest acks and says hello again
    assert events == [Resync()] and guest.state == "negotiating"
    events = pump(guest, host)
    assert isinstance(events[-1], Hello) and host.state == "up"
    events = pump(host, guest)
    assert guest.state == "up" and guest.host_epoch == 33
    guest.send(HINTS)
    assert pump(guest, host) == [HINTS]


def test_garbage_and_mid_line_reset_are_counted_not_fatal():
    guest, host = pair()
    guest.connect()
    pump(guest, host)
    pump(host, guest)
    assert host.counters.resets == 1  # the guest's connect starts with 0xFF
    events = host.receive_data(b"not json\n\x00\x01\x02\n" + b'{"type":"hints","gen'
                               + b"\xff" + encode_message(HINTS))
    assert [type(e) for e in events] == [BadLine, BadLine, Hints]
    assert host.counters.bad_lines == 2 and host.counters.resets == 2


def test_oversized_line_dropped_with_error_to_peer():
    guest, host = pair()
    guest.connect()
    pump(guest, host)
    pump(host, guest)
    events = host.receive_data(b"{" + b" " * MAX_LINE + b"}\n" + encode_message(HINTS))
    assert isinstance(events[0], BadLine) and events[1] == HINTS
    assert host.counters.dropped_lines == 1
    (err,) = pump(host, guest)
    assert isinstance(err, Error) and err.code == "line-too-long"


def test_sends_the_state_does_not_allow_are_refused_locally():
    guest, host = pair()
    with pytest.raises(LocalProtocolError, match="while the link is down"):
        guest.send(Heartbeat(1, PeerState.RUNNING))  # not connected
    guest.connect()
    with pytest.raises(LocalProtocolError, match="cannot send Hints while the link is negotiating"):
        guest.send(HINTS)  # not welcomed yet
    guest.send(Heartbeat(1, PeerState.STARTING))  # alive while negotiating is fine
    pump(guest, host)
    with pytest.raises(LocalProtocolError, match="cannot send Capacity"):
        HostConnection(Feature.CAPACITY, epoch=1).send(Capacity(1, ()))
    with pytest.raises(LocalProtocolError):
        host.send(HINTS)  # a guest-only message, whatever the state
    assert host.allows(Ack) and not guest.allows(Ack)


def test_remote_and_local_errors_are_distinct_types():
    guest, host = pair()
    with pytest.raises(RemoteProtocolError):
        decode_line(b'{"type": "ack"}')  # the peer's fault
    with pytest.raises(LocalProtocolError):
        encode_message(Hints(1, (VcpuHint(1),)))  # ours: entry 0 is for vCPU 1
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
