"""Real guest and host links talking over real unix sockets, ptys and region files."""

from __future__ import annotations

import os
import select
import socket
import time
import tty
from typing import Callable

import pytest

from guestagent.errors import GuestagentError
from guestagent.protocol.channel import MAX_LINE, RESET, LineFramer, decode_line, encode_message
from guestagent.protocol.messages import Heartbeat, Hello, Hints, Sync, SyncAck, Welcome
from guestagent.protocol.model import (
    Feature,
    PeerState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
)
from guestagent.protocol.region import MAGIC, region_size_for
from guestagent.transport import (
    ChannelGuestLink,
    ChannelHostLink,
    RegionGuestLink,
    RegionHostLink,
)

HINTS = [VcpuHint(0, Request.BOOST, SchedClass.FIFO, 40), VcpuHint(1),
         VcpuHint(2, Request.UNBOOST, SchedClass.IDLE)]


def run(links: list, seconds: float, until: Callable[[], bool] | None = None) -> bool:
    """The owner's loop, as the daemon runs it: poll fds, tick by deadline."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        deadlines = [d for d in (link.tick(now) for link in links) if d is not None]
        if until is not None and until():
            return True
        fds = {link.fileno(): link for link in links if link.fileno() is not None}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        wait = max(0.0, min(deadlines + [end]) - time.monotonic())
        for fd, _ in poller.poll(min(wait, 0.05) * 1000):
            fds[fd].on_readable(time.monotonic())
    return until is not None and until()


def caps_for(generation: int) -> list[VcpuCapacity]:
    return [VcpuCapacity(i, 300 + i, acked_generation=generation) for i in range(3)]


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "chan.sock")


def test_channel_negotiation_hints_capacity(sock_path):
    host = ChannelHostLink(sock_path, features=Feature.CAPACITY | Feature.NICE_HINTS,
                           listen=True)
    guest = ChannelGuestLink(sock_path, 3, features=Feature.CAPACITY | Feature.COLOCATION)
    try:
        guest.publish(HINTS, 1, time.monotonic())  # before the host answers: kept
        guest.set_state(PeerState.RUNNING, time.monotonic())
        assert run([host, guest], 3, lambda: host.view().generation == 1)
        hv = host.view()
        assert hv.link == "up" and hv.hints == tuple(HINTS)
        assert hv.features == Feature.CAPACITY and hv.guest_state == PeerState.RUNNING
        host.publish_capacity(caps_for(1), time.monotonic())
        assert run([host, guest], 3, lambda: guest.view().acked_generation == 1
                   and guest.view().capacity is not None)
        gv = guest.view()
        assert gv.link == "up" and gv.capacity == tuple(caps_for(1))
        assert gv.features == Feature.CAPACITY and gv.capacity_age < 3
        # coalescing: three tables published back to back, the host ends on the newest
        for gen in (2, 3, 4):
            guest.publish([VcpuHint(0, Request.BOOST, SchedClass.RR, gen), VcpuHint(1),
                           VcpuHint(2)], gen, time.monotonic())
        assert run([host, guest], 3, lambda: host.view().generation == 4)
        assert host.view().hints[0].rt_priority == 4
    finally:
        guest.close()
        host.close()


def test_channel_host_restart_resyncs(sock_path):
    host = ChannelHostLink(sock_path, listen=True)
    guest = ChannelGuestLink(sock_path, 3)
    guest.publish(HINTS, 7, time.monotonic())
    assert run([host, guest], 3, lambda: host.view().generation == 7)
    host.close()
    assert run([guest], 3, lambda: guest.view().link == "down")
    # a new host peer on the same path: the guest reconnects with back-off and re-sends
    host = ChannelHostLink(sock_path, listen=True)
    try:
        assert run([host, guest], 6, lambda: host.view().generation == 7)
        assert host.view().hints == tuple(HINTS) and guest.view().link == "up"
    finally:
        guest.close()
        host.close()


def test_channel_host_connects_to_a_listening_qemu_socket(sock_path):
    # The host peer as the connecting side, QEMU's server=on socket played by a guest
    # link's peer: a plain listening socket whose accepted connection we drive by hand.
    host = ChannelHostLink(sock_path)  # nothing listens yet: it retries with back-off
    run([host], 0.3)
    assert host.view().link == "down" and host.view().errors.io_errors >= 1
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    try:
        assert run([host], 3, lambda: host.fileno() is not None)
        conn, _ = server.accept()
        conn.settimeout(2)
        run([host], 0.2)
        framer = LineFramer()
        sync = decode_line(framer.feed(conn.recv(65536))[0])
        assert isinstance(sync, Sync)
        conn.sendall(encode_message(SyncAck(sync.id))
                     + encode_message(Hello(Feature.CAPACITY, 5, 3)))
        assert run([host], 2, lambda: host.view().link == "up")
        conn.close()
    finally:
        host.close()
        server.close()


def _raw_guest(path: str, host, hello: Hello) -> tuple[socket.socket, LineFramer]:
    """A hand-driven guest: answers the host's sync, then says hello."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(0.05)
    framer = LineFramer()
    (sync,) = [m for m in _drain(sock, framer, host, 0.3) if isinstance(m, Sync)]
    sock.sendall(encode_message(SyncAck(sync.id)) + encode_message(hello))
    return sock, framer


