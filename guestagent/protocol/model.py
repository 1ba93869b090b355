"""What the guest and the host say to each other, independent of encoding.

These values are the protocol's semantics (docs/protocol.md, "Semantics").
The region and channel codecs encode exactly these; the policy produces
VcpuHint, the host peer produces VcpuCapacity. Numbers are part of the wire
format: never renumber, only add.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PROTOCOL_NAME = "org.guestagent.sched"
VERSION_MAJOR = 1
VERSION_MINOR = 0

CAPACITY_MAX = 1024  # a vCPU with a physical CPU all to itself
RT_PRIORITY_MAX = 99
NICE_MIN, NICE_MAX = -20, 19
GROUP_MAX = 0xFFFF  # co-location groups are u16; 0 means "no group"


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
