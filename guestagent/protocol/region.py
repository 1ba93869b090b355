"""Byte layout of the shared region (docs/protocol.md, "Shared region").

Pure encode/decode of the header, the two control lines and the per-vCPU
slots. Every structure is little-endian and explicitly padded; every 64-byte
line has exactly one writer. Sequence counters are encoded here but driven by
the transport's seqlock (guestagent.transport.seqlock).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from guestagent.protocol.errors import RemoteProtocolError
from guestagent.protocol.model import (
    FEATURE_MASK,
    MAX_VCPUS,
    PROTOCOL_NAME,
    VERSION_MAJOR,
    VERSION_MINOR,
    Feature,
    PeerState,
    VcpuCapacity,
    VcpuHint,
    make_capacity,
    make_hint,
)

__all__ = [
    "GUEST_CONTROL_OFFSET", "HEADER_SIZE", "HOST_CONTROL_OFFSET", "MAGIC", "SLOT_SIZE",
    "GuestControl", "HostControl", "RegionHeader", "RegionLayout", "Verdict", "check_layout",
    "decode_guest_control", "decode_guest_slot", "decode_header", "decode_host_control",
    "decode_host_slot", "encode_guest_control", "encode_guest_slot", "encode_header",
    "encode_host_control", "encode_host_slot", "line_seq", "region_size_for",
]

MAGIC = b"GUESTAGT"
LINE = 64  # cache line: the unit of single-writer ownership
HEADER_SIZE = 256  # static header (2 lines) + guest control + host control
GUEST_CONTROL_OFFSET = 128
HOST_CONTROL_OFFSET = 192
SLOT_SIZE = 64

# static header, written by the guest only while formatting
_HEADER = struct.Struct("<8s32sHHIIIIIII56x")
# guest control line: seq, state, features, epoch, heartbeat, generation
_GUEST_CONTROL = struct.Struct("<IIQQQQ24x")
# host control line: seq, state, features, epoch, heartbeat, acked generation,
# guest epoch the verdict refers to, host ABI major/minor, verdict
_HOST_CONTROL = struct.Struct("<IIQQQQQHHB3x8x")
# guest slot: seq, request, class, rt_priority, nice, flags, group, generation
_GUEST_SLOT = struct.Struct("<IBBBbIH2xQ40x")
# host slot: seq, capacity, host_load, pcpu, applied, acked generation
_HOST_SLOT = struct.Struct("<IHhiIQ40x")
_SEQ = struct.Struct("<I")

assert _HEADER.size == 128 and _GUEST_CONTROL.size == LINE and _HOST_CONTROL.size == LINE
assert _GUEST_SLOT.size == SLOT_SIZE and _HOST_SLOT.size == SLOT_SIZE

U64 = (1 << 64) - 1


class Verdict(enum.IntEnum):
    """The host's answer to the guest's header, in the host control line."""

    NONE = 0  # not looked yet (or not for this guest epoch)
    ACCEPTED = 1
    REFUSED = 2  # unknown major or a layout the host cannot use


@dataclass(frozen=True)
class RegionLayout:
    """Where everything lies for a given number of vCPUs."""

    nr_vcpus: int
    header_size: int = HEADER_SIZE
    guest_table_offset: int = HEADER_SIZE
    guest_slot_size: int = SLOT_SIZE
    host_table_offset: int = 0  # 0: directly after the guest table
    host_slot_size: int = SLOT_SIZE
    region_size: int = 0  # 0: exactly what the tables need

    def __post_init__(self) -> None:
        if self.host_table_offset == 0:
            object.__setattr__(self, "host_table_offset",
                               self.guest_table_offset + self.nr_vcpus * self.guest_slot_size)
        if self.region_size == 0:
            object.__setattr__(self, "region_size",
                               self.host_table_offset + self.nr_vcpus * self.host_slot_size)

    def guest_slot(self, vcpu: int) -> int:
        return self.guest_table_offset + vcpu * self.guest_slot_size

    def host_slot(self, vcpu: int) -> int:
        return self.host_table_offset + vcpu * self.host_slot_size


def region_size_for(nr_vcpus: int) -> int:
    """Bytes a v1 region needs for nr_vcpus."""
    return HEADER_SIZE + 2 * SLOT_SIZE * nr_vcpus


@dataclass(frozen=True)
class RegionHeader:
    """The static header as read, before it is checked against a mapping."""

    abi_major: int
    abi_minor: int
    layout: RegionLayout


def encode_header(layout: RegionLayout, abi_major: int = VERSION_MAJOR,
                  abi_minor: int = VERSION_MINOR) -> bytes:
    """The 128-byte static header. Writers store bytes 8.. first and the magic last."""
    return _HEADER.pack(MAGIC, PROTOCOL_NAME.encode(), abi_major, abi_minor,
                        layout.header_size, layout.region_size, layout.nr_vcpus,
                        layout.guest_table_offset, layout.guest_slot_size,
                        layout.host_table_offset, layout.host_slot_size)


def decode_header(data: bytes) -> RegionHeader:
    """Read the static header; RemoteProtocolError unless it is a guestagent region.

    The layout is not checked here (an unknown major may lay things out
    differently): call check_layout() once the major is known to be 1.
    """
    if len(data) < _HEADER.size:
        raise RemoteProtocolError(f"region too small for a header: {len(data)} < "
                                  f"{_HEADER.size} bytes")
    (magic, name, major, minor, header_size, region_size, nr_vcpus, g_off, g_size,
     h_off, h_size) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        if magic == bytes(8):
            raise RemoteProtocolError("region is not formatted (magic is zero)")
        raise RemoteProtocolError(f"region is of another protocol (magic {magic!r})")
    if name.rstrip(b"\0") != PROTOCOL_NAME.encode():
        shown = name.rstrip(b"\0").decode("ascii", "replace")
        raise RemoteProtocolError(f"region is of another protocol ({shown!r})")
    return RegionHeader(major, minor, RegionLayout(
        nr_vcpus=nr_vcpus, header_size=header_size, guest_table_offset=g_off,
        guest_slot_size=g_size, host_table_offset=h_off, host_slot_size=h_size,
        region_size=region_size))


def check_layout(header: RegionHeader, mapped_size: int) -> RegionLayout:
    """Check a v1 header's layout against the bytes actually mapped."""
    lay = header.layout
    if header.abi_major != VERSION_MAJOR:
        raise RemoteProtocolError(f"region ABI {header.abi_major}.{header.abi_minor} is not "
                            f"supported (this side speaks {VERSION_MAJOR}.x)")
    if not 1 <= lay.nr_vcpus <= MAX_VCPUS:
        raise RemoteProtocolError(f"region nr_vcpus {lay.nr_vcpus} outside 1..{MAX_VCPUS}")
    if lay.header_size < HEADER_SIZE or lay.header_size % LINE:
        raise RemoteProtocolError(f"region header size {lay.header_size} is invalid")
    for what, off, size in (("guest", lay.guest_table_offset, lay.guest_slot_size),
                            ("host", lay.host_table_offset, lay.host_slot_size)):
        # newer minors may grow slots; v1 fields stay at the start of each slot
        if size < SLOT_SIZE or size % LINE or off % LINE or off < lay.header_size:
            raise RemoteProtocolError(f"region {what} table (offset {off}, slot {size}) is invalid")
        if off + size * lay.nr_vcpus > lay.region_size:
            raise RemoteProtocolError(f"region {what} table ends past the region size")
    g_end = lay.guest_table_offset + lay.guest_slot_size * lay.nr_vcpus
    h_end = lay.host_table_offset + lay.host_slot_size * lay.nr_vcpus
    if lay.guest_table_offset < h_end and lay.host_table_offset < g_end:
        raise RemoteProtocolError("region guest and host tables overlap")
    if lay.region_size > mapped_size:
        raise RemoteProtocolError(f"region claims {lay.region_size} bytes but only {mapped_size} "
                            f"are mapped")
    return lay


