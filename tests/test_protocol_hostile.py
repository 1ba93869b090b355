"""A hostile or confused peer on the channel: what the guest refuses, clamps and rejects.

Each case here was accepted (or mishandled) by the 1.0 reference and is fixed in 1.1.
"""

from __future__ import annotations

import json

import pytest

from guestagent.protocol import (
    Capacity,
    Feature,
    GuestConnection,
    Heartbeat,
    HostConnection,
    LinkState,
    PeerState,
    ProtocolError,
    Refused,
    VcpuCapacity,
    Welcome,
    decode_line,
    encode_message,
)


def up_pair(nr_vcpus: int = 2) -> tuple[GuestConnection, HostConnection]:
    guest = GuestConnection(Feature.CAPACITY, epoch=11, nr_vcpus=nr_vcpus)
    host = HostConnection(Feature.CAPACITY, epoch=22)
    guest.connect()
    host.receive_data(guest.data_to_send())
    guest.receive_data(host.data_to_send())
    assert guest.state == LinkState.UP
    return guest, host


def welcomed(protocol: str = "org.guestagent.sched", version=(1, 1), accepted=True,
             epoch: int = 22) -> GuestConnection:
    guest = GuestConnection(Feature.CAPACITY, epoch=11, nr_vcpus=2)
    guest.connect()
    guest.data_to_send()
    guest.receive_data(b'{"type":"sync-ack","id":1}\n')
    line = json.dumps({"type": "welcome", "protocol": protocol, "version": list(version),
                       "accepted": accepted, "features": 1, "epoch": epoch, "reason": ""})
    guest.events = guest.receive_data(line.encode() + b"\n")
    return guest


@pytest.mark.parametrize("protocol, version, why", [
    ("org.evil.sched", (1, 0), "'org.evil.sched' 1.0, not org.guestagent.sched 1.x"),
    ("org.guestagent.sched", (2, 0), "'org.guestagent.sched' 2.0, not org.guestagent.sched 1.x"),
])
def test_welcome_of_another_protocol_or_major_is_refused(protocol, version, why):
    guest = welcomed(protocol, version)
    assert guest.state == LinkState.REFUSED and why in guest.refusal
    assert guest.events == [Refused(guest.refusal)] and guest.features == Feature.NONE
    assert not guest.allows(Heartbeat)


def test_refused_guest_ignores_an_acceptance_from_the_same_host_epoch():
    guest = welcomed(accepted=False, epoch=22)
    assert guest.state == LinkState.REFUSED and guest.refused_by == 22
    # the guest reconnects and says hello: the same host epoch "accepts" it now
    guest.connect()
    guest.data_to_send()
    guest.receive_data(b'{"type":"sync-ack","id":2}\n')
    events = guest.receive_data(encode_message(Welcome(True, Feature.CAPACITY, 22)))
    assert guest.state == LinkState.REFUSED and isinstance(events[0], Refused)
    assert "epoch 22 refused this guest" in guest.refusal
    # a 1.1 heartbeat names another epoch: the host restarted; the guest asks again
    guest.receive_data(encode_message(Heartbeat(1, PeerState.RUNNING, epoch=23)))
    assert decode_line(guest.data_to_send()[:-1]) == guest.hello
    guest.receive_data(encode_message(Welcome(True, Feature.CAPACITY, 23)))
    assert guest.state == LinkState.UP and guest.host_epoch == 23 and guest.refused_by is None


def test_refused_guest_does_not_retry_on_heartbeats_of_the_same_or_no_epoch():
    guest = welcomed(accepted=False, epoch=22)
    guest.data_to_send()
    guest.receive_data(encode_message(Heartbeat(1, PeerState.RUNNING, epoch=22)))
    guest.receive_data(encode_message(Heartbeat(2, PeerState.RUNNING)))  # a 1.0 host
    assert guest.data_to_send() == b"" and guest.state == LinkState.REFUSED


def test_capacity_table_for_another_vcpu_count_is_rejected():
    guest, host = up_pair(nr_vcpus=2)
    table = Capacity(1, tuple(VcpuCapacity(i, 100) for i in range(3)))
    events = guest.receive_data(encode_message(table))
    assert len(events) == 1 and events[0].kind == "wrong-size"
    assert "3 vCPUs; this guest has 2" in events[0].reason and guest.counters.bad_lines == 1
    right = Capacity(2, tuple(VcpuCapacity(i, 100) for i in range(2)))
    assert guest.receive_data(encode_message(right)) == [right]


def test_hint_table_for_another_vcpu_count_is_rejected_by_the_host():
    guest, host = up_pair(nr_vcpus=2)
    line = b'{"type":"hints","generation":1,"nr_vcpus":3,"vcpus":[]}\n'
    (event,) = host.receive_data(line)
    assert event.kind == "wrong-size" and host.counters.bad_lines == 1


def capacity_line(entry: list) -> bytes:
    return json.dumps({"type": "capacity", "seq": 1, "nr_vcpus": 1, "vcpus": [entry]}).encode()


