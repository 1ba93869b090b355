"""A region that goes bad while both links run: headers overwritten, files truncated,
a second agent on the same region. Time is simulated: both links are ticked with a
made-up clock, so "within two heartbeats" is exact and independent of load."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from guestagent.errors import GuestagentError
from guestagent.protocol import (
    GUEST_CONTROL_OFFSET,
    Feature,
    GuestControl,
    LinkState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
    PeerState,
    decode_guest_control,
    encode_guest_control,
    region_size_for,
)
from guestagent.transport import RegionGuestLink, RegionHostLink
from guestagent.transport.complaints import Complaints

PERIOD = 1.0  # heartbeat period of both links
STEP = 0.05


def drive(links, start: float, end: float) -> float:
    t = start
    while t <= end + 1e-9:
        for link in links:
            link.tick(t)
        t = round(t + STEP, 6)
    return t


def boost(nr: int) -> list[VcpuHint]:
    return [VcpuHint(i, Request.BOOST, SchedClass.FIFO, 40) if i == nr - 1 else VcpuHint(i)
            for i in range(nr)]


def guest_epoch(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(GUEST_CONTROL_OFFSET)
        return decode_guest_control(f.read(64)).epoch


@pytest.fixture
def pair(tmp_path):
    path = str(tmp_path / "region")
    guest = RegionGuestLink(path, 4, create=True, heartbeat_period=PERIOD)
    host = RegionHostLink(path, heartbeat_period=PERIOD)
    guest.publish(boost(4), 1, 0.0)
    drive([guest, host], 0.0, 2.0)
    assert guest.view().link == LinkState.UP and host.view().link == LinkState.UP
    yield path, guest, host
    guest.close()
    host.close()


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset, data", [
    (0, bytes(128)),  # header zeroed
    (40, b"\x02\x00"),  # another major
    (52, b"\x07\x00\x00\x00"),  # another layout (nr_vcpus)
], ids=["zeroed", "major-2", "layout"])
def test_bad_header_reformatted_with_a_new_epoch_and_up_within_two_heartbeats(
        pair, offset, data, caplog):
    path, guest, host = pair
    before = guest_epoch(path)
    overwrite(path, offset, data)
    with caplog.at_level(logging.WARNING, "guestagent.transport"):
        drive([guest, host], 2.0 + STEP, 2.0 + 2 * PERIOD)
    assert guest_epoch(path) != before
    assert guest.view().link == LinkState.UP and host.view().link == LinkState.UP
    assert host.view().hints == tuple(boost(4))  # the table came back with the new epoch
    assert any("region: bad-header" in r.message for r in caplog.records)


def test_a_new_guest_epoch_ends_the_old_sessions_hints_before_its_header_is_judged(pair):
    # A guest restarted and wrote its control line (a new epoch, running, heartbeating)
    # while its header cannot be read yet: the old session's boost is over all the same.
    path, guest, host = pair
    assert host.view().hints == tuple(boost(4))
    guest.close()
    overwrite(path, 0, bytes(128))
    overwrite(path, GUEST_CONTROL_OFFSET, encode_guest_control(
        GuestControl(PeerState.RUNNING, Feature.NONE, guest_epoch(path) + 1, 99, 5)))
    drive([host], 2.0 + STEP, 2.0 + PERIOD / 2)  # well within the old session's lease
    assert host.view().hints == () and host.view().generation == 0


def test_header_of_another_protocol_is_not_overwritten_and_said_why(pair):
    path, guest, host = pair
    with open(path, "rb") as f:
        saved = f.read(128)
    overwrite(path, 0, b"NOTOURS!")
    drive([guest, host], 2.0 + STEP, 2.0 + 2 * PERIOD)
    with open(path, "rb") as f:
        assert f.read(8) == b"NOTOURS!"
    assert guest.view().link == LinkState.DOWN and "taken over" in guest.view().reason
    assert host.view().link == LinkState.DOWN and "another protocol" in host.view().reason
    overwrite(path, 0, saved)  # whole again
    drive([guest, host], 4.0 + STEP, 4.0 + 2 * PERIOD)
    assert guest.view().link == LinkState.UP and host.view().link == LinkState.UP


def test_second_agent_on_the_same_region_is_refused_with_the_holders_pid(pair):
    path, guest, host = pair
    with pytest.raises(GuestagentError, match=f"in use by pid {os.getpid()}"):
        RegionGuestLink(path, 4)
    guest.close()
    RegionGuestLink(path, 4).close()  # released with the first one


def test_complaints_are_one_line_per_kind_per_minute_with_the_count():
    lines: list[str] = []
    complain = Complaints("channel", emit=lines.append)
    for t in range(0, 130, 10):  # a bad line every 10 s for two minutes
        complain("invalid", "line is not a JSON object", float(t))
    complain("wrong-size", "capacity table for 3 vCPUs; this guest has 2", 5.0)
    complain("invalid", "peer said \x1b[2J", 125.0)
    assert lines == [
        "channel: invalid: line is not a JSON object",
        "channel: invalid: line is not a JSON object (5 more since the last report)",
        "channel: invalid: line is not a JSON object (5 more since the last report)",
        "channel: wrong-size: capacity table for 3 vCPUs; this guest has 2",
    ]
    complain("invalid", "peer said \x1b[2J", 200.0)
    assert lines[-1] == "channel: invalid: peer said \\x1b[2J (1 more since the last report)"


# A truncated file must not kill either side: the links run in a child so that a
# SIGBUS (the failure before the fix) fails the test instead of killing pytest.
TRUNCATE = textwrap.dedent("""
    import os, sys
    from guestagent.protocol import LinkState, Request, SchedClass, VcpuCapacity, VcpuHint
    from guestagent.transport import RegionGuestLink, RegionHostLink
    path, nr = sys.argv[1], int(sys.argv[2])
    guest = RegionGuestLink(path, nr, create=True, heartbeat_period=1.0)
    host = RegionHostLink(path, heartbeat_period=1.0)
    t = 0.0
    def drive(seconds, gen):
        global t
        end = t + seconds
        while t < end:
            t = round(t + 0.05, 6)
            guest.tick(t)
            host.tick(t)
            guest.publish([VcpuHint(i, Request.BOOST, SchedClass.FIFO, 1 + gen % 90)
                           for i in range(nr)], gen, t)
            host.publish_capacity([VcpuCapacity(i, acked_generation=gen) for i in range(nr)], t)
            gen += 1
        return gen
    gen = drive(2, 1)
    assert guest.view().link == LinkState.UP and host.view().link == LinkState.UP
    for restore in ("content", "zeros"):
        with open(path, "rb") as f:
            saved = f.read()
        os.truncate(path, 8)
        gen = drive(3, gen)
        g, h = guest.view(), host.view()
        assert g.link == LinkState.DOWN and "shrank to 8 bytes" in g.reason, g
        assert h.link == LinkState.DOWN and "shrank to 8 bytes" in h.reason, h
        if restore == "content":
            with open(path, "r+b") as f:
                f.write(saved)
        else:
            os.truncate(path, len(saved))  # whole again, but zero past the magic
        whole_at = gen
        gen = drive(2, gen)
        assert guest.view().link == LinkState.UP, (restore, guest.view())
        assert host.view().link == LinkState.UP, (restore, host.view())
        assert host.view().generation > whole_at  # hints flow again
    print("survived")
""")


@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("nr", [64, 256])
def test_truncated_region_file_kills_neither_side(tmp_path, where, nr):
    assert region_size_for(nr) > 2 * 4096  # several pages
    if where == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        path = f"/dev/shm/guestagent-test-{uuid.uuid4().hex}"
    else:
        path = str(tmp_path / "region")
    try:
        proc = subprocess.run([sys.executable, "-c", TRUNCATE, path, str(nr)],
                              capture_output=True, text=True, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert proc.returncode == 0 and "survived" in proc.stdout, \
        (proc.returncode, proc.stderr[-2000:])
    assert VcpuCapacity(0).capacity == 1024
