"""Line framing and the JSON line codec of the channel (docs/protocol.md, "Channel").

LineFramer turns a byte stream into lines (0xFF resets it, oversized lines
are dropped and reported); encode_* and decode_line turn messages into lines
and back. No IO here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from guestagent.protocol.errors import LocalProtocolError, RemoteProtocolError
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
    FEATURE_MASK,
    MAX_VCPUS,
    Feature,
    PeerState,
    VcpuCapacity,
    VcpuHint,
    make_capacity,
    make_hint,
)

__all__ = [
    "ENTRIES_PER_PART", "MAX_LINE", "RESET", "LineDropped", "LineFramer", "decode_line",
    "encode_message",
]

MAX_LINE = 65536  # bytes per line, the newline included
RESET = b"\xff"  # never valid in UTF-8, so never inside a line: resets the parser
ENTRIES_PER_PART = 1024  # keeps the worst-case hints/capacity line near 32 KiB
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
_TEXT_MAX = 1024  # longest error code/message/reason kept


@dataclass(frozen=True)
class LineDropped:
    """A line longer than MAX_LINE was discarded; the framer skipped to its end."""

    size: int  # bytes seen when it was dropped (at least MAX_LINE)


Framed = Union[bytes, LineDropped]


class LineFramer:
    """Bytes in, complete lines out; memory bounded by MAX_LINE."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line - 1  # content, without its newline
        self._buf = bytearray()
        self._skipping = False
        self.resets = 0  # 0xFF bytes seen

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes) -> list[Framed]:
        out: list[Framed] = []
        start, n = 0, len(data)
        ff = data.find(RESET)
        while start < n:
            if ff != -1 and ff < start:
                ff = data.find(RESET, start)
            nl = data.find(b"\n", start)
            if ff != -1 and (nl == -1 or ff < nl):
                self.resets += 1
                self.reset()
                start = ff + 1
                continue
            end = n if nl == -1 else nl
            if not self._skipping:
                if len(self._buf) + end - start > self._max:
                    out.append(LineDropped(len(self._buf) + end - start))
                    self._buf.clear()
                    self._skipping = True
                else:
                    self._buf += data[start:end]
            if nl == -1:
                break
            if not self._skipping and self._buf.strip():
                out.append(bytes(self._buf))
            self._buf.clear()
            self._skipping = False
            start = nl + 1
        return out


# --- encoding -------------------------------------------------------------------------

