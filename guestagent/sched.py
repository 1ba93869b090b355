"""The scheduling vocabulary both sides share: Linux policy numbers, their names, ranges.

The numbers are the kernel's (include/uapi/linux/sched.h), spelled here once
because ``os`` has no SCHED_DEADLINE and the wire's ``SchedClass`` uses the same
values. Sets of policies hold plain ints, which ``SchedClass`` members match.
"""

from __future__ import annotations

SCHED_OTHER = 0
SCHED_FIFO = 1
SCHED_RR = 2
SCHED_BATCH = 3
SCHED_IDLE = 5
SCHED_DEADLINE = 6
# sched_getscheduler() ORs this into the policy of a thread whose children start at OTHER.
SCHED_RESET_ON_FORK = 0x40000000
POLICY_MASK = 0xFF  # the policy number without flag bits such as SCHED_RESET_ON_FORK

POLICY_NAMES = {
    SCHED_OTHER: "other",
    SCHED_FIFO: "fifo",
    SCHED_RR: "rr",
    SCHED_BATCH: "batch",
    SCHED_IDLE: "idle",
    SCHED_DEADLINE: "deadline",
}
POLICY_BY_NAME = {name: policy for policy, name in POLICY_NAMES.items()}

# Real-time policies: their threads run before every OTHER, BATCH and IDLE thread.
RT_POLICIES = frozenset({SCHED_FIFO, SCHED_RR, SCHED_DEADLINE})
# The policies whose threads carry an RT priority (sched_param.sched_priority).
PRIORITY_POLICIES = frozenset({SCHED_FIFO, SCHED_RR})

RT_PRIORITY_MIN, RT_PRIORITY_MAX = 1, 99
NICE_MIN, NICE_MAX = -20, 19