@dataclass(frozen=True)
class GuestControl:
    """The guest's control line: its lifecycle and the newest hint generation."""

    state: PeerState = PeerState.ABSENT
    features: Feature = Feature.NONE
    epoch: int = 0  # random, non-zero, new on every guest agent start
    heartbeat: int = 0  # incremented every HEARTBEAT_PERIOD while alive
    generation: int = 0  # newest hint generation fully written to the slots


@dataclass(frozen=True)
class HostControl:
    """The host's control line: its lifecycle, verdict and acknowledgement."""

    state: PeerState = PeerState.ABSENT
    features: Feature = Feature.NONE  # what the host supports; in use: AND with the guest's
    epoch: int = 0  # random, non-zero, new on every host peer start
    heartbeat: int = 0
    acked_generation: int = 0  # newest guest generation the host has acted on
    guest_epoch: int = 0  # guest epoch the verdict and ack refer to
    abi_major: int = 0
    abi_minor: int = 0
    verdict: Verdict = Verdict.NONE


def _state(value: int) -> PeerState:
    # a state this version does not know is never taken to mean "running"
    return PeerState(value) if value in PeerState._value2member_map_ else PeerState.ABSENT


def line_seq(line: bytes) -> int:
    """The sequence counter at the start of any control line or slot."""
    return _SEQ.unpack_from(line)[0]


