"""Region layout: golden bytes, round trips, validation of foreign or broken headers."""

from __future__ import annotations

import pytest

from guestagent.protocol.errors import ProtocolError
from guestagent.protocol.model import (
    AppliedFlag,
    Feature,
    HintFlag,
    PeerState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
)
from guestagent.protocol.region import (
    HEADER_SIZE,
    GuestControl,
    HostControl,
    RegionHeader,
    RegionLayout,
    Verdict,
    check_layout,
    decode_guest_control,
    decode_guest_slot,
    decode_header,
    decode_host_control,
    decode_host_slot,
    encode_guest_control,
    encode_guest_slot,
    encode_header,
    encode_host_control,
    encode_host_slot,
    line_seq,
    region_size_for,
)


def h(text: str) -> bytes:
    """Hex with spaces; anything after '#' on a line is a comment."""
    return bytes.fromhex("".join(line.split("#")[0].replace(" ", "") for line in text.split("\n")))


# Field by field, as docs/protocol.md lays them out. A change here is a layout change:
# it must come with a new ABI major (or, for additions in reserved bytes, a new minor).
GOLDEN_HEADER_4 = h("""
    47554553 54414754                               # magic "GUESTAGT"
    6f72672e 67756573 74616765 6e742e73 63686564 000000000000000000000000
                                                    # name "org.guestagent.sched", NUL padded to 32
    0100 0000                                       # abi 1.0
    00010000                                        # header_size 256
    00030000                                        # region_size 768
    04000000                                        # nr_vcpus 4
    00010000 40000000                               # guest table at 256, slots of 64
    00020000 40000000                               # host table at 512, slots of 64
""") + bytes(56)
GOLDEN_GUEST_CONTROL = h("""
    02000000 02000000                               # seq 2, state RUNNING
    0300000000000000                                # features CAPACITY|COLOCATION
    8877665544332211                                # epoch
    0700000000000000                                # heartbeat 7
    2a00000000000000                                # generation 42
""") + bytes(24)
GOLDEN_HOST_CONTROL = h("""
    04000000 02000000                               # seq 4, state RUNNING
    0100000000000000                                # features CAPACITY
    0807060504030201                                # epoch
    0900000000000000                                # heartbeat 9
    2900000000000000                                # acked generation 41
    8877665544332211                                # guest epoch
    0100 0000 01 000000                             # abi 1.0, verdict ACCEPTED, pad
""") + bytes(8)
GOLDEN_GUEST_SLOT = h("""
    06000000                                        # seq 6
    01 01 32 fb                                     # BOOST, FIFO, rt 50, nice -5
    09000000                                        # flags CRITICAL_IRQ|IDLE
    3412 0000                                       # group 0x1234, pad
    2a00000000000000                                # generation 42
""") + bytes(40)
GOLDEN_HOST_SLOT = h("""
    08000000                                        # seq 8
    0003 0001                                       # capacity 768, host_load 256
    05000000                                        # pcpu 5
    11000000                                        # applied BOOSTED|PINNED
    2900000000000000                                # acked generation 41
""") + bytes(40)

GUEST_CONTROL = GuestControl(PeerState.RUNNING, Feature.CAPACITY | Feature.COLOCATION,
                             0x1122334455667788, 7, 42)
HOST_CONTROL = HostControl(PeerState.RUNNING, Feature.CAPACITY, 0x0102030405060708, 9, 41,
                           0x1122334455667788, 1, 0, Verdict.ACCEPTED)
HINT = VcpuHint(3, Request.BOOST, SchedClass.FIFO, 50, -5,
                HintFlag.CRITICAL_IRQ | HintFlag.IDLE, 0x1234)
CAP = VcpuCapacity(3, 768, 5, 256, AppliedFlag.BOOSTED | AppliedFlag.PINNED, 41)


def test_golden_header():
    assert len(GOLDEN_HEADER_4) == 128
    assert encode_header(RegionLayout(4), abi_minor=0) == GOLDEN_HEADER_4  # a 1.0 guest's
    assert encode_header(RegionLayout(4)) == GOLDEN_HEADER_4[:42] + b"\x01\x00" + \
        GOLDEN_HEADER_4[44:]  # 1.1: only the minor differs
    header = decode_header(GOLDEN_HEADER_4)
    assert header == RegionHeader(1, 0, RegionLayout(4))
    assert check_layout(header, 768) == RegionLayout(4)


