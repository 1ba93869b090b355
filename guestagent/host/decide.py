"""The decision core (pure): guest hints + host limits + lease + time -> thread settings.

Nothing here reads a clock or the kernel: the caller passes `now`, the
threads' original settings and the previous plan, so every rule (clamping,
the boosted-vCPU cap, lease expiry, flood limiting) is testable directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from guestagent.host.colocation import assign_pcpus
from guestagent.host.config import HostLimits
from guestagent.host.settings import ThreadSettings
from guestagent.protocol.model import AppliedFlag, PeerState, Request, VcpuHint
from guestagent.sched import NICE_MAX
from guestagent.sched import RT_POLICIES as RT_CLASSES


class Lease(str, enum.Enum):
    """Whether the guest's hints are in force."""

    NONE = "none"  # never heard a running guest
    HELD = "held"  # heartbeat fresh: hints honoured
    EXPIRED = "expired"  # guest quiet or stopping: everything reverted


@dataclass(frozen=True)
class GuestInput:
    """What the link says about the guest, reduced to what decisions need."""

    state: PeerState = PeerState.ABSENT
    hints: tuple[VcpuHint, ...] = ()
    last_heard: float | None = None  # monotonic time the heartbeat last advanced


@dataclass(frozen=True)
class VcpuPlan:
    vcpu: int
    settings: ThreadSettings
    applied: AppliedFlag = AppliedFlag.NONE
    hint: VcpuHint | None = None  # the hint this reflects, if any
    changed_at: float | None = None  # when settings last changed (flood limit)


@dataclass(frozen=True)
class Plan:
    vcpus: Mapping[int, VcpuPlan]
    lease: Lease = Lease.NONE
    lease_expires: float | None = None
    rejected: int = 0  # hints for unknown vCPUs or duplicates, this round
    rate_limited: int = 0  # vCPUs whose change waits for the flood limit
    next_deadline: float | None = None  # when to decide again without new input


def initial_plan(originals: Mapping[int, ThreadSettings]) -> Plan:
    return Plan({v: VcpuPlan(v, s) for v, s in originals.items()})


def _boost(hint: VcpuHint, orig: ThreadSettings, limits: HostLimits
           ) -> tuple[ThreadSettings, AppliedFlag, tuple]:
    """Settings for a BOOST hint before the boosted-vCPU cap; rank orders grants."""
    wants_rt = hint.sched_class in RT_CLASSES
    if wants_rt and limits.rt_policies:
        flags = AppliedFlag.BOOSTED
        policy = int(hint.sched_class)
        if policy not in limits.rt_policies:  # DEADLINE, or a class the host withholds
            policy = limits.rt_policies[0]
            flags |= AppliedFlag.CLAMPED
        asked = max(1, hint.rt_priority)
        prio = min(asked, limits.max_rt_priority)
        if prio < asked:
            flags |= AppliedFlag.CLAMPED
        return replace(orig, policy=policy, rt_priority=prio), flags, (1, asked)
    if not limits.honour_nice or orig.is_rt:
        return orig, AppliedFlag.DENIED, ()
    asked = hint.nice if not wants_rt else limits.nice_floor - 1  # RT withheld: best nice
    nice = max(asked, limits.nice_floor)
    if nice >= orig.nice:
        return orig, AppliedFlag.NONE, ()  # not a boost over what the thread has
    flags = AppliedFlag.BOOSTED | (AppliedFlag.CLAMPED if nice > asked else AppliedFlag.NONE)
    return replace(orig, nice=nice), flags, (0, -asked)


def _unboost(hint: VcpuHint, orig: ThreadSettings, limits: HostLimits
             ) -> tuple[ThreadSettings, AppliedFlag]:
    # An operator's static RT setting outranks a guest's wish to lower it.
    if not limits.honour_unboost or orig.is_rt:
        return orig, AppliedFlag.DENIED
    wanted = hint.nice if hint.nice > 0 else limits.unboost_nice
    nice = max(orig.nice, min(wanted, NICE_MAX))
    if nice == orig.nice:
        return orig, AppliedFlag.NONE
    return replace(orig, nice=nice), AppliedFlag.THROTTLED