def _line(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise LocalProtocolError(f"{obj.get('type')} line of {len(data)} bytes exceeds {MAX_LINE}")
    return data


def _hint_entry(h: VcpuHint) -> list[int]:
    return [h.vcpu, int(h.request), int(h.sched_class), h.rt_priority, h.nice, int(h.flags),
            h.group]


def _capacity_entry(c: VcpuCapacity) -> list[int]:
    return [c.vcpu, c.capacity, c.pcpu, c.host_load, int(c.applied), c.acked_generation]


def _parts(entries: list, nr: int) -> list[list]:
    chunks = [entries[i:i + ENTRIES_PER_PART] for i in range(0, len(entries), ENTRIES_PER_PART)]
    if nr > MAX_VCPUS:
        raise LocalProtocolError(f"nr_vcpus {nr} exceeds {MAX_VCPUS}")
    return chunks or [[]]


def _check_table(items: Sequence[Any]) -> None:
    for i, item in enumerate(items):
        if item.vcpu != i:
            raise LocalProtocolError(f"table entry {i} is for vCPU {item.vcpu}")


def encode_hints(msg: Hints) -> bytes:
    """One or more lines; entries equal to the neutral hint are left out."""
    _check_table(msg.hints)
    entries = [_hint_entry(h) for h in msg.hints if h != VcpuHint(vcpu=h.vcpu)]
    chunks = _parts(entries, len(msg.hints))
    return b"".join(_line({"type": "hints", "generation": msg.generation,
                           "nr_vcpus": len(msg.hints), "part": [i, len(chunks)], "vcpus": c})
                    for i, c in enumerate(chunks))


def encode_capacity(msg: Capacity) -> bytes:
    """One or more lines; entries equal to VcpuCapacity(vcpu) are left out."""
    _check_table(msg.capacities)
    entries = [_capacity_entry(c) for c in msg.capacities if c != VcpuCapacity(vcpu=c.vcpu)]
    chunks = _parts(entries, len(msg.capacities))
    return b"".join(_line({"type": "capacity", "seq": msg.seq,
                           "nr_vcpus": len(msg.capacities), "part": [i, len(chunks)],
                           "vcpus": c})
                    for i, c in enumerate(chunks))


def encode_message(msg: Message | Hints | Capacity) -> bytes:
    """Bytes for one message (several lines for large Hints/Capacity)."""
    if isinstance(msg, Hints):
        return encode_hints(msg)
    if isinstance(msg, Capacity):
        return encode_capacity(msg)
    if isinstance(msg, Hello):
        return _line({"type": "hello", "protocol": msg.protocol,
                      "version": [msg.major, msg.minor], "features": int(msg.features),
                      "epoch": msg.epoch, "nr_vcpus": msg.nr_vcpus})
    if isinstance(msg, Welcome):
        return _line({"type": "welcome", "protocol": msg.protocol,
                      "version": [msg.major, msg.minor], "accepted": msg.accepted,
                      "features": int(msg.features), "epoch": msg.epoch, "reason": msg.reason})
    if isinstance(msg, Ack):
        return _line({"type": "ack", "generation": msg.generation})
    if isinstance(msg, Heartbeat):
        beat = {"type": "heartbeat", "seq": msg.seq, "state": int(msg.state)}
        if msg.epoch:  # 1.1; a 1.0 peer ignores the field
            beat["epoch"] = msg.epoch
        return _line(beat)
    if isinstance(msg, Error):
        return _line({"type": "error", "code": msg.code, "message": msg.message})
    if isinstance(msg, Sync):
        return _line({"type": "sync", "id": msg.id})
    if isinstance(msg, SyncAck):
        return _line({"type": "sync-ack", "id": msg.id})
    raise LocalProtocolError(f"cannot encode {type(msg).__name__}")


# --- decoding -------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise RemoteProtocolError(f"non-finite number {name}")


def _int(obj: dict, key: str, low: int = 0, high: int = U64_MAX, default: Any = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise RemoteProtocolError(f"missing field {key!r}")
    return _check_int(value, key, low, high)


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise RemoteProtocolError(f"field {what!r} is not an integer")
    if not low <= value <= high:
        raise RemoteProtocolError(f"field {what!r} = {value} outside {low}..{high}")
    return value


def _text(obj: dict, key: str, default: str = "") -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"field {key!r} is not a string")
    return value[:_TEXT_MAX]


def _version(obj: dict) -> tuple[int, int]:
    v = obj.get("version")
    if not isinstance(v, list) or len(v) < 2:
        raise RemoteProtocolError("field 'version' is not [major, minor]")
    return _check_int(v[0], "version", 0, 0xFFFF), _check_int(v[1], "version", 0, 0xFFFF)


def _features(obj: dict) -> Feature:
    # unknown feature bits are ignored, not refused
    return Feature(_int(obj, "features", default=0) & FEATURE_MASK)


def _table_header(obj: dict) -> tuple[int, int, int, list]:
    nr = _int(obj, "nr_vcpus", 1, MAX_VCPUS)
    part = obj.get("part", [0, 1])
    if not isinstance(part, list) or len(part) < 2:
        raise RemoteProtocolError("field 'part' is not [index, count]")
    parts = _check_int(part[1], "part", 1, MAX_VCPUS)
    index = _check_int(part[0], "part", 0, parts - 1)
    vcpus = obj.get("vcpus")
    if not isinstance(vcpus, list) or len(vcpus) > nr:
        raise RemoteProtocolError("field 'vcpus' is not a list of at most nr_vcpus entries")
    return nr, index, parts, vcpus


def _entries(vcpus: list, nr: int, width: int) -> list[list[int]]:
    """Rows of integers of any size: each field's decoder clamps or rejects."""
    seen = set()
    rows = []
    for entry in vcpus:
        if not isinstance(entry, list) or len(entry) < width or \
                any(type(x) is not int for x in entry[:width]):
            raise RemoteProtocolError(f"vcpus entry is not a list of {width} integers")
        row = entry[:width]
        if not 0 <= row[0] < nr:
            raise RemoteProtocolError(f"vCPU index {row[0]} outside 0..{nr - 1}")
        if row[0] in seen:
            raise RemoteProtocolError(f"vCPU {row[0]} listed twice")
        seen.add(row[0])
        rows.append(row)
    return rows


def _decode_hints(obj: dict) -> HintsPart:
    nr, index, parts, vcpus = _table_header(obj)
    rows = _entries(vcpus, nr, 7)
    for row in rows:
        _check_int(row[5], "flags", 0, U32_MAX)
    hints = tuple(make_hint(*row) for row in rows)
    return HintsPart(_int(obj, "generation"), nr, index, parts, hints)


def _decode_capacity(obj: dict) -> CapacityPart:
    nr, index, parts, vcpus = _table_header(obj)
    caps = []
    for row in _entries(vcpus, nr, 6):
        _check_int(row[4], "applied", 0, U32_MAX)
        _check_int(row[5], "acked_generation", 0, U64_MAX)
        caps.append(make_capacity(*row))
    return CapacityPart(_int(obj, "seq"), nr, index, parts, tuple(caps))


def _decode_state(obj: dict) -> PeerState:
    value = _int(obj, "state", 0, 0xFFFFFFFF)
    # a state this version does not know is never taken to mean "running"
    return PeerState(value) if value in PeerState._value2member_map_ else PeerState.ABSENT


def decode_line(line: bytes) -> Message:
    """One framed line (no newline) to a message; RemoteProtocolError for anything invalid."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except RemoteProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RemoteProtocolError(f"malformed line: {type(err).__name__}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("line is not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError("line has no string 'type'")
    if kind == "hints":
        return _decode_hints(obj)
    if kind == "capacity":
        return _decode_capacity(obj)
    if kind == "heartbeat":
        return Heartbeat(_int(obj, "seq"), _decode_state(obj), _int(obj, "epoch", default=0))
    if kind == "ack":
        return Ack(_int(obj, "generation"))
    if kind == "sync":
        return Sync(_int(obj, "id"))
    if kind == "sync-ack":
        return SyncAck(_int(obj, "id"))
    if kind == "hello":
        major, minor = _version(obj)
        return Hello(features=_features(obj), epoch=_int(obj, "epoch"),
                     nr_vcpus=_int(obj, "nr_vcpus", 1, MAX_VCPUS), major=major, minor=minor,
                     protocol=_text(obj, "protocol"))
    if kind == "welcome":
        major, minor = _version(obj)
        accepted = obj.get("accepted")
        if not isinstance(accepted, bool):
            raise RemoteProtocolError("field 'accepted' is not a boolean")
        return Welcome(accepted=accepted, features=_features(obj),
                       epoch=_int(obj, "epoch", default=0), reason=_text(obj, "reason"),
                       major=major, minor=minor, protocol=_text(obj, "protocol"))
    if kind == "error":
        return Error(_text(obj, "code"), _text(obj, "message"))
    return Unknown(kind[:64])
