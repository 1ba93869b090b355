"""The scheduler state of one thread, as the host peer reads and writes it."""

from __future__ import annotations

from dataclasses import dataclass

from guestagent.linux.procfs import format_cpulist
from guestagent.sched import POLICY_MASK, POLICY_NAMES
from guestagent.sched import PRIORITY_POLICIES as RT_POLICIES


@dataclass(frozen=True)
class ThreadSettings:
    """Policy (as sched_getscheduler returns it), RT priority, nice and affinity."""

    policy: int
    rt_priority: int
    nice: int
    affinity: frozenset[int]

    @property
    def is_rt(self) -> bool:
        return (self.policy & POLICY_MASK) in RT_POLICIES

    def describe(self) -> str:
        name = POLICY_NAMES.get(self.policy & POLICY_MASK, str(self.policy))
        level = f"{name} {self.rt_priority}" if self.is_rt else f"{name} nice {self.nice}"
        return f"{level} cpus {format_cpulist(self.affinity) or '-'}"