def _lease(guest: GuestInput, limits: HostLimits, previous: Plan, now: float
           ) -> tuple[Lease, float | None]:
    if guest.state == PeerState.RUNNING and guest.last_heard is not None:
        expires = guest.last_heard + limits.lease
        if now < expires:
            return Lease.HELD, expires
        return Lease.EXPIRED, expires
    return (Lease.NONE if previous.lease == Lease.NONE else Lease.EXPIRED), None


def _hints_by_vcpu(hints: Sequence[VcpuHint], known: Mapping[int, ThreadSettings]
                   ) -> tuple[dict[int, VcpuHint], int]:
    """First hint per known vCPU; unknown indices and duplicates are counted, not used."""
    out: dict[int, VcpuHint] = {}
    rejected = 0
    for hint in hints:
        if hint.vcpu in known and hint.vcpu not in out:
            out[hint.vcpu] = hint
        else:
            rejected += 1
    return out, rejected


def decide(guest: GuestInput, originals: Mapping[int, ThreadSettings], limits: HostLimits,
           pin_cpus: frozenset[int], previous: Plan, now: float) -> Plan:
    """The settings every vCPU thread should have now, and why."""
    lease, expires = _lease(guest, limits, previous, now)
    hints, rejected = _hints_by_vcpu(guest.hints, originals) if lease == Lease.HELD else ({}, 0)

    wanted: dict[int, tuple[ThreadSettings, AppliedFlag]] = {}
    ranked: list[tuple[tuple, int]] = []
    for vcpu, orig in originals.items():
        hint = hints.get(vcpu)
        request = hint.request if hint else Request.NEUTRAL
        if hint and request == Request.BOOST:
            settings, flags, rank = _boost(hint, orig, limits)
            if rank:
                ranked.append((rank, vcpu))
        elif hint and request == Request.UNBOOST:
            settings, flags = _unboost(hint, orig, limits)
        else:
            settings, flags = orig, AppliedFlag.NONE
        wanted[vcpu] = (settings, flags)
    # Over the cap: RT before nice, higher priority first, lower vCPU index on ties.
    ranked.sort(key=lambda item: (-item[0][0], -item[0][1], item[1]))
    for _, vcpu in ranked[limits.max_boosted:]:
        wanted[vcpu] = (originals[vcpu], AppliedFlag.DENIED)

    if limits.colocation and pin_cpus and hints:
        groups = {v: h.group for v, h in hints.items() if h.group}
        candidates = {v: pin_cpus & originals[v].affinity for v in groups}
        previous_pins = {v: next(iter(p.settings.affinity)) for v, p in previous.vcpus.items()
                         if p.applied & AppliedFlag.PINNED}
        pins, colocated = assign_pcpus(groups, candidates, previous_pins)
        for vcpu, pcpu in pins.items():
            settings, flags = wanted[vcpu]
            wanted[vcpu] = (replace(settings, affinity=frozenset({pcpu})),
                            flags | AppliedFlag.PINNED)
        for vcpu in colocated:
            settings, flags = wanted[vcpu]
            wanted[vcpu] = (settings, flags | AppliedFlag.COLOCATED)

    plans: dict[int, VcpuPlan] = {}
    deadlines = [expires] if lease == Lease.HELD else []
    rate_limited = 0
    for vcpu, (settings, flags) in wanted.items():
        before = previous.vcpus.get(vcpu) or VcpuPlan(vcpu, originals[vcpu])
        hint = hints.get(vcpu)
        if settings == before.settings:
            plans[vcpu] = VcpuPlan(vcpu, settings, flags, hint, before.changed_at)
            continue
        ready = (before.changed_at is None
                 or now >= before.changed_at + limits.min_change_interval)
        # Going back to the original is always allowed at once: it is the safe direction.
        if ready or settings == originals[vcpu]:
            plans[vcpu] = VcpuPlan(vcpu, settings, flags, hint, now)
        else:
            plans[vcpu] = before
            rate_limited += 1
            deadlines.append(before.changed_at + limits.min_change_interval)
    return Plan(plans, lease, expires, rejected, rate_limited,
                min(deadlines) if deadlines else None)