def encode_guest_control(ctl: GuestControl, seq: int = 0) -> bytes:
    return _GUEST_CONTROL.pack(seq & 0xFFFFFFFF, int(ctl.state), int(ctl.features) & U64,
                               ctl.epoch & U64, ctl.heartbeat & U64, ctl.generation & U64)


def decode_guest_control(line: bytes) -> GuestControl:
    _, state, features, epoch, heartbeat, generation = _GUEST_CONTROL.unpack_from(line)
    return GuestControl(_state(state), Feature(features & FEATURE_MASK), epoch, heartbeat,
                        generation)


def encode_host_control(ctl: HostControl, seq: int = 0) -> bytes:
    return _HOST_CONTROL.pack(seq & 0xFFFFFFFF, int(ctl.state), int(ctl.features) & U64,
                              ctl.epoch & U64, ctl.heartbeat & U64,
                              ctl.acked_generation & U64, ctl.guest_epoch & U64,
                              ctl.abi_major, ctl.abi_minor, int(ctl.verdict))


def decode_host_control(line: bytes) -> HostControl:
    (_, state, features, epoch, heartbeat, acked, guest_epoch, major, minor,
     verdict) = _HOST_CONTROL.unpack_from(line)
    return HostControl(_state(state), Feature(features & FEATURE_MASK), epoch, heartbeat, acked,
                       guest_epoch, major, minor,
                       Verdict(verdict) if verdict in Verdict._value2member_map_
                       else Verdict.NONE)


def encode_guest_slot(hint: VcpuHint, generation: int, seq: int = 0) -> bytes:
    """One guest slot; values outside their ranges are clamped as the decoder would."""
    h = make_hint(hint.vcpu, int(hint.request), int(hint.sched_class), hint.rt_priority,
                  hint.nice, int(hint.flags), hint.group)
    return _GUEST_SLOT.pack(seq & 0xFFFFFFFF, int(h.request), int(h.sched_class),
                            h.rt_priority, h.nice, int(h.flags), h.group, generation & U64)


def decode_guest_slot(vcpu: int, line: bytes) -> tuple[VcpuHint, int]:
    """(hint, generation the slot was written at)."""
    _, req, cls, prio, nice, flags, group, generation = _GUEST_SLOT.unpack_from(line)
    return make_hint(vcpu, req, cls, prio, nice, flags, group), generation


def encode_host_slot(cap: VcpuCapacity, seq: int = 0) -> bytes:
    c = make_capacity(cap.vcpu, cap.capacity, cap.pcpu, cap.host_load, int(cap.applied),
                      cap.acked_generation)
    return _HOST_SLOT.pack(seq & 0xFFFFFFFF, c.capacity, c.host_load,
                           c.pcpu, int(c.applied), c.acked_generation & U64)


def decode_host_slot(vcpu: int, line: bytes) -> VcpuCapacity:
    _, capacity, load, pcpu, applied, acked = _HOST_SLOT.unpack_from(line)
    return make_capacity(vcpu, capacity, pcpu, load, applied, acked)
