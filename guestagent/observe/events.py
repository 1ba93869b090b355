"""Process events from the netlink proc connector, decoded from raw bytes.

kernel.ProcEventSource subscribes; the datagrams are decoded here with struct
because that is faster than a generic netlink marshal, and
because a comm that is not UTF-8 (legal: comm is arbitrary bytes) must not
raise. Anything malformed is counted and skipped, never raised.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from guestagent.observe.parse import decode_comm

# include/uapi/linux/cn_proc.h
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_COMM = 0x200
PROC_EVENT_EXIT = 0x80000000

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLMSG_LEN_TYPE = struct.Struct("=IH")  # the two nlmsghdr fields the decoder needs
_CN_MSG = struct.Struct("=IIIIHH")  # cn_msg: idx, val, seq, ack, len, flags
_EV_HEAD = struct.Struct("=IIQ")  # proc_event: what, cpu, timestamp_ns
_EV_WHAT_STAMP = struct.Struct("=I4xQ")  # proc_event: what, (cpu), timestamp_ns
_PAIR = struct.Struct("=II")
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_COMM = struct.Struct("=II16s")
_NLMSG_ERROR = 2
_NLMSG_OVERRUN = 4
_DATA_OFFSET = _NLMSG.size + _CN_MSG.size + _EV_HEAD.size


@dataclass  # not frozen: every task of the machine costs one per fork and exit, and a
class ProcEvent:  # frozen dataclass is built 5 times slower; nothing changes them
    """A thread appeared (fork), replaced its image (exec), renamed (comm) or left (exit)."""

    kind: str  # "fork" | "exec" | "comm" | "exit"
    tid: int
    tgid: int
    parent_tid: int = 0  # fork only: the thread that created it
    comm: str | None = None  # comm only
    timestamp_ns: int = 0  # CLOCK_MONOTONIC (ktime_get_ns) when the kernel sent it; 0 unknown


def parse_proc_events(data: bytes | bytearray, end: int | None = None
                      ) -> tuple[list[ProcEvent], int]:
    """Decode one datagram (the first ``end`` bytes of ``data``, a reused buffer, when
    given); returns (events, malformed messages skipped)."""
    events: list[ProcEvent] = []
    bad = 0
    off = 0
    end = len(data) if end is None else min(end, len(data))
    while off + _NLMSG.size <= end:
        length, mtype = _NLMSG_LEN_TYPE.unpack_from(data, off)
        if length < _NLMSG.size or off + length > end:
            return events, bad + 1
        if mtype in (_NLMSG_ERROR, _NLMSG_OVERRUN):
            bad += 1
        elif length >= _DATA_OFFSET:
            event = _decode_one(data, off, length)
            if event is False:
                bad += 1
            elif event is not None:
                events.append(event)
        else:
            bad += 1
        off += (length + 3) & ~3
    return events, bad


def _decode_one(data: bytes | bytearray, off: int, length: int):
    what, stamp = _EV_WHAT_STAMP.unpack_from(data, off + _NLMSG.size + _CN_MSG.size)
    body = off + _DATA_OFFSET
    room = off + length - body
    if what == PROC_EVENT_FORK:
        if room < _FORK.size:
            return False
        ptid, _ptgid, tid, tgid = _FORK.unpack_from(data, body)
        return ProcEvent("fork", tid, tgid, ptid, None, stamp)
    if what == PROC_EVENT_COMM:
        if room < _COMM.size:
            return False
        tid, tgid, raw = _COMM.unpack_from(data, body)
        return ProcEvent("comm", tid, tgid, comm=decode_comm(raw.split(b"\0", 1)[0]))
    if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT):
        if room < _PAIR.size:
            return False
        tid, tgid = _PAIR.unpack_from(data, body)
        return ProcEvent("exec" if what == PROC_EVENT_EXEC else "exit", tid, tgid, 0, None, stamp)
    return None  # uid/gid/sid/ptrace/coredump/ack: not ours


def encode_proc_event(event: ProcEvent, seq: int = 0) -> bytes:
    """Build the datagram the kernel would send for ``event`` (tests and fuzzing)."""
    if event.kind == "fork":
        what, body = PROC_EVENT_FORK, _FORK.pack(event.parent_tid, event.parent_tid,
                                                 event.tid, event.tgid)
    elif event.kind == "comm":
        raw = (event.comm or "").encode("utf-8", "surrogateescape")[:15]
        what, body = PROC_EVENT_COMM, _COMM.pack(event.tid, event.tgid, raw)
    elif event.kind == "exec":
        what, body = PROC_EVENT_EXEC, _PAIR.pack(event.tid, event.tgid)
    elif event.kind == "exit":
        what, body = PROC_EVENT_EXIT, _PAIR.pack(event.tid, event.tgid) + bytes(16)
    else:
        raise ValueError(f"unknown event kind {event.kind!r}")
    payload = _EV_HEAD.pack(what, 0, event.timestamp_ns) + body
    cn = _CN_MSG.pack(1, 1, seq, 0, len(payload), 0)
    total = _NLMSG.size + len(cn) + len(payload)
    return _NLMSG.pack(total, 3, 0, seq, 0) + cn + payload + bytes(-total % 4)