def _drain(sock: socket.socket, framer: LineFramer, host, seconds: float = 0.5) -> list:
    got: list = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        run([host], 0.05)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        got += [decode_line(x) for x in framer.feed(data) if isinstance(x, bytes)]
    return got


def test_channel_garbage_reset_and_oversized_lines(sock_path):
    host = ChannelHostLink(sock_path, listen=True)
    sock, framer = _raw_guest(sock_path, host, Hello(Feature.CAPACITY, 9, 3))
    try:
        assert run([host], 2, lambda: host.view().link == "up")
        hints = encode_message(Hints(3, tuple(HINTS)))
        sock.sendall(b"garbage\n\x00\x01{]\n" + b'{"type":"hints","generation":99,"nr'
                     + b"\xff" + hints)
        assert run([host], 2, lambda: host.view().generation == 3)
        errors = host.view().errors
        assert errors.bad_lines == 2 and errors.resets >= 1
        sock.sendall(b"{" + b" " * (2 * MAX_LINE) + b"}\n"
                     + hints.replace(b'"generation":3', b'"generation":4'))
        assert run([host], 2, lambda: host.view().generation == 4)
        assert host.view().errors.dropped_lines == 1
        got = _drain(sock, framer, host)
        assert any(getattr(m, "code", "") == "line-too-long" for m in got)
        assert host.view().link == "up"
    finally:
        sock.close()
        host.close()


def _boosting_guest(host, sock: socket.socket) -> None:
    """The guest's session so far: running, boosting vCPU 0; the host holds it."""
    sock.sendall(encode_message(Heartbeat(1, PeerState.RUNNING, 0))
                 + encode_message(Hints(3, tuple(HINTS))))
    assert run([host], 2, lambda: host.view().generation == 3)
    assert host.view().hints[0].request == Request.BOOST


def _running_without_hints(host, epoch: int) -> None:
    """The new session: up and running, no table of its own yet; nothing to act on."""
    assert run([host], 2, lambda: host.conn.hello.epoch == epoch
               and host.view().guest_state == PeerState.RUNNING)
    view = host.view()
    assert view.link == "up" and view.generation == 0 and view.hints == ()


def test_channel_host_forgets_the_old_sessions_hints_when_the_stream_drops(sock_path):
    host = ChannelHostLink(sock_path, listen=True)
    sock, _ = _raw_guest(sock_path, host, Hello(Feature.CAPACITY, 5, 3))
    try:
        _boosting_guest(host, sock)
        sock.close()
        assert run([host], 2, lambda: host.view().link == "down")
        # a new guest session (another epoch) says hello and heartbeats RUNNING before
        # its first table: the old boost must not be held meanwhile
        sock, _ = _raw_guest(sock_path, host, Hello(Feature.CAPACITY, 6, 3))
        sock.sendall(encode_message(Heartbeat(1, PeerState.RUNNING, 0)))
        _running_without_hints(host, 6)
    finally:
        sock.close()
        host.close()


@pytest.mark.parametrize("how", ["sync", "hello of another epoch"])
def test_channel_host_forgets_the_old_sessions_hints_on_the_same_stream(sock_path, how):
    # A guest agent that restarts behind a virtio-serial port: QEMU's socket, and so
    # the host's stream, stays connected; the new session starts with a sync (or, from
    # a guest that skips it, just a hello of a new epoch).
    host = ChannelHostLink(sock_path, listen=True)
    sock, framer = _raw_guest(sock_path, host, Hello(Feature.CAPACITY, 5, 3))
    try:
        _boosting_guest(host, sock)
        restart = encode_message(Hello(Feature.CAPACITY, 6, 3))
        if how == "sync":
            restart = RESET + encode_message(Sync(1)) + restart
        sock.sendall(restart)
        # until the new session's own heartbeat, it is starting: not the old one's RUNNING
        assert run([host], 2, lambda: host.conn.hello.epoch == 6)
        assert host.view().guest_state == PeerState.STARTING
        sock.sendall(encode_message(Heartbeat(1, PeerState.RUNNING, 0)))
        _running_without_hints(host, 6)
        # the same session saying hello again (the host's own resync) keeps its table
        sock.sendall(encode_message(Hints(4, tuple(HINTS)))
                     + encode_message(Hello(Feature.CAPACITY, 6, 3)))
        assert run([host], 2, lambda: host.view().generation == 4)
        run([host], 0.2)
        assert host.view().hints == tuple(HINTS)
    finally:
        sock.close()
        host.close()


