"""Opt-in steering: move latency tasks onto the vCPUs the host serves best.

Pure functions: snapshot + config + capacity + state + time -> affinity moves.
The daemon applies the moves with sched_setaffinity and, on exit, puts every
steered task back on the CPUs it had. Steering never changes a task's policy
or priority and never touches IRQ affinity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from guestagent.agent.config import Config, Rule, first_rule
from guestagent.protocol.model import CAPACITY_MAX, Request, VcpuHint


@dataclass(frozen=True)
class Steered:
    """A task the agent has moved: what it had, what it was given, when."""

    tid: int
    original: frozenset[int]  # the affinity the task had before the agent touched it
    applied: frozenset[int]  # the affinity the agent set last
    at: float


@dataclass(frozen=True)
class Move:
    tid: int
    comm: str
    affinity: frozenset[int]  # the new affinity
    reason: str


@dataclass(frozen=True)
class SteerState:
    steered: Mapping[int, Steered] = field(default_factory=dict)


def capacity_from_steal(steal: Mapping[int, float], online: frozenset[int]) -> dict[int, int]:
    """Estimate capacity when the host publishes none: what steal time leaves."""
    return {cpu: round(CAPACITY_MAX * (1.0 - min(1.0, max(0.0, steal.get(cpu, 0.0)))))
            for cpu in online}


def fenced_cpus(cpus) -> frozenset[int]:
    """CPUs the admin set apart: isolcpus, nohz_full, isolated cpuset partitions."""
    return cpus.isolated | cpus.nohz_full | cpus.partitions


def allowed_cpus(original: frozenset[int], cpus, rule: Rule) -> frozenset[int]:
    """Where a task may be steered: within what it was allowed, online, not fenced off."""
    allowed = original & cpus.online
    if not rule.allow_isolated:
        allowed -= fenced_cpus(cpus)
    return allowed


def best_cpus(allowed: frozenset[int], capacity: Mapping[int, int],
              hysteresis: int) -> frozenset[int]:
    """The allowed vCPUs within `hysteresis` of the best capacity among them."""
    if not allowed:
        return frozenset()
    top = max(capacity.get(c, 0) for c in allowed)
    return frozenset(c for c in allowed if capacity.get(c, 0) >= top - hysteresis)


def plan(snapshot, config: Config, capacity: Mapping[int, int] | None,
         state: SteerState, now: float) -> tuple[list[Move], SteerState]:
    """The affinity changes to make now, and the state after they are made.

    A task is moved when its current CPUs are all worse than the best allowed
    vCPU by more than the hysteresis, and it has stayed at least the minimum
    dwell time since its last move. A task whose affinity someone else changed
    since the agent set it is adopted afresh: the agent never undoes an
    admin's change.
    """
    steering = config.steering
    if capacity is None:
        capacity = capacity_from_steal(snapshot.cpus.steal, snapshot.cpus.online)
    hysteresis, dwell = steering["hysteresis"], steering["min_dwell_ms"] / 1000.0
    moves: list[Move] = []
    steered: dict[int, Steered] = {}
    for thread in snapshot.threads:
        record = state.steered.get(thread.tid)
        if record is not None and thread.affinity != record.applied:
            record = None  # changed behind our back: the new affinity is the task's own
        rule = first_rule(config.rules, thread) if steering["enabled"] else None
        if rule is not None and not rule.steer:
            rule = None
        if rule is None:
            if record is not None:  # steering ended for it (config reload): put it back
                moves.append(Move(thread.tid, thread.comm, record.original,
                                  "steering ended: original affinity restored"))
            continue
        original = record.original if record else thread.affinity
        allowed = allowed_cpus(original, snapshot.cpus, rule)
        target = best_cpus(allowed, capacity, hysteresis)
        current = thread.affinity & allowed
        settled = record is not None and now - record.at < dwell
        good_enough = bool(current) and current <= allowed and min(
            capacity.get(c, 0) for c in current) >= max(
            (capacity.get(c, 0) for c in allowed), default=0) - hysteresis
        if not target or target == thread.affinity or settled or good_enough:
            if record is not None:
                steered[thread.tid] = record
            continue
        caps = ", ".join(f"{c}:{capacity.get(c, 0)}" for c in sorted(target))
        moves.append(Move(thread.tid, thread.comm, target,
                          f"rule {rule.name}: capacity {caps}"))
        steered[thread.tid] = Steered(thread.tid, original, target, now)
    return moves, SteerState(steered)


def own_cpus(original: frozenset[int], hints: Sequence[VcpuHint],
             online: frozenset[int]) -> frozenset[int]:
    """Where the agent's own threads run: where they were allowed to at start, less the
    vCPUs it asks the host to serve less. Its heartbeats keep the host's lease on every
    boost; from a throttled vCPU they come late (seconds under TCG), and a lapsed lease
    drops the boosts the latency work needs. Unchanged if that leaves nothing."""
    lowered = {h.vcpu for h in hints if h.request == Request.UNBOOST}
    keep = (original & online) - lowered
    return keep or original


def restores(state: SteerState) -> list[tuple[int, frozenset[int]]]:
    """(tid, original affinity) for every steered task: what to put back on exit."""
    return [(s.tid, s.original) for s in state.steered.values()]
