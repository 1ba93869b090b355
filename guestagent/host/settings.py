"""The scheduler state of one thread, as the host peer reads and writes it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from guestagent.observe.parse import format_cpulist

# The policy bits beside the policy number (SCHED_RESET_ON_FORK) survive a restore.
POLICY_MASK = 0xFF
RT_POLICIES = frozenset({os.SCHED_FIFO, os.SCHED_RR})
POLICY_NAMES = {
    os.SCHED_OTHER: "other",
    os.SCHED_FIFO: "fifo",
    os.SCHED_RR: "rr",
    os.SCHED_BATCH: "batch",
    os.SCHED_IDLE: "idle",
    6: "deadline",
}


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

