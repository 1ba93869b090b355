"""The guest-host scheduling protocol (docs/protocol.md), without IO.

model: the values exchanged. channel + connection: the JSON-lines channel,
as bytes in -> events out. region + session: the shared region's byte
layout and the sans-IO sessions that drive it. liveness: link state and
heartbeats, shared by both. Everything a transport or a peer needs is named
here; names beginning with an underscore are not part of the surface.
"""

from guestagent.protocol.channel import (
    ENTRIES_PER_PART,
    MAX_LINE,
    RESET,
    LineDropped,
    LineFramer,
    decode_line,
    encode_message,
)
from guestagent.protocol.connection import (
    BadLine,
    Connection,
    Counters,
    GuestConnection,
    GuestEvent,
    HostConnection,
    HostEvent,
    Refused,
    Resync,
)
from guestagent.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from guestagent.protocol.liveness import HeartbeatWatch, LinkState
from guestagent.protocol.messages import (
    Ack,
    Capacity,
    CapacityPart,
    Error,
    Heartbeat,
    Hello,
    Hints,
    HintsPart,
    Message,
    Sync,
    SyncAck,
    Unknown,
    Welcome,
)
from guestagent.protocol.model import (
    CAPACITY_MAX,
    GROUP_MAX,
    HEARTBEAT_PERIOD,
    MAX_VCPUS,
    NICE_MAX,
    NICE_MIN,
    PROTOCOL_NAME,
    RT_PRIORITY_MAX,
    STALE_AFTER,
    VERSION_MAJOR,
    VERSION_MINOR,
    AppliedFlag,
    Feature,
    HintFlag,
    PeerState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
    make_capacity,
    make_hint,
    neutral_hints,
)
from guestagent.protocol.negotiation import Negotiated, negotiate
from guestagent.protocol.region import (
    GUEST_CONTROL_OFFSET,
    HEADER_SIZE,
    HOST_CONTROL_OFFSET,
    MAGIC,
    SLOT_SIZE,
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
from guestagent.protocol.session import (
    GuestRegionSession,
    HostRegionSession,
    layout_to_keep,
    reformat_problem,
)

__all__ = [
    # model
    "CAPACITY_MAX", "GROUP_MAX", "HEARTBEAT_PERIOD", "MAX_VCPUS", "NICE_MAX", "NICE_MIN",
    "PROTOCOL_NAME", "RT_PRIORITY_MAX", "STALE_AFTER", "VERSION_MAJOR", "VERSION_MINOR",
    "AppliedFlag", "Feature", "HintFlag", "PeerState", "Request", "SchedClass", "VcpuCapacity",
    "VcpuHint", "make_capacity", "make_hint", "neutral_hints",
    # errors, liveness, negotiation
    "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "HeartbeatWatch", "LinkState",
    "Negotiated", "negotiate",
    # channel
    "ENTRIES_PER_PART", "MAX_LINE", "RESET", "LineDropped", "LineFramer", "decode_line",
    "encode_message", "Ack", "Capacity", "CapacityPart", "Error", "Heartbeat", "Hello", "Hints",
    "HintsPart", "Message", "Sync", "SyncAck", "Unknown", "Welcome",
    "BadLine", "Connection", "Counters", "GuestConnection", "GuestEvent", "HostConnection",
    "HostEvent", "Refused", "Resync",
    # region
    "GUEST_CONTROL_OFFSET", "HEADER_SIZE", "HOST_CONTROL_OFFSET", "MAGIC", "SLOT_SIZE",
    "GuestControl", "HostControl", "RegionHeader", "RegionLayout", "Verdict", "check_layout",
    "decode_guest_control", "decode_guest_slot", "decode_header", "decode_host_control",
    "decode_host_slot", "encode_guest_control", "encode_guest_slot", "encode_header",
    "encode_host_control", "encode_host_slot", "line_seq", "region_size_for",
    "GuestRegionSession", "HostRegionSession", "layout_to_keep", "reformat_problem",
]
