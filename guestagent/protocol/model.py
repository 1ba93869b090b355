"""What the guest and the host say to each other, independent of encoding.

These values are the protocol's semantics (docs/protocol.md, "Semantics").
The region and channel codecs encode exactly these; the policy produces
VcpuHint, the host peer produces VcpuCapacity. Numbers are part of the wire
format: never renumber, only add.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from guestagent.sched import NICE_MAX, NICE_MIN, RT_PRIORITY_MAX

__all__ = [
    "CAPACITY_MAX", "GROUP_MAX", "HEARTBEAT_PERIOD", "MAX_VCPUS", "NICE_MAX", "NICE_MIN",
    "PROTOCOL_NAME", "RT_PRIORITY_MAX", "STALE_AFTER", "VERSION_MAJOR", "VERSION_MINOR",
    "AppliedFlag", "Feature", "HintFlag", "PeerState", "Request", "SchedClass", "VcpuCapacity",
    "VcpuHint", "make_capacity", "make_hint", "neutral_hints",
]

PROTOCOL_NAME = "org.guestagent.sched"
VERSION_MAJOR = 1
VERSION_MINOR = 1  # 1.1: heartbeats carry the epoch; the rules of docs/protocol.md 1.1

CAPACITY_MAX = 1024  # a vCPU with a physical CPU all to itself
GROUP_MAX = 0xFFFF  # co-location groups are u16; 0 means "no group"
PCPU_MAX = 0x7FFFFFFF  # physical CPU numbers are i32; -1 means "unknown"


class SchedClass(enum.IntEnum):
    """Scheduling class a vCPU's work needs; values are Linux SCHED_* numbers."""

    OTHER = 0
    FIFO = 1
    RR = 2
    BATCH = 3
    IDLE = 5
    DEADLINE = 6


class Request(enum.IntEnum):
    """What the guest asks the host to do with a vCPU."""

    NEUTRAL = 0  # treat like any other thread
    BOOST = 1  # its work needs the priority given in the hint
    UNBOOST = 2  # only low-priority work runs here: let host work compete


class HintFlag(enum.IntFlag):
    """Why a vCPU matters; informational for the host, shown by both CLIs."""

    NONE = 0
    CRITICAL_IRQ = 1 << 0  # serves an interrupt the guest marked critical
    PINNED_CRITICAL = 1 << 1  # runs critical work pinned to exactly this vCPU
    LATENCY_SLEEPER = 1 << 2  # runs latency-sensitive tasks that mostly sleep
    IDLE = 1 << 3  # nothing runnable of note


class AppliedFlag(enum.IntFlag):
    """What the host actually did with the vCPU thread."""

    NONE = 0
    BOOSTED = 1 << 0  # raised to an RT policy or a lower nice
    THROTTLED = 1 << 1  # lowered (unboost honoured)
    DENIED = 1 << 2  # request refused by host limits
    CLAMPED = 1 << 3  # granted at less than asked
    PINNED = 1 << 4  # affinity set for co-location avoidance
    COLOCATED = 1 << 5  # co-location avoidance could not be satisfied
    BUDGET_SPENT = 1 << 6  # boost budget spent: unboosted (with DENIED) until earned back


class Feature(enum.IntFlag):
    """Optional protocol features, negotiated: the session uses the AND of both sides."""

    NONE = 0
    CAPACITY = 1 << 0  # host publishes per-vCPU capacity
    COLOCATION = 1 << 1  # host honours co-location groups
    NICE_HINTS = 1 << 2  # host applies nice levels for OTHER-class hints
    DEADLINE_HINTS = 1 << 3  # guest may ask for SCHED_DEADLINE-like treatment


class PeerState(enum.IntEnum):
    """Lifecycle state each side publishes about itself."""

    ABSENT = 0  # never written
    STARTING = 1
    RUNNING = 2
    STOPPING = 3  # orderly exit: treat all hints as neutral