@pytest.mark.parametrize("entry, expected", [
    ([0, 10**30, 0, 0, 0, 0], VcpuCapacity(0, 1024, 0, 0)),  # capacity clamped
    ([0, -10**30, 0, 0, 0, 0], VcpuCapacity(0, 0, 0, 0)),
    ([0, 5, 2**31, 0, 0, 0], VcpuCapacity(0, 5, -1, 0)),  # pcpu past i32: unknown
    ([0, 5, 2**31 - 1, 0, 0, 0], VcpuCapacity(0, 5, 2**31 - 1, 0)),
    ([0, 5, -7, 10**30, 0, 0], VcpuCapacity(0, 5, -1, 1024)),  # host_load clamped
    ([0, 5, 0, 0, 0, 2**64 - 1], VcpuCapacity(0, 5, 0, 0, acked_generation=2**64 - 1)),
])
def test_capacity_fields_clamped_as_the_spec_says(entry, expected):
    assert decode_line(capacity_line(entry)).capacities == (expected,)


@pytest.mark.parametrize("entry", [
    [0, 5, 0, 0, 0, 2**64],  # acked_generation is u64
    [0, 5, 0, 0, 0, -1],
    [0, 5, 0, 0, 2**32, 0],  # applied is u32
    [0, 5, 0, 0, -1, 0],
])
def test_capacity_fields_rejected_as_the_spec_says(entry):
    with pytest.raises(ProtocolError):
        decode_line(capacity_line(entry))


def test_hint_fields_clamped_or_rejected_as_the_spec_says():
    def hints(entry: list) -> bytes:
        return json.dumps({"type": "hints", "generation": 1, "nr_vcpus": 1,
                           "vcpus": [entry]}).encode()
    (hint,) = decode_line(hints([0, 10**30, 10**30, 10**30, -10**30, 1, 10**30])).hints
    assert (hint.request, hint.sched_class, hint.rt_priority, hint.nice, hint.group) == \
        (0, 0, 99, -20, 0xFFFF)
    for flags in (2**32, -1):
        with pytest.raises(ProtocolError):
            decode_line(hints([0, 1, 1, 10, 0, flags, 0]))


def test_heartbeat_epoch_is_1_1_and_optional_for_1_0_peers():
    assert encode_message(Heartbeat(12, PeerState.RUNNING, 77)) == \
        b'{"type":"heartbeat","seq":12,"state":2,"epoch":77}\n'
    assert decode_line(b'{"type":"heartbeat","seq":12,"state":2}') == \
        Heartbeat(12, PeerState.RUNNING, 0)


def test_a_fresh_link_drops_nothing_the_peer_sent_before_the_guest_opened():
    # the host connected first: its sync and a minute of heartbeats wait in the port
    host = HostConnection(Feature.CAPACITY, epoch=22)
    host.connect()
    backlog = host.data_to_send() + b"".join(
        encode_message(Heartbeat(i, PeerState.RUNNING, 22)) for i in range(1, 61))
    guest = GuestConnection(Feature.CAPACITY, epoch=11, nr_vcpus=2)
    guest.connect()
    events = guest.receive_data(backlog)
    assert guest.counters.stale == 0 and sum(isinstance(e, Heartbeat) for e in events) == 60
    host.receive_data(guest.data_to_send())
    guest.receive_data(host.data_to_send())
    assert guest.state == LinkState.UP and guest.counters.stale == 0
    assert host.state == LinkState.UP and host.counters.stale == 0


def test_lines_before_our_sync_ack_from_an_old_session_are_still_discarded():
    guest, host = up_pair()
    guest.connect()  # the guest's port re-opened; the host's old lines are in flight
    guest.data_to_send()
    assert guest.receive_data(encode_message(Heartbeat(5, PeerState.RUNNING))) == []
    assert guest.counters.stale == 1


HELLO = {"type": "hello", "protocol": "org.guestagent.sched", "version": [1, 1],
         "features": 1, "epoch": 5, "nr_vcpus": 2}
HEARTBEAT = {"type": "heartbeat", "seq": 1, "state": 2, "epoch": 5}
HINTS = {"type": "hints", "generation": 1, "nr_vcpus": 2, "part": [0, 1], "vcpus": []}


def line_with(base: dict, **fields) -> bytes:
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize("line", [
    line_with(HELLO, version=[1, 2**16]),  # version: u16 each
    line_with(HELLO, version=[-1, 0]),
    line_with(HELLO, features=2**64),  # features: u64
    line_with(HELLO, epoch=2**64),  # counters: u64
    line_with(HELLO, nr_vcpus=4097),  # nr_vcpus: 1..4096
    line_with(HEARTBEAT, state=2**32),  # state: u32
    line_with(HEARTBEAT, seq=-1),
    line_with(HINTS, part=[0, 4097]),  # part: count 1..4096, index below it
    line_with(HINTS, part=[1, 1]),
    line_with(HINTS, part=[0, 0]),
    line_with(HINTS, generation=2**64),
    line_with(HINTS, vcpus=[[1, 1, 1, 10, 0, 0, 0], [1, 1, 1, 10, 0, 0, 0]]),  # vcpu twice
])
def test_the_width_tables_rejections(line):
    with pytest.raises(ProtocolError):
        decode_line(line)


def test_the_width_tables_fallbacks():
    assert decode_line(line_with(HEARTBEAT, state=7)).state == PeerState.ABSENT
    assert decode_line(line_with(HELLO, features=2**63 | 1)).features == Feature.CAPACITY
    (hint,) = decode_line(line_with(HINTS, nr_vcpus=1, vcpus=[[0, 77, 77, 10, 0, 2**31, 0]])
                          ).hints
    assert (hint.request, hint.sched_class, int(hint.flags)) == (0, 0, 0)
