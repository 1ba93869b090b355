"""The host-wide arbiter (pure): which boosts every VM's plans may keep, under caps and budgets.

Each VM's peer decides on its own what its guest may have (decide.py: clamps,
the VM's own cap, lease, flood limit). Limits that must hold across VMs are
decided here, over every VM's requests at once:

- at most `per_cpu` boosted threads per physical CPU: a set of boosted threads is
  admitted only if each can be given a slot on a CPU its affinity allows (a
  matching), so RT threads never have to stack on one CPU;
- at most `host` boosted threads on the host, and at most `per_vm` vCPUs of one VM;
- a boost budget per thread, a token bucket: every thread earns `share` seconds of
  budget per second of wall time, up to `budget`, and a boosted thread spends it by
  running (RT run time, so a boosted vCPU that mostly sleeps spends little). When it
  is spent the thread is returned to its normal settings until the budget is full
  again. Over any span T a thread runs at RT at most share * T + budget, whatever it
  does: at the default share of 1/2 a spinner gets half a CPU, as under pvsched v3's
  rule (spend while boosted, earn back 1:1 only while unboosted), while a thread
  that runs a share f <= 1/2 of the time keeps its boost, where pvsched v3 would
  hold it to f/(1+f).

Grants held stay ahead of new requests (no VM can take a slot by asking louder),
then higher RT priority first. A VM's emulator (main-loop) thread and its
iothreads are companions: admitted right behind its VM's first granted vCPU
(under TCG a vCPU boosted without the main loop gains nothing), inside the same
caps and each with its own budget, and not counted in the VM's share. Nothing here reads a clock or the kernel: run times and `now` are
passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from guestagent.host.undo import EMULATOR, thread_label  # noqa: F401 - EMULATOR re-exported

NS = 1_000_000_000


@dataclass(frozen=True)
class ArbiterLimits:
    """Host-wide limits; None means derived from the host's CPUs (see resolved())."""

    per_cpu: int = 1  # boosted threads per physical CPU
    host: int | None = None  # boosted threads on the host; None: one per CPU (times per_cpu)
    per_vm: int | None = None  # boosted vCPUs of one VM; None: half the host's, at least 1
    budget: float = 0.5  # seconds of boosted run time a thread may bank
    share: float = 0.5  # seconds of budget earned per second of wall time: the RT share
    min_slice: float = 0.01  # never wake more often than this to account a budget

    def resolved(self, pcpus: frozenset[int]) -> ArbiterLimits:
        host = self.host if self.host is not None else max(1, len(pcpus)) * self.per_cpu
        per_vm = self.per_vm if self.per_vm is not None else max(1, host // 2)
        return replace(self, host=host, per_vm=per_vm)


@dataclass(frozen=True, order=True)
class ThreadKey:
    """A thread the arbiter accounts: a VM's vCPU index (>= 0), or a companion (< 0): the
    emulator thread (EMULATOR) or an iothread."""

    vm: str
    index: int

    def describe(self) -> str:
        return f"{self.vm} " + (thread_label(self.index) if self.index < 0
                                else f"vCPU {self.index}")


@dataclass(frozen=True)
class BoostRequest:
    """A thread whose VM's plan would boost it this round."""

    key: ThreadKey
    priority: int  # RT priority it would get (0 for a nice-level boost): higher wins
    cpus: frozenset[int]  # CPUs it may run on (its affinity)


class Verdict(str, enum.Enum):
    GRANTED = "granted"
    SPENT = "budget spent"  # its budget is spent; back once it is earned back
    CPU_CAP = "per-CPU cap"  # no CPU its affinity allows has a free slot
    HOST_CAP = "host cap"
    VM_SHARE = "VM share"
    NO_VCPU = "no vCPU boosted"  # emulator: none of its VM's vCPUs holds a boost
    RT_TRAP = "RT cgroup trap"  # its cgroup has no RT runtime: the kernel refuses FIFO


@dataclass(frozen=True)
class Budget:
    """One thread's boost budget, as of `at`."""

    remaining: float  # seconds of boosted run time left
    at: float  # when it was last accounted
    run_ns: int | None = None  # the thread's total run time then (schedstat), if known
    boosted: bool = False  # boosted since `at`: spending, not earning
    spent: bool = False  # ran out; withheld until full again
    exhaustions: int = 0  # how often it ran out (for metrics)
    boosted_seconds: float = 0.0  # boosted wall time, all told (for metrics)


def fresh_budget(limits: ArbiterLimits, now: float, run_ns: int | None = None) -> Budget:
    return Budget(limits.budget, now, run_ns)


def account(b: Budget, run_ns: int | None, now: float, limits: ArbiterLimits) -> Budget:
    """Earn `share` of the wall time since `at`; spend what the thread ran if boosted."""
    elapsed = max(0.0, now - b.at)
    remaining = b.remaining + limits.share * elapsed
    boosted_seconds = b.boosted_seconds
    if b.boosted:
        if run_ns is not None and b.run_ns is not None:
            ran = max(0, run_ns - b.run_ns) / NS
        else:
            ran = elapsed  # run time unknown: assume it ran all the time (the safe side)
        remaining -= ran
        boosted_seconds += elapsed
    remaining = min(limits.budget, remaining)
    spent, exhaustions = b.spent, b.exhaustions
    if remaining <= 0:
        remaining = 0.0
        if not spent:
            spent, exhaustions = True, exhaustions + 1
    elif spent and remaining >= limits.budget:
        spent = False
    return Budget(remaining, now, run_ns, b.boosted, spent, exhaustions, boosted_seconds)


def _slots(pcpus: frozenset[int], per_cpu: int) -> list[tuple[int, int]]:
    return [(cpu, n) for cpu in sorted(pcpus) for n in range(per_cpu)]


class _Placement:
    """Boosted threads matched to CPU slots (augmenting paths; the sets are small)."""

    def __init__(self, pcpus: frozenset[int], per_cpu: int) -> None:
        self.pcpus = pcpus
        self.slots = _slots(pcpus, per_cpu)
        self.owner: dict[tuple[int, int], ThreadKey] = {}
        self.cpus: dict[ThreadKey, frozenset[int]] = {}

    def _augment(self, key: ThreadKey, seen: set[tuple[int, int]]) -> bool:
        for slot in self.slots:
            if slot[0] not in self.cpus[key] or slot in seen:
                continue
            seen.add(slot)
            holder = self.owner.get(slot)
            if holder is None or self._augment(holder, seen):
                self.owner[slot] = key
                return True
        return False

    def try_add(self, key: ThreadKey, cpus: frozenset[int]) -> bool:
        self.cpus[key] = cpus & self.pcpus
        before = dict(self.owner)
        if self._augment(key, set()):
            return True
        self.owner = before
        del self.cpus[key]
        return False

    def assignment(self) -> dict[ThreadKey, int]:
        return {key: slot[0] for slot, key in self.owner.items()}


@dataclass(frozen=True)
class Arbitration:
    verdicts: Mapping[ThreadKey, Verdict]
    cpus: Mapping[ThreadKey, int]  # a CPU each granted thread can have a slot on
    budgets: Mapping[ThreadKey, Budget]  # accounted to `now`, `boosted` as granted
    next_deadline: float | None  # when a budget runs out or is earned back

    def granted(self, key: ThreadKey) -> bool:
        return self.verdicts.get(key) == Verdict.GRANTED


def arbitrate(requests: Sequence[BoostRequest], held: Iterable[ThreadKey],
              budgets: Mapping[ThreadKey, Budget], run_ns: Mapping[ThreadKey, int],
              pcpus: frozenset[int], limits: ArbiterLimits, now: float) -> Arbitration:
    """Verdicts for this round's requests.

    held: threads granted last round (they keep their place while still asked for);
    budgets: every known thread's budget as last returned (threads not in it start full);
    run_ns: each thread's total run time now, from /proc/PID/task/TID/schedstat;
    pcpus: the host's CPUs boosts may use.
    """
    limits = limits.resolved(pcpus)
    held = frozenset(held)
    asked: dict[ThreadKey, BoostRequest] = {}
    for r in requests:  # one request per thread: the first stands
        asked.setdefault(r.key, r)
    accounted: dict[ThreadKey, Budget] = {}
    for key in set(budgets) | set(asked):
        old = budgets.get(key) or fresh_budget(limits, now, run_ns.get(key))
        accounted[key] = account(old, run_ns.get(key), now, limits)

    def order(r: BoostRequest) -> tuple:
        return (r.key not in held, -r.priority, r.key)

    verdicts: dict[ThreadKey, Verdict] = {}
    placement = _Placement(pcpus, limits.per_cpu)
    per_vm: dict[str, int] = {}
    total = 0
    vcpus = sorted((r for r in asked.values() if r.key.index >= 0), key=order)
    companions: dict[str, list[BoostRequest]] = {}  # per VM: emulator first, then iothreads
    for r in sorted((r for r in asked.values() if r.key.index < 0), key=lambda r: -r.key.index):
        companions.setdefault(r.key.vm, []).append(r)

    def admit(r: BoostRequest) -> Verdict:
        key = r.key
        if accounted[key].spent:
            return Verdict.SPENT
        if key.index >= 0 and per_vm.get(key.vm, 0) >= limits.per_vm:
            return Verdict.VM_SHARE
        if total >= limits.host:
            return Verdict.HOST_CAP
        if not placement.try_add(key, r.cpus):
            return Verdict.CPU_CAP
        return Verdict.GRANTED

    for r in vcpus:
        verdicts[r.key] = admit(r)
        if verdicts[r.key] != Verdict.GRANTED:
            continue
        total += 1
        per_vm[r.key.vm] = per_vm.get(r.key.vm, 0) + 1
        for c in companions.get(r.key.vm, ()):
            if c.key in verdicts:
                continue
            # Right behind its VM's first vCPU: under TCG a vCPU boosted without the main
            # loop buys nothing, so the group goes ahead of other VMs' vCPUs.
            verdicts[c.key] = admit(c)
            total += verdicts[c.key] == Verdict.GRANTED
    for group in companions.values():
        for c in group:
            if c.key not in verdicts:
                verdicts[c.key] = Verdict.SPENT if accounted[c.key].spent else Verdict.NO_VCPU

    out: dict[ThreadKey, Budget] = {}
    deadlines: list[float] = []
    for key, b in accounted.items():
        boosted = verdicts.get(key) == Verdict.GRANTED
        b = replace(b, boosted=boosted)
        out[key] = b
        if boosted and limits.share < 1:  # running flat out, this is when it would run dry
            deadlines.append(now + max(b.remaining / (1 - limits.share), limits.min_slice))
        elif b.spent and key in asked:
            deadlines.append(now + max((limits.budget - b.remaining) / limits.share,
                                       limits.min_slice))
    return Arbitration(verdicts, placement.assignment(), out,
                       min(deadlines) if deadlines else None)


def forget_vm(budgets: Mapping[ThreadKey, Budget], vm: str) -> dict[ThreadKey, Budget]:
    """Budgets without a VM that went away."""
    return {k: b for k, b in budgets.items() if k.vm != vm}

