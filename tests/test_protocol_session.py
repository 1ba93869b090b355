"""Region sessions driven against each other through a bytearray: no mapping, no clock."""

from __future__ import annotations

import pytest

from guestagent.protocol import (
    GUEST_CONTROL_OFFSET,
    HOST_CONTROL_OFFSET,
    Feature,
    GuestRegionSession,
    HostRegionSession,
    LinkState,
    PeerState,
    RegionLayout,
    RemoteProtocolError,
    VcpuCapacity,
    Verdict,
    encode_guest_control,
    encode_header,
    encode_host_control,
    encode_host_slot,
    layout_to_keep,
    line_seq,
)

LAYOUT = RegionLayout(2)


def formatted(guest: GuestRegionSession, abi_major: int = 1) -> bytearray:
    buf = bytearray(LAYOUT.region_size)
    buf[0:128] = encode_header(LAYOUT, abi_major=abi_major, abi_minor=0)
    buf[GUEST_CONTROL_OFFSET:GUEST_CONTROL_OFFSET + 64] = encode_guest_control(guest.control, 2)
    return buf


def host_line(host: HostRegionSession, seq: int) -> bytes:
    return encode_host_control(host.control, seq)


def handshake(guest: GuestRegionSession, host: HostRegionSession, buf: bytearray,
              now: float) -> Verdict:
    line = encode_guest_control(guest.control, 2)
    assert host.receive_guest(line, now)
    verdict = host.judge(bytes(buf[:128]), len(buf))
    host.wants_hints(now)
    return verdict


def test_accept_capacity_and_liveness_by_the_callers_clock():
    guest = GuestRegionSession(Feature.CAPACITY | Feature.COLOCATION, 11, 2, 1.0, 5.0)
    host = HostRegionSession(Feature.CAPACITY | Feature.NICE_HINTS, 22, 1.0, 5.0)
    buf = formatted(guest)
    assert guest.state(0.0) == LinkState.DOWN and host.state(0.0) == LinkState.DOWN
    assert handshake(guest, host, buf, 0.0) == Verdict.ACCEPTED
    assert host.state(0.0) == LinkState.UP and host.in_use == Feature.CAPACITY
    assert host.control.guest_epoch == 11 and host.control.acked_generation == 0
    assert guest.receive_host(2, host_line(host, 2), 0.0)  # capacity is in use: read it
    assert guest.state(0.0) == LinkState.UP
    caps = [VcpuCapacity(0, 500, acked_generation=3), VcpuCapacity(1)]
    guest.receive_capacity([encode_host_slot(c, 2) for c in caps], 0.5)
    assert guest.usable_capacity(LinkState.UP) == tuple(caps) and guest.capacity_at == 0.5
    assert not guest.receive_host(2, host_line(host, 2), 1.0)  # same seq: nothing new
    # liveness is the caller's clock: no heartbeat change for stale_after means down
    assert guest.state(5.0) == LinkState.UP and guest.state(5.1) == LinkState.DOWN
    assert guest.reason(LinkState.DOWN) == "host not heard"
    assert host.acknowledge(caps).acked_generation == 3


def test_heartbeats_are_due_by_period_and_host_writes_none_before_a_guest():
    guest = GuestRegionSession(Feature.NONE, 11, 2, heartbeat_period=1.0)
    assert guest.heartbeat(0.0).heartbeat == 1
    assert guest.heartbeat(0.5) is None and guest.next_heartbeat == 1.0
    assert guest.heartbeat(1.0).heartbeat == 2
    host = HostRegionSession(Feature.NONE, 22, heartbeat_period=1.0)
    assert host.heartbeat(0.0) is None  # no guest epoch: never write into the region
    handshake(guest, host, formatted(guest), 0.0)
    assert host.heartbeat(1.0).heartbeat == 1


def test_unknown_major_refused_and_the_guest_sees_it():
    guest = GuestRegionSession(Feature.CAPACITY, 11, 2)
    host = HostRegionSession(Feature.CAPACITY, 22)
    assert handshake(guest, host, formatted(guest, abi_major=2), 0.0) == Verdict.REFUSED
    assert host.state(0.0) == LinkState.REFUSED and "ABI 2.0" in host.reason
    assert not host.accepted and host.bad_region == 1
    assert not guest.receive_host(2, host_line(host, 2), 0.0)  # refused: no capacity read
    assert guest.state(0.0) == LinkState.REFUSED
    assert guest.reason(LinkState.REFUSED) == "refused by host speaking 1.1"


def test_unformatted_header_is_judged_again_later():
    guest = GuestRegionSession(Feature.NONE, 11, 2)
    host = HostRegionSession(Feature.NONE, 22)
    buf = formatted(guest)
    buf[0:8] = bytes(8)  # the guest is mid-format: magic still zero
    line = encode_guest_control(guest.control, 2)
    assert host.receive_guest(line, 0.0)
    assert host.judge(bytes(buf[:128]), len(buf)) == Verdict.NONE
    assert not host.wants_hints(0.0) and host.state(0.0) == LinkState.DOWN
    assert "not formatted" in host.reason
    buf[0:8] = encode_header(LAYOUT)[0:8]
    assert host.receive_guest(line, 0.1)  # still a new epoch: judged now
    assert host.judge(bytes(buf[:128]), len(buf)) == Verdict.ACCEPTED


def test_new_guest_epoch_resets_the_hint_table():
    guest = GuestRegionSession(Feature.NONE, 11, 2)
    host = HostRegionSession(Feature.NONE, 22)
    buf = formatted(guest)
    handshake(guest, host, buf, 0.0)
    line = encode_guest_control(guest.published(4), 4)
    assert not host.receive_guest(line, 0.1) and host.wants_hints(0.1)
    host.receive_hints(())
    assert host.generation == 4
    restarted = GuestRegionSession(Feature.NONE, 99, 2)
    assert handshake(restarted, host, formatted(restarted), 0.2) == Verdict.ACCEPTED
    assert host.generation == 0 and host.control.guest_epoch == 99


def test_layout_to_keep():
    assert layout_to_keep(bytes(128), 4096, 2) is None  # zeroed: format it
    assert layout_to_keep(encode_header(LAYOUT), LAYOUT.region_size, 2) == LAYOUT
    assert layout_to_keep(encode_header(LAYOUT), LAYOUT.region_size, 3) is None  # ours: reformat
    assert layout_to_keep(encode_header(LAYOUT, 2), LAYOUT.region_size, 2) is None
    with pytest.raises(RemoteProtocolError, match="another protocol"):
        layout_to_keep(b"NOTOURS!" + bytes(120), 4096, 2)


def test_link_state_values_are_what_status_shows():
    assert [str(s) for s in LinkState] == ["down", "negotiating", "up", "refused"]
    assert f"{LinkState.UP}" == "up" and LinkState.REFUSED == "refused"
    assert line_seq(encode_host_control(HostRegionSession(Feature.NONE, 1).control, 6)) == 6
    assert PeerState.RUNNING == 2 and HOST_CONTROL_OFFSET == 192