def test_channel_unknown_major_refused(sock_path):
    host = ChannelHostLink(sock_path, listen=True)
    sock, framer = _raw_guest(sock_path, host, Hello(Feature.CAPACITY, 9, 3, major=2, minor=5))
    try:
        got = _drain(sock, framer, host)
        welcome = [m for m in got if isinstance(m, Welcome)]
        assert welcome and not welcome[0].accepted and "2.5" in welcome[0].reason
        assert host.view().link == "refused"
    finally:
        sock.close()
        host.close()


def test_channel_guest_refused_by_host_reports_it(sock_path):
    host = ChannelHostLink(sock_path, listen=True)
    guest = ChannelGuestLink(sock_path, 3)
    guest.conn.hello = Hello(Feature.NONE, 1, 3, major=3, minor=0)  # a guest from the future
    try:
        assert run([host, guest], 3, lambda: guest.view().link == "refused")
        assert "3.0" in guest.view().reason
    finally:
        guest.close()
        host.close()


def test_port_hangup_backs_off_instead_of_spinning():
    # No virtio-serial port on this machine; a pty slave behaves the same way once its
    # master is closed: read() returns 0 and poll() reports POLLHUP continuously.
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    guest = ChannelGuestLink(path, 2)
    os.close(slave)
    try:
        run([guest], 0.2)
        os.close(master)
        ticks = 0
        wakeups_before = guest.wakeups
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # a real loop for one second of a closed peer
            now = time.monotonic()
            deadline = guest.tick(now)
            ticks += 1
            fd = guest.fileno()
            poller = select.poll()
            if fd is not None:
                poller.register(fd, select.POLLIN)
            timeout = max(0.0, min(deadline or end, end) - time.monotonic())
            for _ in poller.poll(timeout * 1000):
                guest.on_readable(time.monotonic())
        wakeups = guest.wakeups - wakeups_before
        assert wakeups + ticks < 40, (wakeups, ticks)
        assert guest.view().link == "down"
    finally:
        guest.close()


def test_missing_port_is_a_clear_error(tmp_path):
    with pytest.raises(GuestagentError, match="no virtio-serial port named"):
        ChannelGuestLink("org.example.none.0", 2)


# --- region ----------------------------------------------------------------------------

@pytest.fixture
def region_path(tmp_path):
    return str(tmp_path / "region")


def test_region_negotiation_hints_capacity(region_path):
    guest = RegionGuestLink(region_path, 3, features=Feature.CAPACITY | Feature.COLOCATION,
                            create=True, poll_interval=0.01)
    host = RegionHostLink(region_path, features=Feature.CAPACITY | Feature.NICE_HINTS)
    try:
        guest.set_state(PeerState.RUNNING, time.monotonic())
        guest.publish(HINTS, 1, time.monotonic())
        assert run([host, guest], 3, lambda: host.view().generation == 1)
        hv = host.view()
        assert hv.link == "up" and hv.hints == tuple(HINTS)
        assert hv.guest_state == PeerState.RUNNING and hv.features == Feature.CAPACITY
        host.publish_capacity(caps_for(1), time.monotonic())
        assert run([host, guest], 3, lambda: guest.view().acked_generation == 1
                   and guest.view().capacity == tuple(caps_for(1)))
        assert guest.view().link == "up" and guest.view().features == Feature.CAPACITY
    finally:
        guest.close()
        host.close()


def test_region_restarts_and_staleness(region_path):
    guest = RegionGuestLink(region_path, 3, create=True, poll_interval=0.01,
                            heartbeat_period=0.05, stale_after=0.4)
    host = RegionHostLink(region_path, heartbeat_period=0.05, stale_after=0.4)
    guest.publish(HINTS, 5, time.monotonic())
    assert run([host, guest], 3, lambda: host.view().generation == 5)
    # the guest agent restarts: same region kept, new epoch, generation starts again
    guest.close()
    guest = RegionGuestLink(region_path, 3, poll_interval=0.01, heartbeat_period=0.05,
                            stale_after=0.4)
    guest.publish([VcpuHint(i) for i in range(3)], 1, time.monotonic())
    assert run([host, guest], 3, lambda: host.view().generation == 1
               and guest.view().link == "up")
    assert host.view().hints == tuple(VcpuHint(i) for i in range(3))
    # the host peer restarts: the guest sees a new host epoch accept it again
    host.close()
    host = RegionHostLink(region_path, heartbeat_period=0.05, stale_after=0.4)
    assert run([host, guest], 3, lambda: host.view().generation == 1
               and guest.view().link == "up")
    # the guest stops ticking (hung or killed): the host calls it stale
    assert run([host], 2, lambda: host.view().link == "down")
    assert host.view().guest_state == PeerState.ABSENT
    guest.close()
    host.close()


