"""Host limits: what the peer may grant a guest, from a strict TOML file.

Every key is optional; an unknown key, a wrong type or a value out of range
is an error naming the file and line, so a typo never silently widens a limit.
SCHEMA lists the keys as the guest's config does, and the same machinery
(guestagent.linux.schema) checks both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from guestagent.linux.schema import KeyLines, KeySpec, check_table, parse_document, read_text
from guestagent.protocol.model import CAPACITY_MAX
from guestagent.sched import NICE_MAX, NICE_MIN, RT_PRIORITY_MAX, SCHED_FIFO, SCHED_RR

POLICY_BY_NAME = {"fifo": SCHED_FIFO, "rr": SCHED_RR}  # the RT policies a host may grant


@dataclass(frozen=True)
class HostLimits:
    """Limits on what one VM's guest may obtain; defaults suit a shared host."""

    max_rt_priority: int = 40  # below threaded IRQs (FIFO 50), so host interrupts still run
    rt_policies: tuple[int, ...] = (SCHED_FIFO, SCHED_RR)  # empty: no RT at all
    max_boosted: int = 2  # vCPUs of this VM boosted at once
    heartbeat_period: float = 1.0  # seconds between the guest's heartbeats
    lease_periods: float = 1.5  # a boost lasts this many heartbeat periods unless renewed
    pin_cpus: frozenset[int] | None = None  # None: the CPUs the peer may run on
    colocation: bool = True  # honour co-location groups by pinning
    honour_nice: bool = True  # apply nice levels from OTHER-class hints
    nice_floor: int = -10  # the most favourable nice granted
    honour_unboost: bool = True
    unboost_nice: int = 10  # nice for an unboost hint that names none
    min_change_interval: float = 0.1  # seconds between changes to one vCPU (flood limit)
    capacity_period: float = 1.0  # seconds between capacity publications
    contend: Mapping[int, int] = field(default_factory=dict)  # vCPU -> reported capacity

    @property
    def lease(self) -> float:
        return self.heartbeat_period * self.lease_periods


SCHEMA: tuple[KeySpec, ...] = (
    KeySpec("", "max_rt_priority", "int", 40,
            "The highest RT priority granted; a request above it is granted at this value "
            "and reported CLAMPED. Below threaded IRQs (FIFO 50), so host interrupts still run.",
            1, RT_PRIORITY_MAX),
    KeySpec("", "rt_policies", "list[choice]", ["fifo", "rr"],
            "RT policies the peer may grant; a request for another gets the first listed, "
            "CLAMPED. []: no RT at all.", choices=tuple(POLICY_BY_NAME)),
    KeySpec("", "max_boosted", "int", 2,
            "vCPUs of this VM boosted at once; beyond it the lowest requests are DENIED.", 0),
    KeySpec("", "heartbeat_period", "float", 1.0,
            "Seconds between the guest's heartbeats.", 0.01, 3600),
    # Above 2 a silent guest could hold a vCPU at RT past the promised revert.
    KeySpec("", "lease_periods", "float", 1.5,
            "A boost lasts this many heartbeat periods after the last heartbeat.",
            maximum=2, exclusive_minimum=0),
    KeySpec("", "pin_cpus", "list[int]", None,
            "Physical CPUs the peer may pin vCPU threads to for co-location avoidance "
            "(default: the CPUs the peer may run on).", 0, 4095),
    KeySpec("", "colocation", "bool", True, "Honour co-location groups by pinning."),
    KeySpec("", "honour_nice", "bool", True, "Apply nice levels from OTHER-class hints."),
    KeySpec("", "nice_floor", "int", -10, "The most favourable nice level granted.",
            NICE_MIN, NICE_MAX),
    KeySpec("", "honour_unboost", "bool", True,
            "Honour UNBOOST: raise the nice level of vCPUs that only run low-priority work."),
    KeySpec("", "unboost_nice", "int", 10,
            "Nice level for an UNBOOST hint that names no positive nice.", NICE_MIN, NICE_MAX),
    KeySpec("", "min_change_interval", "float", 0.1,
            "Seconds between two changes to one vCPU thread (flood limit).", 0, 60),
    KeySpec("", "capacity_period", "float", 1.0,
            "Seconds between capacity publications.", 0.01, 3600),
    KeySpec("", "contend", "table[int]", {},
            "vCPU = capacity to report whatever the host load, as --contend.", 0, CAPACITY_MAX),
)

# How a checked TOML value becomes a HostLimits field, where the two differ.
AS_FIELD = {
    "rt_policies": lambda names: tuple(dict.fromkeys(POLICY_BY_NAME[n] for n in names)),
    "pin_cpus": frozenset,
}


def limits_from(doc: Mapping[str, Any], path: str, lines: KeyLines,
                tables: frozenset[str] = frozenset()) -> HostLimits:
    """HostLimits from a parsed document's top-level keys; keys in `tables` belong to
    another reader (the service's [host] table) and are skipped here."""
    own = {key: value for key, value in doc.items() if key not in tables}
    values = check_table(SCHEMA, "", own, path, lines)
    return replace(HostLimits(), **{key: AS_FIELD[key](value) if key in AS_FIELD else value
                                    for key, value in values.items()})


def parse_limits(text: str, path: str = "<config>") -> HostLimits:
    """Parse a host config file's text; errors name path:line."""
    return limits_from(parse_document(text, path), path, KeyLines(text))


def load_limits(path: str | None) -> HostLimits:
    if path is None:
        return HostLimits()
    return parse_limits(read_text(path), path)