@dataclass(frozen=True)
class VcpuHint:
    """Guest to host, one per vCPU."""

    vcpu: int
    request: Request = Request.NEUTRAL
    sched_class: SchedClass = SchedClass.OTHER
    rt_priority: int = 0  # 1..99 for FIFO/RR/DEADLINE, else 0
    nice: int = 0  # -20..19, meaningful for OTHER/BATCH/IDLE
    flags: HintFlag = HintFlag.NONE
    group: int = 0  # co-location group; 0 = none


@dataclass(frozen=True)
class VcpuCapacity:
    """Host to guest, one per vCPU."""

    vcpu: int
    capacity: int = CAPACITY_MAX  # 0..1024
    pcpu: int = -1  # physical CPU last run on; -1 unknown
    host_load: int = -1  # 0..1024 load of that physical CPU from others; -1 unknown
    applied: AppliedFlag = AppliedFlag.NONE
    acked_generation: int = 0  # guest hint generation this reflects


def neutral_hints(nr_vcpus: int) -> tuple[VcpuHint, ...]:
    """What a guest publishes when it has nothing to say (or is stopping)."""
    return tuple(VcpuHint(vcpu=i) for i in range(nr_vcpus))


# --- limits and validation shared by both encodings (docs/protocol.md, "Validation") ---

MAX_VCPUS = 4096  # largest nr_vcpus either encoding accepts
HEARTBEAT_PERIOD = 1.0  # seconds between heartbeats a writer should keep
STALE_AFTER = 5.0  # reader-side: no heartbeat change for this long means the peer is stale
HINT_FLAG_MASK = int(HintFlag.CRITICAL_IRQ | HintFlag.PINNED_CRITICAL
                     | HintFlag.LATENCY_SLEEPER | HintFlag.IDLE)
APPLIED_FLAG_MASK = int(AppliedFlag.BOOSTED | AppliedFlag.THROTTLED | AppliedFlag.DENIED
                        | AppliedFlag.CLAMPED | AppliedFlag.PINNED | AppliedFlag.COLOCATED
                        | AppliedFlag.BUDGET_SPENT)
FEATURE_MASK = int(Feature.CAPACITY | Feature.COLOCATION | Feature.NICE_HINTS
                   | Feature.DEADLINE_HINTS)


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


def make_hint(vcpu: int, request: int, sched_class: int, rt_priority: int, nice: int,
              flags: int, group: int) -> VcpuHint:
    """Build a hint from raw wire integers, applying the decode rules.

    Unknown request -> NEUTRAL (a v1 host must not boost for a request it does
    not understand); unknown class -> OTHER; unknown flag bits dropped;
    rt_priority clamped to 0..99, nice to -20..19, group to 0..0xFFFF.
    """
    req = Request(request) if request in Request._value2member_map_ else Request.NEUTRAL
    cls = (SchedClass(sched_class) if sched_class in SchedClass._value2member_map_
           else SchedClass.OTHER)
    return VcpuHint(vcpu=vcpu, request=req, sched_class=cls,
                    rt_priority=_clamp(rt_priority, 0, RT_PRIORITY_MAX),
                    nice=_clamp(nice, NICE_MIN, NICE_MAX),
                    flags=HintFlag(flags & HINT_FLAG_MASK),
                    group=_clamp(group, 0, GROUP_MAX))


def make_capacity(vcpu: int, capacity: int, pcpu: int, host_load: int, applied: int,
                  acked_generation: int) -> VcpuCapacity:
    """Build a capacity from raw wire integers, applying the decode rules.

    capacity clamped to 0..1024, host_load to -1..1024, pcpu outside -1..2**31-1
    -> -1 (unknown), unknown applied bits dropped, acked_generation below 0 -> 0
    (the channel rejects a line with one outside 0..2**64-1 before this).
    """
    return VcpuCapacity(vcpu=vcpu, capacity=_clamp(capacity, 0, CAPACITY_MAX),
                        pcpu=pcpu if -1 <= pcpu <= PCPU_MAX else -1,
                        host_load=_clamp(host_load, -1, CAPACITY_MAX),
                        applied=AppliedFlag(applied & APPLIED_FLAG_MASK),
                        acked_generation=max(acked_generation, 0))