def test_region_unknown_major_refused(region_path):
    guest = RegionGuestLink(region_path, 2, create=True, poll_interval=0.01)
    with open(region_path, "r+b") as f:  # the guest's header, as a v2 guest would write it
        f.seek(40)
        f.write(b"\x02\x00\x00\x00")
    guest._header = guest._mm[:128]  # a v2 guest: this is the header it wrote
    host = RegionHostLink(region_path)
    try:
        assert run([host, guest], 3, lambda: guest.view().link == "refused")
        assert host.view().link == "refused" and "ABI 2.0" in host.view().reason
    finally:
        guest.close()
        host.close()


def test_region_foreign_or_small_refused(region_path):
    with open(region_path, "wb") as f:
        f.write(b"NOTOURS!" + bytes(4096))
    with pytest.raises(GuestagentError, match="another protocol"):
        RegionGuestLink(region_path, 2)
    with open(region_path, "wb") as f:
        f.write(bytes(region_size_for(4) - 1))
    with pytest.raises(GuestagentError, match="too small"):
        RegionGuestLink(region_path, 4)
    # a region formatted for another vCPU count is ours: reformatted, not refused
    with open(region_path, "wb") as f:
        f.write(bytes(region_size_for(4)))
    RegionGuestLink(region_path, 4).close()
    RegionGuestLink(region_path, 2).close()
    with open(region_path, "rb") as f:
        assert f.read(8) == MAGIC


def test_region_host_waits_for_a_missing_region(region_path):
    host = RegionHostLink(region_path)
    run([host], 0.1)
    assert host.view().link == "down" and "cannot open" in host.view().reason
    host.close()


def test_host_never_writes_into_a_region_no_guest_formatted(tmp_path):
    path = tmp_path / "region"
    path.write_bytes(bytes(65536))
    host = RegionHostLink(str(path), heartbeat_period=0.01)
    try:
        for step in range(20):
            host.tick(step * 0.02)
        assert path.read_bytes() == bytes(65536)
        assert host.view().link != "up"
    finally:
        host.close()


def _raw_host(path: str):
    """A hand-driven host: a listening socket; returns (server, accept())."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    return server


def test_channel_guest_refuses_a_welcome_of_another_protocol_with_one_log_line(
        sock_path, caplog):
    server = _raw_host(sock_path)
    guest = ChannelGuestLink(sock_path, 2)
    try:
        with caplog.at_level("WARNING", "guestagent.transport"):
            assert run([guest], 2, lambda: guest.fileno() is not None)
            conn, _ = server.accept()
            conn.settimeout(2)
            framer = LineFramer()
            run([guest], 0.2)
            sync = next(decode_line(x) for x in framer.feed(conn.recv(65536))
                        if isinstance(x, bytes) and b'"sync"' in x)
            evil = (b'{"type":"welcome","protocol":"org.evil.sched","version":[1,0],'
                    b'"accepted":true,"features":15,"epoch":7,"reason":""}\n')
            conn.sendall(encode_message(SyncAck(sync.id)) + evil + evil)
            assert run([guest], 2, lambda: guest.view().link == "refused")
            guest.publish(HINTS[:2], 1, time.monotonic())  # hints stay with the guest
            run([guest], 0.3)
        view = guest.view()
        assert "org.evil.sched" in view.reason and view.reason.startswith("refusing host")
        refusals = [r for r in caplog.records if "channel: refused" in r.message]
        assert len(refusals) == 1 and refusals[0].levelname == "WARNING"
        conn.settimeout(0.2)
        try:
            rest = conn.recv(65536)
        except socket.timeout:
            rest = b""
        assert b'"hints"' not in rest and b'"heartbeat"' not in rest
        conn.close()
    finally:
        guest.close()
        server.close()


def test_channel_sync_ack_that_never_comes_leads_to_a_new_sync(sock_path):
    server = _raw_host(sock_path)
    guest = ChannelGuestLink(sock_path, 2, stale_after=0.3)
    try:
        assert run([guest], 2, lambda: guest.fileno() is not None)
        conn, _ = server.accept()
        conn.settimeout(0.05)
        framer, syncs = LineFramer(), []
        end = time.monotonic() + 5
        while len(syncs) < 2 and time.monotonic() < end:
            run([guest], 0.05)
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            syncs += [m for m in (decode_line(x) for x in framer.feed(data)
                                  if isinstance(x, bytes)) if isinstance(m, Sync)]
        assert len(syncs) >= 2 and syncs[0].id != syncs[1].id
        conn.close()
    finally:
        guest.close()
        server.close()