def test_golden_control_lines():
    assert encode_guest_control(GUEST_CONTROL, seq=2) == GOLDEN_GUEST_CONTROL
    assert decode_guest_control(GOLDEN_GUEST_CONTROL) == GUEST_CONTROL
    assert encode_host_control(HOST_CONTROL, seq=4) == GOLDEN_HOST_CONTROL
    assert decode_host_control(GOLDEN_HOST_CONTROL) == HOST_CONTROL
    assert line_seq(GOLDEN_GUEST_CONTROL) == 2 and line_seq(GOLDEN_HOST_CONTROL) == 4


def test_golden_slots():
    assert encode_guest_slot(HINT, 42, seq=6) == GOLDEN_GUEST_SLOT
    assert decode_guest_slot(3, GOLDEN_GUEST_SLOT) == (HINT, 42)
    assert encode_host_slot(CAP, seq=8) == GOLDEN_HOST_SLOT
    assert decode_host_slot(3, GOLDEN_HOST_SLOT) == CAP


def test_layout_sizes_and_offsets():
    lay = RegionLayout(4)
    assert lay.region_size == region_size_for(4) == HEADER_SIZE + 4 * 128
    assert lay.guest_slot(0) == 256 and lay.guest_slot(3) == 448
    assert lay.host_slot(0) == 512 and lay.host_slot(3) == 704
    # every slot starts on its own cache line
    assert all(lay.guest_slot(i) % 64 == 0 and lay.host_slot(i) % 64 == 0 for i in range(4))
    assert region_size_for(4096) <= 1 << 20  # the largest guest fits a 1 MiB ivshmem BAR


def test_zeroed_slots_decode_to_neutral():
    assert decode_guest_slot(0, bytes(64)) == (VcpuHint(0), 0)
    assert decode_guest_control(bytes(64)) == GuestControl()
    assert decode_host_control(bytes(64)) == HostControl()


def test_out_of_range_values_are_clamped_or_defaulted():
    raw = h("00000000 07 04 c8 80 ff000000 ffff 0000") + bytes(48)
    hint, gen = decode_guest_slot(1, raw)
    # unknown request -> NEUTRAL, unknown class 4 -> OTHER, rt 200 -> 99, nice -128 -> -20,
    # unknown flag bits dropped
    assert hint == VcpuHint(1, Request.NEUTRAL, SchedClass.OTHER, 99, -20, HintFlag(15), 0xFFFF)
    raw = h("00000000 ffff 00f0 feffffff ffffffff") + bytes(48)
    cap = decode_host_slot(2, raw)
    assert cap == VcpuCapacity(2, 1024, -1, -1, AppliedFlag(127), 0)
    # encoding clamps the same way, so what is written is what will be read
    wild = VcpuHint(0, Request.BOOST, SchedClass.RR, 500, 99, HintFlag.NONE, 0)
    assert decode_guest_slot(0, encode_guest_slot(wild, 1))[0].rt_priority == 99
    assert decode_host_slot(0, encode_host_slot(VcpuCapacity(0, 5000), 0)).capacity == 1024


@pytest.mark.parametrize("data, message", [
    (bytes(128), "not formatted"),
    (b"OTHERMAG" + bytes(120), "another protocol"),
    (GOLDEN_HEADER_4[:8] + b"org.other" + bytes(119), "another protocol"),
    (GOLDEN_HEADER_4[:60], "too small"),
])
def test_foreign_headers_refused(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode_header(data)


def _with(field_offset: int, value: bytes) -> bytes:
    return GOLDEN_HEADER_4[:field_offset] + value + GOLDEN_HEADER_4[field_offset + len(value):]


@pytest.mark.parametrize("data, mapped, message", [
    (_with(40, b"\x02\x00"), 768, "ABI 2.0 is not supported"),
    (_with(52, b"\x00\x00\x00\x00"), 768, "nr_vcpus 0"),
    (_with(52, b"\x01\x10\x00\x00"), 1 << 30, "nr_vcpus 4097"),
    (GOLDEN_HEADER_4, 767, "only 767 are mapped"),
    (_with(56, b"\x20\x00\x00\x00"), 768, "guest table"),
    (_with(64, b"\x40\x01\x00\x00"), 768, "overlap"),
    (_with(68, b"\x30\x00\x00\x00"), 768, "host table"),
    (_with(48, b"\x00\x02\x00\x00"), 768, "past the region size"),
    (_with(44, b"\x80\x00\x00\x00"), 768, "header size"),
])
def test_bad_layouts_refused(data, mapped, message):
    with pytest.raises(ProtocolError, match=message):
        check_layout(decode_header(data), mapped)


def test_newer_minor_with_bigger_slots_is_accepted():
    lay = RegionLayout(2, guest_slot_size=128, host_slot_size=128)
    header = decode_header(encode_header(lay, 1, 7))
    assert header.abi_minor == 7
    assert check_layout(header, lay.region_size) == lay

